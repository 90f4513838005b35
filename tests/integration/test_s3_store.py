"""The store on a real S3-compatible server (SeaweedFS on loopback, tests/s3server.py): the server's
conditional writes, the tiny pipeline byte-identical to a local store, leases, the cache, checkpoints on the
store, gc, and bad store settings refused in one line."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from dmsae.objects import Changed, Exists, ObjectClient
from dmsae.remote_store import LEASES, USED, RemoteStore, Traffic
from dmsae.store import MANIFEST, Store
from tests.s3server import BUCKET


def client(url: str) -> ObjectClient:
    return ObjectClient(url)


def data_files(store: Store | RemoteStore, stage: str, key: str) -> dict[str, bytes]:
    """Every data file of an artifact as the store holds it (a remote one read straight from the server)."""
    manifest = store.manifest(stage, key)
    if isinstance(store, RemoteStore):
        return {rel: store.client.get(f"{stage}/{key}/{rel}") for rel in manifest.files}
    return {rel: (store.artifact_dir(stage, key) / rel).read_bytes() for rel in manifest.files}


# -- the server ---------------------------------------------------------------------------------------
def test_the_server_lets_one_of_many_create_only_writers_win(s3_url):
    """The publishing protocol rests on this: of 16 racing create-only writes to one new key, one wins."""
    c = client(s3_url)

    def create(i: int) -> bool:
        try:
            c.create("race/key", str(i).encode())
            return True
        except Exists:
            return False

    with ThreadPoolExecutor(16) as pool:
        wins = sum(pool.map(create, range(16)))
    assert wins == 1
    with pytest.raises(Exists):
        c.create("race/key", b"again")


def test_the_server_refuses_a_write_if_the_object_changed(s3_url):
    """Lease take-over rests on this: a put-if-unchanged with a stale ETag fails."""
    c = client(s3_url)
    first = c.put("lease", b"v1")
    second = c.put_if_unchanged("lease", b"v2", first)
    assert c.get("lease") == b"v2" and second != first
    with pytest.raises(Changed):
        c.put_if_unchanged("lease", b"v3", first)
    assert c.get("lease") == b"v2"


def test_writes_wait_out_a_server_restart_and_a_repeated_create_finds_its_own_write(tmp_path, monkeypatch):
    """obstore repeats reads but not writes: a checkpoint sync or a lease renewal while the server restarts
    must wait for it (CI once failed a run that way). A create-only write whose answer was lost is repeated,
    finds the object, and counts as done only if the object holds exactly what it sent."""
    from tests.s3server import ACCESS_KEY, SECRET_KEY, S3Server

    server = S3Server(tmp_path / "server").start()
    try:
        c = ObjectClient(f"s3://{BUCKET}/restart", {"endpoint": server.endpoint, "access_key_id": ACCESS_KEY,
                                                     "secret_access_key": SECRET_KEY})
        tag = c.put("lease", b"v1")
        c.put("old", b"old")
        c.put("gone", b"to delete")
        c.create("theirs", b"someone else")
        (tmp_path / "upload").write_bytes(b"x" * 100_000)
        calls = {  # each of these failed in one line with the server away for 3 s before the client waited
            "put_file": lambda: c.put_file("ckpt/state", tmp_path / "upload"),
            "create": lambda: c.create("new", b"new"),
            "put_if_unchanged": lambda: c.put_if_unchanged("lease", b"v2", tag),
            "get": lambda: c.get("old"),
            "delete": lambda: c.delete("gone"),
            "list": lambda: sorted(m["path"] for m in c.list("ckpt")),
        }
        server.stop()
        restart = threading.Timer(3.0, server.start)
        restart.start()
        try:
            with ThreadPoolExecutor(len(calls)) as pool:  # all sent while the server is down
                results = dict(zip(calls, pool.map(lambda call: call(), calls.values()), strict=True))
        finally:
            restart.join()
        assert results["get"] == b"old" and results["put_if_unchanged"] not in ("", tag)
        assert c.get("ckpt/state") == b"x" * 100_000 and c.get("new") == b"new" and c.get("lease") == b"v2"
        assert not c.exists("gone") and c.exists("old")
        # the first attempt of each create below loses its answer: "mine" after landing, "theirs" before
        first_attempt = {"mine": True, "theirs": True}
        real_call = ObjectClient._call

        def lost_answer(self, path, call, landed=None):
            def attempt():
                first, first_attempt[path] = first_attempt.get(path, False), False
                if first and path == "theirs":
                    raise ConnectionResetError("connection reset by peer")
                result = call()
                if first:
                    raise ConnectionResetError("connection reset by peer")
                return result
            return real_call(self, path, attempt, landed)

        monkeypatch.setattr(ObjectClient, "_call", lost_answer)
        assert c.create("mine", b"only mine")  # repeated, found its own bytes: done
        with pytest.raises(Exists):  # repeated, found someone else's bytes: a real conflict
            c.create("theirs", b"not theirs")
        assert not any(first_attempt.values())
    finally:
        server.stop()


# -- the pipeline -------------------------------------------------------------------------------------
@pytest.fixture
def s3_run(s3_url, make_config, pipeline_runner):
    cfg = make_config(s3_url)
    Traffic.up = Traffic.down = 0
    run = pipeline_runner(cfg)
    return run, Traffic.up


def test_the_tiny_pipeline_on_s3_is_byte_identical_to_a_local_store(s3_run, pipeline_run):
    run, _ = s3_run
    assert [n.key for n in run.plan.nodes] == [n.key for n in pipeline_run.plan.nodes]  # the URL is in no key
    compared = 0
    for node in run.plan.nodes:
        assert run.computed[node.label]
        remote = data_files(run.store, node.stage, node.key)
        local = data_files(pipeline_run.store, node.stage, node.key)
        assert remote.keys() == local.keys(), node.label
        for rel in remote:
            assert remote[rel] == local[rel], f"{node.label}: {rel} differs"
            compared += 1
    assert compared >= 2 * len(run.plan.nodes)


def test_a_rerun_on_s3_computes_nothing_and_uploads_nothing(s3_run, pipeline_runner):
    run, uploaded = s3_run
    assert uploaded > 0
    Traffic.up = 0
    again = pipeline_runner(run.cfg)
    assert not any(again.computed.values())
    assert Traffic.up == 0


def test_a_second_machine_downloads_each_file_once_and_checks_it(s3_run, pipeline_runner, tmp_path, monkeypatch):
    run, _ = s3_run
    monkeypatch.setenv("DMSAE_CACHE", str(tmp_path / "other-machine"))
    Traffic.down = 0
    again = pipeline_runner(run.cfg)
    assert not any(again.computed.values())
    first = Traffic.down
    assert first > 0
    for node in run.plan.nodes:
        again.store.load(node.stage, node.key)
    assert Traffic.down == first  # read again from the cache


def test_a_corrupted_object_is_withdrawn_and_recomputed(s3_url, make_config, pipeline_runner):
    cfg = make_config(s3_url, "cycles=1", "reuse.k=[]", "interpret.enabled=false")
    run = pipeline_runner(cfg)
    node = run.plan.find("select", 0)
    store = run.store
    rel = next(iter(store.manifest("select", node.key).files))
    good = store.client.get(f"select/{node.key}/{rel}")
    store.client.put(f"select/{node.key}/{rel}", b"garbage")
    fresh = RemoteStore(s3_url, cache_dir=Path(os.environ["DMSAE_CACHE"]) / "fresh")
    from dmsae.errors import IntegrityError

    with pytest.raises(IntegrityError):
        fresh.load("select", node.key)
    assert fresh.load_intact("select", node.key) is None  # withdrawn: its manifest is gone
    assert not fresh.has("select", node.key)
    again = pipeline_runner(cfg)
    assert again.computed[node.label] and not again.computed["train[0]"]
    assert store.client.get(f"select/{node.key}/{rel}") == good


# -- leases -------------------------------------------------------------------------------------------
def test_two_processes_racing_one_key_compute_it_once(s3_url):
    store_a, store_b = RemoteStore(s3_url), RemoteStore(s3_url)
    inside, order = threading.Lock(), []

    def hold(store: RemoteStore, name: str) -> None:
        with store.lock("train", "k1"):
            assert inside.acquire(blocking=False), "two holders at once"
            order.append(name)
            time.sleep(0.5)
            inside.release()

    threads = [threading.Thread(target=hold, args=(s, n)) for s, n in ((store_a, "a"), (store_b, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(order) == ["a", "b"]
    assert not store_a.is_locked("train", "k1")


def test_a_killed_holders_lease_expires_and_a_waiter_takes_over(s3_url, monkeypatch):
    monkeypatch.setenv("DMSAE_LEASE_SECONDS", "2")
    holder = RemoteStore(s3_url).client
    holder.create(f"{LEASES}/train/k2.json", json.dumps({"holder": "dead:1", "expires": time.time() + 2}).encode())
    store = RemoteStore(s3_url)
    assert store.is_locked("train", "k2")
    start = time.monotonic()
    with store.lock("train", "k2"):
        waited = time.monotonic() - start
        assert json.loads(store.client.get(f"{LEASES}/train/k2.json"))["holder"] != "dead:1"
    assert 1.0 < waited < 10


def test_a_lease_is_renewed_while_its_holder_computes(s3_url, monkeypatch):
    monkeypatch.setenv("DMSAE_LEASE_SECONDS", "1.5")
    store, other = RemoteStore(s3_url), RemoteStore(s3_url)
    with store.lock("train", "k3"):
        time.sleep(3.5)  # more than twice the lifetime: only renewal keeps it
        assert other.is_locked("train", "k3")


# -- gc -----------------------------------------------------------------------------------------------
def test_gc_lists_unfinished_uploads_and_expired_leases_and_removes_them(s3_url):
    store = RemoteStore(s3_url)
    c = store.client
    c.put("train/orphan/sae.safetensors", b"x" * 10)  # uploaded, never published
    c.put("train/done/sae.safetensors", b"y")
    c.put(f"train/done/{MANIFEST}", b"{}")
    c.put(f"{LEASES}/train/old.json", json.dumps({"holder": "h", "expires": 1.0}).encode())
    labels = {g.label for g in store.garbage({("train", "done")})}
    assert labels == {"train/orphan (unfinished upload)", f"{LEASES}/train/old.json (expired lease)"}
    for item in store.garbage({("train", "done")}):
        assert store.remove(item)
    assert store.garbage({("train", "done")}) == []
    assert c.exists(f"train/done/{MANIFEST}")


# -- the command line ---------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["unreachable", "credentials", "no-credentials", "bucket", "scheme", "embedded"])
def test_bad_store_settings_are_refused_in_one_line_before_any_work(case, s3_env, tmp_path, make_config, monkeypatch,
                                                                   capsys):
    # in this process, its settings in the environment as a shell passes them: the refusal comes before any work,
    # and a subprocess would only add its imports (two 4-s starts a case on a slow CPU)
    from flows.cli import main

    cfg = make_config(tmp_path / "unused")
    data = json.loads(cfg.model_dump_json())
    env = dict(s3_env)
    data["store"] = f"s3://{BUCKET}/bad-input"
    if case == "unreachable":
        env["AWS_ENDPOINT_URL"] = "http://127.0.0.1:9"  # discard port: nothing listens
    elif case == "credentials":
        env["AWS_SECRET_ACCESS_KEY"] = "wrong-secret"
    elif case == "no-credentials":  # refused, rather than asking a cloud metadata service for some
        env["AWS_ACCESS_KEY_ID"] = env["AWS_SECRET_ACCESS_KEY"] = ""
    elif case == "bucket":
        data["store"] = "s3://no-such-bucket/x"
    elif case == "scheme":
        data["store"] = "ftp://host/x"
    else:
        data["store"] = f"s3://key:{env['AWS_SECRET_ACCESS_KEY']}@{BUCKET}/x"
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(data))
    for command in (["check", str(config)], ["run", str(config), "--no-progress"]):
        code = main(command)
        out, err = capsys.readouterr()
        assert code == 2, err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("dmsae: error:"), err
        assert not env["AWS_SECRET_ACCESS_KEY"] or env["AWS_SECRET_ACCESS_KEY"] not in err + out
    assert not (tmp_path / "unused").exists()
    assert not (Path(env["DMSAE_CACHE"]) / "stores").exists()  # no work began


# -- the cache ----------------------------------------------------------------------------------------
def test_a_cached_artifact_is_hashed_once_per_process(s3_run, tmp_path, monkeypatch):
    """Loading marks recency beside the manifest, not on it: a second load in the same process rehashes nothing
    (touching the manifest changed the stamp verify_files keys on, so every load rehashed the whole model)."""
    import dmsae.store

    run, _ = s3_run
    store = RemoteStore(run.store.url, cache_dir=tmp_path / "hashed")
    node = run.plan.find("harvest")
    first = store.load(node.stage, node.key)
    stamp = (first.path / MANIFEST).stat().st_mtime_ns
    hashed: list[Path] = []
    real = dmsae.store.sha256_file
    monkeypatch.setattr(dmsae.store, "sha256_file", lambda f: hashed.append(f) or real(f))
    again = store.load(node.stage, node.key)
    assert again.path == first.path and (again.path / MANIFEST).stat().st_mtime_ns == stamp
    assert hashed == [] and (again.path / USED).is_file()


def test_the_cache_is_bounded_and_safe_to_delete(s3_run, tmp_path):
    import shutil

    run, _ = s3_run
    cache = tmp_path / "bounded"
    store = RemoteStore(run.store.url, cache_dir=cache, cache_gb=0)  # a bound of 0 bytes: keep only what is in use
    nodes, last = run.plan.nodes[:-1], run.plan.nodes[-1]
    for node in nodes:
        store.load(node.stage, node.key)
    blobs = lambda: sum(p.stat().st_size for p in (cache / "blobs").rglob("*") if p.is_file())  # noqa: E731
    assert blobs() > 0  # copies used in the last ten minutes are never evicted
    for manifest in (cache / "stores").rglob(MANIFEST):  # an hour later
        os.utime(manifest.parent / USED, (time.time() - 3600, time.time() - 3600))
    Traffic.down = 0
    store.load(last.stage, last.key)  # a download: then everything not in use for ten minutes is evicted
    assert Traffic.down > 0
    unique = {hashlib.sha256(b).hexdigest(): len(b) for b in data_files(run.store, last.stage, last.key).values()}
    assert blobs() == sum(unique.values())
    shutil.rmtree(cache)  # deleting the cache costs downloads, nothing else
    art = RemoteStore(run.store.url, cache_dir=cache).load(nodes[0].stage, nodes[0].key)
    assert {rel: (art.path / rel).read_bytes() for rel in art.manifest.files} == data_files(
        run.store, nodes[0].stage, nodes[0].key)

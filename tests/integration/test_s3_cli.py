"""`dmsae run` on an `s3://` store through the real command line, against a real S3-compatible server on
loopback: SIGKILLed mid-harvest, mid-training and between uploading an artifact and publishing it, then run
again until it finishes; the result is byte-identical to an uninterrupted run on a local store, nothing is
written to a local store, and one more run (after every other command, gc included) computes nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dmsae.remote_store import RemoteStore
from flows.pipeline import plan

REPO = Path(__file__).resolve().parents[2]
KILLS = [("harvest:batch:3", "resuming harvest at batch 3"), ("train[0]:step:20", "resuming train[0] at step 16/"),
         ("write:select", None)]
RUN_TIMEOUT_S = 400


def dmsae(args: list[str], env: dict[str, str], cwd: Path, kill_at: str | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, **env, "PREFECT_LOGGING_LEVEL": "INFO", "PYTHONPATH": str(REPO)}
    full.pop("DMSAE_KILL_AT", None)
    if kill_at:
        full["DMSAE_KILL_AT"] = kill_at
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", *args], env=full, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture(scope="module")
def s3_cli_run(s3_server, make_config, tmp_path_factory, prefect_server):
    import uuid

    work = tmp_path_factory.mktemp("s3-cli")
    url = f"s3://dmsae/cli-{uuid.uuid4().hex[:12]}"
    cfg = make_config(url, "train.checkpoint_every=8", "retries=0", f"report_dir={work / 'reports'}")
    config = work / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    # a killed run's lease is taken over after 3 s instead of a minute
    env = {**s3_server.env(), "DMSAE_CACHE": str(work / "cache"), "DMSAE_LEASE_SECONDS": "3",
           "PREFECT_HOME": str(work / "prefect-home")}
    # each run on "another machine": a cache of its own, so a resumed stage finds its checkpoint on the store.
    # The first run is killed together with the temporary Prefect server it starts on its own (what a user without
    # a server runs); the others report to the session's server, which spares each the temporary one's start
    # (20 s on a slow CPU)
    reported = {"PREFECT_API_URL": prefect_server.api_url}
    runs = [dmsae(["run", str(config), "--no-progress"],
                  {**env, "DMSAE_CACHE": str(work / f"cache-{i}"), **(reported if i else {})}, work, kill_at)
            for i, (kill_at, _) in enumerate(KILLS)]
    runs.append(dmsae(["run", str(config), "--no-progress"], {**env, **reported}, work))
    return {"cfg": cfg, "url": url, "env": env, "work": work, "runs": runs}


def test_each_kill_killed_and_the_last_run_finished(s3_cli_run):
    codes = [r.returncode for r in s3_cli_run["runs"]]
    assert codes == [-signal.SIGKILL] * len(KILLS) + [0], s3_cli_run["runs"][-1].stderr[-3000:]


def test_the_killed_stages_resumed_and_their_manifests_say_from_where(s3_cli_run, monkeypatch):
    for i, (kill_at, message) in enumerate(KILLS):
        if message is not None:
            run = s3_cli_run["runs"][i + 1]
            assert message in run.stdout + run.stderr, f"after the kill at {kill_at}"
    for name, value in s3_cli_run["env"].items():
        monkeypatch.setenv(name, value)
    store = RemoteStore(s3_cli_run["url"])
    nodes = {n.label: n for n in plan(s3_cli_run["cfg"]).nodes}
    assert store.manifest("harvest", nodes["harvest"].key).resumed == {"batch": 3}
    assert store.manifest("train", nodes["train[0]"].key).resumed == {"step": 16}


def test_the_result_is_byte_identical_to_a_local_uninterrupted_run(s3_cli_run, pipeline_run, monkeypatch):
    for name, value in s3_cli_run["env"].items():
        monkeypatch.setenv(name, value)
    store = RemoteStore(s3_cli_run["url"])
    nodes = plan(s3_cli_run["cfg"]).nodes
    assert [n.key for n in nodes] == [n.key for n in pipeline_run.plan.nodes]
    for node in nodes:
        local = pipeline_run.store.manifest(node.stage, node.key)
        remote = store.manifest(node.stage, node.key)
        assert remote.files == local.files, node.label
        for rel, digest in remote.files.items():  # the server's bytes, not only the manifest's claim
            import hashlib

            assert hashlib.sha256(store.client.get(f"{node.stage}/{node.key}/{rel}")).hexdigest() == digest
    assert not list(store.client.list(".partial")), "checkpoints are cleared once their stage is published"


def test_nothing_was_written_to_a_local_store(s3_cli_run):
    work = s3_cli_run["work"]
    assert sorted(p.name for p in work.iterdir()) == ["cache", *(f"cache-{i}" for i in range(len(KILLS))),
                                                      "prefect-home", "reports", "tiny.yaml"]
    assert not (REPO / "artifacts" / "runs" / "tiny.json").exists()


def test_the_server_stopped_mid_run_and_started_again_the_run_finishes(make_config, pipeline_run, tmp_path,
                                                                       prefect_server):
    """Stopped while the run trains and started again 5 s later: the calls in flight retry (the client waits up to
    three minutes for a server), the run finishes, and what it published is the uninterrupted run's bytes."""
    import time

    from tests.s3server import ACCESS_KEY, SECRET_KEY, S3Server

    server = S3Server(tmp_path / "server").start()
    try:
        url = "s3://dmsae/outage"
        cfg = make_config(url, "retries=1", f"report_dir={tmp_path / 'reports'}")
        config = tmp_path / "tiny.yaml"
        config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
        # reporting to the session's Prefect server: the run does not start a temporary one of its own
        env = {**prefect_server.env, **server.env(), "DMSAE_CACHE": str(tmp_path / "cache"),
               "DMSAE_LEASE_SECONDS": "20", "PYTHONPATH": str(REPO)}
        env.pop("DMSAE_KILL_AT", None)
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(config), "--no-progress"], env=env,
                                cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + RUN_TIMEOUT_S
            store = RemoteStore(url, options={"endpoint": server.endpoint, "access_key_id": ACCESS_KEY,
                                               "secret_access_key": SECRET_KEY}, cache_dir=tmp_path / "probe-cache")
            harvest = plan(cfg).find("harvest")
            while not store.has("harvest", harvest.key):  # stop it once the harvest is published
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
                time.sleep(0.2)
            server.stop()
            time.sleep(5)
            server.start()
            out, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        assert proc.returncode == 0, out[-3000:]
        for node in plan(cfg).nodes:
            assert store.manifest(node.stage, node.key).files == pipeline_run.store.manifest(node.stage,
                                                                                           node.key).files
    finally:
        server.stop()


def test_every_command_works_on_the_s3_store(s3_cli_run, monkeypatch, prefect_server):
    """status, the run list, branch, report, cards, export and gc read (and gc cleans) the s3:// store."""
    work, url = s3_cli_run["work"], s3_cli_run["url"]
    env = {**s3_cli_run["env"], "PREFECT_API_URL": prefect_server.api_url}  # no temporary server each
    config = str(work / "tiny.yaml")

    def ok(*args: str) -> str:
        result = dmsae(list(args), env, work)
        assert result.returncode == 0, f"dmsae {' '.join(args)}: {result.stderr[-2000:]}"
        return result.stdout

    status = ok("status", config)
    assert "missing" not in status and "select[1]" in status
    assert "tiny" in ok("status", "--store", url)
    assert "tiny-branch" in ok("branch", "tiny", "--store", url, "--set", "selection.tau=0.8")
    assert "tiny-branch" in ok("status", "--store", url)
    ok("report", config)
    assert (work / "reports" / "tiny" / "summary.md").is_file()
    ok("cards", config)
    assert any((work / "reports" / "tiny").rglob("index.html"))
    ok("export", config, "--sae", "train[1]", "--out", str(work / "exported"))
    assert (work / "exported" / "cfg.json").is_file()
    listed = ok("gc", "--store", url)  # a dry run: the branch's missing stages are not garbage
    assert "nothing to remove" in listed or "would remove" in listed.lower() or listed
    for name, value in s3_cli_run["env"].items():  # the store's settings for this process (no Prefect API)
        monkeypatch.setenv(name, value)
    store = RemoteStore(url, cache_dir=work / "cache")
    store.client.put("train/orphan-upload/sae.safetensors", b"half")
    assert "orphan-upload" in ok("gc", "--store", url)
    ok("gc", "--store", url, "--yes")
    assert not store.client.exists("train/orphan-upload/sae.safetensors")
    # one more run computes nothing: the killed runs left nothing to redo, and gc removed nothing a run needs
    assert "computed 0 of" in ok("run", config, "--no-progress")

"""Issue 24 on a real cluster: a `dmsae sweep` on an `s3://` store (a real S3-compatible server on loopback) run
by a real `dask scheduler` and `dask worker` processes, each worker with its own scratch folder and read-through
cache (DMSAE_CACHE), sharing only the store URL (and the server's endpoint and keys).

- The sweep on two workers publishes exactly the bytes the same points publish run one after the other on a
  local store; both workers did work, each in its own cache, and the sweep wrote no local store.
- Both workers SIGKILLed (whole process groups) while the sweep trains: two fresh workers with fresh caches
  join, the same sweep command run again exits 0 with the same bytes, and a training killed with a checkpoint
  on the store and nothing published was finished from that checkpoint (its manifest records `resumed`).
- Two `dmsae run` processes of one config on one store (each its own cache), made to race for the same key:
  both exit 0 and each stage is computed by exactly one of them.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from dmsae.remote_store import RemoteStore
from flows.pipeline import plan
from tests.conftest import run_pipeline
from tests.prefectserver import free_port

REPO = Path(__file__).resolve().parents[2]
DASK = str(Path(sys.executable).with_name("dask"))
TAUS = ("0.5", "0.9")
GRID = ["--grid", f"selection.tau={','.join(TAUS)}"]
SWEEP = "s3dask"
# 6 epochs (a checkpoint every 8 steps) make a training last long enough (seconds) to be caught mid-way
TRAIN = ["train.checkpoint_every=8", "train.epochs=6", "retries=1", "retry_delay_seconds=1", "threads=1"]
LEASE_S = "3"  # a killed worker's lease is taken over after 3 s instead of a minute
RUN_TIMEOUT_S = 300
KILLED_SWEEP_GRACE_S = 120  # how long the sweep whose workers were killed may go on before it is stopped


# -- processes --------------------------------------------------------------------------------------
@dataclass
class Procs:
    """The processes a fixture or test starts, each in its own session (process group) with its output in
    logs/<name>.log; `kill_all` SIGKILLs every group."""

    logs: Path
    started: list[subprocess.Popen[str]] = field(default_factory=list)

    def start(self, name: str, args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
        cwd.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"{name}.log", "w") as out:
            proc = subprocess.Popen(args, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, text=True,
                                    start_new_session=True)
        self.started.append(proc)
        return proc

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def finish(self, name: str, proc: subprocess.Popen[str], timeout: float) -> tuple[int | None, str]:
        """The exit code and output; (None, output) when it ran past `timeout` and was killed."""
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill(proc)
            return None, self.log(name)
        return proc.returncode, self.log(name)

    def kill_all(self) -> None:
        kill(*reversed(self.started))


def kill(*procs: subprocess.Popen[str]) -> None:
    """SIGKILL each process's whole group (a `dask worker` is a nanny and its worker process), then reap them."""
    for proc in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)


# a Prefect home of this module's own (the API is the session's Prefect server): nothing of it mixes with the
# in-process Prefect of the test session, which other tests read back (test_sweep.py's concurrent task runs)
MODULE_PREFECT_HOME = tempfile.mkdtemp(prefix="dmsae-s3dask-prefect-")
atexit.register(shutil.rmtree, MODULE_PREFECT_HOME, True)


def process_env(s3_server, prefect_server, **extra: str) -> dict[str, str]:
    """This module's environment (its own PREFECT_HOME, telemetry off, offline), the S3 server's endpoint and
    keys, 3 s leases, the session's Prefect server as the API (so no command starts a temporary server of its
    own), and `extra`; no store or cache of the parent's. Prefect logs at INFO: a stage's own lines ("resuming
    ...", "took over an expired lease", "waiting for it") are Prefect INFO logs."""
    env = {**os.environ, **s3_server.env(), "DMSAE_LEASE_SECONDS": LEASE_S, "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1", "PREFECT_LOGGING_LEVEL": "INFO", "DO_NOT_TRACK": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_HOME": MODULE_PREFECT_HOME}
    for name in ("DMSAE_KILL_AT", "DMSAE_CACHE", "DMSAE_STORE"):
        env.pop(name, None)
    return {**env, "PREFECT_API_URL": prefect_server.api_url, **extra}


@dataclass
class Worker:
    name: str
    proc: subprocess.Popen[str]
    cache: Path  # its DMSAE_CACHE
    scratch: Path  # its working and Dask local folder


@dataclass
class Cluster:
    """A `dask scheduler` and `dask worker` processes on loopback; each worker has a cache and folder of its own."""

    root: Path
    s3_server: object
    prefect_server: object
    procs: Procs
    address: str = ""
    workers: dict[str, Worker] = field(default_factory=dict)

    def start_scheduler(self) -> None:
        port = free_port()
        self.address = f"tcp://127.0.0.1:{port}"
        self.procs.start("scheduler", [DASK, "scheduler", "--host", "127.0.0.1", "--port", str(port),
                                       "--no-dashboard"], process_env(self.s3_server, self.prefect_server),
                         self.root / "scheduler")

    def add_workers(self, *names: str) -> None:
        for name in names:
            scratch, cache = self.root / name / "scratch", self.root / name / "cache"
            proc = self.procs.start(name, [DASK, "worker", self.address, "--name", name, "--nworkers", "1",
                                           "--nthreads", "1", "--no-dashboard", "--host", "127.0.0.1",
                                           "--local-directory", str(scratch), "--death-timeout", "60"],
                                    process_env(self.s3_server, self.prefect_server, DMSAE_CACHE=str(cache)), scratch)
            self.workers[name] = Worker(name, proc, cache, scratch)
        self.wait_for(names)

    def wait_for(self, names: tuple[str, ...], timeout: float = 120) -> None:
        """Until the scheduler lists every named worker."""
        from distributed import Client

        deadline = time.monotonic() + timeout
        with Client(self.address, timeout=60) as client:
            while True:
                live = {w["name"] for w in client.scheduler_info(n_workers=-1)["workers"].values()}
                if set(names) <= live:
                    return
                gone = [n for n in names if self.workers[n].proc.poll() is not None]
                assert not gone and time.monotonic() < deadline, (
                    f"workers {sorted(set(names) - live)} did not join: " + self.procs.log(names[-1])[-3000:])
                time.sleep(0.3)

    def kill_workers(self) -> list[str]:
        """SIGKILL every live worker at once; returns their names."""
        live = [w for w in self.workers.values() if w.proc.poll() is None]
        kill(*(w.proc for w in live))
        return [w.name for w in live]

    def logs(self, tail: int = 2500) -> str:
        return "\n".join(f"--- {name}:\n{self.procs.log(name)[-tail:]}" for name in self.workers)


@pytest.fixture(scope="module")
def dask_cluster(s3_server, prefect_server, tmp_path_factory) -> Iterator[Cluster]:
    """A scheduler and two workers, worker-a and worker-b, for this module's sweeps."""
    root = tmp_path_factory.mktemp("s3dask-cluster")
    cluster = Cluster(root, s3_server, prefect_server, Procs(root / "logs"))
    try:
        cluster.start_scheduler()
        cluster.add_workers("worker-a", "worker-b")
        yield cluster
    finally:
        cluster.procs.kill_all()


# -- the store ----------------------------------------------------------------------------------------
def remote(url: str, s3_server, cache: Path) -> RemoteStore:
    """The store as a client of this process sees it (explicit endpoint and keys, a cache of its own)."""
    from tests.s3server import ACCESS_KEY, SECRET_KEY

    return RemoteStore(url, options={"endpoint": s3_server.endpoint, "access_key_id": ACCESS_KEY,
                                     "secret_access_key": SECRET_KEY}, cache_dir=cache)


def published(store: RemoteStore) -> dict[tuple[str, str], dict[str, str]]:
    """(stage, key) -> {file: sha256} of every artifact published on the store, each file's sha256 computed
    from the bytes the server returns (and checked against the manifest's record)."""
    out = {}
    for stage in store.stages():
        for key in store.keys(stage):
            if not store.has(stage, key):
                continue
            files = store.manifest(stage, key).files
            got = {rel: hashlib.sha256(store.client.get(f"{stage}/{key}/{rel}")).hexdigest() for rel in files}
            assert got == files, f"{stage}/{key}: the server's bytes are not the ones its manifest records"
            out[(stage, key)] = got
    return out


def point_configs(make_config, store: str | Path, report_dir: Path) -> list:
    """The sweep's points as plain configs (what `--grid selection.tau=...` makes of the base config)."""
    return [make_config(store, f"report_dir={report_dir}", *TRAIN, f"selection.tau={tau}") for tau in TAUS]


def planned(make_config, url: str) -> set[tuple[str, str]]:
    return {(n.stage, n.key) for cfg in point_configs(make_config, url, Path("reports")) for n in plan(cfg).nodes}


@pytest.fixture(scope="module")
def reference(make_config, tmp_path_factory, single_thread) -> dict[tuple[str, str], dict[str, str]]:
    """(stage, key) -> {file: sha256} of the sweep's points run one after the other on a local store."""
    root = tmp_path_factory.mktemp("s3dask-reference")
    out: dict[tuple[str, str], dict[str, str]] = {}
    with single_thread():
        for cfg in point_configs(make_config, root / "store", root / "reports"):
            run = run_pipeline(cfg)
            for node in run.plan.nodes:
                out[(node.stage, node.key)] = dict(run.store.manifest(node.stage, node.key).files)
    return out


def write_base(make_config, root: Path, url: str) -> Path:
    cfg = make_config(url, f"report_dir={root / 'reports'}", *TRAIN)
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return path


def sweep_env(s3_server, prefect_server, root: Path) -> dict[str, str]:
    """The sweep command's environment: a cache of its own, and Prefect at WARNING (the test default; the stages'
    own lines are read from the workers' logs)."""
    return process_env(s3_server, prefect_server, DMSAE_CACHE=str(root / "sweep-cache"),
                       PREFECT_LOGGING_LEVEL="WARNING")


def sweep_command(config: Path, address: str) -> list[str]:
    return [sys.executable, "-m", "flows.cli", "sweep", str(config), *GRID, "--name", SWEEP, "--dask-address",
            address, "--no-progress"]


def cached_artifacts(worker: Worker, url: str) -> list[Path]:
    """The artifacts of the store at `url` the worker holds in its own cache."""
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    return list((worker.cache / "stores" / bucket / prefix).glob("*/*/manifest.json"))


# -- a sweep on two workers ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def swept(dask_cluster, s3_server, make_config, tmp_path_factory):
    root = tmp_path_factory.mktemp("s3dask-sweep")
    url = f"s3://dmsae/sweep-{uuid.uuid4().hex[:12]}"
    config = write_base(make_config, root, url)
    procs = Procs(root / "logs")
    try:
        proc = procs.start("sweep", sweep_command(config, dask_cluster.address),
                           sweep_env(s3_server, dask_cluster.prefect_server, root), root / "sweep-cwd")
        code, out = procs.finish("sweep", proc, RUN_TIMEOUT_S)
    finally:
        procs.kill_all()
    cached = {name: cached_artifacts(w, url) for name, w in dask_cluster.workers.items()}
    return {"root": root, "url": url, "code": code, "out": out, "cached": cached, "logs": dask_cluster.logs()}


def test_the_sweep_on_two_workers_finishes(swept):
    assert swept["code"] == 0, swept["out"][-4000:] + "\n" + swept["logs"]
    assert f"sweep '{SWEEP}' finished" in swept["out"]
    for tau in TAUS:
        assert re.search(rf"{SWEEP}-tau{tau}\s+complete\s", swept["out"]), swept["out"][-2000:]


def test_the_sweep_publishes_the_bytes_of_sequential_local_runs(swept, s3_server, make_config, reference,
                                                                 tmp_path):
    assert swept["code"] == 0, swept["out"][-3000:]
    store = remote(swept["url"], s3_server, tmp_path / "cache")
    got = published(store)
    assert set(got) == planned(make_config, swept["url"]), "every stage of both points' plans, and nothing else"
    assert set(reference) == set(got)
    assert got == reference
    assert not list(store.client.list(".partial")), "checkpoints are cleared once their stage is published"
    record = store.read_sweep(SWEEP)
    assert record.status == "complete" and {p["run"] for p in record.points} == {f"{SWEEP}-tau{t}" for t in TAUS}
    assert all(store.read_run(p["run"]).status == "complete" for p in record.points)


def test_both_workers_did_work_each_in_its_own_cache(swept):
    assert swept["code"] == 0, swept["out"][-3000:]
    assert set(swept["cached"]) == {"worker-a", "worker-b"}
    for name, artifacts in swept["cached"].items():
        assert artifacts, f"{name}'s cache holds no artifact of the sweep's store: it ran no stage"


def test_the_sweep_wrote_no_local_store(swept):
    assert swept["code"] == 0, swept["out"][-3000:]
    assert sorted(p.name for p in (swept["root"] / "sweep-cwd").iterdir()) == [], "the sweep wrote into its cwd"
    assert sorted(p.name for p in swept["root"].iterdir()) == ["logs", "reports", "sweep-cache", "sweep-cwd",
                                                               "tiny.yaml"]
    assert not (REPO / "artifacts" / "sweeps" / f"{SWEEP}.json").exists()


# -- both workers killed mid-training --------------------------------------------------------------
def checkpoints(store: RemoteStore) -> dict[str, set[str]]:
    """Training key -> the files of its checkpoint on the store (`.partial/train/<key>/...`)."""
    out: dict[str, set[str]] = {}
    for obj in store.client.list(".partial/train"):
        _, _, key, rel = obj["path"].split("/", 3)
        out.setdefault(key, set()).add(rel)
    return out


@pytest.fixture(scope="module")
def killed(dask_cluster, s3_server, make_config, tmp_path_factory):
    """The sweep on a fresh store, both workers SIGKILLed once a cycle-1 training (one per point, both points'
    at once on the two workers) has a checkpoint on the store; then two fresh workers with fresh caches, and the
    same sweep command run again."""
    from dmsae.training import CHECKPOINT_FILE

    root = tmp_path_factory.mktemp("s3dask-kill")
    url = f"s3://dmsae/kill-{uuid.uuid4().hex[:12]}"
    config = write_base(make_config, root, url)
    probe = remote(url, s3_server, root / "probe-cache")
    cycle1 = {n.key for cfg in point_configs(make_config, url, root) for n in plan(cfg).nodes if n.label == "train[1]"}
    env = sweep_env(s3_server, dask_cluster.prefect_server, root)
    procs = Procs(root / "logs")
    try:
        first = procs.start("sweep-1", sweep_command(config, dask_cluster.address), env, root / "sweep-cwd")
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not any(CHECKPOINT_FILE in files for key, files in checkpoints(probe).items() if key in cycle1):
            assert first.poll() is None, "the sweep ended before a training checkpoint appeared:\n" + \
                procs.log("sweep-1")[-3000:]
            assert time.monotonic() < deadline, "no training checkpoint appeared on the store"
            time.sleep(0.05)
        victims = dask_cluster.kill_workers()
        # the trainings the kill interrupted: a checkpoint on the store and nothing published
        interrupted = {key for key, files in checkpoints(probe).items()
                       if CHECKPOINT_FILE in files and not probe.has("train", key)}
        dask_cluster.add_workers("worker-c", "worker-d")
        # the first sweep may go on on the fresh workers, fail or hang: it is given a while, then stopped
        first_code, first_out = procs.finish("sweep-1", first, KILLED_SWEEP_GRACE_S)
        rerun = procs.start("sweep-2", sweep_command(config, dask_cluster.address), env, root / "sweep-cwd")
        code, out = procs.finish("sweep-2", rerun, RUN_TIMEOUT_S)
    finally:
        procs.kill_all()
    fresh = {name: cached_artifacts(dask_cluster.workers[name], url) for name in ("worker-c", "worker-d")}
    return {"root": root, "url": url, "victims": victims, "interrupted": interrupted, "first_code": first_code,
            "first_out": first_out, "code": code, "out": out, "fresh": fresh, "logs": dask_cluster.logs(),
            "took_over": "took over an expired lease" in dask_cluster.logs(tail=10**7)}


def test_after_both_workers_were_killed_the_sweep_finishes(killed):
    assert killed["victims"] == ["worker-a", "worker-b"]
    assert killed["code"] == 0, (f"the first sweep ended with {killed['first_code']}:\n{killed['first_out'][-2000:]}"
                                 f"\nthe rerun:\n{killed['out'][-3000:]}\n{killed['logs']}")
    assert f"sweep '{SWEEP}' finished" in killed["out"]
    for tau in TAUS:
        assert re.search(rf"{SWEEP}-tau{tau}\s+complete\s", killed["out"]), killed["out"][-2000:]
    # the fresh workers, each with its own fresh cache, did the work the killed ones left
    assert any(killed["fresh"].values()), "neither fresh worker ran a stage of the sweep"


def test_after_the_kill_the_bytes_are_those_of_sequential_local_runs(killed, s3_server, make_config, reference,
                                                                     tmp_path):
    assert killed["code"] == 0, killed["out"][-3000:]
    store = remote(killed["url"], s3_server, tmp_path / "cache")
    got = published(store)
    assert set(got) == planned(make_config, killed["url"])
    assert got == reference
    assert not list(store.client.list(".partial")), "checkpoints are cleared once their stage is published"
    assert store.read_sweep(SWEEP).status == "complete"


def test_the_interrupted_training_resumed_from_its_checkpoint(killed, s3_server, tmp_path):
    """A training killed with a checkpoint on the store and nothing published was finished by a fresh worker
    from that checkpoint, not from step 0."""
    assert killed["interrupted"], "the training published between seeing its checkpoint and the kill"
    assert killed["code"] == 0, killed["out"][-3000:]
    store = remote(killed["url"], s3_server, tmp_path / "cache")
    for key in killed["interrupted"]:
        resumed = store.manifest("train", key).resumed
        assert resumed and resumed["step"] > 0, f"train/{key} started over instead of resuming: {resumed}"
    assert killed["took_over"], "no fresh worker took over a killed worker's lease"


# -- two processes racing one key -------------------------------------------------------------------
RACERS = ("racer-a", "racer-b")
COMPUTED = re.compile(r"computed (\d+) of (\d+) stages \((.*)\)")


def computed_labels(out: str) -> list[str]:
    """The stage labels a `dmsae run` says it computed."""
    found = COMPUTED.findall(out)
    assert len(found) == 1, out[-2000:]
    n, _, listed = found[0]
    return listed.split(", ") if int(n) else []


def test_two_runs_racing_one_key_compute_it_once(s3_server, prefect_server, make_config, reference, tmp_path):
    """Both runs are started while this test holds the first stage's lease; once both wait for it, it is released,
    so both race for that key (and then for every later one)."""
    url = f"s3://dmsae/race-{uuid.uuid4().hex[:12]}"
    cfg = point_configs(make_config, url, tmp_path / "reports")[TAUS.index("0.9")]
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    nodes = plan(cfg).nodes
    first = nodes[0]
    store = remote(url, s3_server, tmp_path / "probe-cache")
    store.ensure_writable()
    procs = Procs(tmp_path / "logs")
    waiting = f"{first.label} {first.key} is being computed by another process; waiting for it"
    with contextlib.ExitStack() as held:
        held.enter_context(store.lock(first.stage, first.key))
        try:
            runs = [procs.start(name, [sys.executable, "-m", "flows.cli", "run", str(config), "--no-progress"],
                                # like two machines: a cache and a Prefect home each (one Prefect server, as a
                                # team shares one); a lease no stall outlives
                                process_env(s3_server, prefect_server, DMSAE_CACHE=str(tmp_path / name / "cache"),
                                            DMSAE_LEASE_SECONDS="30",
                                            PREFECT_HOME=str(tmp_path / name / "prefect-home")),
                                tmp_path / name / "cwd") for name in RACERS]
            deadline = time.monotonic() + RUN_TIMEOUT_S
            while not all(waiting in procs.log(name) for name in RACERS):
                assert all(p.poll() is None for p in runs), "\n".join(procs.log(n)[-2000:] for n in RACERS)
                assert time.monotonic() < deadline, "the runs never waited for the held lease"
                time.sleep(0.2)
            held.close()  # release: both are polling for it
            results = [procs.finish(name, proc, RUN_TIMEOUT_S) for name, proc in zip(RACERS, runs, strict=True)]
        finally:
            procs.kill_all()
    for code, out in results:
        assert code == 0, out[-4000:]
    computed = [computed_labels(out) for _, out in results]
    assert sorted(computed[0] + computed[1]) == sorted(n.label for n in nodes), (
        f"each stage computed by exactly one of the two: {computed}")
    assert first.label in computed[0] + computed[1]
    got = published(store)
    assert set(got) == {(n.stage, n.key) for n in nodes}
    assert got == {k: reference[k] for k in got}

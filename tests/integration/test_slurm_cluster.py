"""dask.cluster=slurm for real, without SLURM: a SLURMCluster (scheduler on 127.0.0.1) submits the job script
dmsae/clusters.py generates, and a stand-in `sbatch` on PATH runs it here, in the background, with the
submitting environment (what sbatch's default --export=ALL does). A Prefect flow on that cluster then runs a
task on those workers: it sees the store and the inherited keys, and a task asking for the GPU resource runs,
so the workers declare it. (Named apart from tests/unit/test_clusters.py: pytest needs unique basenames.)"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prefect import flow, task

from dmsae.config import Config

HERE = Path(__file__).resolve().parent
SECRET = "supersecret123"

FAKE_SBATCH = """#!/bin/sh
# stands in for SLURM's sbatch: keep the script (jobqueue deletes its file once submitted), run it here in its
# own process group with this environment, and answer as sbatch does
script="$FAKE_SLURM_DIR/job-$$.sh"
cp "$1" "$script"
setsid bash "$script" >"$script.log" 2>&1 </dev/null &
echo $! >>"$FAKE_SLURM_DIR/pids"
echo "Submitted batch job $!"
"""
# a job id is the process (group) id sbatch printed
FAKE_SCANCEL = """#!/bin/sh
kill -TERM -- "-$1" 2>/dev/null || kill -TERM "$1" 2>/dev/null
exit 0
"""


def slurm_config(store: str, device: str = "cpu", workers: int = 1) -> Config:
    kwargs = {"cores": 1, "memory": "2GB", "walltime": "00:10:00",
              # everything on loopback: the scheduler, its dashboard and the workers
              "scheduler_options": {"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"},
              "worker_extra_args": ["--host", "127.0.0.1"], "death_timeout": 30}
    return Config.model_validate({"runner": "dask", "device": device, "store": store,
                                  "dask": {"cluster": "slurm", "workers": workers, "cluster_kwargs": kwargs}})


@pytest.fixture
def fake_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("scancel", FAKE_SCANCEL)):
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_DIR", str(jobs))
    # the workers import this module to run its tasks, as a real job imports dmsae from the shared install
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:8333")
    yield jobs
    # a job the cluster did not cancel (a failed test) ends with the test: each is a process group we started
    pids = jobs / "pids"
    for pid in (int(p) for p in pids.read_text().split()) if pids.is_file() else ():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)


def test_the_generated_script_is_the_one_slurmcluster_submits(monkeypatch):
    from dask_jobqueue import SLURMCluster

    from dmsae.clusters import runner_kwargs, slurm_job_script

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    cfg = slurm_config("s3://dmsae/store", device="cuda")
    kwargs = {**runner_kwargs(cfg)["cluster_kwargs"], "n_workers": 0}  # nothing submitted
    with SLURMCluster(**kwargs) as cluster:
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
        submitted = cluster.job_script()
        assert submitted == slurm_job_script(cfg, scheduler=cluster.scheduler_address, worker_name="dummy-name")
    assert "#SBATCH --gres=gpu:1" in submitted and "--resources GPU=1" in submitted
    assert "export DMSAE_STORE=s3://dmsae/store" in submitted and SECRET not in submitted


@task
def probe() -> dict[str, Any]:
    return {"store": os.environ.get("DMSAE_STORE"), "endpoint": os.environ.get("AWS_ENDPOINT_URL"),
            "inherited_key": os.environ.get("AWS_SECRET_ACCESS_KEY") == SECRET, "pid": os.getpid()}


@flow
def probe_flow(gpu: bool) -> dict[str, Any]:
    from flows.distill import dask_annotations

    # what every stage of a GPU run asks for: it runs only on a worker that declares GPU=1
    with dask_annotations({"GPU": 1} if gpu else {}):
        return probe.submit().result(timeout=120)


def run_probe(store: str, device: str) -> dict[str, Any]:
    """The probe flow on a SLURM cluster of one worker, as `dmsae run` starts one (in a process of its own, so
    that its Prefect server and clients end with it)."""
    from flows.runner import shared_prefect_api, task_runner

    cfg = slurm_config(store, device=device)
    with shared_prefect_api():
        runner = task_runner(cfg.runner, cfg.dask, cfg.device, cfg=cfg)
        seen = probe_flow.with_options(task_runner=runner)(gpu=device == "cuda")
    return {**seen, "flow_pid": os.getpid()}


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_a_flow_runs_on_the_jobs_with_the_store_and_the_inherited_keys(fake_slurm, tmp_path, device):
    store = str(tmp_path / "store")
    code = f"import json, test_slurm_cluster as t; print(json.dumps(t.run_probe({store!r}, {device!r})))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    jobs = sorted(fake_slurm.glob("job-*.sh"))
    assert len(jobs) == 1, "one job per worker (dask.workers=1)"
    assert seen["pid"] != seen["flow_pid"]  # ran in the job's worker, not in the flow's process
    assert seen["store"] == store and seen["endpoint"] == "http://127.0.0.1:8333"
    assert seen["inherited_key"]  # from the submitting environment ...
    assert SECRET not in jobs[0].read_text()  # ... never from the script
    assert ("--resources GPU=1" in jobs[0].read_text()) == (device == "cuda")

"""Where a flow's stage tasks run: one after the other in this process (`runner: local`), or in parallel
on Dask workers through prefect-dask (`runner: dask`): a LocalCluster sized by `dask.workers`, an existing
scheduler at `dask.address`, or workers started for the run as SLURM jobs or Kubernetes pods
(`dask.cluster`, dmsae/clusters.py)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

from dmsae.config import Config, DaskConfig
from dmsae.errors import UserError

CONNECT_TIMEOUT_S = 5
# How long a LocalCluster waits for a lost worker to come back before it closes the worker's nanny for good.
# A killed worker (the OOM killer, a test) is started again by its nanny, which on a loaded machine takes longer
# than Dask's default of 15 s; past it the cluster drops the worker and the flow waits forever on a task no
# worker will take (distributed.deploy.spec.SpecCluster._update_worker_status).
LOST_WORKER_TIMEOUT = "10 minutes"


def setup_torch(cfg: Config) -> None:
    """This process's torch threads, and the device checked: a CUDA run needs a CUDA device it can number."""
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.runner == "dask" and cfg.dask.cluster in ("slurm", "kubernetes"):
        # the GPUs are the workers', not this machine's: each job or pod gets one, which it numbers 0
        if cfg.device not in ("cpu", "cuda", "cuda:0"):
            raise UserError(f"device={cfg.device}: each dask.cluster={cfg.dask.cluster} worker holds one GPU, "
                            "numbered 0; use device=cuda")
        return
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={cfg.device}: no CUDA device is available here; use device=cpu")
    if cfg.device.startswith("cuda:") and int(cfg.device[5:]) >= torch.cuda.device_count():
        raise UserError(f"device={cfg.device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                        f"numbered from 0")


def task_runner(runner: str, dask: DaskConfig, device: str = "cpu", cfg: Config | None = None) -> Any:
    """The Prefect task runner for `runner`. Local: one stage at a time (each already uses every core), in
    plan order. Dask: one stage per worker at a time; every stage of a GPU run asks for one `GPU` resource
    (`stage_resources`), so no two stages share a GPU. `cfg`, the run's config, names the store that SLURM
    jobs and Kubernetes pods are told (DMSAE_STORE)."""
    if runner == "local":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=1)
    from prefect_dask import DaskTaskRunner

    if dask.cluster == "address":
        return DaskTaskRunner(address=dask.address)
    if dask.cluster in ("slurm", "kubernetes"):
        from dmsae.clusters import cluster_warnings, runner_kwargs

        # without the run's config the workers miss only DMSAE_STORE: each stage is given the store anyway
        run_cfg = cfg if cfg is not None else Config(runner="dask", dask=dask, device=device)
        for note in cluster_warnings(run_cfg):
            print(f"dmsae: warning: {note}", file=sys.stderr)
        return DaskTaskRunner(**runner_kwargs(run_cfg, include_store=cfg is not None))
    import dask as dask_lib

    dask_lib.config.set({"distributed.deploy.lost-worker-timeout": LOST_WORKER_TIMEOUT})
    kwargs: dict[str, Any] = {"n_workers": dask.workers, "threads_per_worker": 1, "processes": True,
                              "dashboard_address": None}
    if device.startswith("cuda"):
        # every stage runs on the one device the config names: one worker holding it; a cluster with one
        # worker per GPU (each with GPU=1, e.g. dask-cuda's) is reached with dask.address instead
        kwargs.update(n_workers=1, resources={"GPU": 1})
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=kwargs)


def stage_resources(device: str) -> dict[str, int]:
    """Dask worker resources a stage asks for: one GPU when the run is on one, nothing on the CPU."""
    return {"GPU": 1} if device.startswith("cuda") else {}


def check_dask_address(address: str) -> None:
    """An unreachable scheduler is refused before anything is written."""
    from distributed import Client

    try:
        with Client(address, timeout=CONNECT_TIMEOUT_S):
            pass
    except (OSError, TimeoutError) as e:
        raise UserError(f"dask.address={address}: no Dask scheduler answers there ({type(e).__name__}); start one "
                        "(dask scheduler) or drop the address for a local cluster") from None


@contextlib.contextmanager
def shared_prefect_api() -> Iterator[None]:
    """Dask worker processes must report to the same Prefect API as the flow. With no PREFECT_API_URL set,
    each would start its own temporary server; so start one here, before the cluster, and point this
    process and every worker (through the environment they inherit) at it."""
    if os.environ.get("PREFECT_API_URL"):
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server = SubprocessASGIServer()
    server.start()
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield
    finally:
        # send the queued logs while the server still answers: stopped first, Prefect retries them at exit
        # for about a minute and then reports it could not
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=5)
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()


def check_cluster(cfg: Config) -> None:
    """A slurm or kubernetes cluster's package, keyword arguments and secrets checked, its job script or
    spec generated and thrown away, before anything is written or submitted (`dmsae check` can call this)."""
    if cfg.runner == "dask" and cfg.dask.cluster in ("slurm", "kubernetes"):
        from dmsae.clusters import runner_kwargs

        runner_kwargs(cfg)

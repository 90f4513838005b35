"""Dask clusters a run starts for itself: batch jobs on SLURM (dask-jobqueue's SLURMCluster) or pods on
Kubernetes (the dask-kubernetes operator's KubeCluster), given to prefect-dask's DaskTaskRunner as
`cluster_class`, `cluster_kwargs` and `adapt_kwargs`.

These are functions of the config and an environment mapping (besides importing the cluster's package), so
the job script and the DaskCluster resource a run would submit can be generated and read without a queue or a
Kubernetes API, as tests/unit/test_clusters.py does.

What the workers are given:
- one stage at a time per worker (one Dask thread), `dask.threads` torch threads inside it;
- on a GPU run (`device: cuda`), one GPU per worker, requested from the scheduler (SLURM `--gres=gpu:1`,
  Kubernetes `nvidia.com/gpu: 1`) and declared to Dask (`--resources GPU=1`), which every stage asks for;
- the store (`DMSAE_STORE`) and the non-secret settings of the object store and Prefect API as variables;
- never a secret in plain text: SLURM jobs inherit the submitting environment (sbatch exports it by
  default) or source a file in `job_script_prologue`; pods read AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY
  from a Kubernetes Secret (`secret`, default dmsae-s3). A script or spec that would hold one is refused.
"""

from __future__ import annotations

import copy
import inspect
import ipaddress
import os
import re
import shlex
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from dmsae.config import Config
from dmsae.errors import UserError

SECRET_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
# secret values shorter than this are not searched for: a toy key such as "dmsae" also names the bucket
MIN_SECRET_LEN = 8
DEFAULT_SECRET = "dmsae-s3"
PLACEHOLDER_SCHEDULER = "tcp://<insert-scheduler-address-here>:8786"  # what dask-jobqueue shows before it starts
SLURM_CLASS = "dask_jobqueue.SLURMCluster"
KUBE_CLASS = "dask_kubernetes.operator.KubeCluster"
PACKAGES = {"slurm": ("dask_jobqueue", "dask-jobqueue==0.9.0"),
            "kubernetes": ("dask_kubernetes", "dask-kubernetes==2026.3.0")}
# cluster_kwargs keys dmsae reads itself; no cluster class gets them
OWN_KEYS = frozenset({"adapt", "secret"})
# JobQueueCluster's own keywords: the scheduler's side, not a job's (interface, protocol and config_name go to both)
SLURM_CLUSTER_ONLY = frozenset({"n_workers", "loop", "security", "shared_temp_directory", "silence_logs", "name",
                                "asynchronous", "dashboard_address", "host", "scheduler_options", "scheduler_cls",
                                "job_cls"})
# make_cluster_spec's keywords: they shape the DaskCluster resource, which KubeCluster then takes whole
KUBE_SPEC_KEYS = frozenset({"name", "image", "n_workers", "resources", "env", "worker_command",
                            "scheduler_service_type", "idle_timeout", "jupyter"})
GPU_LIMIT = "nvidia.com/gpu"
# set by prefect-dask (the event loop) or by dmsae (the spec); a user's value would only break the start
MANAGED_KEYS = frozenset({"asynchronous", "loop", "custom_cluster_spec"})


def require(cluster: str) -> None:
    """The cluster's package, imported only when such a cluster is asked for; missing, a one-line error."""
    module, pin = PACKAGES[cluster]
    try:
        __import__(module)
    except ImportError:
        raise UserError(f"dask.cluster={cluster} needs {pin.split('==')[0]}: pip install 'dmsae[cluster]' "
                        f"(or pip install {pin})") from None


def store_url(store: str) -> str:
    """The store as workers on other machines must name it: a URL as it is, a local path made absolute (it
    must be a path every worker shares)."""
    if re.match(r"[a-z][a-z0-9+.-]*://", store):
        return store
    return os.path.abspath(os.path.expanduser(store))


def worker_env(cfg: Config, environ: Mapping[str, str], include_store: bool = True) -> dict[str, str]:
    """The non-secret variables every worker gets: the store, the object store's endpoint and region (the
    config's store_options first, else this environment's) and the Prefect API the task runs report to."""
    options = cfg.store_options
    values = {
        "DMSAE_STORE": store_url(cfg.store) if include_store else None,
        "AWS_ENDPOINT_URL": options.endpoint or environ.get("AWS_ENDPOINT_URL"),
        "AWS_REGION": options.region or environ.get("AWS_REGION"),
        "PREFECT_API_URL": environ.get("PREFECT_API_URL"),
    }
    return {k: v for k, v in values.items() if v}


def refuse_secrets(text: str, where: str, environ: Mapping[str, str]) -> None:
    """Refuse a generated script or spec that holds a secret: a value of a secret variable of this
    environment, or a secret variable set in plain text (e.g. in a user's job_script_prologue)."""
    for name in SECRET_VARS:
        value = environ.get(name, "")
        if len(value) >= MIN_SECRET_LEN and value in text:
            raise UserError(f"{where} would hold the value of {name} in plain text; pass secrets through the "
                            "environment, a sourced file or a Kubernetes Secret (docs/operations.md, Clusters)")
    match = re.search(rf"\b({'|'.join(SECRET_VARS)})\s*=", text)
    if match:
        raise UserError(f"{where} sets {match.group(1)} in plain text; source it from a file in "
                        "job_script_prologue instead (docs/operations.md, Clusters)")


def cluster_warnings(cfg: Config, environ: Mapping[str, str] | None = None) -> list[str]:
    """Notes on a run that starts its workers elsewhere: a Prefect API on loopback is not theirs to reach."""
    environ = os.environ if environ is None else environ
    url = environ.get("PREFECT_API_URL", "")
    host = urlsplit(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if cfg.dask.cluster in ("slurm", "kubernetes") and loopback:
        return [f"PREFECT_API_URL={url} is this machine's loopback: {cfg.dask.cluster} workers on other machines "
                "cannot report there; start a Prefect server they reach (prefect server start --host 0.0.0.0) and "
                "set PREFECT_API_URL to its address"]
    return []


def _adapt(cfg: Config) -> dict[str, int]:
    return dict(cfg.dask.cluster_kwargs.get("adapt") or {})


def _start_workers(cfg: Config) -> int:
    """Workers started with the cluster: `dask.workers`, or none when `adapt` scales them."""
    kw = cfg.dask.cluster_kwargs
    return int(kw.get("n_workers", 0 if "adapt" in kw else cfg.dask.workers))


def slurm_kwargs(cfg: Config, environ: Mapping[str, str] | None = None,
                 include_store: bool = True) -> dict[str, Any]:
    """SLURMCluster's keyword arguments: the user's cluster_kwargs with the workers' environment, one Dask
    thread per worker and, on a GPU run, one GPU per job."""
    environ = os.environ if environ is None else environ
    kw = {k: copy.deepcopy(v) for k, v in cfg.dask.cluster_kwargs.items() if k not in OWN_KEYS}
    gpu = cfg.device.startswith("cuda")
    processes = int(kw.get("processes", 1))
    if gpu and processes != 1:
        raise UserError(f"dask.cluster_kwargs.processes={processes}: a GPU run has one worker per job, holding the "
                        "job's GPU; drop processes")
    # `cores` are the job's CPUs (--cpus-per-task); each worker gets one Dask thread so that it runs one stage
    # at a time, as on a local cluster (dask-jobqueue gives a worker cores/processes threads)
    kw["job_cpu"] = kw.get("job_cpu", kw["cores"])
    kw["cores"] = processes
    kw["processes"] = processes
    kw["n_workers"] = _start_workers(cfg)
    exports = [f"export {name}={shlex.quote(value)}" for name, value in worker_env(cfg, environ, include_store).items()]
    # the user's lines last, so that a sourced file has the last word
    kw["job_script_prologue"] = exports + list(kw.get("job_script_prologue", []))
    if gpu:
        directives = list(kw.get("job_extra_directives", []))
        if not any(d.lstrip().startswith(("--gres", "--gpus", "-G")) for d in directives):
            directives.append("--gres=gpu:1")
        kw["job_extra_directives"] = directives
        args = list(kw.get("worker_extra_args", []))
        if "--resources" not in args:
            args += ["--resources", "GPU=1"]
        kw["worker_extra_args"] = args
    return kw


def slurm_job_script(cfg: Config, environ: Mapping[str, str] | None = None, scheduler: str = PLACEHOLDER_SCHEDULER,
                     worker_name: str = "dmsae-worker", include_store: bool = True) -> str:
    """The batch script each SLURM job of this config runs (what `sbatch` is given), built by dask-jobqueue's
    own SLURMJob, so it is the script SLURMCluster submits, with `scheduler` and `worker_name` filled in."""
    require("slurm")
    from dask_jobqueue.slurm import SLURMJob

    environ = os.environ if environ is None else environ
    kw = slurm_kwargs(cfg, environ, include_store)
    job_kw = {k: v for k, v in kw.items() if k not in SLURM_CLUSTER_ONLY}
    try:
        script = SLURMJob(scheduler, name=worker_name, **job_kw).job_script()
    except (TypeError, ValueError) as e:
        raise UserError(f"dask.cluster_kwargs: SLURMCluster refuses them ({str(e).splitlines()[0]})") from None
    refuse_secrets(script, "the SLURM job script", environ)
    return script


def default_cluster_name(run: str) -> str:
    """A DaskCluster name from the run's name: Kubernetes allows lowercase letters, digits and '-' only."""
    slug = re.sub(r"[^a-z0-9-]+", "-", run.lower()).strip("-")
    return f"dmsae-{slug}"[:53].rstrip("-")


def kubernetes_spec(cfg: Config, environ: Mapping[str, str] | None = None,
                    include_store: bool = True) -> dict[str, Any]:
    """The DaskCluster resource (kubernetes.dask.org/v1) this config's KubeCluster creates: dask-kubernetes'
    make_cluster_spec, with one Dask thread per worker, a GPU per worker on a GPU run (none on the
    scheduler), the workers' environment, and the object store's keys read from a Kubernetes Secret."""
    require("kubernetes")
    from dask_kubernetes.operator import make_cluster_spec

    environ = os.environ if environ is None else environ
    kw = cfg.dask.cluster_kwargs
    gpu = cfg.device.startswith("cuda")
    user_env = {str(k): str(v) for k, v in (kw.get("env") or {}).items()}
    plain = [n for n in SECRET_VARS if n in user_env]
    if plain:
        raise UserError(f"dask.cluster_kwargs.env sets {plain[0]} in plain text; put it in the Kubernetes Secret "
                        f"named by dask.cluster_kwargs.secret (default {DEFAULT_SECRET})")
    env = [{"name": k, "value": v} for k, v in {**worker_env(cfg, environ, include_store), **user_env}.items()]
    secret = kw.get("secret", DEFAULT_SECRET)
    # optional: a run on a shared filesystem store needs no keys, and a missing Secret must not stop its pods
    refs = [{"name": n, "valueFrom": {"secretKeyRef": {"name": secret, "key": n, "optional": True}}}
            for n in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")]
    resources: dict[str, Any] = copy.deepcopy(kw.get("resources") or {})
    worker_resources = copy.deepcopy(resources)
    if gpu:
        worker_resources.setdefault("limits", {}).setdefault(GPU_LIMIT, 1)
    # `dask worker`: distributed no longer installs the `dask-worker` script make_cluster_spec defaults to
    command = kw.get("worker_command", "dask worker")
    command = command.split() if isinstance(command, str) else [str(c) for c in command]
    command += ["--nthreads", "1"]  # one stage at a time per worker
    if gpu and "--resources" not in command:
        command += ["--resources", "GPU=1"]
    spec = make_cluster_spec(
        name=kw.get("name") or default_cluster_name(cfg.name), image=kw["image"], n_workers=_start_workers(cfg),
        resources=worker_resources or None, env=env + refs, worker_command=command,
        scheduler_service_type=kw.get("scheduler_service_type", "ClusterIP"), idle_timeout=kw.get("idle_timeout", 0),
        jupyter=bool(kw.get("jupyter", False)))
    # the scheduler reads no store and runs no stage: neither the keys nor a GPU; and `dask scheduler`, for the
    # `dask-scheduler` script distributed no longer installs
    scheduler = spec["spec"]["scheduler"]["spec"]["containers"][0]
    if scheduler["args"][:1] == ["dask-scheduler"]:
        scheduler["args"] = ["dask", "scheduler", *scheduler["args"][1:]]
    scheduler["env"] = copy.deepcopy(env)
    for part in resources.values():
        part.pop(GPU_LIMIT, None)
    scheduler["resources"] = resources or None
    refuse_secrets(repr(spec), "the Kubernetes cluster spec", environ)
    return spec


def runner_kwargs(cfg: Config, environ: Mapping[str, str] | None = None, include_store: bool = True) -> dict[str, Any]:
    """DaskTaskRunner's keyword arguments for a slurm or kubernetes cluster: `cluster_class` (named, imported by
    prefect-dask), `cluster_kwargs` and `adapt_kwargs` (`adapt` in cluster_kwargs: scale between minimum and
    maximum workers as stages wait)."""
    environ = os.environ if environ is None else environ
    cluster = cfg.dask.cluster
    if cluster not in PACKAGES:
        raise ValueError(f"runner_kwargs is for slurm and kubernetes clusters, not {cluster}")
    require(cluster)
    managed = sorted(MANAGED_KEYS & set(cfg.dask.cluster_kwargs))
    if managed:
        raise UserError(f"dask.cluster_kwargs: {', '.join(managed)} is dmsae's or Prefect's to set; drop it")
    if cluster == "slurm":
        slurm_job_script(cfg, environ, include_store=include_store)  # refuses bad keywords and plain secrets now
        return {"cluster_class": SLURM_CLASS, "cluster_kwargs": slurm_kwargs(cfg, environ, include_store),
                "adapt_kwargs": _adapt(cfg)}
    from dask_kubernetes.operator import KubeCluster

    spec = kubernetes_spec(cfg, environ, include_store)
    rest = {k: v for k, v in cfg.dask.cluster_kwargs.items() if k not in KUBE_SPEC_KEYS | OWN_KEYS}
    accepted = set(inspect.signature(KubeCluster).parameters) - {"custom_cluster_spec", "loop", "asynchronous",
                                                                   "kwargs"}
    unknown = sorted(set(rest) - accepted)
    if unknown:
        raise UserError(f"dask.cluster_kwargs: KubeCluster takes no {', '.join(unknown)}; it takes "
                        f"{', '.join(sorted(accepted | KUBE_SPEC_KEYS | OWN_KEYS))}")
    return {"cluster_class": KUBE_CLASS, "cluster_kwargs": {"custom_cluster_spec": spec, **rest},
            "adapt_kwargs": _adapt(cfg)}

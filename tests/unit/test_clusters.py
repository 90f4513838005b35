"""dmsae/clusters.py: the SLURM job script and the Kubernetes DaskCluster spec a `runner: dask` run would
submit, read offline (no queue, no Kubernetes API, no scheduler): resources, GPUs, the workers' environment,
and no secret in plain text. The same script from a real SLURMCluster, and a run through it, are in
tests/integration/test_clusters.py."""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest

from dmsae.config import Config, load_config
from dmsae.errors import UserError

SECRET = "supersecret123"
KEY_ID = "AKIAEXAMPLEKEYID0001"
ENV = {"AWS_SECRET_ACCESS_KEY": SECRET, "AWS_ACCESS_KEY_ID": KEY_ID, "AWS_ENDPOINT_URL": "http://s3:8333",
       "AWS_REGION": "eu-west-1", "PREFECT_API_URL": "http://prefect.example:4200/api"}
SLURM = {"cores": 8, "memory": "32GB", "walltime": "04:00:00", "queue": "gpu"}
KUBE = {"image": "registry.example/dmsae:1", "resources": {"limits": {"cpu": "8", "memory": "32Gi"}}}


def config(cluster: str, kwargs: dict[str, Any], device: str = "cpu", **top: Any) -> Config:
    data = {"runner": "dask", "device": device, "store": "s3://dmsae/store",
            "dask": {"cluster": cluster, "workers": 3, "cluster_kwargs": kwargs}, **top}
    return Config.model_validate(data)


@pytest.fixture(autouse=True)
def secrets_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The submitting environment holds the keys, as it would on a login node; nothing may copy them out."""
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)


def no_secret(text: str) -> None:
    assert SECRET not in text and KEY_ID not in text


# -- SLURM ------------------------------------------------------------------------------------------------


def test_slurm_script_on_cpu_asks_the_job_s_cores_and_memory_and_no_gpu():
    from dmsae.clusters import slurm_job_script

    script = slurm_job_script(config("slurm", SLURM))
    lines = script.splitlines()
    assert "#SBATCH --cpus-per-task=8" in lines  # `cores`: the job's CPUs
    assert "#SBATCH --mem=30G" in lines  # 32 GB, in the GiB SLURM counts
    assert "#SBATCH -t 04:00:00" in lines and "#SBATCH -p gpu" in lines
    worker = lines[-1].split()
    assert worker[worker.index("--nthreads") + 1] == "1"  # one stage at a time per worker
    assert "--gres" not in script and "--resources" not in script and "GPU" not in script
    no_secret(script)


def test_slurm_script_on_cuda_requests_a_gpu_and_declares_the_dask_resource():
    from dmsae.clusters import slurm_job_script

    lines = slurm_job_script(config("slurm", SLURM, device="cuda")).splitlines()
    assert "#SBATCH --gres=gpu:1" in lines
    worker = lines[-1].split()
    assert worker[worker.index("--resources") + 1] == "GPU=1"  # what every stage of a GPU run asks for


def test_slurm_keeps_the_user_s_own_gpu_request():
    from dmsae.clusters import slurm_job_script

    script = slurm_job_script(config("slurm", {**SLURM, "job_extra_directives": ["--gpus=a100:1"]}, device="cuda"))
    assert "#SBATCH --gpus=a100:1" in script.splitlines() and "--gres" not in script


def test_slurm_script_exports_the_store_and_the_non_secret_settings_only():
    from dmsae.clusters import slurm_job_script

    prologue = ["source ~/.config/dmsae/s3.env"]
    script = slurm_job_script(config("slurm", {**SLURM, "job_script_prologue": prologue}))
    lines = script.splitlines()
    assert "export DMSAE_STORE=s3://dmsae/store" in lines
    assert "export AWS_ENDPOINT_URL=http://s3:8333" in lines and "export AWS_REGION=eu-west-1" in lines
    assert "export PREFECT_API_URL=http://prefect.example:4200/api" in lines
    # the user's file comes after dmsae's lines, so it has the last word, and before the worker starts
    assert lines.index("source ~/.config/dmsae/s3.env") == lines.index("export DMSAE_STORE=s3://dmsae/store") + 4
    assert lines.index("source ~/.config/dmsae/s3.env") < len(lines) - 1
    assert "AWS_SECRET_ACCESS_KEY" not in script and "AWS_ACCESS_KEY_ID" not in script
    no_secret(script)


def test_slurm_store_on_a_shared_path_is_made_absolute(tmp_path, monkeypatch):
    from dmsae.clusters import slurm_job_script

    monkeypatch.chdir(tmp_path)
    script = slurm_job_script(config("slurm", SLURM, store="artifacts"))
    assert f"export DMSAE_STORE={tmp_path / 'artifacts'}" in script.splitlines()


def test_slurm_refuses_a_secret_written_into_the_script():
    from dmsae.clusters import slurm_job_script

    with pytest.raises(UserError, match="sets AWS_SECRET_ACCESS_KEY in plain text"):
        slurm_job_script(config("slurm", {**SLURM, "job_script_prologue": ["export AWS_SECRET_ACCESS_KEY=x"]}))
    with pytest.raises(UserError, match="value of AWS_SECRET_ACCESS_KEY"):
        slurm_job_script(config("slurm", {**SLURM, "job_script_prologue": [f"export TOKEN={SECRET}"]}))


def test_slurm_refuses_unknown_keywords_and_a_gpu_job_of_many_workers():
    from dmsae.clusters import slurm_job_script

    with pytest.raises(UserError, match="unexpected keyword argument 'walltme'") as info:
        slurm_job_script(config("slurm", {**SLURM, "walltme": "1:00:00"}))
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="processes=2"):
        slurm_job_script(config("slurm", {**SLURM, "processes": 2}, device="cuda"))


def test_slurm_runner_kwargs_start_dask_workers_or_adapt():
    from dmsae.clusters import SLURM_CLASS, runner_kwargs

    kw = runner_kwargs(config("slurm", SLURM))
    assert kw["cluster_class"] == SLURM_CLASS and kw["adapt_kwargs"] == {}
    assert kw["cluster_kwargs"]["n_workers"] == 3 and kw["cluster_kwargs"]["job_cpu"] == 8
    adaptive = runner_kwargs(config("slurm", {**SLURM, "adapt": {"minimum": 0, "maximum": 6}}))
    assert adaptive["adapt_kwargs"] == {"minimum": 0, "maximum": 6}
    assert adaptive["cluster_kwargs"]["n_workers"] == 0 and "adapt" not in adaptive["cluster_kwargs"]


# -- Kubernetes ------------------------------------------------------------------------------------------


def containers(spec: dict) -> tuple[dict, dict]:
    return spec["spec"]["worker"]["spec"]["containers"][0], spec["spec"]["scheduler"]["spec"]["containers"][0]


def test_kubernetes_spec_on_cpu_has_the_resources_and_no_gpu():
    from dmsae.clusters import kubernetes_spec

    spec = kubernetes_spec(config("kubernetes", KUBE))
    worker, scheduler = containers(spec)
    assert spec["kind"] == "DaskCluster" and spec["metadata"]["name"] == "dmsae-run"
    assert spec["spec"]["worker"]["replicas"] == 3
    assert worker["image"] == "registry.example/dmsae:1"
    # the commands the pinned distributed installs (`dask`; no `dask-worker` / `dask-scheduler` scripts)
    assert worker["args"][:2] == ["dask", "worker"] and scheduler["args"][:2] == ["dask", "scheduler"]
    assert worker["resources"] == {"limits": {"cpu": "8", "memory": "32Gi"}}
    assert worker["args"][worker["args"].index("--nthreads") + 1] == "1"
    text = json.dumps(spec)
    assert "nvidia.com/gpu" not in text and "--resources" not in text
    no_secret(text)


def test_kubernetes_spec_on_cuda_gives_each_worker_a_gpu_and_the_scheduler_none():
    from dmsae.clusters import kubernetes_spec

    worker, scheduler = containers(kubernetes_spec(config("kubernetes", KUBE, device="cuda")))
    assert worker["resources"]["limits"] == {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": 1}
    assert worker["args"][worker["args"].index("--resources") + 1] == "GPU=1"
    assert "nvidia.com/gpu" not in json.dumps(scheduler)


def test_kubernetes_workers_read_the_keys_from_a_secret_never_from_the_spec():
    from dmsae.clusters import kubernetes_spec

    spec = kubernetes_spec(config("kubernetes", {**KUBE, "secret": "team-s3", "env": {"HF_HOME": "/cache"}}))
    worker, scheduler = containers(spec)
    env = {e["name"]: e for e in worker["env"]}
    assert env["DMSAE_STORE"]["value"] == "s3://dmsae/store"
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://s3:8333" and env["AWS_REGION"]["value"] == "eu-west-1"
    assert env["HF_HOME"]["value"] == "/cache"
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "value" not in env[name]
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "team-s3", "key": name, "optional": True}
    assert {e["name"] for e in scheduler["env"]}.isdisjoint({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"})
    no_secret(json.dumps(spec))
    default = containers(kubernetes_spec(config("kubernetes", KUBE)))[0]
    assert {e["name"]: e for e in default["env"]}["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] \
        == "dmsae-s3"


def test_kubernetes_refuses_a_key_in_plain_text():
    from dmsae.clusters import kubernetes_spec

    with pytest.raises(UserError, match="env sets AWS_SECRET_ACCESS_KEY in plain text"):
        kubernetes_spec(config("kubernetes", {**KUBE, "env": {"AWS_SECRET_ACCESS_KEY": "x"}}))
    with pytest.raises(UserError, match="value of AWS_SECRET_ACCESS_KEY"):
        kubernetes_spec(config("kubernetes", {**KUBE, "env": {"TOKEN": SECRET}}))


def test_kubernetes_runner_kwargs_pass_the_spec_and_refuse_unknown_keywords():
    from dmsae.clusters import KUBE_CLASS, runner_kwargs

    kw = runner_kwargs(config("kubernetes", {**KUBE, "namespace": "ml", "adapt": {"maximum": 4}}, name="Run_v2"))
    assert kw["cluster_class"] == KUBE_CLASS and kw["adapt_kwargs"] == {"maximum": 4}
    assert set(kw["cluster_kwargs"]) == {"custom_cluster_spec", "namespace"}
    assert kw["cluster_kwargs"]["custom_cluster_spec"]["metadata"]["name"] == "dmsae-run-v2"  # a valid k8s name
    with pytest.raises(UserError, match="KubeCluster takes no nmespace"):
        runner_kwargs(config("kubernetes", {**KUBE, "nmespace": "ml"}))
    with pytest.raises(UserError, match="asynchronous is dmsae's or Prefect's to set"):
        runner_kwargs(config("kubernetes", {**KUBE, "asynchronous": True}))


# -- wiring and checks -----------------------------------------------------------------------------------


def test_task_runner_builds_the_cluster_class_lazily():
    from prefect_dask import DaskTaskRunner

    from flows.runner import task_runner

    cfg = config("slurm", SLURM)
    runner = task_runner(cfg.runner, cfg.dask, cfg.device, cfg=cfg)
    assert isinstance(runner, DaskTaskRunner) and runner._cluster is None  # nothing submitted yet
    assert runner.cluster_class == "dask_jobqueue.SLURMCluster"
    assert runner.cluster_kwargs["job_script_prologue"][0] == "export DMSAE_STORE=s3://dmsae/store"
    # an older caller without the config: everything but the store's name
    older = task_runner(cfg.runner, cfg.dask, cfg.device)
    assert not any("DMSAE_STORE" in line for line in older.cluster_kwargs["job_script_prologue"])


def test_a_local_cluster_waits_minutes_for_a_killed_worker_to_come_back():
    """Dask's default gives a lost worker 15 s to return before closing its nanny for good; a worker killed on a
    loaded machine takes longer than that to restart, and the flow then waits forever on a task no worker takes
    (a sweep in tests/integration/test_sweep.py hung so)."""
    import dask
    from dask.utils import parse_timedelta

    from flows.runner import task_runner

    cfg = Config.model_validate({"runner": "dask", "dask": {"workers": 2}})
    with dask.config.set({"distributed.deploy.lost-worker-timeout": "15s"}):  # undone when the block ends
        runner = task_runner(cfg.runner, cfg.dask, cfg.device, cfg=cfg)
        assert runner.cluster_class == "distributed.LocalCluster"
        assert parse_timedelta(dask.config.get("distributed.deploy.lost-worker-timeout")) >= 300


def test_a_missing_package_is_one_line_naming_the_pip_command(monkeypatch):
    from dmsae.clusters import runner_kwargs

    monkeypatch.setitem(sys.modules, "dask_jobqueue", None)  # import fails as if not installed
    with pytest.raises(UserError) as info:
        runner_kwargs(config("slurm", SLURM))
    assert str(info.value) == ("dask.cluster=slurm needs dask-jobqueue: pip install 'dmsae[cluster]' "
                               "(or pip install dask-jobqueue==0.9.0)")


def test_a_loopback_prefect_api_is_a_warning_for_remote_workers():
    from dmsae.clusters import cluster_warnings

    cfg = config("slurm", SLURM)
    assert cluster_warnings(cfg, {"PREFECT_API_URL": "http://127.0.0.1:4200/api"})
    assert cluster_warnings(cfg, {"PREFECT_API_URL": "http://localhost:4200/api"})
    assert not cluster_warnings(cfg, {"PREFECT_API_URL": "http://prefect.example:4200/api"})


def test_the_gpu_is_the_workers_not_the_submitting_machine_s():
    from flows.runner import setup_torch

    setup_torch(config("slurm", SLURM, device="cuda"))  # no GPU here: not this machine's to have
    with pytest.raises(UserError, match="numbered 0"):
        setup_torch(config("kubernetes", KUBE, device="cuda:1"))


# -- config ----------------------------------------------------------------------------------------------


def error_of(*overrides: str) -> str:
    with pytest.raises(UserError) as info:
        load_config(None, list(overrides))
    assert "\n" not in str(info.value)
    return str(info.value)


def test_an_address_alone_still_means_that_scheduler():
    cfg = load_config(None, ["runner=dask", "dask.address=tcp://10.0.0.5:8786"])
    assert cfg.dask.cluster == "address"
    assert load_config(None, []).dask.cluster == "local"


@pytest.mark.parametrize("overrides,field,words", [
    (["dask.cluster=pbs"], "dask.cluster", "'local', 'address', 'slurm' or 'kubernetes'"),
    (["dask.cluster=slurm"], "dask.cluster_kwargs", "needs cores and memory"),
    (["dask.cluster=slurm", "dask.cluster_kwargs={cores: 8}"], "dask.cluster_kwargs", "needs memory"),
    (["dask.cluster=slurm", "dask.cluster_kwargs={cores: 8, memory: lots}"], "dask.cluster_kwargs", "memory='lots'"),
    (["dask.cluster=slurm", "dask.cluster_kwargs={cores: 0, memory: 1GB}"], "dask.cluster_kwargs", "cores=0"),
    (["dask.cluster=kubernetes"], "dask.cluster_kwargs", "needs image"),
    (["dask.cluster=kubernetes", "dask.cluster_kwargs={image: x, name: My_Run}"], "dask.cluster_kwargs", "name="),
    (["dask.cluster_kwargs={cores: 8}"], "dask.cluster_kwargs", "only for cluster slurm or kubernetes"),
    (["dask.cluster=address"], "dask", "needs dask.address"),
    (["dask.address=10.0.0.5:8786"], "dask.address", "not a Dask scheduler address"),
    (["dask.cluster=slurm", "dask.cluster_kwargs={cores: 8, memory: 8GB}", "dask.address=tcp://h:8786"], "dask",
     "dask.address is only for dask.cluster=address"),
])
def test_bad_cluster_settings_are_refused_naming_the_field(overrides, field, words):
    message = error_of(*overrides)
    assert f"defaults: {field}: " in message and words in message


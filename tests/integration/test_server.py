"""A real `prefect server start` subprocess: `dmsae run` against it, checked through the Prefect API,
and `dmsae serve` as a deployment with a cron schedule whose run is triggered through the API.

One server serves the whole module (it takes seconds to start); the tiny config gets one reuse arm
set so the run also has evaluations and therefore the metrics table artifact.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import yaml

from tests.prefectserver import PREFECT, Server, ctrl_c_as_in_a_terminal, stop_process, wait_for

REPO = Path(__file__).resolve().parents[2]
FLOW_NAME = "dmsae-distill"
CRON = "0 3 * * *"
# one reuse k with a single seed (seed 1 dropped: consistency_seeds needs two entries, both 0 here), so
# the plan ends with the evaluations behind the metrics table; one torch thread is faster on a busy CPU
SERVER_OVERRIDES = ["reuse.k=[6]", "reuse.consistency_seeds=[0, 0]", "threads=1"]


@pytest.fixture(scope="module")
def server(prefect_server: Server) -> Server:
    """The session's Prefect server (conftest), which test_resume's runs may have used before."""
    return prefect_server


@contextmanager
def client(server: Server) -> Iterator[Any]:
    """A sync Prefect client on the test server (this process otherwise uses the ephemeral API)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: server.api_url}), get_client(sync_client=True) as c:
        yield c


def flow_run_ids(server: Server) -> set[UUID]:
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with client(server) as c:
        runs = c.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[FLOW_NAME])))
    return {r.id for r in runs}


def task_runs(server: Server, flow_run_id: UUID) -> list[Any]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with client(server) as c:
        return c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def artifacts(server: Server, flow_run_id: UUID, key: str) -> list[Any]:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with client(server) as c:
        return c.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))


@dataclass
class CliRuns:
    cfg: Any  # dmsae.config.Config
    config_path: Path
    labels: list[str]
    first: UUID
    second: UUID
    outputs: list[str]


@pytest.fixture(scope="module")
def cli_runs(server: Server, make_config: Callable[..., Any], tmp_path_factory: pytest.TempPathFactory) -> CliRuns:
    """`dmsae run` twice on the same config, in subprocesses pointed at the server."""
    from flows.pipeline import plan

    root = tmp_path_factory.mktemp("server-run")
    cfg = make_config(root / "store", *SERVER_OVERRIDES, f"report_dir={root / 'reports'}")
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    ids: list[UUID] = []
    outputs: list[str] = []
    for _ in range(2):
        before = flow_run_ids(server)
        proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(path), "--no-progress"],
                              env=server.env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        new = flow_run_ids(server) - before
        assert len(new) == 1, f"expected one new flow run on the server, got {new}"
        ids.append(new.pop())
        outputs.append(proc.stdout)
    return CliRuns(cfg, path, [n.label for n in plan(cfg).nodes], ids[0], ids[1], outputs)


def test_run_is_completed_with_one_task_run_per_stage(server: Server, cli_runs: CliRuns) -> None:
    with client(server) as c:
        run = c.read_flow_run(cli_runs.first)
    assert run.state is not None and run.state.type.value == "COMPLETED", run.state
    assert run.state.name == "Completed"
    assert f"computed {len(cli_runs.labels)} of {len(cli_runs.labels)} stages" in cli_runs.outputs[0]
    runs = task_runs(server, cli_runs.first)
    names = sorted(r.name for r in runs)
    assert names == sorted(cli_runs.labels), "exactly one task run per plan stage, named by its label"
    assert {r.state.name for r in runs} == {"Completed"}, {r.name: r.state.name for r in runs}


def test_second_run_is_a_new_flow_run_with_every_task_cached(server: Server, cli_runs: CliRuns) -> None:
    assert cli_runs.second != cli_runs.first
    with client(server) as c:
        run = c.read_flow_run(cli_runs.second)
    assert run.state is not None and run.state.name == "Completed", run.state
    runs = task_runs(server, cli_runs.second)
    assert sorted(r.name for r in runs) == sorted(cli_runs.labels)
    assert {r.state.name for r in runs} == {"Cached"}, {r.name: r.state.name for r in runs}
    assert all(r.state.type.value == "COMPLETED" for r in runs)
    assert "(everything was cached)" in cli_runs.outputs[1]


def test_run_publishes_summary_metrics_and_progress_artifacts(server: Server, cli_runs: CliRuns) -> None:
    for flow_run in (cli_runs.first, cli_runs.second):
        (summary,) = artifacts(server, flow_run, "dmsae-summary")
        assert summary.type == "markdown"
        assert "tiny" in summary.data and "|" in summary.data  # the report's markdown tables
        (metrics,) = artifacts(server, flow_run, "dmsae-metrics")
        assert metrics.type == "table"
        rows = json.loads(metrics.data) if isinstance(metrics.data, str) else metrics.data
        evaluated = sorted(label.removeprefix("evaluate[").removesuffix("]") for label in cli_runs.labels
                           if label.startswith("evaluate["))
        assert len(rows) == len(evaluated) == 7  # cycles 0 and 1 + the five arms at k=6 (two of them controls)
        assert {"train[0]", "train[1]", "reuse[distilled,k=6,seed=0]", "reuse[frequency,k=6,seed=0]",
                "reuse[none_compute,k=6,seed=0]"} <= {row["sae"] for row in rows}

    # progress artifacts only for work that ran: two trainings in the first run, none in the cached one
    progress = artifacts(server, cli_runs.first, "progress-train")
    assert len(progress) == 2
    assert all(a.type == "progress" and float(a.data) == pytest.approx(100.0) for a in progress), progress
    assert {a.description.split()[0] for a in progress} == {"train[0]", "train[1]"}
    assert len(artifacts(server, cli_runs.first, "progress-reuse")) == 5  # the three arms and the two controls
    assert artifacts(server, cli_runs.second, "progress-train") == []


def test_serve_registers_a_cron_deployment_and_runs_it_on_demand(server: Server, cli_runs: CliRuns,
                                                                tmp_path: Path) -> None:
    from prefect.exceptions import ObjectNotFound

    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "serve", str(cli_runs.config_path), "--cron", CRON,
             "--name", "tiny-nightly"],
            env=server.env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=ctrl_c_as_in_a_terminal)
    try:
        def deployment() -> Any:
            with client(server) as c:
                try:
                    return c.read_deployment_by_name(f"{FLOW_NAME}/tiny-nightly")
                except ObjectNotFound:
                    return None

        dep = wait_for(deployment, 120, "dmsae serve: deployment registered", alive=proc, log=log)
        assert [s.schedule.cron for s in dep.schedules] == [CRON]
        assert dep.schedules[0].active
        assert dep.parameters == {"config": cli_runs.cfg.model_dump(mode="json"), "show_progress": False}
        assert dep.entrypoint == "flows.distill.distill"

        with client(server) as c:
            flow_run = c.create_flow_run_from_deployment(dep.id)

        def finished() -> Any:
            with client(server) as c:
                state = c.read_flow_run(flow_run.id).state
            return state if state is not None and state.is_final() else None

        state = wait_for(finished, 180, "the triggered deployment run", alive=proc, log=log, every=1.0)
        assert state.name == "Completed", f"{state.name}: {state.message}\n{log.read_text(errors='replace')[-3000:]}"
        # same config, same store: the served run found every artifact of the CLI runs
        runs = task_runs(server, flow_run.id)
        assert sorted(r.name for r in runs) == sorted(cli_runs.labels)
        assert {r.state.name for r in runs} == {"Cached"}

        assert not dep.paused
        # Ctrl-C: the runner shuts down cleanly (about 1 s here) and pauses the deployment
        stop_process(proc, signal.SIGINT, grace=60, dump_stacks=True)
        assert deployment().paused, f"exit code {proc.returncode}\n" + log.read_text(errors="replace")[-6000:]
    finally:
        stop_process(proc, signal.SIGINT)


def _tiny_yaml(make_config: Callable[..., Any], tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(make_config(tmp_path / "store").model_dump(mode="json")))
    return path


def test_serve_without_a_server_is_a_user_error(make_config: Callable[..., Any], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """The ephemeral API has no scheduler and dies with the process: serving on it would never run."""
    from flows.cli import main

    assert "PREFECT_API_URL" not in os.environ  # tests/conftest.py keeps this process on the ephemeral API
    assert main(["serve", str(_tiny_yaml(make_config, tmp_path))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dmsae: error:") and "PREFECT_API_URL" in err[0], err


def test_serve_rejects_a_bad_cron(make_config: Callable[..., Any], tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main

    assert main(["serve", str(_tiny_yaml(make_config, tmp_path)), "--cron", "every night"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--cron 'every night'" in err[0], err


def test_prefect_yaml_declares_the_quickstart_deployment_on_a_cron() -> None:
    """prefect.yaml parses with Prefect's own model, and its parameters are configs/quickstart.yaml."""
    from prefect.cli.deploy._models import PrefectYamlModel

    from dmsae.config import Config, load_config
    from flows.serve import DEFAULT_CRON, deployment_parameters

    model = PrefectYamlModel.model_validate(yaml.safe_load((REPO / "prefect.yaml").read_text()))
    assert model.prefect_version == _pinned("prefect")
    (dep,) = model.deployments
    assert dep.entrypoint == "flows/distill.py:distill"
    assert dep.flow_name == FLOW_NAME
    assert [s.cron for s in dep.schedules or []] == [DEFAULT_CRON]
    quickstart = load_config(str(REPO / "configs" / "quickstart.yaml"), [])
    assert Config.model_validate(dep.parameters["config"]) == quickstart
    assert set(dep.parameters) == set(deployment_parameters(quickstart)) and dep.parameters["show_progress"] is False


def test_prefect_yaml_deploys_to_the_server(server: Server) -> None:
    """`prefect deploy` (Prefect's own CLI) registers prefect.yaml's deployment with its cron schedule."""
    from dmsae.config import Config, load_config

    for cmd in (["work-pool", "create", "dmsae", "--type", "process"],
                ["--no-prompt", "deploy", "--name", "quickstart-nightly"]):
        proc = subprocess.run([str(PREFECT), *cmd], env=server.env, cwd=REPO, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with client(server) as c:
        dep = c.read_deployment_by_name(f"{FLOW_NAME}/quickstart-nightly")
    assert [s.schedule.cron for s in dep.schedules] == [CRON] and dep.schedules[0].active
    assert dep.work_pool_name == "dmsae" and dep.entrypoint == "flows/distill.py:distill"
    # the default pull step `prefect deploy` adds: runs execute in the checkout it was deployed from
    assert dep.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
    quickstart = load_config(str(REPO / "configs" / "quickstart.yaml"), [])
    assert Config.model_validate(dep.parameters["config"]) == quickstart


def _pinned(package: str) -> str:
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.lower().startswith(f"{package}=="):
            return line.split("==", 1)[1].strip()
    raise AssertionError(f"{package} is not pinned in constraints.txt")

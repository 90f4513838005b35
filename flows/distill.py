"""Prefect wiring of the distillation plan: one task run per stage, Cached when its artifact exists.

The flow only wires: the stage maths live in `stages/`, keys and execution in `flows.pipeline`.
A user mistake (bad path, too few tokens, ...) ends the task in a Failed state carrying the
one-line message, without a traceback and without retries.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, Failed, State
from prefect.task_runners import ThreadPoolTaskRunner

from dmsae.config import Config
from dmsae.errors import UserError
from dmsae.plan import Node
from dmsae.reports.run import write_report
from dmsae.reports.tables import results_table
from dmsae.runtime import Runtime
from dmsae.stores import AnyStore, open_store, store_for
from flows.pipeline import materialize, plan, preflight, run_record

PROGRESS_EVERY_S = 2.0
INVALID_INPUT = "InvalidInput"  # state name of a run stopped by a user mistake


def _progress_reporter(node: Node) -> Any:
    """A callback that mirrors a stage's progress into a Prefect progress artifact, throttled."""
    artifact_id = create_progress_artifact(
        progress=0.0, key=f"progress-{node.stage.replace('_', '-')}", description=f"{node.label} {node.key}"
    )
    last = [0.0]

    def report(fraction: float, _message: str) -> None:
        now = time.monotonic()
        if now - last[0] >= PROGRESS_EVERY_S or fraction >= 1.0:
            last[0] = now
            update_progress_artifact(artifact_id=artifact_id, progress=100.0 * min(1.0, fraction))

    return report


def retry_unless_user_error(_task: Any, _task_run: Any, state: State) -> bool:
    """Retry transient failures (I/O, a lost server connection), never a user's mistake: it would fail
    the same way again."""
    return state.name != INVALID_INPUT and not isinstance(state.data, UserError)


@task(cache_policy=NO_CACHE, persist_result=False, retry_condition_fn=retry_unless_user_error)
def run_stage(store_location: str, store_options: dict[str, Any], node: Node, device: str, show_progress: bool,
              threads: int | None = None) -> State:
    """One stage on whichever machine runs the task: only the store's location and its non-secret options
    travel (secrets come from that machine's environment)."""
    if threads:  # a Dask worker process: its share of the cores
        import torch

        torch.set_num_threads(threads)
    store = open_store(store_location, store_options)
    # the progress artifact only for work that runs: a cached stage is checked and returned at once
    rt = Runtime(device=device, show_progress=show_progress,
                 on_progress=None if store.has(node.stage, node.key) else _progress_reporter(node))
    try:
        _, computed = materialize(store, node, rt)
    except UserError as e:
        return Failed(name=INVALID_INPUT, message=str(e), data=e)
    if not computed:
        return Completed(data=node.key, name="Cached", message=f"{node.label} {node.key} already in the store")
    return Completed(data=node.key, message=f"{node.label} {node.key} computed")


def execute(nodes: list[Node], cfg: Config, store: AnyStore,
            show_progress: bool = True) -> tuple[list[str], State | None]:
    """Submit every node to the flow's task runner, each waiting for its inputs, so a parallel runner runs
    independent stages at once and a serial one runs them in plan order. Returns the labels computed (not
    found in the store) and, when a stage failed, the flow's Failed state carrying its one-line message."""
    from flows.runner import stage_resources

    stage_task = run_stage.with_options(retries=cfg.retries, retry_delay_seconds=cfg.retry_delay_seconds)
    threads = cfg.dask.threads if cfg.runner == "dask" else None
    futures: dict[tuple[str, str], Any] = {}
    with dask_annotations(stage_resources(cfg.device) if cfg.runner == "dask" else {}):
        for node in nodes:
            waits = [futures[(n.stage, n.key)] for n in node.inputs.values()]
            futures[(node.stage, node.key)] = stage_task.with_options(task_run_name=node.label).submit(
                store.location, cfg.store_options.client_options(), node, cfg.device, show_progress, threads,
                wait_for=waits)
    computed: list[str] = []
    failure: State | None = None
    for node in nodes:
        future = futures[(node.stage, node.key)]
        future.wait()
        state = future.state
        if state.is_completed():
            if state.name != "Cached":
                computed.append(node.label)
        elif failure is None and state.is_failed():  # the first failure in plan order; the rest waited on it
            user_error = state.name == INVALID_INPUT or isinstance(state.result(raise_on_failure=False), UserError)
            failure = Failed(name=INVALID_INPUT if user_error else "Failed",
                             message=state.message or f"{node.label} failed")
    incomplete = [n.label for n in nodes if not futures[(n.stage, n.key)].state.is_completed()]
    if failure is None and incomplete:  # neither done nor failed: never ran (a crashed worker, say)
        failure = Failed(name="Failed", message="a stage did not run: " + ", ".join(incomplete))
    return computed, failure


@contextlib.contextmanager
def dask_annotations(resources: dict[str, int]) -> Iterator[None]:
    """Dask resources for the tasks submitted inside (a stage on a GPU run asks for one GPU)."""
    if not resources:
        yield
        return
    import dask

    with dask.annotate(resources=resources):
        yield


@flow(name="dmsae-distill", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=1))
def distill(config: dict[str, Any], show_progress: bool = True) -> dict[str, Any]:
    """Run every stage of the plan in order; returns {"keys": {stage label: key}, "computed": [labels
    this run computed, as opposed to found in the store]}."""
    try:
        cfg = Config.model_validate(config)
    except ValueError as e:  # a deployment's parameters edited in the UI land here
        return Failed(name=INVALID_INPUT, message=f"config: {str(e).splitlines()[0]}")  # type: ignore[return-value]
    if cfg.threads:  # runs of a served deployment start here, not in the CLI
        import torch

        torch.set_num_threads(cfg.threads)
    store = store_for(cfg)
    try:
        p = plan(cfg)
        preflight(cfg, p, store)
        store.ensure_writable()
        previous = store.read_run(cfg.name) if store.has_run(cfg.name) else None
    except UserError as e:
        return Failed(name=INVALID_INPUT, message=str(e))  # type: ignore[return-value]
    parent = previous.parent if previous is not None else None
    created = previous.created if previous is not None else ""
    # recorded before anything runs, so `dmsae gc` keeps what a running pipeline is about to use
    store.write_run(run_record(cfg, p, "running", parent, created))
    computed, failure = execute(p.nodes, cfg, store, show_progress)
    if failure is not None:
        store.write_run(run_record(cfg, p, "failed", parent, created))
        return failure  # type: ignore[return-value]
    keys = {node.label: node.key for node in p.nodes}
    store.write_run(run_record(cfg, p, "complete", parent, created))
    summary = write_report(cfg, store, p, Path(cfg.report_dir) / cfg.name)
    create_markdown_artifact(markdown=summary.read_text(), key="dmsae-summary", description=f"dmsae run {cfg.name}")
    table = results_table(store, p)
    if not table.empty:
        create_table_artifact(table=table.round(4).astype(object).where(table.notna(), None).to_dict("records"),
                              key="dmsae-metrics", description=f"SAEs of {cfg.name} on held-out eval tokens")
    return {"keys": keys, "computed": computed}

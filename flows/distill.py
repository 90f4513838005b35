"""Prefect wiring of the distillation plan: one task run per stage, Cached when its artifact exists.

The flow only wires: the stage maths live in `stages/`, keys and execution in `dmsae.pipeline`.
A user mistake (bad path, too few tokens, ...) ends the task in a Failed state carrying the
one-line message, without a traceback and without retries.
"""

from __future__ import annotations

import time
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

from dmsae.config import Config
from dmsae.errors import UserError
from dmsae.pipeline import Node, materialize, plan
from dmsae.report import results_table, write_report
from dmsae.runtime import Runtime
from dmsae.store import Store

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


@task(cache_policy=NO_CACHE, persist_result=False)
def run_stage(store_root: str, node: Node, device: str, show_progress: bool) -> State:
    store = Store(store_root)
    if store.has(node.stage, node.key):
        return Completed(data=node.key, name="Cached", message=f"{node.label} {node.key} already in the store")
    rt = Runtime(device=device, show_progress=show_progress, on_progress=_progress_reporter(node))
    try:
        _, computed = materialize(store, node, rt)
    except UserError as e:
        return Failed(message=str(e), data=e)
    if not computed:  # another process finished it while we waited
        return Completed(data=node.key, name="Cached", message=f"{node.label} computed by another run")
    return Completed(data=node.key, message=f"{node.label} {node.key} computed")


@flow(name="dmsae-distill", log_prints=True)
def distill(config: dict[str, Any], show_progress: bool = True) -> dict[str, str]:
    """Run every stage of the plan in order; returns {stage label: key}."""
    cfg = Config.model_validate(config)
    p = plan(cfg)
    store = Store(cfg.store)
    keys: dict[str, str] = {}
    for node in p.nodes:
        state = run_stage.with_options(task_run_name=node.label)(
            str(store.root), node, cfg.device, show_progress, return_state=True
        )
        if state.is_failed():
            error = state.result(raise_on_failure=False)
            name = INVALID_INPUT if isinstance(error, UserError) else "Failed"
            return Failed(name=name, message=state.message or f"{node.label} failed")  # type: ignore[return-value]
        keys[node.label] = node.key
    store.write_run(cfg.name, {"name": cfg.name, "config": cfg.model_dump(mode="json"), "keys": keys})
    summary = write_report(cfg, store, p, Path(cfg.report_dir) / cfg.name)
    create_markdown_artifact(markdown=summary.read_text(), key="dmsae-summary", description=f"dmsae run {cfg.name}")
    table = results_table(store, p)
    if not table.empty:
        create_table_artifact(table=table.round(4).astype(object).where(table.notna(), None).to_dict("records"),
                              key="dmsae-metrics", description=f"SAEs of {cfg.name} on held-out eval tokens")
    return keys

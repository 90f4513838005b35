"""Sweeps: a grid of runs branched from one base config, planned together so every stage two points share
is computed once, and run on one task runner (Dask by default) so independent stages run at once.

    dmsae sweep configs/quickstart.yaml --grid selection.tau=0.7,0.8,0.9 --grid seed=0,1

Each point is an ordinary run (recorded with the base run as its parent, as `dmsae branch` does); the
sweep record lists them with their grid values.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.states import Failed, State

from dmsae.config import Config, config_warnings, load_config
from dmsae.errors import UserError
from dmsae.plan import Node, Plan
from dmsae.reports.run import write_report
from dmsae.reports.sweep import write_sweep_report
from dmsae.store import SweepRecord
from dmsae.stores import AnyStore, store_for
from flows.distill import execute
from flows.pipeline import plan, preflight, run_record
from flows.runner import setup_torch

# run-level keys a point cannot vary: the points share one store, one report folder and one task runner
FIXED_KEYS = ("name", "store", "report_dir", "runner", "dask", "device", "threads")


def split_values(raw: str) -> list[str]:
    """'0.7,0.8' -> ['0.7', '0.8']; commas inside brackets stay ('[16, 32],[64]' is two lists)."""
    values, depth, current = [], 0, ""
    for ch in raw:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += ch
    values.append(current.strip())
    return [v for v in values if v]


def parse_grid(items: list[str], grid_file: str | None) -> dict[str, list[str]]:
    """`--grid KEY=V1,V2` items and a YAML file of `KEY: [V1, V2]` into {dotted key: raw values}."""
    grid: dict[str, list[str]] = {}
    if grid_file is not None:
        path = Path(grid_file)
        if not path.is_file():
            raise UserError(f"--grid-file {grid_file}: no such file; give a YAML mapping of key: [values]")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise UserError(f"--grid-file {grid_file}: not valid YAML ({str(e).splitlines()[0]})") from None
        data = data.get("grid", data) if isinstance(data, dict) else data
        if not isinstance(data, dict) or not data:
            raise UserError(f"--grid-file {grid_file}: expected a mapping of dotted keys to lists of values")
        for key, values in data.items():
            values = values if isinstance(values, list) else [values]
            grid[str(key)] = [yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()
                              for v in values]
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--grid {item!r}: expected KEY=V1,V2,..., e.g. --grid selection.tau=0.7,0.8")
        values = split_values(raw)
        if not values:
            raise UserError(f"--grid {key}: no values; give at least one, e.g. --grid {key}=1,2")
        grid[key.strip()] = values
    if not grid:
        raise UserError("sweep: the grid is empty; give --grid KEY=V1,V2 (or --grid-file)")
    for key in grid:
        if key.split(".")[0] in FIXED_KEYS:
            raise UserError(f"--grid {key}: every point shares the sweep's {key.split('.')[0]}; set it with --set")
    return grid


def point_name(sweep: str, assignment: dict[str, str]) -> str:
    """A run name that says the point's grid values: quickstart-sweep-tau0.7-seed1."""
    parts = [re.sub(r"[^A-Za-z0-9._-]+", "", k.split(".")[-1] + v) for k, v in assignment.items()]
    return "-".join([sweep, *parts])[:100]


def sweep_points(config: str, sets: list[str], grid: dict[str, list[str]], name: str | None
                 ) -> tuple[Config, str, list[tuple[str, dict[str, str], Config]]]:
    """(the base config, the sweep name, and per point: run name, grid values, validated config)."""
    base = load_config(config, sets)
    sweep = name or f"{base.name}-sweep"
    points, seen = [], set()
    for combo in itertools.product(*grid.values()):
        assignment = dict(zip(grid, combo, strict=True))
        run = point_name(sweep, assignment)
        if run in seen:  # values that differ only in characters a name cannot hold
            run = f"{sweep}-p{len(points)}"
        seen.add(run)
        try:
            cfg = load_config(config, [*sets, *(f"{k}={v}" for k, v in assignment.items()), f"name={run}"])
        except UserError as e:
            where = ", ".join(f"{k}={v}" for k, v in assignment.items())
            raise UserError(f"--grid point {where}: {e}") from None
        points.append((run, assignment, cfg))
    return base, sweep, points


@dataclass
class Sweep:
    """A sweep checked and planned, before anything is written."""

    base: Config
    name: str
    points: list[tuple[str, dict[str, str], Config]]  # run name, grid values, config
    plans: list[Plan]
    warnings: list[str]  # config warnings of the points, each once


def prepare_sweep(config: str, sets: list[str], grid: dict[str, list[str]], name: str | None) -> Sweep:
    """Every point's config, plan and preflight: the checks `dmsae sweep` makes before it writes anything."""
    base, sweep, points = sweep_points(config, sets, grid, name)
    store = store_for(base)
    if store.has_sweep(sweep) and store.read_sweep(sweep).grid != grid:
        raise UserError(f"--name {sweep}: a sweep of another grid is recorded under this name; choose another name")
    setup_torch(base)
    notes: dict[str, None] = {}
    plans = []
    for _, _, cfg in points:
        notes.update(dict.fromkeys(config_warnings(cfg)))
        p = plan(cfg)
        preflight(cfg, p, store)
        plans.append(p)
    return Sweep(base, sweep, points, plans, list(notes))


def run_sweep(sweep: Sweep, grid: dict[str, list[str]], show_progress: bool) -> State:
    """Record the sweep and run `sweep_flow` on the base config's task runner (progress bars only when local)."""
    from flows.runner import shared_prefect_api, task_runner

    base = sweep.base
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    record = SweepRecord(name=sweep.name, base=base.name, grid=grid, status="planned", created=now, updated=now,
                         points=[{"run": run, "values": values} for run, values, _ in sweep.points])
    runner = task_runner(base.runner, base.dask, base.device, cfg=base)
    with shared_prefect_api() if base.runner == "dask" else contextlib.nullcontext():
        return sweep_flow.with_options(task_runner=runner)(
            base.model_dump(mode="json"), [c.model_dump(mode="json") for _, _, c in sweep.points],
            record.model_dump(mode="json"), show_progress=show_progress and base.runner == "local",
            return_state=True)


def unique_nodes(plans: list[Plan]) -> list[Node]:
    """Every plan's nodes once, in an order where inputs come first: equal (stage, key) is equal work."""
    seen: dict[tuple[str, str], Node] = {}
    for p in plans:
        for node in p.nodes:
            seen.setdefault((node.stage, node.key), node)
    return list(seen.values())


def sweep_plans(store: AnyStore, record: SweepRecord) -> dict[str, Plan]:
    """The plan of each of the sweep's points whose run is recorded, by run name (what its report reads)."""
    plans = {}
    for pt in record.points:
        if store.has_run(pt["run"]):
            plans[pt["run"]] = plan(Config.model_validate(store.read_run(pt["run"]).config))
    return plans


@flow(name="dmsae-sweep", log_prints=True)
def sweep_flow(base: dict[str, Any], points: list[dict[str, Any]], sweep: dict[str, Any],
               show_progress: bool = False) -> dict[str, Any]:
    """Run every point's plan as one graph on the flow's task runner. Returns {"points": {run: status},
    "computed": [stage labels computed], "unique_stages": n}."""
    base_cfg = Config.model_validate(base)
    cfgs = [Config.model_validate(c) for c in points]
    record = SweepRecord.model_validate(sweep)
    store = store_for(base_cfg)
    plans = [plan(c) for c in cfgs]
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    for cfg, p in zip(cfgs, plans, strict=True):  # recorded first, so `dmsae gc` keeps what the sweep will use
        store.write_run(run_record(cfg, p, "running", parent=base_cfg.name))
    store.write_sweep(record.model_copy(update={"status": "running", "updated": now}))
    nodes = unique_nodes(plans)
    computed, failure = execute(nodes, base_cfg, store, show_progress)
    statuses = {}
    for cfg, p in zip(cfgs, plans, strict=True):
        done = all(store.has(n.stage, n.key) for n in p.nodes)
        statuses[cfg.name] = "complete" if done else "failed"
        store.write_run(run_record(cfg, p, statuses[cfg.name], parent=base_cfg.name))
        if done:
            write_report(cfg, store, p, Path(cfg.report_dir) / cfg.name)
    status = "complete" if failure is None else "failed"
    record = record.model_copy(update={"status": status, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    store.write_sweep(record)
    report = write_sweep_report(store, record, sweep_plans(store, record), Path(base_cfg.report_dir) / record.name)
    create_markdown_artifact(markdown=report.read_text(), key="dmsae-sweep", description=f"sweep {record.name}")
    if failure is not None:
        return Failed(name=failure.name, message=failure.message)  # type: ignore[return-value]
    return {"points": statuses, "computed": computed, "unique_stages": len(nodes)}

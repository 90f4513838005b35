"""Sweeps: a grid of runs branched from one base config, planned together so every stage two points share
is computed once, and run on one task runner (Dask by default) so independent stages run at once.

    dmsae sweep configs/quickstart.yaml --grid selection.tau=0.7,0.8,0.9 --grid seed=0,1

Each point is an ordinary run (recorded with the base run as its parent, as `dmsae branch` does); the
sweep record lists them with their grid values.
"""

from __future__ import annotations

import itertools
import re
import time
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.states import Failed

from dmsae.config import Config, load_config
from dmsae.errors import UserError
from dmsae.store import Store, SweepRecord
from flows.distill import INVALID_INPUT, execute
from flows.pipeline import Node, Plan, plan, run_record
from flows.report import write_report

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


def unique_nodes(plans: list[Plan]) -> list[Node]:
    """Every plan's nodes once, in an order where inputs come first: equal (stage, key) is equal work."""
    seen: dict[tuple[str, str], Node] = {}
    for p in plans:
        for node in p.nodes:
            seen.setdefault((node.stage, node.key), node)
    return list(seen.values())


@flow(name="dmsae-sweep", log_prints=True)
def sweep_flow(base: dict[str, Any], points: list[dict[str, Any]], sweep: dict[str, Any],
               show_progress: bool = False) -> dict[str, Any]:
    """Run every point's plan as one graph on the flow's task runner. Returns {"points": {run: status},
    "computed": [stage labels computed], "unique_stages": n}."""
    base_cfg = Config.model_validate(base)
    cfgs = [Config.model_validate(c) for c in points]
    record = SweepRecord.model_validate(sweep)
    store = Store(base_cfg.store)
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
    report = write_sweep_report(store, record, Path(base_cfg.report_dir) / record.name)
    create_markdown_artifact(markdown=report.read_text(), key="dmsae-sweep", description=f"sweep {record.name}")
    if failure is not None:
        return Failed(name=failure.name, message=failure.message)  # type: ignore[return-value]
    return {"points": statuses, "computed": computed, "unique_stages": len(nodes)}


__all__ = ["INVALID_INPUT", "parse_grid", "sweep_flow", "sweep_points", "unique_nodes", "write_sweep_report"]


# -- the sweep report -----------------------------------------------------------------------------------------
def sweep_tables(store: Store, record: SweepRecord) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(per point: grid values and final-core facts; per point, arm and k: the SAE metrics; the Jaccard of
    the final cores' lineage ids between points) for the points whose runs are complete."""
    from flows.report import _lineage_ids, core_overlap, results_table

    points, arms, cores = [], [], {}
    for pt in record.points:
        if not store.run_path(pt["run"]).is_file():
            continue
        cfg = Config.model_validate(store.read_run(pt["run"]).config)
        p = plan(cfg)
        if not all(store.has(n.stage, n.key) for n in p.nodes):
            continue
        final = p.last_core()
        m = store.manifest("select", final.key).metrics
        overlap = core_overlap(store, p)
        points.append({"run": pt["run"], **pt["values"], "core_size": m["core_size"],
                       "cap_bit": bool(m.get("cap_bit")), "explained_fraction": m.get("explained_fraction"),
                       "cycle_jaccard": float(overlap.jaccard.mean()) if len(overlap) else None})
        table = results_table(store, p)
        table = table[table.arm != "cycle"].copy()
        table.insert(0, "run", pt["run"])
        arms.append(table)
        cores[pt["run"]] = _lineage_ids(store, final)
    names = list(cores)
    jaccard = pd.DataFrame([[len(cores[a] & cores[b]) / max(1, len(cores[a] | cores[b])) for b in names]
                            for a in names], index=names, columns=names)
    return pd.DataFrame(points), (pd.concat(arms, ignore_index=True) if arms else pd.DataFrame()), jaccard


def plot_sweep(points: pd.DataFrame, arms: pd.DataFrame, jaccard: pd.DataFrame, record: SweepRecord,
               path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = record.grid
    first = next(iter(grid))

    def short(run: str) -> str:
        return run.removeprefix(record.name + "-")

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    x = pd.to_numeric(points[first], errors="coerce")
    others = [k for k in grid if k != first]
    for label, g in (points.assign(_x=x).groupby(others) if others else [("", points.assign(_x=x))]):
        g = g.sort_values("_x")
        axes[0].plot(g._x if g._x.notna().all() else g[first].astype(str), g.core_size, marker="o",
                     label=", ".join(f"{k}={v}" for k, v in zip(others, label if isinstance(label, tuple)
                                                                else (label,), strict=False)) or None)
    axes[0].set_xlabel(first)
    axes[0].set_ylabel("final core size")
    axes[0].set_title("Core size across the grid")
    if others:
        axes[0].legend(fontsize=7)
    styles = {"distilled": "-", "random": ":", "none": "--"}
    for (run, arm), g in arms.groupby(["run", "arm"]) if not arms.empty else []:
        if arm in styles:
            g = g.sort_values("l0")
            axes[1].plot(g.l0, g.ce_loss_score, styles[arm], marker="o", ms=3,
                         label=f"{short(run)} {arm}")
    axes[1].set_xscale("log", base=2)
    axes[1].set_xlabel("total L0 (eval tokens)")
    axes[1].set_ylabel("CE-loss score")
    axes[1].set_title("Reuse arms per point")
    if axes[1].get_legend_handles_labels()[0]:  # a grid without reuse arms has nothing to plot here
        axes[1].legend(fontsize=6, ncol=2)
    im = axes[2].imshow(jaccard.to_numpy(), vmin=0, vmax=1, cmap="viridis")
    labels = [short(n) for n in jaccard.index]
    axes[2].set_xticks(range(len(labels)), labels, rotation=60, fontsize=7, ha="right")
    axes[2].set_yticks(range(len(labels)), labels, fontsize=7)
    axes[2].set_title("Final-core Jaccard between points")
    fig.colorbar(im, ax=axes[2], fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_sweep_report(store: Store, record: SweepRecord, out_dir: Path) -> Path:
    """<out_dir>/sweep.md with the tables, sweep.png with the plots, sweep_points.csv and sweep_arms.csv."""
    from flows.report import _md_table

    out_dir.mkdir(parents=True, exist_ok=True)
    points, arms, jaccard = sweep_tables(store, record)
    grid = ", ".join(f"`{k}` = {', '.join(v)}" for k, v in record.grid.items())
    parts = [f"# Sweep {record.name}", "", f"Base run `{record.base}`; grid: {grid}; "
             f"{len(points)} of {len(record.points)} points complete.", ""]
    if not points.empty:
        points.to_csv(out_dir / "sweep_points.csv", index=False)
        arms.to_csv(out_dir / "sweep_arms.csv", index=False)
        plot_sweep(points, arms, jaccard, record, out_dir / "sweep.png")
        cols = [c for c in ("run", "arm", "k", "core_size", "l0", "explained_variance", "ce_loss_score",
                            "dead_fraction") if c in arms.columns]
        parts += ["## Points: the final core", "", _md_table(points), "",
                  "## Reuse arms per point (held-out eval tokens)", "",
                  _md_table(arms[cols].sort_values(["run", "arm", "k"]), "{:.4f}"), "",
                  "## Final-core Jaccard between points (lineage ids; across seeds they never match)", "",
                  _md_table(jaccard.reset_index(names="run")), "", "![the sweep](sweep.png)", ""]
    path = out_dir / "sweep.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(parts) + "\n")
    tmp.replace(path)
    return path

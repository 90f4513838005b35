"""The report of a sweep: per grid point its final core, its reuse arms and the final cores' overlap between
points, as tables (sweep.md, CSV) and one figure (sweep.png)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from dmsae.plan import Plan
from dmsae.reports.tables import core_overlap, lineage_ids, md_table, results_table, write_text_atomically
from dmsae.store import SweepRecord
from dmsae.stores import AnyStore


def sweep_tables(store: AnyStore, record: SweepRecord, plans: Mapping[str, Plan]
                 ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(per point: grid values and final-core facts; per point, arm and k: the SAE metrics; the Jaccard of
    the final cores' lineage ids between points) for the points whose runs are complete. `plans`: the plan of
    each recorded point's run, by run name."""
    points, arms, cores = [], [], {}
    for pt in record.points:
        p = plans.get(pt["run"])
        if p is None or not all(store.has(n.stage, n.key) for n in p.nodes):
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
        cores[pt["run"]] = lineage_ids(store, final)
    names = list(cores)
    jaccard = pd.DataFrame([[len(cores[a] & cores[b]) / max(1, len(cores[a] | cores[b])) for b in names]
                            for a in names], index=names, columns=names)
    return pd.DataFrame(points), (pd.concat(arms, ignore_index=True) if arms else pd.DataFrame()), jaccard


def plot_sweep(points: pd.DataFrame, arms: pd.DataFrame, jaccard: pd.DataFrame, record: SweepRecord,
               path: Path) -> None:
    """Core size over the first grid key, each point's reuse arms over L0, and the final-core Jaccard."""
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
    styles = {"distilled": ("-", "o"), "random": (":", "o"), "none": ("--", "o"), "frequency": ("-.", "^"),
              "none_compute": ("--", "s")}
    for (run, arm), g in arms.groupby(["run", "arm"]) if not arms.empty else []:
        if arm in styles:
            g = g.sort_values("l0")
            line, marker = styles[arm]
            axes[1].plot(g.l0, g.ce_loss_score, line, marker=marker, ms=3, label=f"{short(run)} {arm}")
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


def write_sweep_report(store: AnyStore, record: SweepRecord, plans: Mapping[str, Plan], out_dir: Path) -> Path:
    """<out_dir>/sweep.md with the tables, sweep.png with the plots, sweep_points.csv and sweep_arms.csv."""
    out_dir.mkdir(parents=True, exist_ok=True)
    points, arms, jaccard = sweep_tables(store, record, plans)
    grid = ", ".join(f"`{k}` = {', '.join(v)}" for k, v in record.grid.items())
    parts = [f"# Sweep {record.name}", "", f"Base run `{record.base}`; grid: {grid}; "
             f"{len(points)} of {len(record.points)} points complete.", ""]
    if not points.empty:
        points.to_csv(out_dir / "sweep_points.csv", index=False)
        arms.to_csv(out_dir / "sweep_arms.csv", index=False)
        plot_sweep(points, arms, jaccard, record, out_dir / "sweep.png")
        cols = [c for c in ("run", "arm", "k", "core_size", "l0", "explained_variance", "ce_loss_score",
                            "dead_fraction") if c in arms.columns]
        parts += ["## Points: the final core", "", md_table(points), "",
                  "## Reuse arms per point (held-out eval tokens)", "",
                  "Arms as in docs/design.md: distilled, random and no core at every k; the controls `frequency` "
                  "(the most often firing latents of the same SAE) and `none_compute` (no core, as many training "
                  "tokens as the distillation) at `reuse.control_k`.", "",
                  md_table(arms[cols].sort_values(["run", "arm", "k"]), "{:.4f}"), "",
                  "## Final-core Jaccard between points (lineage ids; across seeds they never match)", "",
                  md_table(jaccard.reset_index(names="run")), "", "![the sweep](sweep.png)", ""]
    return write_text_atomically(out_dir / "sweep.md", "\n".join(parts) + "\n")

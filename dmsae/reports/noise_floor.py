"""The noise floor of a one-seed comparison: the no-core reuse arm trained again with another seed, read against
the first seed's no-core curve at its own measured L0, exactly as a cored arm is read (`dmsae ablate
--noise-floor-seed`)."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import pandas as pd

from dmsae.eval.l0match import read_at_l0
from dmsae.plan import Node, Plan
from dmsae.reports.tables import md_table
from dmsae.stores import AnyStore

METRICS = {"evaluate": ("l0", "ce_loss_score", "explained_variance"),
           "interpret": ("absorption_fraction", "sparse_probe_k1", "sparse_probe_k5")}


@dataclass(frozen=True)
class NoiseFloor:
    seed: int  # the retrained no-core arm's seed
    reference_seed: int  # whose no-core curve it is read against
    ks: tuple[int, ...]
    table: pd.DataFrame  # per k: the arm's metrics and d_* against the reference curve; empty until computed


def sae_k(node: Node) -> int:
    return node.inputs["sae"].params["sae"]["k"]


def no_core_nodes(p: Plan, ks: Collection[int] | None = None) -> list[Node]:
    """The no-core arm's evaluate and interpret nodes at `ks` (every reuse k when None)."""
    return [n for n in p.nodes if n.stage in METRICS and n.inputs["sae"].stage == "reuse"
            and n.inputs["sae"].params["arm"] == "none" and (ks is None or sae_k(n) in ks)]


def arm_table(store: AnyStore, nodes: list[Node], seed: int) -> pd.DataFrame:
    """One row per SAE of `nodes`: its seed, k and the metrics of its evaluate and interpret stages."""
    rows: dict[str, dict[str, float]] = {}
    for n in nodes:
        m = store.manifest(n.stage, n.key).metrics
        rows.setdefault(n.inputs["sae"].key, {"seed": seed, "k": sae_k(n)}).update({c: m[c] for c in METRICS[n.stage]})
    return pd.DataFrame(rows.values())


def noise_floor(store: AnyStore, reference: Plan, reference_seed: int, other: Plan, seed: int,
                ks: Collection[int]) -> NoiseFloor:
    """The other seed's no-core arm at `ks` against the reference run's no-core curve (an empty table while any
    of its stages is missing)."""
    nodes = no_core_nodes(other, ks)
    empty = NoiseFloor(seed, reference_seed, tuple(sorted(ks)), pd.DataFrame())
    if not nodes or not all(store.has(n.stage, n.key) for n in nodes):
        return empty
    base = arm_table(store, [n for n in no_core_nodes(reference) if store.has(n.stage, n.key)], reference_seed)
    if base.empty:
        return empty
    base = base.sort_values("l0")
    again = arm_table(store, nodes, seed).sort_values("k")
    for metric in ("ce_loss_score", "explained_variance", *METRICS["interpret"]):
        if metric not in again.columns:  # interpretation off: no absorption or probing to compare
            continue
        reference_values = [read_at_l0(base.l0.to_numpy(), base[metric].to_numpy(dtype=float), at)[0]
                            for at in again.l0]
        again[f"d_{metric}"] = again[metric] - reference_values
    return NoiseFloor(seed, reference_seed, tuple(sorted(ks)), again)


def mean_abs_deltas(table: pd.DataFrame) -> dict[str, float]:
    """The mean |d| of every d_* column, rounded to 4 places."""
    return {c: round(float(np.abs(table[c]).mean()), 4) for c in table.columns if c.startswith("d_")}


def noise_floor_text(nf: NoiseFloor) -> str:
    """The table as plain text, and the mean |d| per metric."""
    return nf.table.round(4).to_string(index=False) + "\nmean |d|: " + str(mean_abs_deltas(nf.table))


def noise_floor_markdown(nf: NoiseFloor) -> list[str]:
    """The ablation report's section on the noise floor."""
    ks = ", ".join(map(str, nf.ks))
    parts = ["## Noise floor: the no-core arm with another seed", "",
             f"The no-core reuse arm trained again with seed {nf.seed} at k = {ks}, read against seed "
             f"{nf.reference_seed}'s no-core curve at its own measured L0, exactly as a cored arm is read: `d_*` is "
             "what seed noise alone gives a difference in the tables above.", ""]
    if nf.table.empty:
        return parts + ["Not computed yet (run the ablation without `--report-only`).", ""]
    means = ", ".join(f"`{c}` {v:.4f}" for c, v in mean_abs_deltas(nf.table).items())
    return parts + [md_table(nf.table, "{:.4f}"), "", f"Mean |d|: {means}.", ""]

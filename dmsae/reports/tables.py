"""Tables several reports share: the per-SAE metrics, absorption and probing beside them, the core overlap
between cycles, and a markdown rendering of a DataFrame."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from dmsae import readers
from dmsae.plan import Node, Plan
from dmsae.stores import AnyStore

ARM_COLORS = {"distilled": "tab:blue", "random": "tab:orange", "none": "tab:gray", "frequency": "tab:green",
              "none_compute": "tab:purple"}
ARM_LABELS = {"distilled": "distilled core", "random": "random core", "none": "no core",
              "frequency": "frequency core", "none_compute": "no core, compute-matched"}
TABLE_COLUMNS = ["sae", "arm", "cycle", "k", "seed", "core_size", "l0", "l0_noncore", "explained_variance", "mse",
                 "cosine", "ce_loss_score", "kl_score", "dead_fraction", "dense_fraction"]
INTERPRET_COLUMNS = ["absorption_fraction", "absorption_rate", "sparse_probe_k1", "sparse_probe_k2",
                     "sparse_probe_k5", "sparse_probe_k10", "dense_probe"]


def md_table(df: pd.DataFrame, floatfmt: str = "{:.3f}") -> str:
    """A markdown table; floats through `floatfmt`, missing values empty, "(none)" for no rows."""
    if df.empty:
        return "(none)"
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df.itertuples(index=False):  # itertuples keeps each column's type; iterrows upcasts ints
        cells = ["" if pd.isna(v) else floatfmt.format(v) if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def interim_report(write: Callable[[], Any], what: str) -> bool:
    """Rewrite a study's report between its points. A failure is a one-line warning and False, never the end of
    the study: hours of training must not stop on a report bug (a re-run would meet it again after the first
    point and never get further). The report written at the end is not guarded: it fails loudly."""
    try:
        write()
    except Exception as e:  # noqa: BLE001 - any report bug; the computation it reports on goes on
        print(f"{what}: the interim report failed ({type(e).__name__}: {e}); the next points still run and the "
              "report is written again at the end", file=sys.stderr, flush=True)
        return False
    return True


def write_text_atomically(path: Path, text: str) -> Path:
    """Write through a temporary file and a rename, so a reader never sees half a report."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def results_table(store: AnyStore, p: Plan) -> pd.DataFrame:
    """One row per evaluated SAE (cycle SAEs and reuse arms)."""
    rows: list[dict[str, Any]] = []
    for ev in p.of_stage("evaluate"):
        if not store.has("evaluate", ev.key):
            continue
        sae = ev.inputs["sae"]
        m = store.manifest("evaluate", ev.key).metrics
        rows.append({
            "sae": sae.label,
            "arm": sae.params["arm"] if sae.stage == "reuse" else "cycle",
            "cycle": sae.cycle if sae.stage == "train" else None,
            "k": m["k"], "seed": sae.params["seed"], "core_size": m["core_size"],
            **{c: m[c] for c in TABLE_COLUMNS[6:]},
        })
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    return table.astype({"cycle": "Int64"})


def interpret_table(store: AnyStore, p: Plan, table: pd.DataFrame) -> pd.DataFrame:
    """Absorption and sparse probing beside each evaluated SAE's L0 (empty when nothing was interpreted)."""
    rows = []
    for node in p.of_stage("interpret"):
        if not store.has(node.stage, node.key):
            continue
        m = store.manifest(node.stage, node.key).metrics
        rows.append({"sae": node.inputs["sae"].label,
                     **{c: (float("nan") if m.get(c) is None else m[c]) for c in INTERPRET_COLUMNS}})
    if not rows:
        return pd.DataFrame()
    cols = ["sae", "arm", "k", "seed", "l0"]
    return table[cols].merge(pd.DataFrame(rows), on="sae", how="inner")


def lineage_ids(store: AnyStore, select_node: Node) -> set[tuple[int, int]]:
    """The lineage ids (born cycle, index at birth) of a select artifact's core."""
    lineage = readers.core(store.load("select", select_node.key, verify=False))["lineage"]
    return {(int(a), int(b)) for a, b in lineage.tolist()}


def core_overlap(store: AnyStore, p: Plan) -> pd.DataFrame:
    """Jaccard overlap of the lineage ids of consecutive cycles' cores."""
    cores = [lineage_ids(store, n) for n in p.of_stage("select") if store.has("select", n.key)]
    rows = []
    for c in range(1, len(cores)):
        a, b = cores[c - 1], cores[c]
        rows.append({"cycles": f"{c - 1}->{c}", "jaccard": len(a & b) / max(1, len(a | b)),
                     "kept": len(a & b), "size_before": len(a), "size_after": len(b)})
    return pd.DataFrame(rows)

"""The noise floor of the one-seed paper-ratio comparison: the no-core reuse arm trained again with another
seed at the low k, read against seed 0's no-core curve at its own L0, exactly as a cored arm is.

    python docs/results/paper-ratio/noise_floor.py STORE [--seed 1] [--k 20,40,80] [--threads 2]   # from the repo root

Computes only what STORE lacks (the other seed's no-core reuse, evaluate and interpret stages; model, tokens,
harvest, baseline and probes are shared with the paper-ratio run) and prints the table.
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
import torch

from dmsae.l0match import read_at_l0
from dmsae.runtime import Runtime
from dmsae.store import Store
from flows.ablation import point_config
from flows.pipeline import Node, ancestors, materialize, plan

METRICS = {"evaluate": ("l0", "ce_loss_score", "explained_variance"),
           "interpret": ("absorption_fraction", "sparse_probe_k1", "sparse_probe_k5")}


def sae_k(node: Node) -> int:
    return node.inputs["sae"].params["sae"]["k"]


def no_core_nodes(store_root: str, seed: int, ks: list[int] | None = None) -> tuple[Store, list[Node]]:
    """The no-core arm's evaluate and interpret nodes at `ks` (every reuse k when None)."""
    cfg = point_config("configs/paper-ratio.yaml", [f"store={store_root}"], "topk", "0.6", seed)
    nodes = [n for n in plan(cfg).nodes if n.stage in METRICS and n.inputs["sae"].stage == "reuse"
             and n.inputs["sae"].params["arm"] == "none" and (ks is None or sae_k(n) in ks)]
    return Store(cfg.store), nodes


def table(store: Store, nodes: list[Node], seed: int) -> pd.DataFrame:
    rows: dict[str, dict[str, float]] = {}
    for n in nodes:
        m = store.manifest(n.stage, n.key).metrics
        rows.setdefault(n.inputs["sae"].key, {"seed": seed, "k": sae_k(n)}).update({c: m[c] for c in METRICS[n.stage]})
    return pd.DataFrame(rows.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("store")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--k", default="20,40,80")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.k.split(",")]
    store, other = no_core_nodes(args.store, args.seed, ks)
    todo = {a.key: a for n in other for a in [*ancestors(n), n]}  # inputs first, each once
    for n in todo.values():
        materialize(store, n, Runtime(show_progress=True))
    _, base_nodes = no_core_nodes(args.store, 0)
    base = table(store, [n for n in base_nodes if store.has(n.stage, n.key)], 0).sort_values("l0")
    again = table(store, other, args.seed).sort_values("k")
    for metric in ("ce_loss_score", "explained_variance", *METRICS["interpret"]):
        reference = [read_at_l0(base.l0.to_numpy(), base[metric].to_numpy(dtype=float), at)[0] for at in again.l0]
        again[f"d_{metric}"] = again[metric] - reference
    print(again.round(4).to_string(index=False))
    print("mean |d|:", {c: round(float(np.abs(again[c]).mean()), 4) for c in again.columns if c.startswith("d_")})


if __name__ == "__main__":
    main()

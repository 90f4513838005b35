"""select stage: keep the shortest score-sorted prefix of latents that reaches tau of the total,
truncated to `max_core` latents when a cap is set.

The kept latents' encoder columns become the next cycle's core; their lineage ids, birth bias and birth
threshold travel with them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from dmsae import readers
from dmsae.runtime import Runtime
from dmsae.store import Artifact

NAME = "select"
VERSION = "2"  # 2: max_core; the birth bias and threshold travel with the core
READS_ACTIVATIONS = False


def select_prefix(scores: np.ndarray, tau: float) -> tuple[np.ndarray, int, np.ndarray]:
    """(order, n_keep, cumulative): scores sorted descending with ties by index, and the shortest
    prefix whose sum reaches tau * total (0 when every score is 0)."""
    scores = np.asarray(scores, dtype=np.float64)
    order = np.lexsort((np.arange(scores.size), -scores))
    cumulative = np.cumsum(scores[order])
    total = cumulative[-1] if cumulative.size else 0.0
    if total <= 0:
        return order, 0, cumulative
    n_keep = int(np.searchsorted(cumulative, tau * total, side="left")) + 1
    return order, min(n_keep, scores.size), cumulative


def run(out_dir: Path, params: dict[str, Any], inputs: dict[str, Artifact], rt: Runtime) -> dict[str, Any]:
    scores = readers.attribution_scores(inputs["attribute"]).double().numpy()
    order, n_reach_tau, cumulative = select_prefix(scores, params["tau"])
    cap = params.get("max_core")
    n_keep = n_reach_tau if cap is None else min(n_reach_tau, cap)
    sae_tensors = readers.sae_tensors(inputs["train"])
    lineage_file = readers.lineage(inputs["train"])
    lineage = lineage_file["lineage"]
    kept = torch.from_numpy(order[:n_keep].copy()).long()
    core_size = inputs["train"].metrics["core_size"]
    save_file({
        "indices": kept,
        "encoder": sae_tensors["W_enc"][:, kept].contiguous(),
        "lineage": lineage[kept].contiguous(),
        "bias": lineage_file["birth_bias"][kept].contiguous(),
        "threshold": lineage_file["birth_threshold"][kept].contiguous(),
        "order": torch.from_numpy(order.copy()).long(),
        "sorted_scores": torch.from_numpy(scores[order].copy()),
        "cumulative": torch.from_numpy(cumulative.copy()),
    }, str(out_dir / readers.CORE_FILE))
    born = lineage[kept][:, 0].tolist()
    return {
        "cycle": params["cycle"], "tau": params["tau"], "core_size": n_keep, "n_candidates": int(scores.size),
        # what the cap cost: the size that reached tau, and the attribution the kept core explains
        "max_core": cap, "n_reach_tau": n_reach_tau, "cap_bit": cap is not None and n_reach_tau > cap,
        "explained_fraction": float(cumulative[n_keep - 1] / cumulative[-1]) if n_keep else 0.0,
        "kept_from_previous_core": int((kept < core_size).sum()),
        "born_in_cycle": {str(c): born.count(c) for c in sorted(set(born))},
    }


def describe(metrics: dict[str, Any]) -> str:
    """The status line's detail for a finished select stage."""
    return f"core size {metrics['core_size']}"

"""select stage: keep the shortest score-sorted prefix of latents that reaches tau of the total.

The kept latents' encoder columns become the next cycle's core; their lineage ids travel with them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from dmsae.runtime import Runtime
from dmsae.store import Artifact
from stages import attribute as attribute_stage
from stages import train as train_stage

NAME = "select"
VERSION = "1"
FILE = train_stage.CORE_FILE


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
    scores = load_file(str(inputs["attribute"].file(attribute_stage.FILE)))["scores"].double().numpy()
    order, n_keep, cumulative = select_prefix(scores, params["tau"])
    sae_tensors = load_file(str(inputs["train"].file(train_stage.SAE_FILE)))
    lineage = load_file(str(inputs["train"].file(train_stage.LINEAGE_FILE)))["lineage"]
    kept = torch.from_numpy(order[:n_keep].copy()).long()
    core_size = inputs["train"].metrics["core_size"]
    save_file({
        "indices": kept,
        "encoder": sae_tensors["W_enc"][:, kept].contiguous(),
        "lineage": lineage[kept].contiguous(),
        "order": torch.from_numpy(order.copy()).long(),
        "sorted_scores": torch.from_numpy(scores[order].copy()),
        "cumulative": torch.from_numpy(cumulative.copy()),
    }, str(out_dir / FILE))
    born = lineage[kept][:, 0].tolist()
    return {
        "cycle": params["cycle"], "tau": params["tau"], "core_size": n_keep, "n_candidates": int(scores.size),
        "kept_from_previous_core": int((kept < core_size).sum()),
        "born_in_cycle": {str(c): born.count(c) for c in sorted(set(born))},
    }

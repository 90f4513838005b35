"""baseline stage: clean and zero-ablation losses on the eval tokens, shared by every evaluation."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from dmsae import lm, readers
from dmsae.eval.reconstruction import lm_divergences
from dmsae.runtime import Runtime
from dmsae.store import Artifact

NAME = "baseline"
VERSION = "2"
READS_ACTIVATIONS = False


def run(out_dir: Path, params: dict[str, Any], inputs: dict[str, Artifact], rt: Runtime) -> dict[str, Any]:
    model = lm.load_model(inputs["model"].path, rt.device, params["dtype"], params.get("autocast"))
    lm.check_layer(model, params["layer"])
    windows, bos, threshold = readers.split_tokens(inputs, "eval")
    batch = rt.args.get("batch_size", 8)
    sums = {"ce_clean": 0.0, "ce_patched": 0.0, "kl": 0.0, "count": 0.0}
    n_batches = math.ceil(windows.shape[0] / batch)
    for i in tqdm(range(n_batches), desc="baseline", unit="batch", disable=not rt.show_progress):
        ids = windows[i * batch:(i + 1) * batch].long().to(rt.device)
        for key, value in lm_divergences(model, params["layer"], ids, bos, torch.zeros_like, threshold).items():
            sums[key] += value
    n = sums["count"]
    return {"ce_orig": sums["ce_clean"] / n, "ce_zero": sums["ce_patched"] / n, "kl_zero": sums["kl"] / n,
            "n_positions": int(n)}


def describe(metrics: dict[str, Any]) -> str:
    """The status line's detail for a finished baseline stage (none)."""
    return ""

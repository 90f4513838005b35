"""evaluate stage: one SAE on the held-out eval tokens (the maths is `dmsae.eval.reconstruction`).

Reconstruction: L0 (total, non-core), explained variance (mean-centred), MSE, cosine similarity,
dead and dense fractions. Downstream: the full reconstruction spliced in at layer L, scored against
the clean model and a zero ablation (from the baseline stage):
CE-loss score (CE_zero - CE_sae) / (CE_zero - CE_orig), KL score (KL_zero - KL_sae) / KL_zero.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor
from tqdm import tqdm

from dmsae import lm, readers
from dmsae.eval.reconstruction import (
    ce_loss_score,
    cosine,
    explained_variance,
    firing_fractions,
    kl_score,
    lm_divergences,
)
from dmsae.runtime import Runtime
from dmsae.store import Artifact

NAME = "evaluate"
VERSION = "2"
READS_ACTIVATIONS = False


def run(out_dir: Path, params: dict[str, Any], inputs: dict[str, Artifact], rt: Runtime) -> dict[str, Any]:
    model = lm.load_model(inputs["model"].path, rt.device, params["dtype"], params.get("autocast"))
    sae, scale = readers.load_sae(inputs["sae"], rt.device)
    windows, bos, threshold = readers.split_tokens(inputs, "eval")
    batch = rt.args.get("batch_size", 8)
    xs, xhats = [], []
    fires = torch.zeros(sae.width, dtype=torch.long)
    l0 = l0_nc = 0.0
    sums = {"ce_clean": 0.0, "ce_patched": 0.0, "kl": 0.0, "count": 0.0}

    def reconstruct(x: Tensor) -> Tensor:
        nonlocal l0, l0_nc
        xs_scaled = x * scale
        f_core, f_nc = sae.encode(xs_scaled)
        x_hat = sae.decode(f_core, f_nc)
        active = torch.cat([f_core, f_nc], dim=1) > 0
        fires.add_(active.sum(0).cpu())
        l0 += float(active.sum())
        l0_nc += float((f_nc > 0).sum())
        xs.append(xs_scaled.cpu())
        xhats.append(x_hat.cpu())
        return x_hat / scale

    n_batches = math.ceil(windows.shape[0] / batch)
    for i in tqdm(range(n_batches), desc="evaluate", unit="batch", disable=not rt.show_progress):
        ids = windows[i * batch:(i + 1) * batch].long().to(rt.device)
        for key, value in lm_divergences(model, params["layer"], ids, bos, reconstruct, threshold).items():
            sums[key] += value
        rt.report((i + 1) / n_batches, f"batch {i + 1}/{n_batches}")
    x, x_hat = torch.cat(xs), torch.cat(xhats)
    n_tok = x.shape[0]
    base = inputs["baseline"].metrics
    ce_sae = sums["ce_patched"] / sums["count"]
    kl_sae = sums["kl"] / sums["count"]
    save_file({"fires": fires}, str(out_dir / readers.FREQUENCIES_FILE))
    return {
        "n_tokens": n_tok, "core_size": sae.core_size, "k": sae.k,
        "l0": l0 / n_tok, "l0_noncore": l0_nc / n_tok,
        "explained_variance": explained_variance(x, x_hat),
        "mse": float((x - x_hat).pow(2).mean()),
        "cosine": cosine(x, x_hat),
        "ce_orig": base["ce_orig"], "ce_zero": base["ce_zero"], "ce_sae": ce_sae, "kl_sae": kl_sae,
        "ce_loss_score": ce_loss_score(base["ce_orig"], ce_sae, base["ce_zero"]),
        "kl_score": kl_score(kl_sae, base["kl_zero"]),
        **firing_fractions(fires, n_tok, params["dense_threshold"]),
    }


def describe(metrics: dict[str, Any]) -> str:
    """The status line's detail for a finished evaluate stage (a diverged SAE's metrics are stored as null)."""
    l0, score = metrics.get("l0"), metrics.get("ce_loss_score")
    return (f"L0 {'n/a' if l0 is None else f'{l0:.1f}'}, "
            f"CE-loss score {'n/a' if score is None else f'{score:.3f}'}")

"""evaluate stage: one SAE on the held-out eval tokens.

Reconstruction: L0 (total, non-core), explained variance (mean-centred), MSE, cosine similarity,
dead and dense fractions. Downstream: the full reconstruction spliced in at layer L, scored against
the clean model and a zero ablation (from the baseline stage):
CE-loss score (CE_zero - CE_sae) / (CE_zero - CE_orig), KL score (KL_zero - KL_sae) / KL_zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm import tqdm

from dmsae import lm
from dmsae.runtime import Runtime
from dmsae.store import Artifact
from stages import tokens as tokens_stage
from stages import train as train_stage
from stages.attribute import loss_mask, norm_threshold_of

NAME = "evaluate"
VERSION = "2"
FREQ_FILE = "frequencies.safetensors"


@torch.no_grad()
def lm_divergences(
    model: nn.Module, layer: int, ids: Tensor, bos: int, replace: Callable[[Tensor], Tensor] | None,
    norm_threshold: float = math.inf,
) -> dict[str, float]:
    """Summed next-token CE of the clean and the patched model, and KL(clean || patched), over the
    positions of `loss_mask`. `replace` maps the layer-L residual at the kept positions [N, d] (not BOS,
    not an outlier above `norm_threshold`) to its substitute; None compares the clean model with itself."""
    mask = loss_mask(ids, bos)
    with lm.autocast(model):
        clean_logits = model(input_ids=ids, use_cache=False).logits
    clean_logp = torch.log_softmax(clean_logits.float(), dim=-1)
    if replace is None:
        patched_logp = clean_logp
    else:
        def patch(h: Tensor) -> Tensor:
            spliced = lm.kept_positions(h, ids, bos, norm_threshold)
            out = h.clone()
            out[spliced] = replace(h[spliced].float()).to(h.dtype)
            return out

        with lm.splice(model, layer, patch), lm.autocast(model):
            patched_logits = model(input_ids=ids, use_cache=False).logits
        patched_logp = torch.log_softmax(patched_logits.float(), dim=-1)
    target = ids[:, 1:, None]
    ce_clean = -(clean_logp[:, :-1].gather(-1, target).squeeze(-1) * mask[:, :-1]).sum()
    ce_patched = -(patched_logp[:, :-1].gather(-1, target).squeeze(-1) * mask[:, :-1]).sum()
    kl = (clean_logp.exp() * (clean_logp - patched_logp)).sum(-1)
    return {"ce_clean": float(ce_clean), "ce_patched": float(ce_patched),
            "kl": float((kl * mask).sum()), "count": float(mask.sum())}


def ce_loss_score(ce_orig: float, ce_sae: float, ce_zero: float) -> float:
    return (ce_zero - ce_sae) / (ce_zero - ce_orig)


def kl_score(kl_sae: float, kl_zero: float) -> float:
    return (kl_zero - kl_sae) / kl_zero


def explained_variance(x: Tensor, x_hat: Tensor) -> float:
    """1 - E||x - x_hat||^2 / E||x - E x||^2, centred on the mean (not on zero)."""
    x, x_hat = x.double(), x_hat.double()
    return 1.0 - float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def firing_fractions(fires: Tensor, n_tokens: int, dense_threshold: float) -> dict[str, float]:
    """Dead: never fired on the eval tokens; dense: fired on more than `dense_threshold` of them."""
    freq = fires.double() / max(1, n_tokens)
    return {"dead_fraction": float((fires == 0).double().mean()),
            "dense_fraction": float((freq > dense_threshold).double().mean())}


def run(out_dir: Path, params: dict[str, Any], inputs: dict[str, Artifact], rt: Runtime) -> dict[str, Any]:
    model = lm.load_model(inputs["model"].path, rt.device, params["dtype"], params.get("autocast"))
    sae, scale = train_stage.load_sae(inputs["sae"])
    sae.to(rt.device)
    windows = load_file(str(inputs["tokens"].file(tokens_stage.FILE)))["eval"]
    bos = inputs["tokens"].metrics["bos_id"]
    threshold = norm_threshold_of(inputs["harvest"])
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
    save_file({"fires": fires}, str(out_dir / FREQ_FILE))
    return {
        "n_tokens": n_tok, "core_size": sae.core_size, "k": sae.k,
        "l0": l0 / n_tok, "l0_noncore": l0_nc / n_tok,
        "explained_variance": explained_variance(x, x_hat),
        "mse": float((x - x_hat).pow(2).mean()),
        "cosine": float(torch.nn.functional.cosine_similarity(x, x_hat, dim=1).mean()),
        "ce_orig": base["ce_orig"], "ce_zero": base["ce_zero"], "ce_sae": ce_sae, "kl_sae": kl_sae,
        "ce_loss_score": ce_loss_score(base["ce_orig"], ce_sae, base["ce_zero"]),
        "kl_score": kl_score(kl_sae, base["kl_zero"]),
        **firing_fractions(fires, n_tok, params["dense_threshold"]),
    }

"""How well an SAE reconstructs: in activation space (explained variance, FVU, cosine), through the language
model (CE-loss and KL scores of the reconstruction spliced in at layer L), and how often latents fire.

CE-loss score (CE_zero - CE_sae) / (CE_zero - CE_orig), KL score (KL_zero - KL_sae) / KL_zero, where "zero"
is the zero ablation of the layer's residual (the baseline stage) and "orig" the clean model.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from dmsae import lm


@torch.no_grad()
def lm_divergences(
    model: nn.Module, layer: int, ids: Tensor, bos: int, replace: Callable[[Tensor], Tensor] | None,
    norm_threshold: float = math.inf,
) -> dict[str, float]:
    """Summed next-token CE of the clean and the patched model, and KL(clean || patched), over the
    positions of `lm.loss_mask`. `replace` maps the layer-L residual at the kept positions [N, d] (not BOS,
    not an outlier above `norm_threshold`) to its substitute; None compares the clean model with itself."""
    mask = lm.loss_mask(ids, bos)
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
    """1 - E||x - x_hat||^2 / E||x - E x||^2, centred on the mean (not on zero), in float64."""
    x, x_hat = x.double(), x_hat.double()
    return 1.0 - float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def fvu(x: Tensor, x_hat: Tensor) -> float:
    """Fraction of variance unexplained, mean-centred, in the inputs' dtype."""
    num = (x - x_hat).pow(2).sum()
    den = (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
    return float(num / den)


def cosine(x: Tensor, x_hat: Tensor) -> float:
    """Mean over rows of the cosine similarity between x and its reconstruction."""
    return float(torch.nn.functional.cosine_similarity(x, x_hat, dim=1).mean())


def firing_fractions(fires: Tensor, n_tokens: int, dense_threshold: float) -> dict[str, float]:
    """Dead: never fired on the eval tokens; dense: fired on more than `dense_threshold` of them."""
    freq = fires.double() / max(1, n_tokens)
    return {"dead_fraction": float((fires == 0).double().mean()),
            "dense_fraction": float((freq > dense_threshold).double().mean())}


def mean_best_cosine(dec_a: Tensor, dec_b: Tensor) -> float:
    """Mean over A's latents of the best cosine similarity with any of B's decoder rows."""
    a = torch.nn.functional.normalize(dec_a.double(), dim=1)
    b = torch.nn.functional.normalize(dec_b.double(), dim=1)
    return float((a @ b.T).max(dim=1).values.mean())

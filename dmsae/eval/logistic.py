"""The one logistic-regression solver of the evaluations: full-batch L-BFGS from zeros, no randomness.

Absorption's ground-truth letter probe, its k-sparse main-latent probes and the sparse/dense probing probes
all call `fit_logistic`; they differ only in the objective's weighting, its penalty and the solver's budget,
which are its arguments. Each caller keeps the exact objective it was written with (the same operations
in the same order), so a probe's bits do not depend on which caller asked.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor


def fit_logistic(
    x: Tensor,
    y: Tensor,
    *,
    penalty: float,
    pos_weight: Tensor | None = None,
    sample_weight: Tensor | None = None,
    reduction: Literal["mean", "sum_over_n"] = "mean",
    max_iter: int = 100,
    tolerance_grad: float = 1e-9,
    tolerance_change: float = 1e-12,
    history_size: int = 20,
) -> tuple[Tensor, Tensor]:
    """(weight, bias) of a logistic regression of targets y on x, minimising

    - reduction="mean": BCE(x W + b, y) averaged over all entries + penalty |W|^2
    - reduction="sum_over_n": (weighted BCE summed over rows + penalty |W|^2) / n (sklearn's objective / n)

    y [n] gives one output (weight [f], bias []); y [n, o] gives o independent outputs (weight [o, f], bias
    [o]). `pos_weight` [o] weights each output's positives, `sample_weight` [n] each row; the bias is never
    penalised. Parameters start at zero in x's dtype; L-BFGS (lr 1, strong Wolfe line search) runs one step
    of at most `max_iter` iterations."""
    n = len(y)
    multi = y.ndim == 2
    w = torch.zeros((y.shape[1], x.shape[1]) if multi else (x.shape[1],), dtype=x.dtype, requires_grad=True)
    b = torch.zeros((y.shape[1],) if multi else (), dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=history_size,
                            line_search_fn="strong_wolfe", tolerance_grad=tolerance_grad,
                            tolerance_change=tolerance_change)

    def objective() -> Tensor:
        logits = x @ w.T + b if multi else x @ w + b
        if reduction == "mean":
            bce = F.binary_cross_entropy_with_logits(logits, y, weight=sample_weight, pos_weight=pos_weight)
            return bce + penalty * w.pow(2).sum()
        bce = F.binary_cross_entropy_with_logits(logits, y, weight=sample_weight, pos_weight=pos_weight,
                                                 reduction="sum")
        return (bce + penalty * w.pow(2).sum()) / n

    def closure() -> Tensor:
        opt.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    with torch.enable_grad():  # callers often run under no_grad (feature extraction)
        opt.step(closure)
    return w.detach(), b.detach()


def balanced_weights(y: Tensor) -> Tensor:
    """Per-row weights of sklearn's class_weight="balanced" for boolean labels y [n]: n / (2 n_class), float64."""
    n = len(y)
    n_pos = int(y.sum())
    return torch.where(y, n / (2 * max(n_pos, 1)), n / (2 * max(n - n_pos, 1))).double()

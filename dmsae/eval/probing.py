"""Sparse probing: how well do a few SAE latents linearly predict a binary property of a text?

Definitions (k-sparse probing of Gurnee et al. 2023 / Gao et al. 2024, as evaluated by SAEBench's
`sparse_probing` eval):

- Features: one vector per text, the mean of the SAE latents (or of the residual stream, for the
  baseline) over the text's real tokens; BOS, EOS and padding positions are left out (`mean_pool`,
  `pooled`).
- Tasks: binary one-vs-rest, balanced in both splits (`dmsae.eval.tasks`).
- Latent choice: rank latents by |mean(x | y=1) - mean(x | y=0)| on the train split only; the k-sparse
  probe sees the top k (k = 1, 2, 5, 10 by default), so the sets are nested.
- Probe: L2 logistic regression with scikit-learn's default objective, C * sum(log loss) + |w|^2 / 2,
  C = 1, bias not penalised; score = accuracy on the held-out test split (threshold logit > 0).
- Dense baseline: the same probe on all residual-stream dimensions. `sparse_probe` on residual
  features gives SAEBench's "LLM top-k" baseline.

Differences from SAEBench, and why:
- scikit-learn is not a dependency, so the probe is solved by full-batch L-BFGS in float64 from a zero
  start (`dmsae.eval.logistic`); the objective is convex, so it reaches the same minimiser up to the
  solver tolerance.
- SAEBench trains the dense probe with minibatch AdamW and keeps the epoch with the best *test*
  accuracy, which selects on the test split. Here the dense probe is the same deterministic logistic
  regression as the sparse ones; nothing is chosen on the test split, so it can read slightly lower.
- Ties in the mean-difference ranking (e.g. dead latents, all zero) go to the lower latent index
  (stable sort), so the chosen set does not depend on the sort implementation.
- `mean_pool` takes an explicit token mask (SAEBench infers it from zeroed residual positions) and
  returns zeros, not NaN, for a text with no unmasked token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pandas as pd
import torch

from dmsae.eval.logistic import fit_logistic
from dmsae.sae import MatryoshkaSAE

DEFAULT_KS = (1, 2, 5, 10)
Task = tuple[str, list[int], list[int], list[bool]]  # (name, text rows, labels, is_test), as `readers.probe_tasks`


# -------------------------------------------------------------------------------------- features


def mean_pool(acts: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of acts [B, L, F] over the positions where mask [B, L] is true -> [B, F].

    The mask should be false at BOS, EOS and padding, as in SAEBench: BOS carries outsized activations
    that say nothing about the text. A row with no true position pools to zeros.
    """
    if acts.shape[:2] != mask.shape:
        raise ValueError(f"mean_pool: acts {tuple(acts.shape)} and mask {tuple(mask.shape)} disagree on [B, L]")
    m = mask.to(acts.dtype).unsqueeze(-1)
    return (acts * m).sum(1) / m.sum(1).clamp_min(1)


# ----------------------------------------------------------------------------------------- probes


@dataclass(frozen=True)
class LogisticProbe:
    weight: torch.Tensor  # [F], float64
    bias: float

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float64) @ self.weight + self.bias

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return (self.logits(x) > 0).long()


def _check_xy(x: torch.Tensor, y: torch.Tensor, what: str) -> None:
    if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"{what}: need x [N, F] and y [N], got {tuple(x.shape)} and {tuple(y.shape)}")
    if not bool(((y == 0) | (y == 1)).all()):
        raise ValueError(f"{what}: labels must be 0 or 1")


def train_logistic(x: torch.Tensor, y: torch.Tensor, c: float = 1.0, max_iter: int = 1000,
                   tol: float = 1e-6) -> LogisticProbe:
    """L2 logistic regression, scikit-learn's objective (C * sum log loss + |w|^2 / 2, bias free).

    Full-batch L-BFGS in float64 from zeros: no randomness, no minibatch order, so the same inputs give
    the same bits on the same machine.
    """
    _check_xy(x, y, "train_logistic")
    if y.unique().numel() != 2:
        raise ValueError("train_logistic: the train split needs both classes")
    x64, y64 = x.detach().to(torch.float64), y.detach().to(torch.float64)
    # the objective divided by C * n: same minimiser, loss of order 1 for the line search
    w, b = fit_logistic(x64, y64, penalty=0.5 / (c * x64.shape[0]), max_iter=max_iter, tolerance_grad=tol)
    return LogisticProbe(weight=w.clone(), bias=float(b))


def accuracy(probe: LogisticProbe, x: torch.Tensor, y: torch.Tensor) -> float:
    _check_xy(x, y, "accuracy")
    return float((probe.predict(x) == y.to(torch.long)).to(torch.float64).mean())


def rank_latents(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Latent indices by |mean(x | y=1) - mean(x | y=0)|, largest first; ties by lower index."""
    _check_xy(x, y, "rank_latents")
    x64 = x.detach().to(torch.float64)
    diff = (x64[y == 1].mean(0) - x64[y == 0].mean(0)).abs()
    return torch.sort(diff, descending=True, stable=True).indices


def sparse_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 ks: Sequence[int] = DEFAULT_KS, c: float = 1.0) -> pd.DataFrame:
    """One row per k: the k latents chosen on the train split (best first), train and test accuracy."""
    _check_xy(test_x, test_y, "sparse_probe test")
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"sparse_probe: train has {train_x.shape[1]} features, test {test_x.shape[1]}")
    bad = [k for k in ks if not 1 <= k <= train_x.shape[1]]
    if bad:
        raise ValueError(f"sparse_probe: k must be in 1..{train_x.shape[1]}, got {bad}")
    order = rank_latents(train_x, train_y)
    rows = []
    for k in ks:
        idx = order[:k]
        probe = train_logistic(train_x[:, idx], train_y, c=c)
        rows.append({"k": k, "latents": [int(i) for i in idx],
                     "train_accuracy": accuracy(probe, train_x[:, idx], train_y),
                     "test_accuracy": accuracy(probe, test_x[:, idx], test_y)})
    return pd.DataFrame(rows, columns=["k", "latents", "train_accuracy", "test_accuracy"])


def dense_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                c: float = 1.0) -> float:
    """Test accuracy of the probe on every feature (SAEBench's "LLM" baseline on residual features)."""
    _check_xy(test_x, test_y, "dense_probe test")
    return accuracy(train_logistic(train_x, train_y, c=c), test_x, test_y)


# ------------------------------------------------------------------------------------- SAE codes


def encoder(sae: MatryoshkaSAE, scale: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Residual rows -> the SAE's codes (core and non-core side by side), in the SAE's input scale."""
    def encode(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat(sae.encode(x.float() * scale), dim=1)
    return encode


def pooled(residuals: torch.Tensor, offsets: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
           chunk: int = 4096) -> torch.Tensor:
    """Per text, the mean over its tokens of fn(residual rows) (the residual itself when fn is None), float64;
    a text without tokens pools to zeros. Text i's rows are residuals[offsets[i]:offsets[i + 1]]."""
    counts = offsets[1:] - offsets[:-1]
    text_of_row = torch.repeat_interleave(torch.arange(len(counts)), counts)
    sums = None
    for start in range(0, len(residuals), chunk):
        x = residuals[start:start + chunk].float()
        feats = (x if fn is None else fn(x)).double()
        if sums is None:
            sums = torch.zeros(len(counts), feats.shape[1], dtype=torch.float64)
        sums.index_add_(0, text_of_row[start:start + chunk], feats)
    if sums is None:
        width = residuals.shape[1] if fn is None else fn(residuals[:1].float()).shape[1]
        return torch.zeros(len(counts), width, dtype=torch.float64)
    return sums / counts.clamp_min(1).double()[:, None]


def pooled_codes(sae: MatryoshkaSAE, scale: float, data: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per probing text of a probes artifact's tensors (`readers.probe_data`), the mean of the SAE's codes over
    its tokens."""
    return pooled(data["text_residuals"], data["text_offsets"], encoder(sae, scale))


def sparse_probing(features: torch.Tensor, tasks: Sequence[Task], ks: Sequence[int],
                   skip_latents: int = 0) -> pd.DataFrame:
    """Per task (as `readers.probe_tasks` lists them) and per k, the k-sparse probe on pooled codes `features`
    (texts x latents). `skip_latents` leaves the first n latents (a core) out of the candidates; the `latents`
    column keeps the SAE's own indices."""
    rows = []
    for task, ids, labels, is_test in tasks:
        test, y = torch.tensor(is_test), torch.tensor(labels)
        x = features[ids][:, skip_latents:]
        table = sparse_probe(x[~test], y[~test], x[test], y[test], ks=tuple(k for k in ks if k <= x.shape[1]))
        rows += [{"task": task, **r, "latents": [i + skip_latents for i in r["latents"]]}
                 for r in table.to_dict("records")]
    return pd.DataFrame(rows)

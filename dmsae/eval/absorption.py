"""Feature absorption on the first-letter task (Chanin et al. 2024, "A is for Absorption"), measured the way
SAEBench's `evals/absorption` measures it, as a pure function of activations an LM stage has already computed.

Setting. Each word is one vocabulary token. The LM reads a few-shot prompt whose last line is
"{word} has the first letter:" (earlier lines end with the answer, e.g. " C"); `x` is the residual at the
word's token, in the SAE's input space (for this project: scaled as the SAE was trained). One row per word.

Definitions implemented (letter L, unit probe direction p = row L of the ground-truth probe / its norm):
1. Ground-truth probe: one-vs-rest logistic regression with 26 outputs on x, fitted on a per-letter 80/20
   split of the words. A test word is a *probe true positive* for L if it starts with L and logit_L(x) > 0.
   L is evaluated only if the probe's test F1 for L (logit > 0) exceeds `min_probe_f1` (0.6).
2. Main ("split") latents: an L1-penalised one-vs-rest probe on the SAE codes (train split) ranks latents;
   for k = 1..max_k the k top-weighted latents get a class-balanced logistic regression of their own, scored
   by test F1. The main latents are the top-k set at the last k for which every step k-1 -> k raised F1 by
   more than `f1_jump` (0.03); k = 1 always counts.
3. Per probe true positive, with codes a and decoder rows w_j: c_j = a_j (w_j . p) is latent j's share of
   the reconstruction's projection on p; P = x . p; M = sum of c_j over main latents. Absorbers are non-main
   latents with cos(w_j, p) >= 0.1 and c_j > 0; A = sum of the top 3 c_j among them.
   absorption fraction = 0 if M >= P or A < 0.4 P; 1 if M <= 0; else B / (B + M) with B = min(A, P - M).
   full absorption: no main latent fires, the latent with the largest c_j has cos >= 0.025, P > 0, and
   its c_j >= 0.4 P.
4. Per letter: absorption_fraction = mean fraction over its probe true positives; absorption_rate = share
   of them with full absorption (SAEBench's mean_absorption_fraction_score / mean_full_absorption_score);
   the headline numbers are means over evaluated letters.

Where this differs from SAEBench, and why:
- c_j uses the decoder row itself (a_j w_j . p), not a_j cos(w_j, p): identical for unit-norm decoder rows
  (ours, and what SAEBench assumes), and still a projection of the reconstruction when they are not.
- All probes are full-batch and zero-initialised, solved to convergence (L-BFGS for the ground-truth and
  k-sparse probes, FISTA for the L1 ranking probe) instead of shuffled minibatch Adam plus scikit-learn:
  bit-for-bit repeatable on one CPU, no sklearn, and the latent ranking depends on the L1 objective rather
  than on an optimiser budget. The k-sparse probes minimise sklearn's default objective (C = 1, balanced).
- The ground-truth probe is fitted on x centred and divided by one scalar (conditioning only; the direction
  in x-space is unchanged), and the split is stratified by letter so rare letters keep test words.
- Top-k candidates are latents with positive L1-probe weight only: past those SAEBench's topk would pick
  zero-weight latents, which carry no evidence for the letter.
- `first_letter_words` keeps lowercase words by default and one token per word (the leading-space form
  when both exist); SAEBench keeps every alphabetic token, whose near-duplicates straddle the split.
- ICL examples are drawn from an RNG seeded by (seed, word), not the global `random` state.
- The word's position comes from the tokenizer's offsets (`token_index`), not a fixed index from the end
  (SAEBench's -6 assumes how the template tokenizes).
- P <= 0 counts as no absorption explicitly (SAEBench reaches 0 the same way for P < 0, and divides by
  zero at P = 0). Letters with fewer than `min_words` words are skipped (no SAEBench analogue; tiny test
  splits make F1 and rates noise).
- SAEBench reports nothing unless >= 20 letters pass the probe-F1 gate; here `min_letters` defaults to 2
  and the result carries `n_letters`, so a caller can apply the stricter gate.
"""

from __future__ import annotations

import math
import random
import string
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from dmsae.eval.logistic import balanced_weights, fit_logistic

LETTERS = string.ascii_lowercase
TEMPLATE = "{word} has the first letter:"
# leading-space markers: GPT-2 byte-level BPE ("Ġ"), SentencePiece ("▁"), or an already decoded space
SPACE_MARKERS = ("Ġ", "▁", " ")
ACT_EPS = 1e-8  # a latent "fires" above this (SAEBench's EPS)


# ----------------------------------------------------------------------------------------------------------
# words and prompts


class VocabWord(NamedTuple):
    token_id: int
    word: str  # the bare word, e.g. "cat"
    letter: str  # its first letter, lowercase
    text: str  # the token as text, e.g. " cat": what to put in the prompt so it tokenizes back to token_id


def first_letter_words(
    vocab: Mapping[str, int] | Sequence[str],
    *,
    min_len: int = 2,
    lowercase_only: bool = True,
    max_words: int | None = None,
    seed: int = 0,
) -> list[VocabWord]:
    """Single-token alphabetic words of a vocabulary (token -> id, or tokens listed by id), sorted by word.

    One token per word: the leading-space form wins over the bare form because it is the whole-word token
    (the bare form is often a word piece). With `max_words`, a seeded sample of that size, still sorted."""
    items = vocab.items() if isinstance(vocab, Mapping) else ((tok, i) for i, tok in enumerate(vocab))
    best: dict[str, VocabWord] = {}
    for token, token_id in items:
        spaced = token.startswith(SPACE_MARKERS)
        word = token[1:] if spaced else token
        if len(word) < min_len or not (word.isascii() and word.isalpha()):
            continue
        if lowercase_only and not word.islower():
            continue
        cand = VocabWord(int(token_id), word, word[0].lower(), " " + word if spaced else word)
        old = best.get(word)
        # prefer spaced, then the smaller id: the choice must not depend on the vocab's iteration order
        if old is None or (spaced, -cand.token_id) > (old.text.startswith(" "), -old.token_id):
            best[word] = cand
    words = sorted(best.values(), key=lambda w: (w.word, w.token_id))
    if max_words is not None and len(words) > max_words:
        g = torch.Generator().manual_seed(seed)
        keep = torch.randperm(len(words), generator=g)[:max_words].sort().values
        words = [words[i] for i in keep.tolist()]
    return words


class LetterPrompt(NamedTuple):
    text: str
    answer: str  # e.g. " C"; what the LM should continue with
    word_start: int  # character span of the queried word in `text`: read the token ending at word_end
    word_end: int


def _answer(word: str) -> str:
    return " " + next(c for c in word if c.isalpha()).upper()


def prompt_for(
    word: str,
    examples: Sequence[str],
    *,
    template: str = TEMPLATE,
    n_examples: int = 10,
    separator: str = "\n",
    seed: int = 0,
) -> LetterPrompt:
    """SAEBench-style few-shot prompt: separator, then `n_examples` lines "<ex> has the first letter: X",
    then the query line without its answer. `word` and `examples` are token texts (VocabWord.text).

    The examples are a sample seeded by (seed, word), never containing `word`. The prompt starts with the
    separator as in SAEBench (some tokenizers mangle the very first token)."""
    rng = random.Random(f"{seed}:{word}")  # str seeds hash with sha512: stable across processes
    drawn = rng.sample(list(examples), min(n_examples + 1, len(examples)))
    chosen = [e for e in drawn if e.strip() != word.strip()][:n_examples]
    lines = [template.format(word=e) + _answer(e) for e in chosen]
    head = separator + "".join(line + separator for line in lines)
    prefix = template.split("{word}")[0]
    start = len(head) + len(prefix)
    return LetterPrompt(head + template.format(word=word), _answer(word), start, start + len(word))


def token_index(offsets: Sequence[tuple[int, int]], char_end: int) -> int:
    """Index of the token covering character char_end - 1 (from a fast tokenizer's offset mapping): the
    position to read for a word ending at char_end. Tokenizer-agnostic, unlike SAEBench's fixed -6."""
    for i, (a, b) in enumerate(offsets):
        if a < char_end <= b:
            return i
    raise ValueError(f"no token covers character {char_end - 1}")


# ----------------------------------------------------------------------------------------------------------
# ground-truth probe


@dataclass(frozen=True)
class LetterProbe:
    weight: Tensor  # [26, d]: one-vs-rest logistic regression, row i detects LETTERS[i]
    bias: Tensor  # [26]
    train_idx: Tensor  # rows of x it was fitted on
    test_idx: Tensor  # held-out rows
    accuracy: float  # argmax accuracy on the held-out rows (NaN if none)
    f1: Tensor  # [26] held-out F1 of logit > 0 per letter; NaN for letters without held-out words

    def logits(self, x: Tensor) -> Tensor:
        return x.to(self.weight) @ self.weight.T + self.bias


def _split(letters: Tensor, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Per-letter random split; a letter with >= 2 words keeps at least one on each side."""
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in range(len(LETTERS)):
        rows = (letters == c).nonzero().flatten()
        rows = rows[torch.randperm(len(rows), generator=g)]
        n_test = min(max(round(len(rows) * test_fraction), 1), len(rows) - 1) if len(rows) >= 2 else 0
        test.append(rows[:n_test])
        train.append(rows[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def _f1(pred: Tensor, y: Tensor) -> float:
    tp = int((pred & y).sum())
    denom = int(pred.sum()) + int(y.sum())
    return 2 * tp / denom if denom else 0.0


def _check_inputs(x: Tensor, letters: Tensor) -> None:
    if x.ndim != 2 or letters.shape != (len(x),):
        raise ValueError(f"x must be [N, d] and letters [N]; got {tuple(x.shape)} and {tuple(letters.shape)}")
    if len(letters) and not (0 <= int(letters.min()) and int(letters.max()) < len(LETTERS)):
        raise ValueError("letters must be integers in 0..25")


def train_letter_probe(
    x: Tensor,
    letters: Tensor,
    *,
    test_fraction: float = 0.2,
    l2: float = 1e-4,
    max_iter: int = 200,
    seed: int = 0,
) -> LetterProbe:
    """Fit the ground-truth first-letter probe (rows of x: words; letters: 0..25). Deterministic for a seed."""
    _check_inputs(x, letters)
    x, letters = x.detach().float().cpu(), letters.detach().long().cpu()
    d = x.shape[1]
    train_idx, test_idx = _split(letters, test_fraction, seed)
    xt = x[train_idx]
    weight, bias = torch.zeros(len(LETTERS), d), torch.zeros(len(LETTERS))
    if len(train_idx):
        # centre and divide by one scalar: better conditioned, same direction in x-space
        mu = xt.mean(0)
        s = (xt - mu).pow(2).mean().sqrt().clamp_min(1e-12)
        z = (xt - mu) / s
        y = F.one_hot(letters[train_idx], len(LETTERS)).float()
        # each letter's positives weighted up to the weight of its negatives, as SAEBench's pos_weight does
        pos = y.sum(0)
        w, b = fit_logistic(z, y, penalty=0.5 * l2, pos_weight=(len(y) - pos) / pos.clamp_min(1),
                            max_iter=max_iter, tolerance_grad=1e-9)
        weight = w / s
        bias = b - weight @ mu
    f1 = torch.full((len(LETTERS),), math.nan)
    accuracy = math.nan
    if len(test_idx):
        logits = x[test_idx] @ weight.T + bias
        yt = letters[test_idx]
        accuracy = float((logits.argmax(1) == yt).float().mean())
        for c in yt.unique().tolist():
            f1[c] = _f1(logits[:, c] > 0, yt == c)
    return LetterProbe(weight, bias, train_idx, test_idx, accuracy, f1)


# ----------------------------------------------------------------------------------------------------------
# SAE codes, main latents, absorption


@dataclass(frozen=True)
class _Codes:
    """SAE codes of n rows kept sparse (SAE widths reach 65k): nonzero entries in row-major order."""

    rows: Tensor
    cols: Tensor
    vals: Tensor
    n: int
    width: int

    @classmethod
    def of(cls, x: Tensor, encode: Callable[[Tensor], Tensor], width: int, batch_size: int) -> _Codes:
        rows, cols, vals = [torch.zeros(0, dtype=torch.long)], [torch.zeros(0, dtype=torch.long)], [torch.zeros(0)]
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                a = encode(x[start:start + batch_size]).detach().float().cpu()
                if a.shape != (min(batch_size, len(x) - start), width):
                    raise ValueError(f"encode returned shape {tuple(a.shape)}; expected [n, {width}] (w_dec's width)")
                r, c = a.nonzero(as_tuple=True)
                rows.append(r + start)
                cols.append(c)
                vals.append(a[r, c])
        return cls(torch.cat(rows), torch.cat(cols), torch.cat(vals), len(x), width)

    def select(self, idx: Tensor) -> _Codes:
        """The codes of rows idx (sorted), renumbered 0..len(idx)-1; row-major order is kept."""
        pos = torch.full((self.n,), -1, dtype=torch.long)
        pos[idx] = torch.arange(len(idx))
        keep = pos[self.rows] >= 0
        return _Codes(pos[self.rows[keep]], self.cols[keep], self.vals[keep], len(idx), self.width)

    def dense(self, latents: Tensor) -> Tensor:
        """[n, len(latents)] float64 matrix of the given latents' activations."""
        pos = torch.full((self.width,), -1, dtype=torch.long)
        pos[latents] = torch.arange(len(latents))
        keep = pos[self.cols] >= 0
        out = torch.zeros(self.n, len(latents), dtype=torch.float64)
        out[self.rows[keep], pos[self.cols[keep]]] = self.vals[keep].double()
        return out

    def row_bounds(self) -> list[int]:
        """Row i's entries are [bounds[i], bounds[i + 1])."""
        return torch.searchsorted(self.rows, torch.arange(self.n + 1)).tolist()


def _rank_latents(codes: _Codes, letters: Tensor, l1: float, max_iter: int, tol: float = 1e-7) -> Tensor:
    """[width, 26] weights of the L1-penalised one-vs-rest probe on SAE codes that ranks latents for k-sparse
    probing: per letter, minimise the pos-weighted mean logistic loss + l1 * |w|_1 (SAEBench's objective).

    Solved by FISTA with per-letter backtracking (the letters' problems are independent) rather than
    SAEBench's fixed Adam budget, so the ranking is a property of the objective, not of an optimiser
    schedule. With a free bias the objective is unchanged if each latent is centred and rescaled (with its
    L1 weight rescaled to match), so it is solved in standardised coordinates: latents that fire on every
    word, or with large activations, would otherwise stall convergence. Only latents that fire on these
    rows can get weight, so it runs on those."""
    active = codes.cols.unique()  # sorted
    local = torch.searchsorted(active, codes.cols)
    n = codes.n
    mean = torch.zeros(len(active), dtype=torch.float64).index_add_(0, local, codes.vals.double()) / n
    sq = torch.zeros(len(active), dtype=torch.float64).index_add_(0, local, codes.vals.double() ** 2) / n
    # CSR products: several times faster than COO here, and bit-identical whatever the thread count
    coo = torch.sparse_coo_tensor(torch.stack([codes.rows, local]), codes.vals.double(), (n, len(active)),
                                  check_invariants=False).coalesce()  # indices built here are in range
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        a, a_t = coo.to_sparse_csr(), coo.t().coalesce().to_sparse_csr()
    std = (sq - mean * mean).clamp_min(0).sqrt()
    flat = std <= 1e-9 * (sq.sqrt() + 1e-30)  # (near-)constant latents: no signal beyond the bias
    std = torch.where(flat, 1.0, std)
    thresh = torch.where(flat, math.inf, l1 / std)[:, None]  # l1 |w| = (l1 / std) |v| for v = w * std

    def design(v: Tensor) -> Tensor:  # standardised codes @ v, keeping the matrix sparse
        return a @ (v / std[:, None]) - (mean / std) @ v

    y = F.one_hot(letters, len(LETTERS)).double()
    pos = y.sum(0)
    pw = ((n - pos) / pos.clamp_min(1))[None, :]
    scale = 1 + (pw - 1) * y  # per-element loss weight: pw on positives, 1 on negatives

    def loss(v: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        z = design(v) + b
        return (scale * F.softplus(z) - pw * y * z).mean(0), z  # pos-weighted BCE, averaged per letter

    def soft(v: Tensor, t: Tensor) -> Tensor:
        return v.sign() * (v.abs() - t).clamp_min(0)

    v = torch.zeros(len(active), len(LETTERS), dtype=torch.float64)
    b = torch.zeros(len(LETTERS), dtype=torch.float64)
    yv, yb, theta = v, b, 1.0
    step = torch.ones(len(LETTERS), dtype=torch.float64)
    for _ in range(max_iter):
        fy, z = loss(yv, yb)
        r = (torch.sigmoid(z) * scale - pw * y) / n  # d loss / d z
        gv = (a_t @ r - mean[:, None] * r.sum(0)) / std[:, None]
        gb = r.sum(0)
        for _ in range(60):  # backtracking: shrink each letter's step until the quadratic bound holds
            nv, nb = soft(yv - step * gv, step * thresh), yb - step * gb
            fn, _ = loss(nv, nb)
            dv, db = nv - yv, nb - yb
            bound = fy + (gv * dv).sum(0) + gb * db + (dv.pow(2).sum(0) + db.pow(2)) / (2 * step)
            bad = fn > bound + 1e-12 * fy.abs()
            if not bad.any():
                break
            step = torch.where(bad, step / 2, step)
        theta_next = (1 + math.sqrt(1 + 4 * theta * theta)) / 2
        yv = nv + (theta - 1) / theta_next * (nv - v)
        yb = nb + (theta - 1) / theta_next * (nb - b)
        done = float((nv - v).abs().max()) <= tol * max(1.0, float(nv.abs().max()))
        v, b, theta = nv, nb, theta_next
        if done:
            break
    full = torch.zeros(codes.width, len(LETTERS))
    full[active] = (v / std[:, None]).float()
    return full


def _main_latents(
    candidates: Tensor, x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor,
    f1_jump: float, max_iter: int,
) -> tuple[list[int], list[float]]:
    """(main latents, test F1 per k) by the F1-jump rule over growing top-k sets of `candidates`."""
    f1s: list[float] = []
    main: list[int] = []
    best = -math.inf
    for k in range(1, len(candidates) + 1):
        # sklearn's default objective (C = 1, class_weight="balanced") divided by n, in float64
        w, b = fit_logistic(x_train[:, :k], y_train.double(), penalty=0.5, sample_weight=balanced_weights(y_train),
                            reduction="sum_over_n", max_iter=max_iter, tolerance_grad=1e-9)
        f1 = _f1(x_test[:, :k] @ w + b > 0, y_test)
        f1s.append(f1)
        if f1 <= best + f1_jump:
            break
        best, main = f1, candidates[:k].tolist()
    return main, f1s


@dataclass
class AbsorptionResult:
    letters: pd.DataFrame  # one row per letter that has words (see LETTER_COLUMNS); `evaluated` marks the averaged ones
    words: pd.DataFrame  # one row per probe true positive of an evaluated letter (see WORD_COLUMNS)
    means: dict[str, float] = field(default_factory=dict)  # headline numbers; NaN when `reason` is set
    reason: str | None = None  # why nothing could be measured, if so


LETTER_COLUMNS = [
    "letter", "n_words", "n_test_words", "probe_f1", "main_latents", "n_main", "main_f1", "f1_by_k",
    "n_probe_tp", "n_main_miss", "n_full_absorption", "absorption_rate", "absorption_fraction", "evaluated",
    "skip_reason",
]
WORD_COLUMNS = [
    "letter", "row", "probe_projection", "main_projection", "absorber_projection", "main_fired",
    "top_latent", "top_latent_cos", "top_latent_projection", "absorption_fraction", "full_absorption",
]
MEAN_KEYS = [
    "absorption_fraction", "absorption_rate", "n_main",
    "absorption_fraction_std", "absorption_rate_std", "n_main_std", "n_letters",
]


def _empty(reason: str, letters: pd.DataFrame | None = None) -> AbsorptionResult:
    means = {k: math.nan for k in MEAN_KEYS} | {"n_letters": 0.0}
    frame = letters if letters is not None else pd.DataFrame(columns=LETTER_COLUMNS)
    return AbsorptionResult(frame, pd.DataFrame(columns=WORD_COLUMNS), means, reason)


def _word_rows(
    letter: str, rows: Tensor, proj: Tensor, codes: _Codes, dec_dot: Tensor, dec_cos: Tensor, main: list[int],
    cos_absorber: float, cos_full: float, proj_share: float, max_absorbers: int,
) -> list[dict]:
    """Absorption fraction and full absorption for the probe true positives `rows` (sorted indices into x);
    proj: their projections x . p; dec_dot, dec_cos: each decoder row's dot product and cosine with p."""
    out = []
    sub = codes.select(rows)
    bounds = sub.row_bounds()
    is_main = torch.zeros(codes.width, dtype=torch.bool)
    is_main[main] = True
    for i, row in enumerate(rows.tolist()):
        cols, acts = sub.cols[bounds[i]:bounds[i + 1]], sub.vals[bounds[i]:bounds[i + 1]].double()
        c = acts * dec_dot[cols]  # each firing latent's share of the reconstruction's projection on p
        P = float(proj[i])
        M = float(c[is_main[cols]].sum())
        ok = ~is_main[cols] & (dec_cos[cols] >= cos_absorber) & (c > 0)
        A = float(c[ok].topk(min(max_absorbers, int(ok.sum()))).values.sum())
        # P <= 0 would make A / P meaningless: never absorption (SAEBench also lands on 0 there)
        if P <= 0 or M >= P or A < proj_share * P:
            frac = 0.0
        elif M <= 0:
            frac = 1.0
        else:
            absorbed = min(A, P - M)
            frac = min(max(absorbed / (absorbed + M), 0.0), 1.0)
        main_fired = bool((acts[is_main[cols]] > ACT_EPS).any())
        if len(c):
            j = int(c.argmax())  # first maximum: ties go to the lower latent index (cols are sorted)
            top, top_c, top_cos = int(cols[j]), float(c[j]), float(dec_cos[cols[j]])
        else:
            top, top_c, top_cos = -1, 0.0, math.nan
        full = not main_fired and top >= 0 and top_cos >= cos_full and P > 0 and top_c >= proj_share * P
        out.append({
            "letter": letter, "row": row, "probe_projection": P, "main_projection": M, "absorber_projection": A,
            "main_fired": main_fired, "top_latent": top, "top_latent_cos": top_cos,
            "top_latent_projection": top_c, "absorption_fraction": frac, "full_absorption": bool(full),
        })
    return out


def absorption(
    x: Tensor,
    letters: Tensor,
    probe: LetterProbe,
    encode: Callable[[Tensor], Tensor],
    w_dec: Tensor,
    *,
    max_k: int = 10,
    f1_jump: float = 0.03,
    min_probe_f1: float = 0.6,
    min_words: int = 10,
    min_letters: int = 2,
    cos_absorber: float = 0.1,
    cos_full: float = 0.025,
    proj_share: float = 0.4,
    max_absorbers: int = 3,
    l1: float = 0.01,
    l1_max_iter: int = 300,
    lr_max_iter: int = 100,
    batch_size: int = 1024,
) -> AbsorptionResult:
    """Absorption of the first-letter features by an SAE (see the module docstring for the definitions).

    x: [N, d] residuals at the word tokens, in the SAE's input space; letters: [N] in 0..25; probe: from
    `train_letter_probe` on the same x (its split is reused: main latents are chosen on the train rows,
    scored and measured on the test rows); encode: [n, d] -> [n, width] codes, called on CPU float32
    batches of at most `batch_size` rows; w_dec: [width, d].
    Degenerate inputs give NaN means and a `reason` rather than an exception; inconsistent ones (shapes,
    a probe fitted on other rows) raise ValueError."""
    _check_inputs(x, letters)
    if probe.weight.shape[1] != x.shape[1] or w_dec.ndim != 2 or w_dec.shape[1] != x.shape[1]:
        raise ValueError("probe, x and w_dec must share the model dimension d")
    n_split = len(probe.train_idx) + len(probe.test_idx)
    if n_split != len(x) or (len(probe.test_idx) and int(probe.test_idx.max()) >= len(x)):
        raise ValueError("the probe was trained on a different set of rows than x")
    x, letters = x.detach().float().cpu(), letters.detach().long().cpu()
    w_dec = w_dec.detach().float().cpu()
    if len(letters.unique()) < 2:
        return _empty("fewer than 2 distinct letters among the words")

    codes = _Codes.of(x, encode, len(w_dec), batch_size)
    train, test = probe.train_idx, probe.test_idx
    tr_codes, te_codes = codes.select(train), codes.select(test)
    if len(tr_codes.vals) == 0:
        return _empty("the SAE has no active latent on any training word")
    ranking = _rank_latents(tr_codes, letters[train], l1, l1_max_iter)
    dec_norm = w_dec.norm(dim=1).double().clamp_min(1e-12)
    test_logits = probe.logits(x[test])
    counts = torch.bincount(letters, minlength=len(LETTERS))
    test_counts = torch.bincount(letters[test], minlength=len(LETTERS))

    rows, word_rows = [], []
    for c, letter in enumerate(LETTERS):
        if counts[c] == 0:
            continue
        row = {"letter": letter, "n_words": int(counts[c]), "n_test_words": int(test_counts[c]),
               "probe_f1": float(probe.f1[c]), "main_latents": [], "n_main": 0, "main_f1": math.nan,
               "f1_by_k": [], "n_probe_tp": 0, "n_main_miss": 0, "n_full_absorption": 0,
               "absorption_rate": math.nan, "absorption_fraction": math.nan, "evaluated": False, "skip_reason": ""}
        rows.append(row)
        if counts[c] < min_words:
            row["skip_reason"] = f"fewer than {min_words} words"
            continue
        if not probe.f1[c] > min_probe_f1:  # also catches NaN (no test words)
            row["skip_reason"] = f"probe F1 not above {min_probe_f1}"
            continue
        weights = ranking[:, c]
        order = torch.argsort(-weights, stable=True)  # ties go to the lower latent index
        candidates = order[weights[order] > 0][:max_k]
        if len(candidates) == 0:
            row["skip_reason"] = "no latent has positive weight for this letter"
            continue
        main, f1s = _main_latents(candidates, tr_codes.dense(candidates), letters[train] == c,
                                  te_codes.dense(candidates), letters[test] == c, f1_jump, lr_max_iter)
        row.update(main_latents=main, n_main=len(main), main_f1=f1s[len(main) - 1], f1_by_k=f1s)
        is_tp = (letters[test] == c) & (test_logits[:, c] > 0)
        if not is_tp.any():
            row["skip_reason"] = "no probe true positives"
            continue
        p = probe.weight[c] / probe.weight[c].norm()
        dec_dot = (w_dec @ p).double()  # float32 product: w_dec may be [65k, 2304]
        tp = test[is_tp]
        words = _word_rows(letter, tp, x[tp].double() @ p.double(), codes, dec_dot, dec_dot / dec_norm, main,
                           cos_absorber, cos_full, proj_share, max_absorbers)
        word_rows += words
        n_full = sum(w["full_absorption"] for w in words)
        row.update(n_probe_tp=len(words), n_main_miss=sum(not w["main_fired"] for w in words),
                   n_full_absorption=n_full, absorption_rate=n_full / len(words),
                   absorption_fraction=float(np.mean([w["absorption_fraction"] for w in words])), evaluated=True)

    table = pd.DataFrame(rows, columns=LETTER_COLUMNS)
    done = table[table.evaluated]
    if len(done) < min_letters:
        return _empty(f"{len(done)} letter(s) passed the word-count and probe-F1 gates; need {min_letters}", table)
    means: dict[str, float] = {}
    for key in ("absorption_fraction", "absorption_rate", "n_main"):
        vals = done[key].astype(float)
        means[key] = float(vals.mean())
        means[f"{key}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else math.nan
    means["n_letters"] = float(len(done))
    return AbsorptionResult(table, pd.DataFrame(word_rows, columns=WORD_COLUMNS), means)

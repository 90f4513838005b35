"""bench/train.py's rows for issue 25's anchor targets: each precision against the anchors in the same precision,
PASS/MISS from the measured ratios and FVUs, and the bf16-vs-fp32 target judged only where bf16 is native;
bench/precision_quality.py's arms, speed and activation lines."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench import train


def result(step_ms: float, fvu: float, **extra: Any) -> dict[str, Any]:
    return {"step_seconds": [1.0] + [step_ms / 1000] * 4, "n_dead": [0] * 5, "fvu": fvu, "version": "x", **extra}


def results(ours_fp32: float = 250, ours_bf16: float = 120, dl_fvu: float = 0.30) -> dict[str, dict[str, Any]]:
    return {"dmsae": result(ours_fp32, 0.300), "dmsae-bf16": result(ours_bf16, 0.302),
            "dictionary_learning-None": result(1500, dl_fvu), "dictionary_learning-bf16": result(900, dl_fvu),
            "sparsify-fp32": result(400, 0.25, decoder="eager_decode"), "sparsify-bf16": result(300, 0.25)}


def by_what(rows: list[train.Row]) -> dict[str, train.Row]:
    return {r.what.split(" SparseCoder")[0].split(" MatryoshkaBatchTopKTrainer")[0]: r for r in rows}


def test_rows_per_precision(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(train.precision, "native_bf16", lambda device: (True, "the CPU has AMX (amx_bf16)"))
    rows = by_what(train.precision_rows(results(), {"fp32": 0.100, "bf16": 0.030}, 200, "cpu"))
    sp = rows["dmsae step, no core, fp32 vs sparsify x"]
    assert sp.ratio == pytest.approx(1.6) and sp.passed
    dl = rows["dmsae step, no core, bf16 vs dictionary_learning x"]
    assert dl.ratio == pytest.approx(7.5) and dl.passed
    fp32, bf16 = rows["dmsae step, no core, fp32"], rows["dmsae step, no core, bf16"]  # vs the matmul
    assert fp32.ratio == pytest.approx(2.5) and fp32.passed is False  # <= 2x
    assert bf16.ratio == pytest.approx(4.0) and bf16.passed is False  # <= 3x
    speed = rows["dmsae step, no core, bf16 vs fp32"]
    assert speed.ratio == pytest.approx(250 / 120) and speed.passed  # >= 2x and |dFVU| 0.002


def test_fvu_worse_than_dictionary_learning_misses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(train.precision, "native_bf16", lambda device: (True, "AMX"))
    rows = by_what(train.precision_rows(results(dl_fvu=0.28), {"fp32": 0.1, "bf16": 0.03}, 200, "cpu"))
    assert rows["dmsae step, no core, fp32 vs dictionary_learning x"].passed is False  # 0.300 > 0.28 + 0.01


def test_bf16_target_not_judged_without_native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(train.precision, "native_bf16", lambda device: (False, "no amx_bf16"))
    rows = by_what(train.precision_rows(results(), {"fp32": 0.1, "bf16": 0.03}, 200, "cpu"))
    assert rows["dmsae step, no core, bf16 vs fp32"].passed is None


def test_without_native_bf16_only_fp32_is_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(train.precision, "native_bf16", lambda device: (False, "the CPU has no native bfloat16"))
    assert train.measured_precisions("cpu") == ("fp32",)
    res = {k: v for k, v in results().items() if not k.endswith("bf16")}
    rows = train.precision_rows(res, {"fp32": 0.1, "bf16": 0.5}, 200, "cpu")
    judged = [r for r in rows if r.passed is not None]
    assert judged and all(", fp32" in r.what or r.what.endswith("fp32") for r in judged)
    skipped = [r for r in rows if "bf16" in r.what]
    assert len(skipped) == 1 and skipped[0].value is None and "no native bfloat16" in skipped[0].note


def test_anchor_error_is_a_row_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(train.precision, "native_bf16", lambda device: (True, "AMX"))
    res = results()
    res["sparsify-bf16"] = {"error": "sparsify exited 1: boom"}
    rows = train.precision_rows(res, {"fp32": 0.1, "bf16": 0.03}, 200, "cpu")
    failed = [r for r in rows if r.note == "sparsify exited 1: boom"]
    assert len(failed) == 1 and failed[0].passed is None and failed[0].ratio is None


def test_precision_speed_counts_only_the_stages_whose_keys_differ() -> None:
    from bench.precision_quality import speed

    # the harvest is shared (computed once, by the fp32 run: 100 s there, none in the bf16 run): left out
    fp32 = {"harvest": ("harvest", "h", 100.0), "train[0]": ("train", "a", 30.0),
            "evaluate[cycle=0]": ("evaluate", "e", 10.0)}
    bf16 = {"harvest": ("harvest", "h", 0.0), "train[0]": ("train", "b", 20.0),
            "evaluate[cycle=0]": ("evaluate", "f", 10.0)}
    line = speed(fp32, bf16)
    assert "the 2 stages" in line
    assert "all: fp32 40 s, bf16 30 s (1.33x)" in line
    assert "(train, reuse): fp32 30 s, bf16 20 s (1.50x)" in line


def test_precision_arms_share_the_fp32_run_and_set_only_their_field() -> None:
    from bench.precision_quality import arms

    sae, lm = arms("sae", "/s", []), arms("lm", "/s", [])
    def config(sets: list[str]) -> set[str]:
        return {s for s in sets if not s.startswith("name=")}
    assert config(sae["fp32"]) == config(lm["fp32"])  # one fp32 run serves both tables
    assert config(sae["bf16"]) - config(sae["fp32"]) == {"precision.sae=bf16"}
    assert config(lm["bf16"]) - config(lm["fp32"]) == {"precision.lm=bf16"}
    assert "precision.sae=fp32" in lm["bf16"] and "precision.lm=fp32" in sae["bf16"]


def test_precision_activation_errors_read_real_harvests(tmp_path: Path) -> None:
    from bench.precision_quality import activation_errors
    from dmsae import activations

    def harvest(name: str, rows: np.ndarray) -> Path:
        (tmp_path / name).mkdir()
        array = activations.create(tmp_path / name / activations.ARRAY, rows.shape[0], rows.shape[1], 8)
        writer = activations.ChunkWriter(array)
        writer.append(rows)
        writer.close()
        return tmp_path / name

    rows = np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32)
    a, b, c = harvest("a", rows), harvest("b", rows * np.float32(1.01)), harvest("c", rows[:19])
    line = activation_errors([a, a], [a, b])
    assert ("median 0.0000, 99th percentile 0.0000 over the 20 rows both kept (0 kept by one only: the outlier "
            "filter); median 0.0100, 99th percentile 0.0100 over the 20") in line
    # one of them dropped the last row: the 19 others are compared
    assert "median 0.0000, 99th percentile 0.0000 over the 19 rows both kept (1 kept by one only" in \
        activation_errors([a], [c])
    other = harvest("other", np.random.default_rng(1).standard_normal((20, 4)).astype(np.float32))
    assert "could not be paired" in activation_errors([a], [other])
    (tmp_path / "parted").mkdir()  # a harvest in parts holds a list of its parts, no array of its own
    assert "rows not compared" in activation_errors([a], [tmp_path / "parted"])


def test_common_rows_pairs_harvests_that_dropped_different_rows() -> None:
    """Each harvest's outlier filter may drop rows the other kept: the rows both kept are paired in order, through
    drops on either side, one after the other or at the ends; unrelated rows are not paired."""
    from bench.harvest import common_rows

    rng = np.random.default_rng(0)
    rows = rng.standard_normal((40, 16))
    noisy = rows * (1 + 0.01 * rng.standard_normal((40, 1)))  # bf16-sized differences
    x_kept = [i for i in range(40) if i not in (10, 11, 39)]  # x dropped two in a row and the last
    y_kept = [i for i in range(40) if i not in (0, 3, 12, 25)]  # y dropped the first, and 12 where x dropped 11
    xi, yi = common_rows(rows[x_kept], noisy[y_kept])
    both = [i for i in range(40) if i in x_kept and i in y_kept]
    assert [x_kept[i] for i in xi] == both and [y_kept[i] for i in yi] == both
    assert common_rows(rows, rng.standard_normal((40, 16))) is None
    assert common_rows(rows[x_kept], noisy[y_kept], max_dropped=2) is None


def test_generated_tables_link_the_notes_only_from_inside_the_repository(tmp_path: Path) -> None:
    from bench import run

    inside = run.notes_link(run.REPO / "docs" / "x.md")
    assert inside == "[BENCHMARKS.md](../BENCHMARKS.md)"
    # a GPU machine's $OUT: the page is copied into docs/ later, where a relative link would leave the repository
    outside = run.notes_link(tmp_path / "c" / "bench-train.md")
    assert "](" not in outside and "BENCHMARKS.md" in outside

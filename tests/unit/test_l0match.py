"""dmsae.eval.l0match: reading a metric curve at another arm's L0."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from dmsae.eval.l0match import matched_deltas, read_at_l0


def test_read_at_l0_interpolates_in_log_l0():
    l0, y = np.array([10.0, 40.0, 20.0]), np.array([0.5, 0.9, 0.7])  # unsorted on purpose
    assert read_at_l0(l0, y, 20.0) == (pytest.approx(0.7), False)
    value, extra = read_at_l0(l0, y, math.sqrt(10 * 20))  # halfway in log L0 between 10 and 20
    assert value == pytest.approx(0.6) and not extra
    value, extra = read_at_l0(l0, y, 44.0)  # just past the end: linear in log L0, flagged
    assert extra and value == pytest.approx(0.9 + 0.2 * math.log(44 / 40) / math.log(2))
    assert math.isnan(read_at_l0(l0, y, 60.0)[0])  # far past the end: no reading
    assert math.isnan(read_at_l0(l0, y, 5.0)[0])


def test_matched_deltas_compare_at_equal_l0_not_equal_k():
    # the no-core arm: score rises with L0; a cored arm at k=16 spends L0 32, where no core scores 0.8
    table = pd.DataFrame([
        {"arm": "none", "k": 16, "seed": 0, "l0": 16.0, "ce_loss_score": 0.7, "explained_variance": 0.5},
        {"arm": "none", "k": 32, "seed": 0, "l0": 32.0, "ce_loss_score": 0.8, "explained_variance": 0.6},
        {"arm": "none", "k": 64, "seed": 0, "l0": 64.0, "ce_loss_score": 0.9, "explained_variance": 0.7},
        {"arm": "distilled", "k": 16, "seed": 0, "l0": 32.0, "ce_loss_score": 0.75, "explained_variance": 0.65},
        {"arm": "none", "k": 16, "seed": 1, "l0": 16.0, "ce_loss_score": 0.0, "explained_variance": 0.0},
        {"arm": "none", "k": 32, "seed": 1, "l0": 32.0, "ce_loss_score": 0.0, "explained_variance": 0.0},
    ])
    d = matched_deltas(table)
    assert len(d) == 1
    row = d.iloc[0]
    assert row.d_ce_loss_score == pytest.approx(-0.05)  # worse than no core at its own L0, though better at k=16
    assert row.d_explained_variance == pytest.approx(0.05)
    assert row.none_ce_loss_score == pytest.approx(0.8) and not row.extrapolated  # seed 0's curve, not seed 1's


def test_a_diverged_sae_reads_as_nan_and_stays_off_the_curve():
    # a training that diverged stores its metrics as null (None here): NaN, not a crash, and the reference
    # curve is read through its finite points only
    table = pd.DataFrame([
        {"arm": "none", "k": 16, "seed": 0, "l0": 16.0, "ce_loss_score": 0.7, "explained_variance": 0.5},
        {"arm": "none", "k": 24, "seed": 0, "l0": 24.0, "ce_loss_score": None, "explained_variance": None},
        {"arm": "none", "k": 32, "seed": 0, "l0": 32.0, "ce_loss_score": 0.8, "explained_variance": 0.6},
        {"arm": "distilled", "k": 16, "seed": 0, "l0": 24.0, "ce_loss_score": 0.8, "explained_variance": 0.6},
        {"arm": "distilled", "k": 32, "seed": 0, "l0": None, "ce_loss_score": None, "explained_variance": None},
    ])
    d = matched_deltas(table).set_index("k")
    assert d.loc[16, "none_ce_loss_score"] == pytest.approx(0.7 + 0.1 * math.log(24 / 16) / math.log(2))
    assert math.isnan(d.loc[32, "d_ce_loss_score"]) and math.isnan(d.loc[32, "d_explained_variance"])


def test_compare_arms_reads_the_arm_with_more_points():
    """A control at one k is compared with the distilled curve read at the control's L0; with equal counts the
    reference is read, as matched_deltas does."""
    from dmsae.eval.l0match import compare_arms

    rows = [{"arm": "distilled", "k": k, "seed": 0, "l0": float(k), "ce_loss_score": s, "explained_variance": 0.5}
            for k, s in ((16, 0.70), (32, 0.80), (64, 0.90))]
    rows.append({"arm": "none_compute", "k": 32, "seed": 0, "l0": math.sqrt(16 * 32), "ce_loss_score": 0.72,
                 "explained_variance": 0.4})
    d = compare_arms(pd.DataFrame(rows), "distilled", "none_compute")
    assert len(d) == 1 and d.curve[0] == "distilled" and d.k[0] == 32
    # the distilled curve halfway in log L0 between 16 and 32 reads 0.75: distilled - control = 0.75 - 0.72
    assert d.d_ce_loss_score[0] == pytest.approx(0.03)
    assert d.d_explained_variance[0] == pytest.approx(0.1)
    assert d.d_ce_loss_score_same_k[0] == pytest.approx(0.80 - 0.72)
    # three points each: the reference is the curve, as in matched_deltas
    none = [{**r, "arm": "none", "ce_loss_score": r["ce_loss_score"] - 0.05} for r in rows[:3]]
    d = compare_arms(pd.DataFrame(rows[:3] + none), "distilled", "none")
    assert list(d.curve) == ["none"] * 3 and d.d_ce_loss_score.to_numpy() == pytest.approx([0.05] * 3)
    assert compare_arms(pd.DataFrame(rows[:3]), "distilled", "frequency").empty

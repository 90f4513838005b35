"""The bootstrap interval over seeds (dmsae/eval/stats.py) and the cross-seed overlap of dictionaries
(dmsae/eval/overlap.py) on cases whose answer is known."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from dmsae.eval.overlap import chance_overlap, dictionary_overlap, random_dictionary, unit_rows
from dmsae.eval.stats import EXCLUDES, INCLUDES, ONE_SEED, bootstrap_ci, paired_bootstrap_ci

# -- bootstrap -------------------------------------------------------------------------------------------


def test_two_seeds_give_the_interval_from_one_to_the_other():
    """With values a < b the resampled means are a (1/4), (a+b)/2 (1/2) and b (1/4): the 2.5% and 97.5%
    quantiles are exactly a and b."""
    ci = bootstrap_ci([0.1, 0.3])
    assert ci.mean == pytest.approx(0.2)
    assert (ci.low, ci.high) == (0.1, 0.3)
    assert ci.decision == EXCLUDES and ci.excludes_zero
    ci = bootstrap_ci([-0.1, 0.3])
    assert (ci.low, ci.high) == (-0.1, 0.3) and ci.decision == INCLUDES and ci.excludes_zero is False


def test_large_normal_sample_gives_the_normal_interval():
    """For n normal values the bootstrap interval of the mean approaches mean +- 1.96 s / sqrt(n)."""
    v = np.random.default_rng(1).normal(0.5, 2.0, size=400)
    ci = bootstrap_ci(v)
    half = 1.96 * v.std(ddof=1) / math.sqrt(v.size)
    assert ci.low == pytest.approx(v.mean() - half, abs=0.05 * half + 0.02)
    assert ci.high == pytest.approx(v.mean() + half, abs=0.05 * half + 0.02)
    assert ci.high - ci.low == pytest.approx(2 * half, rel=0.08)


def test_bootstrap_is_deterministic_given_its_seed_and_drops_nan():
    v = [0.3, -0.1, 0.2, 0.05, 0.4]
    assert bootstrap_ci(v) == bootstrap_ci(v)
    assert bootstrap_ci(v, seed=1) != bootstrap_ci(v, seed=2)
    assert bootstrap_ci([*v, float("nan")]) == bootstrap_ci(v)


def test_constant_and_single_values():
    ci = bootstrap_ci([0.02, 0.02, 0.02])
    assert (ci.low, ci.high) == (0.02, 0.02) and ci.decision == EXCLUDES
    one = bootstrap_ci([0.5])
    assert one.n == 1 and math.isnan(one.low) and one.decision == ONE_SEED and one.text() == "+0.5000"
    assert bootstrap_ci([]).text() == "" and bootstrap_ci([float("nan")]).n == 0
    assert bootstrap_ci([0.1, 0.3]).text("{:+.2f}") == "+0.20 [+0.10, +0.30]"


def test_paired_interval_resamples_seeds_not_values():
    """Large seed effects shared by both arms cancel: the pairs' difference is always 0.1."""
    a = np.array([1.0, 5.0, -3.0, 10.0])
    ci = paired_bootstrap_ci(a + 0.1, a)
    assert ci.low == pytest.approx(0.1) and ci.high == pytest.approx(0.1) and ci.decision == EXCLUDES
    # the unpaired spread would include 0
    assert bootstrap_ci(a + 0.1).decision == INCLUDES
    with pytest.raises(ValueError):
        paired_bootstrap_ci([1.0], [1.0, 2.0])


# -- overlap ---------------------------------------------------------------------------------------------


def permuted_noisy_copy(x: np.ndarray, rng: np.random.Generator, noise: float) -> tuple[np.ndarray, np.ndarray]:
    perm = rng.permutation(x.shape[0])
    return unit_rows(x[perm] + noise * rng.standard_normal(x.shape)), perm


def test_a_permuted_noisy_copy_is_shared_whole():
    rng = np.random.default_rng(0)
    n, d = 200, 32
    enc, dec = random_dictionary(n, d, rng), random_dictionary(n, d, rng)
    perm = rng.permutation(n)
    enc_b = unit_rows(enc[perm] + 0.02 * rng.standard_normal((n, d)))
    dec_b = unit_rows(dec[perm] + 0.02 * rng.standard_normal((n, d)))
    o = dictionary_overlap(enc, dec, enc_b, dec_b)
    assert o.shared == n and o.fraction == 1.0 and o.agree == n
    assert o.mean_encoder_cosine > 0.99 and o.mean_decoder_cosine > 0.99


def test_matchings_that_disagree_share_nothing():
    """Encoders copied in one order, decoders in another: every cosine is 1 but the two matchings pair each
    latent with different partners."""
    rng = np.random.default_rng(1)
    n, d = 50, 16
    enc, dec = random_dictionary(n, d, rng), random_dictionary(n, d, rng)
    shift = np.roll(np.arange(n), 1)
    o = dictionary_overlap(enc, dec, enc, dec[shift])
    assert o.shared == 0 and o.agree == 0 and o.mean_decoder_cosine == pytest.approx(1.0)


def test_the_cosine_threshold():
    """A copy rotated to cosine 0.6 (below 0.7) in both matrices is matched but not shared; at 0.8 it is."""
    rng = np.random.default_rng(2)
    n, d = 30, 64
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    base, other = q[:n], q[n:2 * n]  # orthonormal: the rotated copy's best partner is its own latent

    def at(c: float) -> np.ndarray:
        return c * base + math.sqrt(1 - c * c) * other

    assert dictionary_overlap(base, base, at(0.6), at(0.6)).shared == 0
    assert dictionary_overlap(base, base, at(0.8), at(0.8)).shared == n
    assert dictionary_overlap(base, base, at(0.8), at(0.6)).shared == 0  # both cosines must pass


def test_random_dictionaries_match_at_the_chance_level():
    """In 8 dimensions random directions often lie within cosine 0.7, so chance is far from 0 (about 0.37); pairs
    of random dictionaries (encoders equal to decoders, as the chance level draws them) share that fraction on
    average."""
    n, d = 40, 8
    chance = chance_overlap(n, n, d, draws=20, seed=5)
    assert 0.25 < chance < 0.5
    rng = np.random.default_rng(11)
    seen = []
    for _ in range(20):
        a, b = random_dictionary(n, d, rng), random_dictionary(n, d, rng)
        seen.append(dictionary_overlap(a, a, b, b).fraction)
    assert np.mean(seen) == pytest.approx(chance, abs=0.04)
    # in high dimension chance is nil, and two random dictionaries share nothing
    assert chance_overlap(64, 64, 256, seed=0) == 0.0
    rng = np.random.default_rng(3)
    a, b, c, e = (random_dictionary(64, 256, rng) for _ in range(4))
    assert dictionary_overlap(a, b, c, e).shared == 0


def test_different_sizes_match_the_smaller():
    rng = np.random.default_rng(4)
    big = random_dictionary(40, 32, rng)
    small = big[[3, 17, 29, 5]]
    o = dictionary_overlap(small, small, big, big)
    assert (o.n_a, o.n_b, o.matched, o.shared, o.fraction) == (4, 40, 4, 4, 1.0)
    o = dictionary_overlap(big, big, small, small)
    assert o.shared == 4 and o.fraction == 1.0
    empty = dictionary_overlap(big[:0], big[:0], big, big)
    assert empty.shared == 0 and math.isnan(empty.fraction)


def test_controls_table_and_its_forest_plot(tmp_path):
    """Per comparison and k, the mean over seeds with its bootstrap interval; the plot draws a bar per interval
    and none for a single seed."""
    from dmsae.reports.ablation import controls_table, plot_controls

    rows = []
    for seed, d in enumerate([0.010, 0.012, 0.008, 0.011, 0.009]):  # distilled - none: all above 0
        rows.append({"gate": "topk", "cap": "0.6", "comparison": "distilled - none", "k": 16, "seed": seed,
                     "d_ce_loss_score": d, "d_explained_variance": d, "d_ce_loss_score_same_k": d,
                     "l0": 16.0, "curve": "none", "extrapolated": False})
    for seed, d in enumerate([0.01, -0.01, 0.02, -0.02, 0.0]):  # straddles 0
        rows.append({"gate": "topk", "cap": "0.6", "comparison": "distilled - random", "k": 16, "seed": seed,
                     "d_ce_loss_score": d, "d_explained_variance": d, "d_ce_loss_score_same_k": d,
                     "l0": 16.0, "curve": "random", "extrapolated": False})
    rows.append({"gate": "topk", "cap": "0.6", "comparison": "distilled - frequency", "k": 32, "seed": 0,
                 "d_ce_loss_score": 0.003, "d_explained_variance": 0.003, "d_ce_loss_score_same_k": 0.003,
                 "l0": 32.0, "curve": "distilled", "extrapolated": False})
    t = controls_table(pd.DataFrame(rows))
    by = t.set_index("comparison")
    assert by.loc["distilled - none", "d_ce_loss_score"] == pytest.approx(0.010)
    assert 0.008 <= by.loc["distilled - none", "d_ce_loss_score_lo"] < 0.010 < by.loc["distilled - none",
                                                                                        "d_ce_loss_score_hi"] <= 0.012
    assert by.loc["distilled - none", "d_ce_loss_score_decision"] != by.loc["distilled - random",
                                                                             "d_ce_loss_score_decision"]
    assert by.loc["distilled - frequency", "seeds"] == 1
    # the table's order: distilled - none first, as COMPARISONS lists them
    assert list(t.comparison) == ["distilled - none", "distilled - frequency", "distilled - random"]
    path = tmp_path / "controls.png"
    assert plot_controls(t, path) == 2 and path.read_bytes()[:4] == b"\x89PNG"

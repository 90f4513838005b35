"""stages.select.select_prefix: the shortest score-sorted prefix reaching tau of the total (docs/design.md
"Selection"), checked against a plain-Python sort and running sum."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stages.select import select_prefix

scores_strategy = st.lists(
    st.one_of(
        st.just(0.0),
        st.sampled_from([0.5, 1.0, 2.0]),  # repeated values: ties must break by index
        st.floats(min_value=0.0, max_value=1e6, allow_nan=False, allow_infinity=False, allow_subnormal=False),
    ),
    min_size=1, max_size=60,
)
tau_strategy = st.one_of(
    st.just(1.0),
    st.floats(min_value=1e-6, max_value=1.0, exclude_min=False, allow_nan=False, allow_subnormal=False),
)


def reference(scores: list[float], tau: float) -> tuple[list[int], list[float], int]:
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    running, cumulative = 0.0, []
    for i in order:  # sequential float64 sums, as np.cumsum does
        running += scores[i]
        cumulative.append(running)
    total = cumulative[-1]
    if total <= 0:
        return order, cumulative, 0
    target = tau * total
    n_keep = next(n + 1 for n, s in enumerate(cumulative) if s >= target)
    return order, cumulative, n_keep


@settings(max_examples=300, deadline=None)
@given(scores=scores_strategy, tau=tau_strategy)
def test_select_prefix_property(scores, tau):
    order, n_keep, cumulative = select_prefix(np.array(scores), tau)
    ref_order, ref_cum, ref_keep = reference(scores, tau)
    assert order.tolist() == ref_order
    assert cumulative.tolist() == ref_cum
    assert n_keep == ref_keep

    s = np.asarray(scores)
    total = float(cumulative[-1])  # the running sum; np.sum (pairwise) may differ in the last bit
    assert total == pytest.approx(float(np.sum(s)), rel=1e-12)
    # descending, ties broken by the lower index first
    for a, b in zip(order[:-1], order[1:], strict=True):
        assert s[a] > s[b] or (s[a] == s[b] and a < b)
    if total > 0:
        assert 1 <= n_keep <= s.size
        assert cumulative[n_keep - 1] >= tau * total  # the prefix reaches tau * total
        if n_keep > 1:  # and the prefix one shorter does not
            assert cumulative[n_keep - 2] < tau * total
        assert s[order[n_keep - 1]] > 0  # never keeps a zero-score latent
    else:
        assert n_keep == 0


def test_all_zero_scores_keep_nothing():
    order, n_keep, cumulative = select_prefix(np.zeros(7), 0.9)
    assert n_keep == 0
    assert order.tolist() == list(range(7))  # all tied: index order
    assert cumulative.tolist() == [0.0] * 7


def test_tau_one_keeps_every_positive_score():
    s = np.array([0.0, 3.0, 0.0, 1.0, 2.0, 0.0])
    order, n_keep, _ = select_prefix(s, 1.0)
    assert n_keep == 3
    assert order[:n_keep].tolist() == [1, 4, 3]
    assert order.tolist() == [1, 4, 3, 0, 2, 5]


def test_worked_example():
    s = np.array([1.0, 4.0, 2.0, 2.0, 1.0])  # total 10: 4 -> 0.4, +2 -> 0.6, +2 -> 0.8, +1 -> 0.9
    assert select_prefix(s, 0.4)[1] == 1
    assert select_prefix(s, 0.41)[1] == 2
    assert select_prefix(s, 0.8)[1] == 3
    assert select_prefix(s, 0.85)[1] == 4
    order, n_keep, cumulative = select_prefix(s, 0.9)
    assert order.tolist() == [1, 2, 3, 0, 4]
    assert n_keep == 4
    np.testing.assert_allclose(cumulative, [4, 6, 8, 9, 10])


@pytest.mark.parametrize("tau", [0.3, 1.0])
def test_single_score(tau):
    assert select_prefix(np.array([5.0]), tau)[1] == 1

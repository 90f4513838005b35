"""Comparisons at equal total L0, not equal k.

A core that fires outside BatchTopK makes an SAE spend more L0 than its k, so comparing arms at equal k
flatters (or hides) the core. Here each arm's metric is a curve over its measured L0 (one point per k),
read by linear interpolation in log L0, and the reference arm is read at the L0 the other arm measured.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

# how far past the ends of the reference curve (as a factor of L0) a reading may extrapolate linearly
EXTRAPOLATE = 1.15
METRICS = ("ce_loss_score", "explained_variance")


def read_at_l0(l0: np.ndarray, values: np.ndarray, at: float, extrapolate: float = EXTRAPOLATE) -> tuple[float, bool]:
    """(the curve's value at L0 `at`, whether it was extrapolated); NaN beyond `extrapolate` x its ends."""
    order = np.argsort(l0)
    x, y = np.log(np.asarray(l0, dtype=float)[order]), np.asarray(values, dtype=float)[order]
    if x.size == 0 or not at > 0:
        return math.nan, False
    t = math.log(at)
    if x.size == 1:
        return (float(y[0]), False) if abs(t - x[0]) < 1e-12 else (math.nan, False)
    if x[0] <= t <= x[-1]:
        return float(np.interp(t, x, y)), False
    if t < x[0] - math.log(extrapolate) or t > x[-1] + math.log(extrapolate):
        return math.nan, False
    i, j = (0, 1) if t < x[0] else (-2, -1)
    slope = (y[j] - y[i]) / (x[j] - x[i]) if x[j] != x[i] else 0.0
    return float(y[i] + slope * (t - x[i])), True


def matched_deltas(table: pd.DataFrame, reference: str = "none", metrics: tuple[str, ...] = METRICS) -> pd.DataFrame:
    """For each SAE of another arm (rows with columns arm, k, seed, l0 and METRICS), its metrics minus the
    `reference` arm's of the same seed read at the same L0. Columns: arm, k, seed, l0, and per metric the
    value, the reference's reading and the difference (d_<metric>); `extrapolated` marks readings past the
    reference curve's ends."""
    # a diverged SAE's metrics are stored as null: NaN here, and left out of the curves it would be read on
    table = table.assign(**{c: pd.to_numeric(table[c], errors="coerce") for c in ("l0", *metrics)})
    rows = []
    for (arm, seed), group in table[table.arm != reference].groupby(["arm", "seed"], sort=True):
        ref = table[(table.arm == reference) & (table.seed == seed)]
        for r in group.sort_values("k").itertuples(index=False):
            row = {"arm": arm, "k": int(r.k), "seed": int(seed), "l0": float(r.l0), "extrapolated": False}
            for metric in metrics:
                value = float(getattr(r, metric))
                curve = ref[np.isfinite(ref.l0) & (ref.l0 > 0) & np.isfinite(ref[metric])]
                at, extra = read_at_l0(curve.l0.to_numpy(), curve[metric].to_numpy(), float(r.l0))
                row[metric], row[f"{reference}_{metric}"] = value, at
                row[f"d_{metric}"] = value - at
                row["extrapolated"] |= extra
            rows.append(row)
    return pd.DataFrame(rows)


def compare_arms(table: pd.DataFrame, arm: str, reference: str, metrics: tuple[str, ...] = METRICS) -> pd.DataFrame:
    """`arm` minus `reference` at equal total L0, seed by seed. The arm with more points (k values) is the curve,
    read at the L0 the other measured; with equal counts the reference is the curve, as in `matched_deltas`. So a
    control trained at one k is compared with the distilled curve read at its L0. Columns: seed, k (of the SAE read
    at its own L0), l0 (its L0), curve (which arm was read), d_<metric>, extrapolated; and d_<metric>_same_k, the
    plain difference at the same k where both arms have it."""
    table = table.assign(**{c: pd.to_numeric(table[c], errors="coerce") for c in ("l0", *metrics)})
    rows = []
    for seed, g in table.groupby("seed", sort=True):
        a, r = g[g.arm == arm], g[g.arm == reference]
        if a.empty or r.empty:
            continue
        read_reference = len(r) >= len(a)
        curve, points = (r, a) if read_reference else (a, r)
        for p in points.sort_values("k").itertuples(index=False):
            row: dict[str, object] = {"seed": int(seed), "k": int(p.k), "l0": float(p.l0),
                                      "curve": reference if read_reference else arm, "extrapolated": False}
            other = (r if read_reference else a)
            same_k = other[other.k == p.k]
            for metric in metrics:
                c = curve[np.isfinite(curve.l0) & (curve.l0 > 0) & np.isfinite(curve[metric])]
                at, extra = read_at_l0(c.l0.to_numpy(), c[metric].to_numpy(), float(p.l0))
                value = float(getattr(p, metric))
                row[f"d_{metric}"] = value - at if read_reference else at - value
                row["extrapolated"] = bool(row["extrapolated"]) | extra
                twin = float(same_k[metric].iloc[0]) if len(same_k) else math.nan
                row[f"d_{metric}_same_k"] = value - twin if read_reference else twin - value
            rows.append(row)
    return pd.DataFrame(rows)

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

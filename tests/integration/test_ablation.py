"""`dmsae ablate` (flows/ablate.py) on the tiny model: two gates x one seed through the real Prefect flow, the
shared stages computed once, and the report's L0-matched tables filled from the store."""

from __future__ import annotations

import pandas as pd
import pytest

from dmsae.config import load_config
from dmsae.store import Store
from flows.pipeline import plan


@pytest.fixture(scope="module")
def ablation(reuse_config_yaml, tmp_path_factory, single_thread):
    from flows.ablate import point_config
    from flows.cli import main

    out = tmp_path_factory.mktemp("ablation-report")
    args = ["ablate", str(reuse_config_yaml), "--gates", "relu,topk", "--caps", "none,2", "--seeds", "0",
            "--out", str(out)]
    with single_thread():
        assert main(args) == 0
    points = [point_config(str(reuse_config_yaml), [], g, c, 0) for g in ("relu", "topk") for c in ("none", "2")]
    return out, points


def test_points_share_what_has_no_core(ablation):
    _, points = ablation
    plans = [plan(c) for c in points]
    store = Store(points[0].store)
    for label in ("train[0]", "attribute[0]", "reuse[none,k=4,seed=0]", "evaluate[none,k=8,seed=0]"):
        keys = {next(n.key for n in p.nodes if n.label == label) for p in plans}
        assert len(keys) == 1, label
    # the gated stages differ between gates and exist
    keys = {p.find("train", 1).key for p in plans}
    assert len(keys) == 4 and all(store.has("train", k) for k in keys)


def test_report_has_the_matched_tables(ablation):
    out, points = ablation
    text = (out / "ablation.md").read_text()
    assert "Not finished yet" not in text
    rows = pd.read_parquet(out / "ablation.parquet")
    assert set(rows.gate) == {"relu", "topk"} and set(rows.cap) == {"none", "2"}
    matched = pd.read_csv(out / "ablation_matched.csv")
    assert set(matched.arm) == {"distilled", "random", "frequency", "none_compute"}
    assert {"d_ce_vs_none_lo", "d_ce_vs_none_hi", "d_ce_vs_none_decision"} <= set(matched.columns)
    controls = pd.read_csv(out / "controls.csv")
    assert {"distilled - none", "distilled - none_compute", "distilled - frequency", "distilled - random",
            "none_compute - none"} == set(controls.comparison)
    # one seed: a mean and no interval, and the report says so in words
    # ("no reading" where the tiny arms' L0 curves do not overlap)
    decisions = set(controls.d_ce_loss_score_decision)
    assert "one seed: no interval" in decisions and decisions <= {"one seed: no interval", "no reading"}
    assert "## The controls" in text and "one seed: no interval" in text
    capped = rows[(rows.cap == "2") & (rows.arm == "distilled")]
    uncapped = rows[(rows.cap == "none") & (rows.arm == "distilled")]
    assert (capped.core_size <= 2).all() and (uncapped.core_size > 2).all()
    assert (out / "ablation.png").stat().st_size > 0 and (out / "controls.png").read_bytes()[:4] == b"\x89PNG"
    assert "![The controls" in text
    assert "## The decision" in text and "relu" in text and "topk" in text


def test_rerun_computes_nothing(ablation, reuse_config_yaml, single_thread):
    from flows.cli import main

    out, points = ablation
    store_root = Store(points[0].store).root
    before = sorted(p.name for p in store_root.glob("*/*") if p.is_dir())
    with single_thread():
        assert main(["ablate", str(reuse_config_yaml), "--gates", "relu,topk", "--caps", "none,2", "--seeds", "0",
                     "--out", str(out)]) == 0
    assert sorted(p.name for p in store_root.glob("*/*") if p.is_dir()) == before


def test_bad_grid_is_one_line(reuse_config_yaml, capsys):
    from flows.cli import main

    assert main(["ablate", str(reuse_config_yaml), "--gates", "relu,sigmoid"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "core_gate" in err


def test_points_pick_pairs_not_the_cross_product(reuse_config_yaml, tmp_path, capsys):
    import json

    from flows.cli import main

    out = tmp_path / "pairs"
    assert main(["ablate", str(reuse_config_yaml), "--points", "topk:2,relu:none", "--seeds", "0", "--out", str(out),
                 "--report-only"]) == 0
    from flows.ablate import point_name

    base = load_config(str(reuse_config_yaml)).name
    assert json.loads((out / "points.json").read_text()) == [point_name(base, "topk", "2", 0),
                                                             point_name(base, "relu", "none", 0)]
    report = (out / "ablation.md").read_text()
    assert "--points topk:2,relu:none" in report
    assert main(["ablate", str(reuse_config_yaml), "--points", "topk"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--points" in err[0]


def test_feature_metrics_are_compared_at_equal_l0_over_seeds():
    """A hand-built grid: the no-core arm's absorption falls linearly in log2 L0; the distilled arm sits 0.1
    below that line at L0 = 16 (between the no-core points 8 and 32) in seed 0 and 0.3 below in seed 1."""
    import pandas as pd

    from dmsae.reports.ablation import summarise_features

    rows = []
    for seed, gap in ((0, 0.1), (1, 0.3)):
        for l0 in (8, 32):
            rows.append({"gate": "topk", "cap": "0.6", "arm": "none", "k": l0, "seed": seed, "l0": float(l0),
                         "absorption_fraction": 0.5 - 0.05 * {8: 3, 32: 5}[l0], "absorption_rate": 0.0,
                         "sparse_probe_k1": 0.8, "sparse_probe_k5": 0.9})
        rows.append({"gate": "topk", "cap": "0.6", "arm": "distilled", "k": 16, "seed": seed, "l0": 16.0,
                     "absorption_fraction": 0.3 - gap, "absorption_rate": 0.0, "sparse_probe_k1": 0.85,
                     "sparse_probe_k5": 0.9})
    table = summarise_features(pd.DataFrame(rows)).set_index(["arm", "k"])
    distilled = table.loc[("distilled", 16)]
    # the no-core curve at L0 16 (halfway in log2 between 8 and 32) reads 0.5 - 0.05 * 4 = 0.3
    # the two seeds' differences -0.1 and -0.3: their bootstrap interval is exactly [-0.3, -0.1]
    assert distilled["d_absorption_fraction"] == "-0.200 [-0.300, -0.100]"
    assert distilled["d_sparse_probe_k1"] == "+0.050 [+0.050, +0.050]" and distilled["seeds"] == 2
    assert table.loc[("none", 8), "absorption_fraction"] == "0.350 ± 0.000"


def test_cross_seed_overlap_of_a_point_with_itself_is_whole(ablation):
    """The overlap section's sets (distilled core, cycle 0's top c by attribution, frequency core, whole cycle-0
    dictionary) read from the store: a point paired with itself as another seed shares every latent."""
    from dmsae.reports.ablation import DISTILLED_SET, FREQUENCY_SET, TOPC_SET, WHOLE_SET, cross_seed_overlap

    _, points = ablation
    cfg = points[-1]
    p = plan(cfg)
    pairs = cross_seed_overlap([(cfg, p), (cfg.model_copy(update={"seed": 1}), p)], Store(cfg.store))
    assert set(pairs.set) == {DISTILLED_SET, TOPC_SET, FREQUENCY_SET, WHOLE_SET}
    assert (pairs.shared_fraction == 1.0).all() and (pairs.shared == pairs.size_a).all()
    assert (pairs.chance < 0.5).all()
    whole = pairs[pairs.set == WHOLE_SET].iloc[0]
    assert whole.size_a == 128
    core = pairs[pairs.set == DISTILLED_SET].iloc[0]
    assert core.size_a == pairs[pairs.set == TOPC_SET].iloc[0].size_a <= 2  # the cap of the point

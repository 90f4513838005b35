"""The convergence study (`dmsae converge`): its points are the preset's own cycle-0 stages with more epochs,
and its report reads them back with tokens, metrics and the cross-seed overlap against chance."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest

from dmsae.plan import ancestors
from dmsae.reports.convergence import overlap_rows, study_nodes, write_convergence_report
from dmsae.runtime import Runtime
from dmsae.stores import store_for
from flows.cli import main as cli_main
from flows.convergence import study_points
from flows.pipeline import materialize


@pytest.fixture(scope="module")
def study(pipeline_run, make_config, tmp_path_factory, single_thread):
    """Budgets 1 and 2 epochs, seeds 0 and 1, computed without Prefect from a copy of the tiny run's store."""
    store = tmp_path_factory.mktemp("store-convergence")
    shutil.copytree(pipeline_run.cfg.store, store, dirs_exist_ok=True)
    base = make_config(store)
    points = study_points(base, [2, 1], [0, 1])

    computed = {}
    with single_thread():
        for cfg, p in points:
            _, evaluate = study_nodes(p)
            s = store_for(cfg)
            for node in [*ancestors(evaluate), evaluate]:
                computed[(cfg.train.epochs, cfg.seed, node.label)] = materialize(s, node, Runtime())[1]
    return base, points, computed


def test_points_are_the_presets_cycle0_with_more_epochs(study, pipeline_run):
    base, points, computed = study
    assert [(c.train.epochs, c.seed) for c, _ in points] == [(1, 0), (1, 1), (2, 0), (2, 1)]  # small first
    assert all(c.cycles == 1 for c, _ in points)
    # the tiny preset trains one epoch with seed 0: that point is the tiny run's own train[0], reused
    one_epoch_seed0 = study_nodes(points[0][1])[0]
    assert one_epoch_seed0.key == pipeline_run.plan.find("train", 0).key
    assert computed[(1, 0, "train[0]")] is False
    # the harvest is shared by every point: computed by none of them
    assert not any(done for (e, s, label), done in computed.items() if label == "harvest")
    assert computed[(2, 1, "train[0]")] is True


def test_report_reads_tokens_metrics_and_overlap(study, tmp_path):
    base, points, _ = study
    path = write_convergence_report(points, tmp_path, "dmsae converge tiny")
    table = pd.read_csv(tmp_path / "convergence.csv")
    n_tokens = table.loc[table.epochs == 1, "tokens"].iloc[0]
    assert sorted(zip(table.epochs, table.seed, strict=True)) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert (table.loc[table.epochs == 2, "tokens"] == 2 * n_tokens).all()
    assert table.fvu.between(0, 2).all() and table.dead_fraction.between(0, 1).all()
    text = path.read_text()
    assert "## Cross-seed overlap" in text and "## Where each flattens" in text
    assert (tmp_path / "convergence.png").stat().st_size > 1000
    # two seeds at each budget: one overlap row per budget, a fraction and its chance level
    overlap = overlap_rows(points, store_for(base))
    assert list(overlap.epochs) == [1, 2]
    assert overlap.overlap.between(0, 1).all() and overlap.chance.between(0, 1).all()
    assert (overlap.agree >= overlap.overlap).all()  # shared latents are among those both matchings agree on


def test_bad_budgets_are_refused_in_one_line(tmp_path, capsys):
    assert cli_main(["converge", "configs/quickstart.yaml", "--budgets", "0,4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dmsae: error: --budgets")
    assert cli_main(["converge", "configs/quickstart.yaml", "--seeds", "a"]) == 2
    assert "--seeds" in capsys.readouterr().err


def test_flattening_is_read_over_the_finished_budgets_only():
    import math

    import pandas as pd

    from dmsae.reports.convergence import flattens

    budgets = [1, 4, 16, 64]
    assert flattens(pd.Series({1: 0.30}), budgets, "fvu") == "not enough points yet"
    moving = flattens(pd.Series({1: 0.30, 4: 0.25}), budgets, "fvu")  # 16 and 64 not trained yet
    assert moving == "still moving at the largest finished budget (0.3000 at 1 -> 0.2500 at 4 epochs)"
    assert flattens(pd.Series({1: 0.30, 4: 0.25, 16: 0.248, 64: math.nan}), budgets, "fvu").startswith(
        "flat from 4 epoch(s) on")
    assert "0.2500 at 4 -> 0.2400 at 64" in flattens(pd.Series({1: 0.30, 4: 0.25, 64: 0.24}), budgets, "fvu")


def test_a_failing_interim_report_does_not_stop_the_study(study, tmp_path, monkeypatch, capsys):
    """Every point still runs when the report between points fails (a report bug once stopped a long study);
    only the report written at the end raises."""
    import flows.convergence as convergence

    _, points, _ = study
    calls = []

    def broken(*args, **kwargs):
        calls.append(args)
        raise ValueError("a report bug")

    monkeypatch.setattr(convergence, "write_convergence_report", broken)
    with pytest.raises(ValueError, match="a report bug"):
        convergence.run_convergence(points, tmp_path, "dmsae converge tiny")
    assert len(calls) == len(points) + 1  # after each point, then the final one
    err = capsys.readouterr().err
    assert err.count("convergence: the interim report failed (ValueError: a report bug)") == len(points)
    assert f"point {len(points)} done" in err

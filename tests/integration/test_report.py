"""The report (dmsae.reports.run, `dmsae report`) on the tiny run with reuse arms: files, valid PNGs, the
metrics table, and the consistency measures checked against hand computations."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report_dir(reuse_run, tmp_path_factory):
    from dmsae.reports.run import write_report

    out = tmp_path_factory.mktemp("report")
    summary = write_report(reuse_run.cfg, reuse_run.store, reuse_run.plan, out)
    assert summary == out / "summary.md"
    return out


def linked_images(summary: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", summary)


def check_png(path) -> None:
    from PIL import Image

    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path.name
    assert len(data) > 5_000, (path.name, len(data))
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        width, height = im.size
    assert width > 300 and height > 200, (path.name, im.size)
    import matplotlib.image

    pixels = matplotlib.image.imread(str(path))
    assert pixels.shape[:2] == (height, width)
    assert float(pixels[..., :3].std()) > 0.01, path.name  # not a blank canvas


def test_summary_links_every_figure_and_each_is_a_valid_png(report_dir):
    summary = (report_dir / "summary.md").read_text()
    images = linked_images(summary)
    assert set(images) == {"cumulative_attribution.png", "core_origins.png", "training_curves.png", "arms.png"}
    for name in images:
        check_png(report_dir / name)
    assert sorted(p.name for p in report_dir.glob("*.png")) == sorted(images)


def test_summary_names_the_run_and_its_sections(report_dir, reuse_run):
    summary = (report_dir / "summary.md").read_text()
    assert summary.startswith("# dmsae run `tiny`")
    final = reuse_run.node("select[1]")
    assert str(reuse_run.store.artifact_dir("select", final.key)) in summary
    for heading in ("## Distillation cycles", "## Core overlap between cycles", "## SAEs on held-out eval tokens",
                    "## Seed consistency", "## Figures"):
        assert heading in summary
    for label in ("reuse[distilled,k=4,seed=0]", "reuse[none,k=8,seed=1]", "train[0]"):
        assert label in summary


def test_summary_has_the_controls(report_dir, reuse_run):
    summary = (report_dir / "summary.md").read_text()
    controls = summary.split("## The controls")[1].split("\n## ")[0]
    for comparison in ("distilled - frequency", "distilled - none_compute", "distilled - random",
                       "none_compute - none"):
        assert comparison in controls, comparison
    assert "shared_fraction" in summary.split("## Seed consistency")[1]
    table = pd.read_parquet(report_dir / "metrics.parquet")
    assert {"frequency", "none_compute"} <= set(table.arm)


def test_metrics_table_has_one_row_per_evaluation(report_dir, reuse_run):
    table = pd.read_parquet(report_dir / "metrics.parquet")
    cfg = reuse_run.cfg
    # 2 cycle SAEs + 3 arms x (k=4, k=8, k=8 with the second seed) + the two controls at k=8
    assert len(table) == cfg.cycles + 3 * (len(cfg.reuse.k) + 1) + 2 == 13
    assert table["sae"].is_unique
    assert sorted(table["arm"].value_counts().items()) == [("cycle", 2), ("distilled", 3), ("frequency", 1),
                                                           ("none", 3), ("none_compute", 1), ("random", 3)]
    for ev in reuse_run.plan.of_stage("evaluate"):
        row = table[table.sae == ev.inputs["sae"].label]
        assert len(row) == 1, ev.label
        m = reuse_run.store.manifest("evaluate", ev.key).metrics
        for col in ("l0", "explained_variance", "ce_loss_score", "kl_score", "dead_fraction", "core_size", "k"):
            assert row[col].iloc[0] == pytest.approx(m[col]), (ev.label, col)
    reuse_rows = table[table.arm != "cycle"]
    assert set(zip(reuse_rows.k, reuse_rows.seed, strict=True)) == {(4, 0), (8, 0), (8, 1)}
    assert set(zip(*[table[table.arm.isin(["frequency", "none_compute"])][c] for c in ("k", "seed")],
                   strict=True)) == {(8, 0)}
    assert (table[table.arm.isin(["none", "none_compute"])].core_size == 0).all()
    final_size = reuse_run.artifact("select", 1).metrics["core_size"]
    assert (table[table.arm.isin(["distilled", "random", "frequency"])].core_size == final_size).all()


def brute_force_mean_best_cosine(a: np.ndarray, b: np.ndarray) -> float:
    best = []
    for i in range(a.shape[0]):
        top = -2.0
        for j in range(b.shape[0]):
            cos = float(np.dot(a[i], b[j]) / (np.linalg.norm(a[i]) * np.linalg.norm(b[j])))
            top = max(top, cos)
        best.append(top)
    return sum(best) / len(best)


def test_mean_best_cosine():
    from dmsae.eval.reconstruction import mean_best_cosine

    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(40, 12)), rng.normal(size=(25, 12)) * rng.uniform(0.1, 5, size=(25, 1))
    ta, tb = torch.from_numpy(a).float(), torch.from_numpy(b).float()
    assert mean_best_cosine(ta, tb) == pytest.approx(brute_force_mean_best_cosine(a, b), abs=1e-6)
    assert mean_best_cosine(tb, ta) == pytest.approx(brute_force_mean_best_cosine(b, a), abs=1e-6)
    assert mean_best_cosine(ta, ta) == pytest.approx(1.0, abs=1e-12)
    # identical up to order and positive scale of the rows
    perm = rng.permutation(40)
    assert mean_best_cosine(ta, ta[perm] * 3.0) == pytest.approx(1.0, abs=1e-6)
    # a flipped sign is a mismatch, not a match
    assert mean_best_cosine(ta[:1], -ta[:1]) == pytest.approx(-1.0, abs=1e-6)


def test_seed_consistency_matches_brute_force_on_the_reuse_saes(reuse_run):
    from dmsae.reports.run import seed_consistency

    df = seed_consistency(reuse_run.store, reuse_run.plan, reuse_run.cfg)
    assert sorted(df.arm) == ["distilled", "none", "random"]
    assert (df.k == 8).all() and set(df.seeds) == {"0,1"}
    for arm in ("distilled", "none", "random"):
        decs = [load_file(str(reuse_run.load(f"reuse[{arm},k=8,seed={s}]").file("sae.safetensors")))["W_dec"]
                for s in (0, 1)]
        expected = brute_force_mean_best_cosine(decs[0].double().numpy(), decs[1].double().numpy())
        got = float(df[df.arm == arm].mean_best_cosine.iloc[0])
        assert got == pytest.approx(expected, abs=1e-9), arm
        assert 0 < got < 1


def test_core_overlap_matches_lineage_of_the_select_artifacts(reuse_run):
    from dmsae.reports.tables import core_overlap

    ids = []
    for cycle in (0, 1):
        lineage = load_file(str(reuse_run.artifact("select", cycle).file("core.safetensors")))["lineage"]
        ids.append({(int(born), int(index)) for born, index in lineage.tolist()})
    a, b = ids
    df = core_overlap(reuse_run.store, reuse_run.plan)
    assert len(df) == 1
    row = df.iloc[0]
    assert row["cycles"] == "0->1"
    assert row["jaccard"] == pytest.approx(len(a & b) / len(a | b))
    assert (row["kept"], row["size_before"], row["size_after"]) == (len(a & b), len(a), len(b))
    assert len(b) == reuse_run.artifact("select", 1).metrics["core_size"]


def test_cli_report_writes_the_report(reuse_config_yaml, tmp_path, capsys):
    from flows.cli import main

    out = tmp_path / "cli-report"
    assert main(["report", str(reuse_config_yaml), "--out", str(out)]) == 0
    assert (out / "summary.md").is_file()
    assert len(pd.read_parquet(out / "metrics.parquet")) == 13
    for name in linked_images((out / "summary.md").read_text()):
        check_png(out / name)
    assert str(out) in capsys.readouterr().out


def test_cli_report_on_an_empty_store_is_a_user_error(reuse_run, tmp_path, capsys):
    import yaml

    from flows.cli import main

    cfg = reuse_run.cfg.model_dump(mode="json")
    cfg["store"] = str(tmp_path / "empty-store")
    path = tmp_path / "empty.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["report", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "nothing of run 'tiny'" in capsys.readouterr().err


def test_core_overlap_on_hand_made_cores(tmp_path):
    """Three select artifacts with chosen lineage ids: Jaccard 2/5 then 1/4 (the tiny run's cores happen
    to coincide, Jaccard 1, which would not tell Jaccard from other overlap measures)."""
    from safetensors.torch import save_file

    from dmsae.reports.tables import core_overlap
    from dmsae.store import Store
    from flows.pipeline import Plan, stage_node

    cores = [[(0, 1), (0, 2), (0, 3)], [(0, 2), (1, 9), (0, 1), (1, 5)], [(1, 5)]]
    store = Store(tmp_path / "store")
    nodes = []
    for cycle, ids in enumerate(cores):
        node = stage_node("select", {"cycle": cycle, "tau": 0.9}, {}, cycle)
        with store.writer("select", node.key) as tmp:
            save_file({"lineage": torch.tensor(ids, dtype=torch.long)}, str(tmp / "core.safetensors"))
            store.finalize(tmp, key=node.key, stage="select", version=node.version, params=node.params, inputs={})
        nodes.append(node)
    df = core_overlap(store, Plan(nodes))
    assert df["cycles"].tolist() == ["0->1", "1->2"]
    assert df["jaccard"].tolist() == pytest.approx([2 / 5, 1 / 4])
    assert df["kept"].tolist() == [2, 1]
    assert df["size_before"].tolist() == [3, 4]
    assert df["size_after"].tolist() == [4, 1]

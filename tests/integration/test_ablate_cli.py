"""`dmsae ablate` as a command: bad input is one line and exit code 2 with nothing written, the old spelling
`python -m flows.ablation` forwards to it, and `--noise-floor-seed` trains the no-core arm with another seed and
writes its table into the ablation report (the tiny model, through the real Prefect flows)."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

from dmsae.store import Store
from flows.ablate import point_config
from flows.cli import main
from flows.pipeline import plan


def store_entries(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize(("args", "expect"), [
    (["--gates", "relu,sigmoid"], "sae.core_gate"),
    (["--seeds", "0,x"], "--seeds 0,x: expected comma-separated integers"),
    (["--points", "topk"], "--points: 'topk' is not GATE:CAP"),
    (["--gates", ",", "--caps", "none"], "at least one value"),
    (["--set", "sae.k=many"], "sae.k:"),
    (["--noise-floor-k", "4"], "--noise-floor-k needs --noise-floor-seed"),
    (["--noise-floor-seed", "0"], "that is the reference seed"),
    (["--noise-floor-seed", "one"], "--noise-floor-seed one: expected comma-separated integers"),
    (["--noise-floor-seed", "1,2"], "give one seed"),
    (["--noise-floor-seed", "5", "--noise-floor-k", "5"], "give values among reuse.k (4, 8)"),
])
def test_bad_input_is_one_line_and_exit_2(reuse_config_yaml, reuse_run, capsys, args, expect):
    before = store_entries(reuse_run.store.root)
    assert main(["ablate", str(reuse_config_yaml), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dmsae: error: ") and expect in err[0], err
    assert store_entries(reuse_run.store.root) == before


def test_missing_config_is_one_line(tmp_path, capsys):
    assert main(["ablate", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config file not found" in err[0]


def test_old_spelling_forwards_to_dmsae_ablate(reuse_config_yaml):
    proc = subprocess.run([sys.executable, "-m", "flows.ablation", str(reuse_config_yaml), "--gates", "relu,sigmoid"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    note, error = proc.stderr.strip().splitlines()
    assert "dmsae ablate" in note and error.startswith("dmsae: error: ") and "core_gate" in error
    usage = subprocess.run([sys.executable, "-m", "flows.ablation", "--help"], capture_output=True, text=True,
                           timeout=300)
    assert usage.returncode == 0 and "usage: dmsae ablate" in usage.stdout and "--noise-floor-seed" in usage.stdout


def test_noise_floor_is_computed_and_reported(reuse_config_yaml, tmp_path, single_thread, capsys):
    out = tmp_path / "ablation"
    args = ["ablate", str(reuse_config_yaml), "--points", "topk:2", "--seeds", "0", "--noise-floor-seed", "2",
            "--noise-floor-k", "4", "--out", str(out)]
    with single_thread():
        assert main(args) == 0
    printed = capsys.readouterr().out
    assert "mean |d|:" in printed and f"ablation report: {out / 'ablation.md'}" in printed
    # the other seed's no-core arm exists at k = 4 only, and nothing of its cored arms or cycles >= 1
    noise_cfg = point_config(str(reuse_config_yaml), [], "topk", "2", 2)
    store = Store(noise_cfg.store)
    done = {n.label for n in plan(noise_cfg).nodes if store.has(n.stage, n.key)}
    assert {"reuse[none,k=4,seed=2]", "evaluate[none,k=4,seed=2]"} <= done
    assert "reuse[none,k=8,seed=2]" not in done and "train[1]" not in done
    report = (out / "ablation.md").read_text()
    assert "Reproduce: `dmsae ablate " in report and "--noise-floor-seed 2 --noise-floor-k 4" in report
    assert "## Noise floor: the no-core arm with another seed" in report
    table = pd.read_csv(out / "noise_floor.csv")
    assert table.k.tolist() == [4] and table.seed.tolist() == [2]
    assert {"d_ce_loss_score", "d_explained_variance"} <= set(table.columns)
    # a report-only re-run reads the same table from the store and computes nothing
    before = store_entries(store.root)
    assert main([*args, "--report-only"]) == 0
    assert store_entries(store.root) == before
    assert pd.read_csv(out / "noise_floor.csv").equals(table)

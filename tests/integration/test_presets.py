"""The presets under configs/: each one loads and plans, and the controls preset is the quickstart with the
controlled ablation's settings, key for key, so a store made with either command is reused whole by the other
(docs/results/controls.md and convergence.md give both forms)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dmsae.config import Config, load_config
from dmsae.reports.convergence import study_nodes
from flows.ablate import point_config
from flows.convergence import point_config as convergence_point
from flows.pipeline import plan

REPO = Path(__file__).resolve().parents[2]
PRESETS = sorted((REPO / "configs").glob("*.yaml"))
# the settings docs/results/controls.md gave on the command line before the preset existed
CONTROLS_AS_SETS = ["data.train_tokens=1000000", "data.eval_tokens=8192", "train.epochs=4", "reuse.k=[16,32]",
                    "reuse.control_k=[16,32]", "reuse.consistency_seeds=[0,0]", "interpret.enabled=false"]


def stage_keys(cfg: Config) -> list[tuple[str, str]]:
    return sorted((n.stage, n.key) for n in plan(cfg).nodes)


@pytest.mark.parametrize("preset", PRESETS, ids=[p.name for p in PRESETS])
def test_every_preset_loads_and_plans(preset):
    cfg = load_config(preset, [])
    assert cfg.name == preset.stem
    assert plan(cfg).nodes


@pytest.mark.parametrize("seed", [0, 3])
def test_controls_preset_has_the_quickstart_keys_with_the_study_settings(seed):
    as_sets = point_config(str(REPO / "configs/quickstart.yaml"), CONTROLS_AS_SETS, "topk", "0.6", seed)
    preset = point_config(str(REPO / "configs/controls.yaml"), [], "topk", "0.6", seed)
    assert preset.name != as_sets.name  # the run names differ, the stages do not
    assert stage_keys(preset) == stage_keys(as_sets)
    assert len(stage_keys(preset)) == 38  # 3 cycles, 5 arms at k 16 and 32: the budget the study counted
    # a changed setting must change the keys, or the comparison above could not fail
    other = point_config(str(REPO / "configs/controls.yaml"), ["train.epochs=3"], "topk", "0.6", seed)
    assert stage_keys(other) != stage_keys(preset)


def test_convergence_points_of_the_controls_preset_are_the_quickstart_ones():
    quickstart = load_config(REPO / "configs/quickstart.yaml", CONTROLS_AS_SETS[:2])
    controls = load_config(REPO / "configs/controls.yaml", [])
    for epochs in (1, 64):
        a = study_nodes(plan(convergence_point(quickstart, epochs, 1)))
        b = study_nodes(plan(convergence_point(controls, epochs, 1)))
        assert [n.key for n in a] == [n.key for n in b]

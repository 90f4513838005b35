"""bench/step_phases.py: the parts it times must be the step's and the loop's, add up within the step they belong to,
and be put back as they were afterwards (a benchmark that left timers in place would slow every later run)."""

from __future__ import annotations

import pytest
import torch

from bench import step_phases
from dmsae import native, sparse_step, training
from dmsae.config import SAEConfig
from dmsae.sae import MatryoshkaSAE


def small_run(precision: str, steps: int = 9) -> dict[str, float]:
    sae = training.build_sae(SAEConfig(width=256, k=8, group_fractions=[0.25, 0.25]).model_dump(), 32, None, 0)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(128, 32, generator=g) for _ in range(steps)]
    return step_phases.phase_times(sae, batches, precision)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_parts_are_timed_within_their_step(precision):
    times = small_run(precision)
    for part in ("step", "loop", "joint_topk", "sort_entries", "adam", "clip_grad_norm_", "project_decoder_grads",
                 "normalize_decoder", "update_stats_sparse"):
        assert times.get(part, 0) > 0, part
    inside = sum(v for k, v in times.items() if k in ("joint_topk", "sort_entries", "aux_entries"))
    assert inside < times["step"] < times["loop"]
    text = step_phases.table(times, precision, 1)
    assert f"part of the {precision} step" in text and "| joint_topk |" in text


def test_timers_are_removed_afterwards():
    before = (sparse_step.joint_topk, native.group_bag_sums, torch.optim.Adam.step, MatryoshkaSAE.normalize_decoder,
              torch.nn.utils.clip_grad_norm_, training.update_stats_sparse)
    small_run("fp32", steps=6)
    after = (sparse_step.joint_topk, native.group_bag_sums, torch.optim.Adam.step, MatryoshkaSAE.normalize_decoder,
             torch.nn.utils.clip_grad_norm_, training.update_stats_sparse)
    assert after == before


def test_too_few_steps_are_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        step_phases.main(["--steps", "5"], batches=lambda n: [])
    assert exit_info.value.code == 2
    assert "--steps must be more than 5" in capsys.readouterr().err

"""The tiny pipeline end to end with `device: cuda`: every stage (a harvest in two parts, training, attribution,
selection, the random core, reuse arms, baseline and evaluations, probes, interpret, latent cards) on the GPU,
with `precision: auto` (bf16 on a GPU that has it), then once through `dmsae run` (Prefect). CUDA only: each test
skips with "no CUDA device" where torch sees none (the CPU runs of the same stages are the other integration
tests, so nothing here runs twice on the CPU). bench/gpu_check.sh runs these with `pytest -m cuda`."""

from __future__ import annotations

import math

import numpy as np
import pytest
import yaml

from tests.conftest import REUSE_OVERRIDES

pytestmark = pytest.mark.cuda

CUDA = ["device=cuda", "precision.sae=auto", "precision.lm=auto", "harvest.parts=2", *REUSE_OVERRIDES,
        "interpret.enabled=true", "interpret.cards_noncore=5", "interpret.probe_examples=40"]


@pytest.fixture(scope="module")
def cuda_run(cuda_device, make_config, pipeline_runner, tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda")
    return pipeline_runner(make_config(root / "store", f"report_dir={root / 'reports'}", *CUDA))


def test_every_stage_runs_on_cuda(cuda_run):
    assert all(cuda_run.computed.values())  # a fresh store: every node computed, none failed
    stages = {n.stage for n in cuda_run.plan.nodes}
    assert {"harvest_part", "harvest", "train", "attribute", "select", "random_core", "reuse", "baseline",
            "evaluate", "probes", "interpret", "latents"} <= stages
    import torch

    if torch.cuda.is_bf16_supported():  # auto resolves per device: bf16 on a GPU with it, in the keys
        assert cuda_run.plan.find("train", 0).params["train"]["precision"] == "bf16"
    assert cuda_run.plan.find("harvest").params["autocast"] == "bfloat16"  # CUDA's LM runs under autocast


def test_cuda_results_match_the_cpu_run(cuda_run, pipeline_run):
    """Same data, same seeds; the GPU runs the LM (and here the SAE step) in bfloat16, so close, not equal."""
    from dmsae import readers

    a = readers.harvest_array(cuda_run.artifact("harvest"))[:]
    b = readers.harvest_array(pipeline_run.artifact("harvest"))[:]
    assert a.shape == b.shape
    rel = np.linalg.norm(a - b) / np.linalg.norm(b)
    assert rel < 0.02, rel  # bfloat16's 8 bits compounded over two layers, as tests/integration/test_precision_run
    for cycle in (0, 1):
        got, want = cuda_run.artifact("train", cycle).metrics, pipeline_run.artifact("train", cycle).metrics
        assert abs(got["train_fvu"] - want["train_fvu"]) < 0.05, (cycle, got["train_fvu"], want["train_fvu"])
        attr = cuda_run.artifact("attribute", cycle).metrics
        assert math.isfinite(attr["score_total"]) and attr["score_total"] > 0
        assert abs(attr["fvu"] - pipeline_run.artifact("attribute", cycle).metrics["fvu"]) < 0.05


def test_cuda_evaluations_are_finite_and_in_range(cuda_run):
    for node in cuda_run.plan.of_stage("evaluate"):
        m = cuda_run.store.load(node.stage, node.key).metrics
        assert 0 < m["explained_variance"] <= 1 and 0 < m["l0"], node.label
        assert math.isfinite(m["ce_loss_score"]) and math.isfinite(m["kl_score"]), node.label
    probes = cuda_run.artifact("probes").metrics
    assert 0 <= probes["dense_probe_mean"] <= 1
    assert cuda_run.artifact("latents").metrics["n_latents"] > 0


def test_dmsae_run_on_cuda(cuda_device, make_config, tmp_path, capsys):
    """The CLI (Prefect, its local task runner) with device=cuda: every stage computed, exit 0."""
    from flows.cli import main

    cfg = make_config(tmp_path / "store", f"report_dir={tmp_path / 'reports'}", "device=cuda", "cycles=1")
    path = tmp_path / "tiny-cuda.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    capsys.readouterr()
    assert main(["run", str(path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "precision:" in out and "computed" in out

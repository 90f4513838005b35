"""`precision.sae: bf16` through the pipeline: the train and reuse keys change (the numbers do), nothing else's
does, and the SAEs reach the float32 quality. Skips where the CPU has no native bfloat16 (then bf16 is refused:
tests/unit/test_precision.py)."""

from __future__ import annotations

import pytest

from dmsae.precision import native_bf16
from stages import train as train_stage

pytestmark = pytest.mark.skipif(not native_bf16("cpu")[0],
                                reason="this CPU has no native bfloat16 (neither AMX nor AVX512-BF16)")


@pytest.fixture(scope="module")
def bf16_run(make_config, pipeline_runner, tmp_path_factory):
    return pipeline_runner(make_config(tmp_path_factory.mktemp("bf16"), "precision.sae=bf16"))


def test_only_the_sae_stages_and_what_follows_them_change_keys(bf16_run, pipeline_run):
    ref = {n.label: n for n in pipeline_run.plan.nodes}
    for node in bf16_run.plan.nodes:
        same = node.key == ref[node.label].key
        assert same == (node.stage in ("model", "tokens", "harvest", "harvest_part", "baseline", "probes")), node.label
    train = bf16_run.plan.find("train", 0)
    assert train.params["train"]["precision"] == "bf16"
    assert train.params["train"]["bf16_step"] == train_stage.BF16_STEP  # a new bf16 step gets new bf16 keys
    assert "precision" not in pipeline_run.plan.find("train", 0).params["train"]  # fp32 keeps its old key


def test_bf16_training_reaches_the_fp32_quality(bf16_run, pipeline_run):
    for cycle in (0, 1):
        a = bf16_run.artifact("train", cycle).metrics
        b = pipeline_run.artifact("train", cycle).metrics
        assert abs(a["train_fvu"] - b["train_fvu"]) < 0.02, (cycle, a["train_fvu"], b["train_fvu"])


def test_the_language_model_in_bf16_changes_its_stages_keys_and_stays_close(make_config, pipeline_runner,
                                                                             pipeline_run, tmp_path):
    import numpy as np

    from dmsae import activations

    cfg = make_config(tmp_path / "store", "precision.lm=bf16", "cycles=1", "reuse.k=[]", "interpret.enabled=false")
    run = pipeline_runner(cfg)
    harvest = run.plan.find("harvest")
    assert harvest.params["autocast"] == "bfloat16" and "autocast" not in pipeline_run.plan.find("harvest").params
    assert run.plan.find("tokens").key == pipeline_run.plan.find("tokens").key  # no LM forward there
    a = activations.open_array(run.artifact("harvest").file(activations.ARRAY))[:]
    b = activations.open_array(pipeline_run.artifact("harvest").file(activations.ARRAY))[:]
    assert a.shape == b.shape and not np.array_equal(a, b)  # the forward really ran in bfloat16 ...
    rel = np.linalg.norm(a - b) / np.linalg.norm(b)
    assert rel < 0.02, rel  # ... to about bfloat16's precision (8 bits: 0.4%) compounded over two layers
    attr = run.artifact("attribute", 0).metrics
    assert np.isfinite(attr["score_total"]) and attr["score_total"] > 0

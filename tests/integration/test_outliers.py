"""Massive-activation outliers: the harvest stores only tokens under factor x median norm, and the
attribution and evaluation splices leave the model's own activation at exactly those positions.

The reference positions come from a plain `output_hidden_states` forward, not from dmsae.lm."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import load_file

from dmsae import activations, harvesting, readers
from dmsae.eval.reconstruction import lm_divergences
from dmsae.runtime import Runtime
from stages import attribute as attribute_stage
from stages import harvest as harvest_stage

LAYER = 1
FACTOR = 1.15  # the tiny random model has no real outliers: a low factor makes some


def hidden_after(model, ids, layer):
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1]


@pytest.fixture(scope="module")
def model(pipeline_run):
    from transformers import LlamaForCausalLM

    m = LlamaForCausalLM.from_pretrained(str(pipeline_run.artifact("model").path)).eval()
    m.requires_grad_(False)
    return m


@pytest.fixture(scope="module")
def filtered_harvest(pipeline_run, tmp_path_factory):
    """The harvest stage run directly with FACTOR, on the shared run's model and tokens."""
    out = tmp_path_factory.mktemp("harvest-outliers")
    inputs = {"model": pipeline_run.artifact("model"), "tokens": pipeline_run.artifact("tokens")}
    params = {"layer": LAYER, "chunk_rows": 256, "store_dtype": "float32", "dtype": "float32",
              "outlier_factor": FACTOR}
    metrics = harvest_stage.run(out, params, inputs, Runtime(show_progress=False, args={"batch_size": 16}))
    return out, metrics


def test_harvest_keeps_exactly_the_rows_under_the_threshold(pipeline_run, model, filtered_harvest, bos_id):
    out, metrics = filtered_harvest
    windows = load_file(str(pipeline_run.artifact("tokens").file("tokens.safetensors")))["train"].long()
    h = hidden_after(model, windows, LAYER)
    real = windows != bos_id
    norms = h.norm(dim=-1)
    expected_threshold = FACTOR * float(norms[:16][real[:16]].median())  # first harvest batch of 16 windows
    assert metrics["norm_threshold"] == pytest.approx(expected_threshold, rel=1e-5)
    keep = real & (norms <= expected_threshold)
    n_out = int(real.sum() - keep.sum())
    assert 0 < n_out < int(real.sum()) // 2, "the factor should exclude some tokens but not most"
    assert metrics["n_outliers"] == n_out
    assert metrics["n_tokens"] == int(keep.sum())

    stored = zarr.open_array(str(out / activations.ARRAY), mode="r")
    assert stored.shape == (int(keep.sum()), h.shape[-1])  # shrunk to the rows kept
    np.testing.assert_allclose(stored[:], h[keep].numpy(), rtol=1e-4, atol=1e-4)
    assert float(np.linalg.norm(stored[:], axis=1).max()) <= expected_threshold * (1 + 1e-5)


def test_no_factor_keeps_every_real_token(pipeline_run):
    harvest = pipeline_run.artifact("harvest")  # the shared run uses the default factor 10
    windows = load_file(str(pipeline_run.artifact("tokens").file("tokens.safetensors")))["train"]
    assert harvest.metrics["n_outliers"] == 0  # a random tiny Llama has no 10x outliers
    assert harvest.metrics["n_tokens"] == int((windows != pipeline_run.artifact("tokens").metrics["bos_id"]).sum())
    assert harvesting.norm_threshold(torch.ones(4), None) == math.inf


def test_evaluation_splice_leaves_outliers_untouched(pipeline_run, model, bos_id):
    ids = load_file(str(pipeline_run.artifact("tokens").file("tokens.safetensors")))["eval"][:4].long()
    h = hidden_after(model, ids, LAYER)
    norms = h.norm(dim=-1)
    threshold = FACTOR * float(norms[ids != bos_id].median())
    expected = (ids != bos_id) & (norms <= threshold)
    assert 0 < int((~expected & (ids != bos_id)).sum()), "want an outlier among the eval tokens"

    captured: list[torch.Tensor] = []

    def zero_and_record(x):
        captured.append(x)
        return torch.zeros_like(x)

    lm_divergences(model, LAYER, ids, bos_id, zero_and_record, threshold)
    # the replaced rows are exactly the clean residuals at the expected positions
    assert captured[0].shape[0] == int(expected.sum())
    torch.testing.assert_close(captured[0], h[expected].float(), rtol=1e-4, atol=1e-4)

    # no position passes a zero threshold: the patched model is the clean model
    r = lm_divergences(model, LAYER, ids, bos_id, torch.zeros_like, 0.0)
    assert r["ce_patched"] == pytest.approx(r["ce_clean"], rel=1e-6)
    assert r["kl"] == pytest.approx(0.0, abs=1e-6)


def test_attribution_splices_only_kept_positions(pipeline_run, model, bos_id):
    sae, scale = readers.load_sae(pipeline_run.artifact("train", 0))
    ids = load_file(str(pipeline_run.artifact("tokens").file("tokens.safetensors")))["attribution"][:4].long()
    h = hidden_after(model, ids, LAYER)
    norms = h.norm(dim=-1)
    threshold = FACTOR * float(norms[ids != bos_id].median())
    expected = (ids != bos_id) & (norms <= threshold)
    n_kept = int(expected.sum())
    with torch.enable_grad():
        full = attribute_stage.attribution_batch(model, sae, LAYER, scale, ids, bos_id)
        kept = attribute_stage.attribution_batch(model, sae, LAYER, scale, ids, bos_id, threshold)
    assert full["abs_attr"].shape[0] == int((ids != bos_id).sum())
    assert kept["abs_attr"].shape[0] == n_kept < full["abs_attr"].shape[0]
    torch.testing.assert_close(kept["x"], h[expected].float() * scale, rtol=1e-4, atol=1e-4)

"""Core gates and the core cap through the real pipeline on the tiny model (no Prefect): the cap bounds
the core, the birth bias and threshold travel from the SAE a latent was born in to the next cycle's core,
and configs that differ only in how a core is gated share every stage that has no core."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from dmsae import readers

CAP = 3


@pytest.fixture(scope="module")
def gated_runs(pipeline_run, make_config, tmp_path_factory, single_thread):
    """relu_bias with a cap and topk with a cap, from a copy of `pipeline_run`'s store (its cycle 0 is shared)."""
    store = tmp_path_factory.mktemp("store-gates")
    shutil.copytree(pipeline_run.cfg.store, store, dirs_exist_ok=True)
    from tests.conftest import run_pipeline

    with single_thread():
        return {gate: run_pipeline(make_config(store, f"sae.core_gate={gate}", f"selection.max_core={CAP}"))
                for gate in ("relu_bias", "topk")}


def test_cap_bounds_the_core_and_says_what_it_cost(pipeline_run, gated_runs):
    uncapped = pipeline_run.artifact("select", 0).metrics
    assert uncapped["core_size"] > CAP  # the tiny run's core exceeds the cap, so the cap is exercised
    for run in gated_runs.values():
        for cycle in range(run.cfg.cycles):
            m = run.artifact("select", cycle).metrics
            assert m["core_size"] <= CAP and m["max_core"] == CAP
            assert m["cap_bit"] == (m["n_reach_tau"] > CAP)
            core = load_file(str(run.artifact("select", cycle).file(readers.CORE_FILE)))
            cum = core["cumulative"]
            assert m["explained_fraction"] == pytest.approx(float(cum[m["core_size"] - 1] / cum[-1]))
            assert m["explained_fraction"] < run.cfg.selection.tau or not m["cap_bit"]
        # cycle 0 has no core: its train, attribute and the uncapped ranking are the plain run's
        assert run.plan.find("train", 0).key == pipeline_run.plan.find("train", 0).key
        assert not run.computed["train[0]"] and not run.computed["attribute[0]"]
    # another cap, another select[0]; the second gate with the same cap shares it, and computes cycle 1
    assert gated_runs["relu_bias"].computed["select[0]"] and not gated_runs["topk"].computed["select[0]"]
    assert gated_runs["topk"].computed["train[1]"]


def test_fraction_cap_resolves_against_k(make_config, tmp_path):
    from flows.pipeline import plan

    cfg = make_config(tmp_path, "selection.max_core=0.5", "sae.k=6")
    assert plan(cfg).find("select", 0).params["max_core"] == 3


def test_birth_bias_and_threshold_travel_with_the_core(gated_runs):
    run = gated_runs["relu_bias"]
    c0 = load_file(str(run.artifact("train", 0).file(readers.SAE_FILE)))
    sel0 = load_file(str(run.artifact("select", 0).file(readers.CORE_FILE)))
    idx = sel0["indices"]
    assert torch.equal(sel0["bias"], c0["b_enc"][idx]) and torch.equal(sel0["threshold"], c0["threshold"][idx])
    assert float(sel0["threshold"].max()) < 1e38  # selected latents fired, so they have a threshold
    # cycle 1 freezes that bias (relu_bias default) and gates its core at those thresholds
    c1 = load_file(str(run.artifact("train", 1).file(readers.SAE_FILE)))
    c = idx.numel()
    assert torch.equal(c1["b_enc"][:c], sel0["bias"]) and torch.equal(c1["threshold"][:c], sel0["threshold"])
    lin1 = load_file(str(run.artifact("train", 1).file(readers.LINEAGE_FILE)))
    assert torch.equal(lin1["birth_bias"][:c], sel0["bias"])
    # a latent kept again in cycle 1 keeps its cycle-0 birth values, not anything learned in cycle 1
    sel1 = load_file(str(run.artifact("select", 1).file(readers.CORE_FILE)))
    for j, i in enumerate(sel1["indices"].tolist()):
        if i < c:
            assert float(sel1["bias"][j]) == float(sel0["bias"][i])


def test_topk_cycle_spends_exactly_k(gated_runs):
    run = gated_runs["topk"]
    m = run.artifact("train", 1).metrics
    assert m["core_size"] > 0 and m["core_gate"] == "topk"
    assert m["train_l0"] == pytest.approx(run.cfg.sae.k, abs=1e-6)  # core + non-core = k on every logged step

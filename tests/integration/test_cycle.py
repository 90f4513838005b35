"""Two distillation cycles through flows.pipeline (no Prefect) on the tiny model: the cycle transfer,
lineage, document-disjoint token splits, harvested activations, and determinism across store roots."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

WIDTH = 128
BOS_ID = 1  # the tiny tokenizer's <s>
D_MODEL = 64
CONTEXT = 32


def tensors(run, stage: str, cycle: int | None, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(run.artifact(stage, cycle).file(name)))


def test_every_stage_was_computed_once(pipeline_run):
    assert all(pipeline_run.computed.values())
    assert len(pipeline_run.computed) == 9


def test_rerun_into_the_same_store_computes_nothing(pipeline_run, pipeline_runner):
    again = pipeline_runner(pipeline_run.cfg)
    assert not any(again.computed.values())


# -- cycle transfer ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cycle_tensors(pipeline_run):
    r = pipeline_run
    return {
        "tr0": tensors(r, "train", 0, "sae.safetensors"),
        "tr1": tensors(r, "train", 1, "sae.safetensors"),
        "lin0": tensors(r, "train", 0, "lineage.safetensors")["lineage"],
        "lin1": tensors(r, "train", 1, "lineage.safetensors")["lineage"],
        "sel0": tensors(r, "select", 0, "core.safetensors"),
        "sel1": tensors(r, "select", 1, "core.safetensors"),
        "att0": tensors(r, "attribute", 0, "scores.safetensors"),
        "att1": tensors(r, "attribute", 1, "scores.safetensors"),
    }


def reference_selection(scores: np.ndarray, tau: float) -> list[int]:
    order = sorted(range(scores.size), key=lambda i: (-scores[i], i))
    total, running = float(np.sum(scores)), 0.0
    for n, i in enumerate(order, 1):
        running += scores[i]
        if running >= tau * total * (1 - 1e-12):
            return order[:n]
    return order


def test_selection_follows_the_scores(cycle_tensors, pipeline_run):
    tau = pipeline_run.cfg.selection.tau
    cap = pipeline_run.cfg.selection.core_cap(pipeline_run.cfg.sae.k)  # the default caps the core at 0.6 k
    for cycle in (0, 1):
        scores = cycle_tensors[f"att{cycle}"]["scores"].double().numpy()
        sel = cycle_tensors[f"sel{cycle}"]
        assert (scores > 0).any()
        assert sel["indices"].tolist() == reference_selection(scores, tau)[:cap]


def test_candidates_are_core_plus_first_group(cycle_tensors):
    c = cycle_tensors["sel0"]["indices"].numel()
    first_group = round(0.125 * WIDTH)
    assert cycle_tensors["att0"]["scores"].numel() == first_group
    assert cycle_tensors["att1"]["scores"].numel() == c + max(1, round(0.125 * (WIDTH - c)))


def test_core_encoder_is_transferred_bit_identically(cycle_tensors):
    sel0, tr0, tr1 = cycle_tensors["sel0"], cycle_tensors["tr0"], cycle_tensors["tr1"]
    idx = sel0["indices"]
    c = idx.numel()
    assert 0 < c < WIDTH
    assert torch.equal(sel0["encoder"], tr0["W_enc"][:, idx])  # select copies cycle 0's columns
    assert torch.equal(tr1["W_enc"][:, :c], sel0["encoder"])  # and train[1] keeps them untouched


def test_core_decoder_rows_are_reinitialised(cycle_tensors):
    idx = cycle_tensors["sel0"]["indices"]
    c = idx.numel()
    old = cycle_tensors["tr0"]["W_dec"][idx].double()
    new = cycle_tensors["tr1"]["W_dec"][:c].double()
    cos = (old * new).sum(1) / (old.norm(dim=1) * new.norm(dim=1))
    assert (cos < 0.99).all(), cos


def test_lineage_of_the_core_travels_with_it(cycle_tensors):
    sel0, sel1 = cycle_tensors["sel0"], cycle_tensors["sel1"]
    lin0, lin1 = cycle_tensors["lin0"], cycle_tensors["lin1"]
    idx0 = sel0["indices"]
    c = idx0.numel()
    # cycle 0: every latent is born in cycle 0 at its own index
    assert torch.equal(lin0, torch.stack([torch.zeros(WIDTH, dtype=torch.long), torch.arange(WIDTH)], dim=1))
    assert torch.equal(sel0["lineage"], torch.stack([torch.zeros(c, dtype=torch.long), idx0], dim=1))
    # cycle 1: the core keeps select[0]'s ids, the rest are born in cycle 1
    assert torch.equal(lin1[:c], sel0["lineage"])
    assert torch.equal(lin1[c:, 0], torch.ones(WIDTH - c, dtype=torch.long))
    assert torch.equal(lin1[c:, 1], torch.arange(c, WIDTH))
    # select[1] carries the ids of what it kept
    assert torch.equal(sel1["lineage"], lin1[sel1["indices"]])
    for (born, at_birth), i in zip(sel1["lineage"].tolist(), sel1["indices"].tolist(), strict=True):
        if i < c:
            assert (born, at_birth) == (0, int(idx0[i]))
        else:
            assert (born, at_birth) == (1, i)


def test_train_metadata_records_the_core(pipeline_run, cycle_tensors):
    c = cycle_tensors["sel0"]["indices"].numel()
    assert pipeline_run.artifact("train", 0).metrics["core_size"] == 0
    assert pipeline_run.artifact("train", 1).metrics["core_size"] == c
    assert pipeline_run.artifact("select", 0).metrics["core_size"] == c


# -- token splits ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def token_splits(pipeline_run):
    return tensors(pipeline_run, "tokens", None, "tokens.safetensors")


def test_tiny_constants(bos_id, d_model, pipeline_run):
    assert (bos_id, d_model) == (BOS_ID, D_MODEL)
    assert pipeline_run.artifact("tokens").metrics["bos_id"] == BOS_ID


def test_token_splits_are_document_disjoint(token_splits):
    docs = {s: token_splits[f"{s}_docs"].tolist() for s in ("train", "attribution", "eval")}
    for s, ids in docs.items():
        assert len(ids) == len(set(ids)) > 0, s
    assert not set(docs["train"]) & set(docs["attribution"])
    assert not set(docs["train"]) & set(docs["eval"])
    assert not set(docs["attribution"]) & set(docs["eval"])


@pytest.mark.parametrize("split,tokens", [("train", 4096), ("attribution", 256), ("eval", 256)])
def test_windows_hold_exactly_their_documents(token_splits, documents, vocab, split, tokens):
    """Each split's windows are BOS + the split's documents joined by BOS, tokenized independently."""
    windows = token_splits[split]
    assert windows.shape == (math.ceil(tokens / CONTEXT), CONTEXT)
    assert (windows[:, 0] == BOS_ID).all()
    stream = windows[:, 1:].reshape(-1).tolist()
    expected: list[int] = []
    doc_ids = token_splits[f"{split}_docs"].tolist()
    for n, doc in enumerate(doc_ids):
        if n:
            expected.append(BOS_ID)
        expected.extend(vocab[w] for w in documents[doc].split())
        if n == len(doc_ids) - 2:
            assert len(expected) < len(stream)  # no listed document is left unused
    assert len(expected) >= len(stream)
    assert stream == expected[: len(stream)]


# -- harvest -----------------------------------------------------------------------------------------


def test_harvest_matches_an_independent_forward_pass(pipeline_run, token_splits, tiny_model_dir):
    from transformers import LlamaForCausalLM

    from dmsae import activations

    art = pipeline_run.artifact("harvest")
    stored = activations.open_array(art.file(activations.ARRAY))[:]
    windows = token_splits["train"].long()
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        hidden = model(input_ids=windows, output_hidden_states=True).hidden_states[1 + 1]  # after layer 1
    expected = hidden[windows != BOS_ID].numpy()
    assert stored.shape == expected.shape == (int((windows != BOS_ID).sum()), D_MODEL)
    np.testing.assert_allclose(stored, expected, rtol=1e-4, atol=1e-5)
    m = art.metrics
    mean_sq = float(np.square(expected.astype(np.float64)).sum(1).mean())
    assert m["n_tokens"] == expected.shape[0]
    assert m["scale"] == pytest.approx(math.sqrt(D_MODEL / mean_sq), rel=1e-5)


# -- determinism -------------------------------------------------------------------------------------


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def second_run(pipeline_runner, make_config, tmp_path_factory):
    """The same config run again into another store root."""
    other = pipeline_runner(make_config(tmp_path_factory.mktemp("store-b")))
    assert all(other.computed.values())
    return other


def test_same_config_in_two_stores_gives_identical_files(pipeline_run, second_run):
    differing = []
    for node_a, node_b in zip(pipeline_run.plan.nodes, second_run.plan.nodes, strict=True):
        assert node_a.key == node_b.key
        ma = pipeline_run.store.manifest(node_a.stage, node_a.key)
        mb = second_run.store.manifest(node_b.stage, node_b.key)
        assert ma.files, node_a.label
        assert set(ma.files) == set(mb.files), node_a.label
        differing += [f"{node_a.label}/{rel}" for rel in ma.files if ma.files[rel] != mb.files[rel]]
        # and the manifests tell the truth about the bytes on disk
        for store, m in ((pipeline_run.store, ma), (second_run.store, mb)):
            root = store.artifact_dir(m.stage, m.key)
            assert {rel: sha256(root / rel) for rel in m.files} == m.files
    assert not differing, f"files whose bytes differ between two identical runs: {differing}"


def test_same_config_in_two_stores_gives_identical_contents(pipeline_run, second_run):
    """Numerically identical results, file by file (tensors, tables, arrays, JSON)."""
    import json

    import pandas as pd

    from dmsae import activations

    for node in pipeline_run.plan.nodes:
        root_a = pipeline_run.store.artifact_dir(node.stage, node.key)
        root_b = second_run.store.artifact_dir(node.stage, node.key)
        files = pipeline_run.store.manifest(node.stage, node.key).files
        for rel in files:
            a, b = root_a / rel, root_b / rel
            if rel.endswith(".safetensors"):
                from safetensors import safe_open

                ta, tb = load_file(str(a)), load_file(str(b))
                assert ta.keys() == tb.keys()
                for name in ta:
                    assert torch.equal(ta[name], tb[name]), f"{node.label}/{rel}:{name}"
                with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
                    assert fa.metadata() == fb.metadata()
            elif rel.endswith(".parquet"):
                pd.testing.assert_frame_equal(pd.read_parquet(a), pd.read_parquet(b))
            elif rel.endswith(".json"):
                assert json.loads(a.read_text()) == json.loads(b.read_text()), f"{node.label}/{rel}"
            elif ".zarr/" not in rel:
                assert a.read_bytes() == b.read_bytes(), f"{node.label}/{rel}"
        if node.stage == "harvest":
            xa = activations.open_array(root_a / activations.ARRAY)[:]
            xb = activations.open_array(root_b / activations.ARRAY)[:]
            np.testing.assert_array_equal(xa, xb)

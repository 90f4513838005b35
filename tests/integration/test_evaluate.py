"""The evaluate and baseline stages (docs/design.md section 2, Evaluation) against independent computations:
next-token CE and KL from a plain forward pass with our own splice hook and loops, explained variance
in numpy, firing fractions and L0 by hand, and one evaluated SAE recomputed from its saved weights."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

LAYER = 1  # harvest.layer of the tiny config
BOS_ID = 1


# -- independent reference computations ---------------------------------------------------------------


def hidden_after(model, ids: torch.Tensor, layer: int) -> torch.Tensor:
    """The residual stream after decoder layer `layer` ([B, T, d]), from output_hidden_states."""
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1]


def logprobs(model, ids: torch.Tensor, layer: int | None = None, new_hidden=None) -> torch.Tensor:
    """float64 log-probabilities [B, T, V]; with `new_hidden` ([B, T, d], a function of the layer's output),
    the output of decoder layer `layer` is replaced at non-BOS positions by a hook of our own."""
    handle = None
    if new_hidden is not None:
        def hook(_mod, _inp, out):
            h = out if isinstance(out, torch.Tensor) else out[0]
            keep = (ids == BOS_ID)[..., None]
            h2 = torch.where(keep, h, new_hidden(h).to(h.dtype))
            return h2 if isinstance(out, torch.Tensor) else (h2, *out[1:])

        handle = model.model.layers[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits
    finally:
        if handle is not None:
            handle.remove()
    return torch.log_softmax(logits.double(), dim=-1)


def scored_positions(ids: torch.Tensor) -> list[tuple[int, int]]:
    """(b, t) whose input token t and target token t+1 are both real tokens (not BOS)."""
    B, T = ids.shape
    return [(b, t) for b in range(B) for t in range(T - 1) if ids[b, t] != BOS_ID and ids[b, t + 1] != BOS_ID]


def summed_ce(logp: torch.Tensor, ids: torch.Tensor) -> float:
    return sum(-float(logp[b, t, ids[b, t + 1]]) for b, t in scored_positions(ids))


def summed_kl(logp_p: torch.Tensor, logp_q: torch.Tensor, ids: torch.Tensor) -> float:
    """sum over scored positions of KL(p || q) = sum_v p_v (log p_v - log q_v)."""
    total = 0.0
    for b, t in scored_positions(ids):
        p = logp_p[b, t].exp()
        total += float((p * (logp_p[b, t] - logp_q[b, t])).sum())
    return total


def np_explained_variance(x: np.ndarray, x_hat: np.ndarray, centre: bool = True) -> float:
    x, x_hat = x.astype(np.float64), x_hat.astype(np.float64)
    ref = x - x.mean(axis=0) if centre else x
    return 1.0 - float(np.sum((x - x_hat) ** 2) / np.sum(ref ** 2))


# -- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread(single_thread):
    with single_thread():  # forward passes: far faster than two threads on a busy 2-core machine
        yield


@pytest.fixture(scope="module")
def model(pipeline_run):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(pipeline_run.artifact("model").path)).eval()


@pytest.fixture(scope="module")
def eval_ids(pipeline_run) -> torch.Tensor:
    windows = load_file(str(pipeline_run.artifact("tokens").file("tokens.safetensors")))["eval"].long()
    assert windows.shape == (8, 32) and (windows[:, 0] == BOS_ID).all()
    assert (windows[:, 1:] == BOS_ID).any()  # document boundaries inside windows: the mask matters
    return windows


# -- lm_divergences and the scores ---------------------------------------------------------------------


def test_lm_divergences_clean_ce_matches_a_plain_forward(model, eval_ids):
    from dmsae.eval.reconstruction import lm_divergences

    out = lm_divergences(model, LAYER, eval_ids, BOS_ID, None)
    logp = logprobs(model, eval_ids)
    positions = scored_positions(eval_ids)
    assert out["count"] == len(positions)
    assert len(positions) < eval_ids.shape[0] * (eval_ids.shape[1] - 1)  # some positions are masked
    assert out["ce_clean"] == pytest.approx(summed_ce(logp, eval_ids), rel=1e-5)
    assert out["ce_patched"] == pytest.approx(out["ce_clean"], rel=1e-12)
    assert out["kl"] == pytest.approx(0.0, abs=1e-9)


def test_lm_divergences_zero_splice_matches_our_own_hook(model, eval_ids):
    from dmsae.eval.reconstruction import lm_divergences

    out = lm_divergences(model, LAYER, eval_ids, BOS_ID, torch.zeros_like)
    clean = logprobs(model, eval_ids)
    zeroed = logprobs(model, eval_ids, LAYER, torch.zeros_like)
    assert out["ce_clean"] == pytest.approx(summed_ce(clean, eval_ids), rel=1e-5)
    assert out["ce_patched"] == pytest.approx(summed_ce(zeroed, eval_ids), rel=1e-5)
    assert out["kl"] == pytest.approx(summed_kl(clean, zeroed, eval_ids), rel=1e-4)
    # the ablation really changes the (random, near-uniform) model
    assert abs(out["ce_patched"] - out["ce_clean"]) > 1e-3 * out["ce_clean"]
    assert out["kl"] > 1e-4 * out["count"]


def test_scores_are_one_for_identity_and_zero_for_zero_ablation(model, eval_ids):
    from dmsae.eval.reconstruction import ce_loss_score, kl_score, lm_divergences

    zero = lm_divergences(model, LAYER, eval_ids, BOS_ID, torch.zeros_like)
    ident = lm_divergences(model, LAYER, eval_ids, BOS_ID, lambda x: x)
    half = lm_divergences(model, LAYER, eval_ids, BOS_ID, lambda x: 0.5 * x)
    n = zero["count"]
    ce_orig, ce_zero, kl_zero = zero["ce_clean"] / n, zero["ce_patched"] / n, zero["kl"] / n
    assert ident["ce_clean"] / n == pytest.approx(ce_orig, rel=1e-12)
    assert ce_loss_score(ce_orig, ident["ce_patched"] / n, ce_zero) == pytest.approx(1.0, abs=1e-6)
    assert kl_score(ident["kl"] / n, kl_zero) == pytest.approx(1.0, abs=1e-6)
    assert ce_loss_score(ce_orig, ce_zero, ce_zero) == 0.0
    assert kl_score(kl_zero, kl_zero) == 0.0
    # something in between, by the formulas of docs/design.md written out here
    ce_half, kl_half = half["ce_patched"] / n, half["kl"] / n
    assert ce_loss_score(ce_orig, ce_half, ce_zero) == pytest.approx((ce_zero - ce_half) / (ce_zero - ce_orig))
    assert kl_score(kl_half, kl_zero) == pytest.approx(1 - kl_half / kl_zero)
    assert 0 < kl_half < kl_zero


def test_score_formulas_on_numbers():
    from dmsae.eval.reconstruction import ce_loss_score, kl_score

    assert ce_loss_score(ce_orig=2.0, ce_sae=3.0, ce_zero=4.0) == pytest.approx(0.5)
    assert ce_loss_score(ce_orig=2.0, ce_sae=5.0, ce_zero=4.0) == pytest.approx(-0.5)  # worse than ablation
    assert kl_score(kl_sae=0.25, kl_zero=1.0) == pytest.approx(0.75)


# -- reconstruction metrics ----------------------------------------------------------------------------


def test_explained_variance_is_mean_centred():
    from dmsae.eval.reconstruction import explained_variance

    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 16)) * rng.uniform(0.5, 2.0, size=16) + 3.0  # far from zero mean
    x_hat = x + 0.8 * rng.normal(size=x.shape)
    got = explained_variance(torch.from_numpy(x).float(), torch.from_numpy(x_hat).float())
    expected = np_explained_variance(x, x_hat)
    assert got == pytest.approx(expected, abs=1e-6)
    zero_centred = np_explained_variance(x, x_hat, centre=False)
    assert abs(got - zero_centred) > 0.1, (got, zero_centred)
    # the mean as reconstruction explains nothing; a perfect one everything
    mean = np.broadcast_to(x.mean(0), x.shape)
    assert explained_variance(torch.from_numpy(x), torch.from_numpy(mean.copy())) == pytest.approx(0.0, abs=1e-12)
    assert explained_variance(torch.from_numpy(x), torch.from_numpy(x)) == 1.0


def test_firing_fractions_on_hand_made_counts():
    from dmsae.eval.reconstruction import firing_fractions

    # 6 latents on 100 tokens: 2 never fire; 11 and 100 firings exceed 10 % (10 firings is not "more than")
    fires = torch.tensor([0, 0, 5, 10, 11, 100])
    out = firing_fractions(fires, 100, dense_threshold=0.1)
    assert out["dead_fraction"] == pytest.approx(2 / 6)
    assert out["dense_fraction"] == pytest.approx(2 / 6)
    out = firing_fractions(fires, 100, dense_threshold=0.04)
    assert out["dense_fraction"] == pytest.approx(4 / 6)
    out = firing_fractions(torch.zeros(4, dtype=torch.long), 0, dense_threshold=0.1)
    assert out == {"dead_fraction": 1.0, "dense_fraction": 0.0}


@pytest.fixture(scope="module")
def eval_residuals(model, eval_ids) -> np.ndarray:
    """Raw layer-L residuals of the eval split at non-BOS positions [N, d], from our own forward pass."""
    h = hidden_after(model, eval_ids, LAYER)
    return h[eval_ids != BOS_ID].numpy().astype(np.float64)


def write_sae_artifact(tmp_path, tensors: dict[str, torch.Tensor], core_size: int, k: int, scale: float,
                       group_fractions: list[float]):
    """A hand-made SAE in the train stage's on-disk layout, as an Artifact."""
    from dmsae.store import Artifact, Manifest

    d, width = tensors["W_enc"].shape
    meta = {"core_size": core_size, "k": k, "scale": scale, "d": d, "width": width}
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(tmp_path / "sae.safetensors"),
              metadata={"dmsae": json.dumps(meta)})
    manifest = Manifest(key="h" * 20, stage="train", version="2", files={},
                        params={"sae": {"group_fractions": group_fractions, "l0_mode": "dynamic"}}, inputs={})
    return Artifact(tmp_path, manifest)


def test_evaluate_stage_on_a_hand_made_sae(reuse_run, eval_residuals, tmp_path):
    """W_enc = 0 makes every latent's activation a constant: relu(b_enc), kept above its threshold.
    So L0, dead and dense fractions are known by hand; b_dec = mean(x) with W_dec = 0 gives EV = 0."""
    from dmsae import readers
    from dmsae.runtime import Runtime
    from stages import evaluate

    scale = reuse_run.artifact("harvest").metrics["scale"]
    d, width, c = 64, 16, 2
    x_scaled = eval_residuals * scale
    # core: always kept when > 0 | non-core: kept when > threshold
    b_enc = torch.tensor([1.0, -1.0, 2.0, 0.5, 0.5, -1.0, 3.0] + [0.0] * 9)
    threshold = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.1, 0.0, 3.0] + [3.0e38] * 9)
    # active: core 0; non-core 2 (2 > 1) and 4 (0.5 > 0.1); not 3 (0.5 <= 1), 5 (relu -> 0), 6 (3 == 3)
    tensors = {"W_enc": torch.zeros(d, width), "b_enc": b_enc, "W_dec": torch.zeros(width, d),
               "b_dec": torch.from_numpy(x_scaled.mean(0)).float(), "threshold": threshold}
    sae_art = write_sae_artifact(tmp_path, tensors, c, 6, scale, [0.125, 0.25])
    inputs = {"model": reuse_run.artifact("model"), "tokens": reuse_run.artifact("tokens"),
              "harvest": reuse_run.artifact("harvest"), "baseline": reuse_run.load("baseline"), "sae": sae_art}
    out = tmp_path / "out"
    out.mkdir()
    params = {"layer": LAYER, "dtype": "float32", "dense_threshold": 0.1}
    m = evaluate.run(out, params, inputs, Runtime(show_progress=False, args={"batch_size": 3}))
    n = eval_residuals.shape[0]
    assert m["n_tokens"] == n
    assert (m["core_size"], m["k"]) == (c, 6)
    assert m["l0"] == pytest.approx(3.0)
    assert m["l0_noncore"] == pytest.approx(2.0)
    assert m["dead_fraction"] == pytest.approx(13 / 16)
    assert m["dense_fraction"] == pytest.approx(3 / 16)
    fires = load_file(str(out / readers.FREQUENCIES_FILE))["fires"]
    expected_fires = torch.zeros(width, dtype=torch.long)
    expected_fires[[0, 2, 4]] = n
    assert torch.equal(fires, expected_fires)
    # x_hat = mean of the scaled eval activations: explained variance 0, MSE = the per-entry variance
    assert m["explained_variance"] == pytest.approx(0.0, abs=1e-5)
    assert m["mse"] == pytest.approx(float(x_scaled.var(axis=0).mean()), rel=1e-4)
    assert np_explained_variance(x_scaled, np.broadcast_to(x_scaled.mean(0), x_scaled.shape), centre=False) > 0.05


def encode_by_hand(t: dict[str, torch.Tensor], x: np.ndarray) -> np.ndarray:
    """JumpReLU with the saved thresholds (0 for core latents), in float32 like the stage."""
    xt = torch.from_numpy(x).float()
    pre = torch.relu((xt - t["b_dec"]) @ t["W_enc"] + t["b_enc"])
    return (pre * (pre > t["threshold"])).numpy()


def test_evaluate_stage_matches_recomputation_from_the_saved_sae(reuse_run, model, eval_ids, eval_residuals):
    from safetensors import safe_open

    sae_art = reuse_run.load("reuse[distilled,k=8,seed=0]")
    m = reuse_run.load("evaluate[distilled,k=8,seed=0]").metrics
    base = reuse_run.load("baseline").metrics

    path = str(sae_art.file("sae.safetensors"))
    t = load_file(path)
    with safe_open(path, "pt") as f:
        meta = json.loads(f.metadata()["dmsae"])
    c, scale = meta["core_size"], meta["scale"]
    assert c > 0 and meta["k"] == 8
    assert scale == reuse_run.artifact("harvest").metrics["scale"]

    x = eval_residuals * scale
    f = encode_by_hand(t, x).astype(np.float64)
    x_hat = t["b_dec"].double().numpy() + f @ t["W_dec"].double().numpy()
    n = x.shape[0]
    active = f > 0
    assert m["n_tokens"] == n
    assert m["core_size"] == c
    assert m["l0"] == pytest.approx(active.sum() / n, rel=1e-3)
    assert m["l0_noncore"] == pytest.approx(active[:, c:].sum() / n, rel=1e-3)
    assert m["l0"] > m["l0_noncore"] > 0
    assert m["explained_variance"] == pytest.approx(np_explained_variance(x, x_hat), abs=1e-4)
    assert m["mse"] == pytest.approx(float(np.mean((x - x_hat) ** 2)), rel=1e-4)
    cos = np.sum(x * x_hat, 1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(x_hat, axis=1))
    assert m["cosine"] == pytest.approx(float(cos.mean()), abs=1e-5)
    fires = active.sum(0)
    assert m["dead_fraction"] == pytest.approx(float(np.mean(fires == 0)), abs=1.5 / t["W_enc"].shape[1])
    assert m["dense_fraction"] == pytest.approx(float(np.mean(fires / n > 0.1)), abs=1.5 / t["W_enc"].shape[1])

    # downstream: our own splice of x_hat / scale at non-BOS positions, our own CE and KL
    x_hat_raw = torch.zeros(*eval_ids.shape, x.shape[1], dtype=torch.float64)
    x_hat_raw[eval_ids != BOS_ID] = torch.from_numpy(x_hat / scale)
    clean = logprobs(model, eval_ids)
    spliced = logprobs(model, eval_ids, LAYER, lambda h: x_hat_raw)
    zeroed = logprobs(model, eval_ids, LAYER, torch.zeros_like)
    count = len(scored_positions(eval_ids))
    ce_orig, ce_sae, ce_zero = (summed_ce(lp, eval_ids) / count for lp in (clean, spliced, zeroed))
    kl_sae, kl_zero = summed_kl(clean, spliced, eval_ids) / count, summed_kl(clean, zeroed, eval_ids) / count
    assert base["n_positions"] == count
    assert base["ce_orig"] == pytest.approx(ce_orig, rel=1e-5)
    assert base["ce_zero"] == pytest.approx(ce_zero, rel=1e-5)
    assert base["kl_zero"] == pytest.approx(kl_zero, rel=1e-4)
    assert m["ce_sae"] == pytest.approx(ce_sae, rel=1e-4)
    assert m["kl_sae"] == pytest.approx(kl_sae, rel=1e-3, abs=1e-6)
    assert m["ce_loss_score"] == pytest.approx((ce_zero - ce_sae) / (ce_zero - ce_orig), abs=1e-3)
    assert m["kl_score"] == pytest.approx((kl_zero - kl_sae) / kl_zero, abs=1e-3)
    assert math.isfinite(m["ce_loss_score"]) and m["ce_loss_score"] != pytest.approx(1.0, abs=1e-3)


def test_every_evaluated_sae_has_its_own_metrics(reuse_run):
    """One evaluation per cycle SAE and per reuse SAE; different SAEs give different reconstructions."""
    evals = reuse_run.plan.of_stage("evaluate")
    # the cycles, three arms at each k and the second seed, and the two controls at one k
    assert len(evals) == reuse_run.cfg.cycles + 3 * (len(reuse_run.cfg.reuse.k) + 1) + 2
    evs = {n.label: reuse_run.store.manifest("evaluate", n.key).metrics["explained_variance"] for n in evals}
    assert len(set(evs.values())) == len(evs), evs

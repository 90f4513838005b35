"""Core gates (`sae.core_gate`): each variant's maths against a float64 autograd reference built from the
flat tensors, and the properties each gate promises (total L0 = k for topk, a frozen birth bias that stays
bit-identical, a core that fires only above its birth threshold)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dmsae import sparse_step
from dmsae.runtime import Runtime
from dmsae.sae import MatryoshkaSAE
from dmsae.training import train_sae
from tests.unit.test_sae import ENDS, FRACTIONS, TRAIN_PARAMS, WIDTH, B, D, _batches, data, ref_topk_mask

C = 5
GATES = [("relu", False), ("relu_bias", True), ("relu_bias", False), ("topk", False)]


def make_gated(gate: str, freeze_bias: bool, k: int = 6, seed: int = 0, dead_after: int = 10**9,
               aux_alpha: float = 0.5) -> MatryoshkaSAE:
    """An SAE with a 5-latent core and every parameter randomised; relu_bias gets birth thresholds that
    cut about half of the core's positive pre-activations."""
    g = torch.Generator().manual_seed(seed)
    core = torch.randn(D, C, generator=g) / D**0.5
    birth_bias = 0.3 + 0.1 * torch.randn(C, generator=g)
    birth_thr = 0.6 + 0.2 * torch.rand(C, generator=g)
    sae = MatryoshkaSAE(D, WIDTH, k, FRACTIONS, core_encoder=core, aux_alpha=aux_alpha, dead_after_tokens=dead_after,
                        generator=g, core_gate=gate, core_bias=birth_bias, core_threshold=birth_thr,
                        freeze_core_bias=freeze_bias)
    with torch.no_grad():
        sae.enc.add_(0.3 * torch.randn(sae.enc.shape, generator=g))
        sae.b_enc.copy_(0.1 * torch.randn(sae.b_enc.shape, generator=g))
        if gate != "relu_bias":
            sae.b_enc_core.copy_((2.0 if gate == "topk" else 0.3) + 0.1 * torch.randn(C, generator=g))
        sae.b_dec.copy_(0.1 * torch.randn(D, generator=g))
    return sae


def reference(sae: MatryoshkaSAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """(loss, f_core, f_nc, leaves) in float64 with autograd; masks (threshold, top-k) held fixed."""
    names = ["enc", "b_enc", "dec", "dec_core", "b_dec", "b_enc_core", "enc_core"]
    p = {n: getattr(sae, n).detach().double().clone().requires_grad_(True) for n in names}
    x = x.double()
    xc = x - p["b_dec"]
    pre_core = torch.relu(xc @ p["enc_core"] + p["b_enc_core"])
    pre_nc = torch.relu(xc @ p["enc"] + p["b_enc"])
    if sae.core_gate == "topk":
        mask = ref_topk_mask(torch.cat([pre_core, pre_nc], 1), sae.k)
        f_core, f_nc = pre_core * mask[:, :C], pre_nc * mask[:, C:]
    else:
        f_core = pre_core
        if sae.core_gate == "relu_bias":
            f_core = pre_core * (pre_core > sae.core_threshold.double()).detach()
        k_nc = max(1, sae.k - round(float((f_core > 0).double().sum(1).mean())))
        f_nc = pre_nc * ref_topk_mask(pre_nc, k_nc)
    losses = []
    for m in ENDS[C]:
        x_hat = p["b_dec"] + f_core @ p["dec_core"] + f_nc[:, :m] @ p["dec"][:m]
        losses.append((x - x_hat).pow(2).sum(1).mean())
    loss = torch.stack(losses).mean()
    dead = sae.dead_mask().nonzero().squeeze(1)
    if dead.numel():
        resid = (x - x_hat).detach()
        vals, pos = pre_nc[:, dead].topk(min(D // 2, dead.numel()), dim=1)
        f_aux = torch.zeros(x.shape[0], dead.numel(), dtype=torch.float64).scatter(1, pos, vals)
        aux = (resid - f_aux @ p["dec"][dead]).pow(2).sum(1).mean() / (resid - resid.mean(0)).pow(2).sum(1).mean()
        loss = loss + sae.aux_alpha * aux
    loss.backward()
    return loss.detach(), f_core.detach(), f_nc.detach(), p


@pytest.mark.parametrize("gate,freeze_bias", GATES)
@pytest.mark.parametrize("with_dead", [False, True])
def test_fast_step_equals_autograd(gate, freeze_bias, with_dead, device):
    """Each gate's fast step against the float64 autograd reference (on the CPU), the step itself on `device`."""
    sae = make_gated(gate, freeze_bias, dead_after=1000)
    if with_dead:
        with torch.no_grad():
            sae.tokens_since_fired[::3] = 1000
    x = data()
    loss_ref, f_core_ref, _, p = reference(sae, x)
    # the case exercises the gate: some core entries are positive and some positive pre-activations are cut
    pre_core = torch.relu((x - sae.b_dec) @ sae.enc_core + sae.b_enc_core)
    assert 0 < int((f_core_ref > 0).sum()) < int((pre_core > 0).sum()) or gate == "relu"
    fwd = sae.forward_train(x)
    assert float(fwd.loss.detach()) == pytest.approx(float(loss_ref), rel=1e-5)
    sae.zero_grad(set_to_none=True)
    stats, _, _ = sparse_step.train_step(sae.to(device), x.to(device))
    sae.cpu()  # Module.to moves the gradients too
    assert stats.loss == pytest.approx(float(loss_ref), rel=1e-5)
    torch.testing.assert_close(stats.core_code.double().cpu(), f_core_ref, rtol=1e-5, atol=1e-6)
    names = ["enc", "b_enc", "dec", "b_dec", "dec_core"] + ([] if freeze_bias else ["b_enc_core"])
    for name in names:
        got, want = getattr(sae, name).grad, p[name].grad
        assert got is not None, name
        scale = float(want.abs().max()) + 1e-12
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5 * scale, msg=lambda m, n=name: f"{n}: {m}")
    if freeze_bias:
        assert not isinstance(sae.b_enc_core, torch.nn.Parameter) and sae.b_enc_core.grad is None


@pytest.mark.parametrize("k", [1, 6, 40])
def test_topk_total_l0_is_k_per_batch(k):
    """Core and non-core share one BatchTopK: exactly k x B active entries, whatever the core's density."""
    sae = make_gated("topk", False, k=k)
    with torch.no_grad():
        sae.b_enc_core.fill_(3.0)  # a core that would fire on every token under relu
    x = data()
    fwd = sae.forward_train(x)
    assert int((fwd.f_core > 0).sum() + (fwd.f_noncore > 0).sum()) == k * B
    stats, cols, vals = sparse_step.train_step(sae, x)
    assert stats.l0_core + stats.l0_noncore == pytest.approx(k)
    assert 0 < stats.l0_core  # the dense core won some of the slots, and only some when k > C
    if k > C:
        assert stats.l0_core < C
    # the same entries as the autograd path
    torch.testing.assert_close(stats.core_code, fwd.f_core, rtol=1e-6, atol=1e-6)
    assert sorted(cols[vals > 0].tolist()) == sorted(fwd.f_noncore.nonzero()[:, 1].tolist())


def test_joint_topk_matches_a_concatenated_topk():
    g = torch.Generator().manual_seed(4)
    pre_core, pre_nc = torch.relu(torch.randn(300, 7, generator=g) + 1), torch.relu(torch.randn(300, 400, generator=g))
    idx, vals, f_core = sparse_step.joint_topk(pre_core, pre_nc, 9)
    both = torch.cat([pre_core, pre_nc], 1).numpy()
    keep = np.argsort(-both.ravel(), kind="stable")[: 9 * 300]
    expected = np.zeros(both.size, dtype=np.float32)
    expected[keep] = both.ravel()[keep]
    expected = expected.reshape(both.shape)
    np.testing.assert_array_equal(f_core.numpy(), expected[:, :7])
    got_nc = torch.zeros(300 * 400).index_put_((idx,), vals).view(300, 400)
    np.testing.assert_array_equal(got_nc.numpy(), expected[:, 7:])


def test_relu_bias_core_fires_only_above_its_birth_threshold():
    sae = make_gated("relu_bias", True)
    x = data(400)
    with torch.no_grad():
        f_core, _ = sae.encode(x)
        pre = torch.relu((x - sae.b_dec) @ sae.enc_core + sae.b_enc_core)
    assert torch.equal(f_core, torch.where(pre > sae.core_threshold, pre, torch.zeros_like(pre)))
    assert 0 < int((f_core > 0).sum()) < int((pre > 0).sum())
    # training-time gate = inference gate for the core
    assert torch.equal(sae.forward_train(x).f_core.detach(), f_core)


@pytest.mark.parametrize("gate,freeze_bias", GATES)
def test_training_keeps_frozen_parts_bit_identical(gate, freeze_bias, device):
    """The training loop (`train_sae`: the step, fused Adam, the statistics) on `device`, for each gate."""
    sae = make_gated(gate, freeze_bias, dead_after=640)
    enc_core, bias, thr = sae.enc_core.clone(), sae.b_enc_core.detach().clone(), sae.core_threshold.clone()
    train_sae(sae.to(device), _batches(), 25, TRAIN_PARAMS, Runtime(device=device, show_progress=False))
    sae.cpu()
    assert torch.equal(sae.enc_core, enc_core)
    assert torch.equal(sae.b_enc_core.detach(), bias) == freeze_bias
    if gate == "topk":  # the core's inference thresholds are learned (EMA) like the non-core's
        assert bool(torch.isfinite(sae.core_threshold).any()) and not torch.equal(sae.core_threshold, thr)
    else:  # relu: 0; relu_bias: the birth thresholds, untouched
        assert torch.equal(sae.core_threshold, thr)


def test_training_runs_where_the_sae_lives_without_a_runtime(device):
    """`train_sae` with no Runtime (as the benchmarks call it) on an SAE already on `device`: the CPU batches go
    to the SAE's device (on CUDA this stopped at the first step, "found at least two devices")."""
    sae = make_gated("relu", False, dead_after=640).to(device)
    before = sae.dec.detach().clone()
    curve = train_sae(sae, _batches(), 5, TRAIN_PARAMS)
    assert sae.dec.device.type == device and len(curve) > 0
    assert not torch.equal(sae.dec.detach(), before)


@pytest.mark.parametrize("gate", ["relu_bias", "topk"])
def test_gated_core_round_trips_through_the_flat_tensors(gate):
    sae = make_gated(gate, gate == "relu_bias")
    train_sae(sae, _batches(), 10, TRAIN_PARAMS)
    t = sae.full_tensors()
    back = MatryoshkaSAE.from_tensors(t, C, sae.k, FRACTIONS, core_gate=gate)
    x = data(100)
    with torch.no_grad():
        a, b = sae.encode(x), back.encode(x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # the stored core thresholds gate the core (not a plain ReLU)
    assert float(t["threshold"][:C].min()) > 0


def test_a_never_selected_latent_reads_back_as_unset():
    """random_core tells dead latents by `threshold < UNSET_THRESHOLD`; the written value must not pass it."""
    from dmsae.sae import UNSET_THRESHOLD

    sae = make_gated("relu", False)
    with torch.no_grad():
        sae.threshold[:3] = torch.tensor([0.5, float("inf"), 2.0])
    thr = sae.full_tensors()["threshold"][C:C + 3]
    assert (thr < UNSET_THRESHOLD).tolist() == [True, False, True]

"""The Matryoshka BatchTopK SAE (docs/design.md section 2, "SAE") against from-scratch float64 references.

Every reference below recomputes the maths from the flat [core | non-core] tensors of
`full_tensors()` with plain torch ops, never through the methods under test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dmsae import sparse_step
from dmsae.sae import MatryoshkaSAE
from dmsae.training import train_sae

D = 32
WIDTH = 128
FRACTIONS = [1 / 32, 1 / 16, 1 / 8, 1 / 4]
# round(f * n) per group, chosen so no size is a .5 tie: n = 128 -> 4, 8, 16, 32; n = 123 -> 4, 8, 15, 31
ENDS = {0: [4, 12, 28, 60, 128], 5: [4, 12, 27, 58, 123]}
B = 51  # odd, so a mean count of active core latents is never exactly x.5


def make_sae(
    c: int = 0, k: int = 6, l0_mode: str = "dynamic", core_bias: float = 0.0, seed: int = 0,
    freeze: bool = True, dead_after: int = 10**9, aux_alpha: float = 1 / 32,
) -> tuple[MatryoshkaSAE, torch.Tensor | None]:
    """An SAE with every parameter randomised (not the symmetric W_enc = W_dec^T init)."""
    g = torch.Generator().manual_seed(seed)
    core = torch.randn(D, c, generator=g) / D**0.5 if c else None
    sae = MatryoshkaSAE(D, WIDTH, k, FRACTIONS, core_encoder=core, l0_mode=l0_mode, aux_alpha=aux_alpha,
                        dead_after_tokens=dead_after, freeze_core_encoder=freeze, generator=g)
    with torch.no_grad():
        sae.enc.add_(0.3 * torch.randn(sae.enc.shape, generator=g))
        sae.b_enc.copy_(0.1 * torch.randn(sae.b_enc.shape, generator=g))
        sae.b_enc_core.copy_(core_bias + 0.1 * torch.randn(sae.b_enc_core.shape, generator=g))
        sae.b_dec.copy_(0.1 * torch.randn(D, generator=g))
    return sae, core


def data(n: int = B, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def ref_tensors(sae: MatryoshkaSAE) -> dict[str, torch.Tensor]:
    return {name: t.double() for name, t in sae.full_tensors().items()}


def ref_pre(t: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return torch.relu((x.double() - t["b_dec"]) @ t["W_enc"] + t["b_enc"])


def ref_k_noncore(pre_core: torch.Tensor, k: int, l0_mode: str) -> int:
    if l0_mode == "fixed":
        return k
    mean_active = float((pre_core > 0).double().sum(dim=1).mean()) if pre_core.shape[1] else 0.0
    return max(1, k - round(mean_active))


def ref_topk_mask(pre_nc: torch.Tensor, k_nc: int) -> torch.Tensor:
    """Keep the k_nc * B largest entries of the whole batch (numpy argsort, not torch.topk)."""
    flat = pre_nc.detach().numpy().ravel()
    keep = np.argsort(-flat, kind="stable")[: k_nc * pre_nc.shape[0]]
    mask = np.zeros(flat.size, dtype=bool)
    mask[keep] = True
    return torch.from_numpy(mask.reshape(pre_nc.shape))


def ref_codes(sae: MatryoshkaSAE, x: torch.Tensor, l0_mode: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    t = ref_tensors(sae)
    c = sae.core_size
    pre = ref_pre(t, x)
    k_nc = ref_k_noncore(pre[:, :c], sae.k, l0_mode)
    f_nc = torch.where(ref_topk_mask(pre[:, c:], k_nc), pre[:, c:], torch.zeros_like(pre[:, c:]))
    return pre[:, :c], f_nc, k_nc


def ref_prefix_losses(sae: MatryoshkaSAE, x: torch.Tensor, f_core: torch.Tensor, f_nc: torch.Tensor) -> torch.Tensor:
    """x_hat_i = b_dec + f_core W_dec[:c] + f_nc[:, :m_i] W_dec[c:c+m_i], one latent at a time."""
    t = ref_tensors(sae)
    c, w_dec, x = sae.core_size, t["W_dec"], x.double()
    losses = []
    for m in ENDS[c]:
        x_hat = t["b_dec"].expand_as(x).clone()
        for j in range(c):
            x_hat += f_core[:, j:j + 1] * w_dec[j]
        for j in range(m):
            x_hat += f_nc[:, j:j + 1] * w_dec[c + j]
        losses.append((x - x_hat).pow(2).sum(dim=1).mean())
    return torch.stack(losses)


# -- BatchTopK and the dynamic non-core L0 -----------------------------------------------------------


@pytest.mark.parametrize("c", [0, 5])
def test_group_ends(c):
    sae, _ = make_sae(c=c)
    assert sae.ends == ENDS[c]


@pytest.mark.parametrize("c,k,core_bias,l0_mode", [
    (0, 6, 0.0, "dynamic"),   # no core: plain BatchTopK with k
    (5, 6, 0.0, "dynamic"),   # about half the core active: k_nc = k - round(mean core L0)
    (5, 6, 0.5, "dynamic"),
    (5, 4, 10.0, "dynamic"),  # every core latent active, k - 5 < 1: clamped to 1
    (5, 6, 0.0, "fixed"),     # fixed mode ignores the core
])
def test_batch_topk_keeps_exactly_k_times_batch(c, k, core_bias, l0_mode):
    sae, _ = make_sae(c=c, k=k, core_bias=core_bias, l0_mode=l0_mode)
    x = data()
    f_core_ref, f_nc_ref, k_nc = ref_codes(sae, x, l0_mode)
    if core_bias == 10.0:
        assert k_nc == 1  # the case really exercises the clamp
    if l0_mode == "fixed":
        assert k_nc == k
    out = sae.forward_train(x)
    assert out.k_noncore == k_nc
    assert int((out.f_noncore > 0).sum()) == k_nc * B
    # the kept entries are exactly the k_nc * B largest pre-activations of the whole batch
    torch.testing.assert_close(out.f_noncore.double(), f_nc_ref, rtol=1e-5, atol=1e-6)
    # the core is never top-k'd: every positive core pre-activation is kept
    torch.testing.assert_close(out.f_core.double(), f_core_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("c,core_bias,l0_mode", [(0, 0.0, "dynamic"), (5, 0.0, "dynamic"), (5, 10.0, "dynamic"),
                                                 (5, 0.0, "fixed")])
def test_train_step_selects_the_same_batch_topk(c, core_bias, l0_mode):
    """The fast training path keeps the same entries as the reference BatchTopK."""
    sae, _ = make_sae(c=c, k=4, core_bias=core_bias, l0_mode=l0_mode)
    x = data()
    _, f_nc_ref, k_nc = ref_codes(sae, x, l0_mode)
    stats, cols, vals = sparse_step.train_step(sae, x)
    assert stats.k_noncore == k_nc
    active = vals > 0
    assert int(active.sum()) == k_nc * B
    ref_cols = f_nc_ref.nonzero()[:, 1]
    assert sorted(cols[active].tolist()) == sorted(ref_cols.tolist())
    np.testing.assert_allclose(np.sort(vals[active].double().numpy()),
                               np.sort(f_nc_ref[f_nc_ref > 0].numpy()), rtol=1e-5, atol=1e-6)
    assert stats.l0_noncore == pytest.approx(k_nc)
    assert stats.l0_core == pytest.approx(float((ref_codes(sae, x, l0_mode)[0] > 0).sum()) / B)


@pytest.mark.parametrize("kind", ["normal", "ties", "mostly_negative", "heavy_tail", "constant"])
@pytest.mark.parametrize("k", [3, 40])
@pytest.mark.parametrize("small", [None, 1000])
@pytest.mark.parametrize("any_order", [False, True])
def test_select_topk_is_an_exact_batch_topk(kind, k, small, any_order, monkeypatch):
    """The sampled-threshold shortcut must pick the same values as a full top-k (large input: strided sample),
    with the candidates found by one nonzero or by 8-flag words (`small` lowered so that this input takes them),
    and the compiled selection where the order is free."""
    if small is not None:
        monkeypatch.setattr(sparse_step, "SMALL", small)
    g = torch.Generator().manual_seed(3)
    shape = (512, 256)
    pre = {
        "normal": lambda: torch.randn(shape, generator=g),
        "ties": lambda: torch.round(torch.randn(shape, generator=g) * 4) / 4,
        "mostly_negative": lambda: torch.randn(shape, generator=g) - 3.5,
        "heavy_tail": lambda: torch.empty(shape).exponential_(generator=g).pow(4),
        "constant": lambda: torch.full(shape, 0.25),
    }[kind]()
    idx, vals = sparse_step.select_topk(pre, k, any_order)
    n_keep = k * shape[0]
    assert idx.numel() == n_keep and vals.numel() == n_keep
    assert torch.unique(idx).numel() == n_keep
    assert torch.equal(pre.flatten()[idx], vals)
    expected = np.sort(pre.numpy().ravel())[::-1][:n_keep]
    np.testing.assert_array_equal(np.sort(vals.numpy())[::-1], expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tail", [0, 77])
@pytest.mark.parametrize("compiled", ["1", "0"])
def test_above_equals_one_nonzero(dtype, tail, compiled, monkeypatch):
    """The search by 8-flag words (and the compiled one where it builds) returns exactly
    (flat > thr).nonzero(), in order, and those entries, NaN and infinities included, with a length that is not a
    multiple of 8, for sparse, dense, full and empty masks."""
    monkeypatch.setattr(sparse_step, "SMALL", 4096)
    monkeypatch.setenv("DMSAE_NATIVE", compiled)
    flat = torch.randn(4096 * 5 + tail, generator=torch.Generator().manual_seed(0)).to(dtype)
    flat[[5, 4096, 9000, flat.numel() - 1]] = torch.tensor([float("nan"), float("inf"), -float("inf"), 3.0],
                                                           dtype=dtype)
    for thr in (1.5, 2.5, -0.5, -9.0, 9.0, float("inf")):
        t = torch.tensor(thr, dtype=dtype)
        idx, vals = sparse_step.above(flat, t)
        want = (flat > t).nonzero().squeeze(1)
        assert torch.equal(idx, want) and torch.equal(vals, flat[want]), thr


# -- Matryoshka prefix losses ------------------------------------------------------------------------


@pytest.mark.parametrize("c", [0, 5])
def test_prefix_losses_match_from_scratch_reconstructions(c):
    sae, _ = make_sae(c=c, k=6)
    x = data()
    f_core, f_nc, _ = ref_codes(sae, x, "dynamic")
    expected = ref_prefix_losses(sae, x, f_core, f_nc)
    assert expected.shape == (len(ENDS[c]),)

    out = sae.forward_train(x)
    torch.testing.assert_close(out.prefix_losses.double(), expected, rtol=1e-5, atol=1e-5)
    assert float(out.aux_loss) == 0.0  # no latent is dead yet
    assert float(out.loss.detach()) == pytest.approx(float(expected.mean()), rel=1e-5)
    # the full reconstruction is the last prefix
    t = ref_tensors(sae)
    x_hat = t["b_dec"] + f_core @ t["W_dec"][:c] + f_nc @ t["W_dec"][c:]
    torch.testing.assert_close(out.x_hat.double(), x_hat, rtol=1e-5, atol=1e-5)

    sae.zero_grad(set_to_none=True)
    stats, _, _ = sparse_step.train_step(sae, x)
    torch.testing.assert_close(stats.prefix_losses.double(), expected, rtol=1e-5, atol=1e-5)
    assert stats.loss == pytest.approx(float(expected.mean()), rel=1e-5)


def _reference_loss(sae: MatryoshkaSAE, x: torch.Tensor, l0_mode: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Dense float64 loss with autograd leaves for every trainable parameter (top-k mask held fixed)."""
    c = sae.core_size
    leaves = {
        "enc": sae.enc, "b_enc": sae.b_enc, "dec": sae.dec, "dec_core": sae.dec_core, "b_dec": sae.b_dec,
        "b_enc_core": sae.b_enc_core, "enc_core": sae.enc_core,
    }
    p = {n: t.detach().double().clone().requires_grad_(True) for n, t in leaves.items()}
    x = x.double()
    xc = x - p["b_dec"]
    pre_core = torch.relu(xc @ p["enc_core"] + p["b_enc_core"])
    pre_nc = torch.relu(xc @ p["enc"] + p["b_enc"])
    k_nc = ref_k_noncore(pre_core.detach(), sae.k, l0_mode)
    f_nc = pre_nc * ref_topk_mask(pre_nc, k_nc)
    losses = []
    for m in ENDS[c]:
        x_hat = p["b_dec"] + pre_core @ p["dec_core"] + f_nc[:, :m] @ p["dec"][:m]
        losses.append((x - x_hat).pow(2).sum(dim=1).mean())
    prefix = torch.stack(losses)
    loss = prefix.mean()
    dead = (sae.tokens_since_fired >= sae.dead_after_tokens).nonzero().squeeze(1)
    aux = torch.zeros((), dtype=torch.float64)
    if dead.numel():
        resid = (x - x_hat).detach()  # x_hat: the full (last-prefix) reconstruction
        k_aux = min(D // 2, dead.numel())
        vals, pos = pre_nc[:, dead].topk(k_aux, dim=1)
        f_aux = torch.zeros(x.shape[0], dead.numel(), dtype=torch.float64).scatter(1, pos, vals)
        err = (resid - f_aux @ p["dec"][dead]).pow(2).sum(dim=1).mean()
        aux = err / (resid - resid.mean(0)).pow(2).sum(dim=1).mean()
        loss = loss + sae.aux_alpha * aux
    loss.backward()
    return loss.detach(), aux.detach(), p


@pytest.mark.parametrize("c,freeze,with_dead,b_enc_shift", [
    (0, True, False, 0.0), (5, True, False, 0.0), (5, True, True, 0.0), (5, False, True, 0.0), (0, True, True, 0.0),
    (5, True, False, -6.0),  # fewer than k*B positive pre-activations: only the positive ones count
    (5, True, True, -1.0),  # some tokens have more than k_aux positive dead latents, some fewer
])
def test_train_step_gradients_match_autograd(c, freeze, with_dead, b_enc_shift, device):
    """train_step writes hand-accumulated gradients; they must equal autograd of the dense loss (computed on the
    CPU in float64 whatever `device` the step runs on)."""
    sae, _ = make_sae(c=c, k=6, freeze=freeze, dead_after=1000, aux_alpha=0.5)
    with torch.no_grad():
        sae.b_enc.add_(b_enc_shift)
    if with_dead:
        with torch.no_grad():
            sae.tokens_since_fired[::3] = 1000  # every third non-core latent is dead
    x = data()
    loss_ref, aux_ref, p = _reference_loss(sae, x, "dynamic")
    sae.zero_grad(set_to_none=True)
    # the step on `device`, then the module back on the CPU for the checks below (Module.to moves gradients too)
    stats, _, _ = sparse_step.train_step(sae.to(device), x.to(device))
    sae.cpu()
    assert stats.loss == pytest.approx(float(loss_ref), rel=1e-5)
    assert stats.aux_loss == pytest.approx(float(aux_ref), rel=1e-4, abs=1e-7)
    if b_enc_shift < -5:
        t = ref_tensors(sae)
        n_pos = int((ref_pre(t, x)[:, c:] > 0).sum())
        assert 0 < n_pos < stats.k_noncore * B  # the case is really exercised
        assert stats.l0_noncore == pytest.approx(n_pos / B)
        fwd = sae.forward_train(x)
        assert int((fwd.f_noncore > 0).sum()) == n_pos
    if with_dead:
        assert float(aux_ref) > 0
        dead = sae.tokens_since_fired >= sae.dead_after_tokens
        positive = ((x - sae.b_dec) @ sae.enc + sae.b_enc)[:, dead].gt(0).sum(1)
        assert bool((positive > sae.k_aux).any()), "the case must have tokens whose AuxK needs a top-k"
        if b_enc_shift:
            assert bool((positive <= sae.k_aux).any()), "and tokens whose positive dead latents all count"
        fwd = sae.forward_train(x)
        assert float(fwd.aux_loss) == pytest.approx(float(aux_ref), rel=1e-4)
    names = ["enc", "b_enc", "dec", "b_dec"] + ([] if c == 0 else ["dec_core", "b_enc_core"])
    if not freeze and c:
        names.append("enc_core")
    for name in names:
        got = getattr(sae, name).grad
        assert got is not None, name
        want = p[name].grad
        scale = float(want.abs().max()) + 1e-12
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5 * scale, msg=lambda m, n=name: f"{n}: {m}")
    if freeze and c:
        assert not isinstance(sae.enc_core, torch.nn.Parameter)
        assert sae.enc_core.grad is None


# -- training: unit-norm decoder, frozen core, inference thresholds ----------------------------------


def _batches(seed: int = 5, batch: int = 64):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(8, D, generator=g) * 2  # a few directions, so latents specialise
    while True:
        coef = torch.relu(torch.randn(batch, 8, generator=g))
        yield coef @ mix + 0.1 * torch.randn(batch, D, generator=g)


TRAIN_PARAMS = {"lr": 3e-3, "log_every": 5, "warmup_fraction": 0.1, "decay_fraction": 0.2, "threshold_ema": 0.9}


@pytest.fixture(scope="module")
def trained():
    sae, core = make_sae(c=5, k=6, dead_after=640)
    before = {n: t.detach().clone() for n, t in sae.state_dict().items()}
    curve = train_sae(sae, _batches(), 25, TRAIN_PARAMS)
    return sae, core, before, curve


def test_cpu_training_asks_glibc_to_keep_freed_memory(monkeypatch):
    """train_sae on the CPU sets glibc's thresholds so that a step's freed buffers are not handed back to the OS
    between steps (BENCHMARKS.md: the float32 step 1.07x faster, the same bits); glibc accepts the values."""
    import platform

    from dmsae import memory

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc: nothing to set")
    calls = []
    monkeypatch.setattr(memory, "keep_freed_heap", lambda: calls.append(True) or True)
    sae, _ = make_sae(c=0, k=6, dead_after=640)
    train_sae(sae, _batches(), 2, TRAIN_PARAMS)
    assert calls == [True]
    monkeypatch.undo()
    memory.keep_freed_heap.cache_clear()
    assert memory.keep_freed_heap() is True  # mallopt returned success for both thresholds


def test_decoder_rows_unit_norm_after_training(trained):
    sae, _, before, curve = trained
    assert len(curve) > 0
    w_dec = sae.full_tensors()["W_dec"].double()
    np.testing.assert_allclose(w_dec.norm(dim=1).numpy(), 1.0, atol=1e-5)
    # and training really moved them (so the check is not vacuous)
    assert not torch.allclose(sae.dec, before["dec"])
    assert not torch.allclose(sae.dec_core, before["dec_core"])
    assert not torch.allclose(sae.b_enc_core, before["b_enc_core"])  # core b_enc is trainable


def test_frozen_core_encoder_is_bit_identical(trained):
    sae, core, before, _ = trained
    assert torch.equal(sae.enc_core, core)
    assert torch.equal(sae.full_tensors()["W_enc"][:, :5], core)
    assert not torch.equal(sae.enc, before["enc"])  # the non-core encoder did train


def test_inference_encode_is_batch_independent(trained):
    sae, _, _, _ = trained
    x = next(_batches(seed=11, batch=40))
    with torch.no_grad():
        f_core, f_nc = sae.encode(x)
        rows = [sae.encode(x[i:i + 1]) for i in range(x.shape[0])]
        for sub in (x[:7], x[7:]):  # different batch compositions
            sc, sn = sae.encode(sub)
            assert sn.shape[0] == sub.shape[0]
    torch.testing.assert_close(torch.cat([r[0] for r in rows]), f_core, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([r[1] for r in rows]), f_nc, rtol=1e-5, atol=1e-5)
    # the encoding is the per-latent threshold rule, recomputed from the flat tensors
    t = ref_tensors(sae)
    pre = ref_pre(t, x)
    thr = t["threshold"][5:]
    expected_nc = torch.where(pre[:, 5:] > thr, pre[:, 5:], torch.zeros_like(pre[:, 5:]))
    torch.testing.assert_close(f_nc.double(), expected_nc, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f_core.double(), pre[:, :5], rtol=1e-5, atol=1e-5)
    assert int((f_nc > 0).sum()) > 0  # thresholds were learnt: something fires


def test_threshold_ema_of_smallest_selected_activation():
    sae, _ = make_sae()
    m = WIDTH
    cols = torch.tensor([0, 0, 1, 3])
    vals = torch.tensor([2.0, 1.0, 5.0, 0.0])  # latent 3 was selected at 0: not active
    sparse_step.update_stats_sparse(sae, cols, vals, None, batch_tokens=10, ema=0.9)
    expected = torch.full((m,), float("inf"))
    expected[0], expected[1] = 1.0, 5.0
    assert torch.equal(sae.threshold, expected)
    since = torch.full((m,), 10, dtype=torch.long)
    since[0] = since[1] = 0
    assert torch.equal(sae.tokens_since_fired, since)

    sparse_step.update_stats_sparse(sae, torch.tensor([0, 2]), torch.tensor([3.0, 4.0]), None, batch_tokens=10,
                                    ema=0.9)
    expected[0] = 0.9 * 1.0 + 0.1 * 3.0
    expected[2] = 4.0
    torch.testing.assert_close(sae.threshold, expected)
    since += 10
    since[0] = since[2] = 0
    assert torch.equal(sae.tokens_since_fired, since)

    # the dense update gives the same state
    dense, _ = make_sae()
    f1 = torch.zeros(10, m)
    f1[0, 0], f1[1, 0], f1[2, 1] = 2.0, 1.0, 5.0
    f2 = torch.zeros(10, m)
    f2[4, 0], f2[5, 2] = 3.0, 4.0
    no_core = torch.zeros(10, 0)
    dense.update_stats(no_core, f1, 0.9)
    dense.update_stats(no_core, f2, 0.9)
    torch.testing.assert_close(dense.threshold, sae.threshold)
    assert torch.equal(dense.tokens_since_fired, sae.tokens_since_fired)


def test_full_tensors_round_trip(trained):
    sae, _, _, _ = trained
    t = sae.full_tensors()
    back = MatryoshkaSAE.from_tensors(t, sae.core_size, sae.k, FRACTIONS)
    for name, v in back.full_tensors().items():
        assert torch.equal(v, t[name]), name
    x = next(_batches(seed=12))
    with torch.no_grad():
        a, b = sae.encode(x), back.encode(x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])

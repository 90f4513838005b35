"""The GPU's training step (`dmsae.graph_step`): its fixed-shape maths against the float64 autograd reference for
every core gate and L0 mode, the same selection as the sparse step, no read back to the host (what a CUDA graph
needs, checked here on the CPU by the ops the step dispatches), AuxK's steps handed to the sparse step, and a
training with it beside one with the sparse step. On a CUDA device the same tests run the captured graph."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dmsae import graph_step, sparse_step
from dmsae.training import train_sae
from tests.unit.test_core_gate import GATES, make_gated, reference
from tests.unit.test_sae import TRAIN_PARAMS, _batches, _reference_loss, data, make_sae


def _check_grads(sae: torch.nn.Module, p: dict, names: list[str]) -> None:
    for name in names:
        got, want = getattr(sae, name).grad, p[name].grad
        assert got is not None, name
        scale = float(want.abs().max()) + 1e-12
        torch.testing.assert_close(got.double().cpu(), want, rtol=1e-4, atol=1e-5 * scale,
                                   msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("gate,freeze_bias", GATES)
def test_graphed_step_equals_autograd_for_every_gate(gate, freeze_bias, device):
    sae = make_gated(gate, freeze_bias)
    x = data()
    loss_ref, f_core_ref, _, p = reference(sae, x)
    step = graph_step.GraphedStep()
    sae.to(device)
    for _ in range(2):  # on a GPU: the capture, then a replay
        sae.zero_grad(set_to_none=True)
        stats, _, _ = step(sae, x.to(device))
        assert float(stats.loss) == pytest.approx(float(loss_ref), rel=1e-5)
        torch.testing.assert_close(stats.core_code.double().cpu(), f_core_ref, rtol=1e-5, atol=1e-6)
        _check_grads(sae, p, ["enc", "b_enc", "dec", "b_dec", "dec_core"] + ([] if freeze_bias else ["b_enc_core"]))
    assert step.counts["auxk"] == 0 and step.fallback is None
    assert step.counts["replayed" if device == "cuda" else "eager"] >= 1


@pytest.mark.parametrize("c,l0_mode,freeze,b_enc_shift", [
    (0, "dynamic", True, 0.0), (5, "dynamic", True, 0.0), (5, "fixed", True, 0.0), (5, "dynamic", False, 0.0),
    (5, "dynamic", True, -6.0),  # fewer than k*B positive pre-activations: the zero entries add nothing
])
def test_static_step_equals_autograd(c, l0_mode, freeze, b_enc_shift, device):
    sae, _ = make_sae(c=c, k=6, l0_mode=l0_mode, freeze=freeze)
    with torch.no_grad():
        sae.b_enc.add_(b_enc_shift)
    x = data()
    loss_ref, _, p = _reference_loss(sae, x, l0_mode)
    sae.to(device)
    out = graph_step.static_step(sae, x.to(device))
    assert float(out.loss) == pytest.approx(float(loss_ref), rel=1e-5)
    for name, grad in out.grads.items():
        getattr(sae, name).grad = grad
    names = ["enc", "b_enc", "dec", "b_dec"] + ([] if c == 0 else ["dec_core", "b_enc_core"])
    _check_grads(sae, p, names + (["enc_core"] if c and not freeze else []))
    assert ("enc_core" in out.grads) == (c > 0 and not freeze)  # a frozen core encoder gets no gradient


@pytest.mark.parametrize("c,gate,l0_mode", [(0, "topk", "dynamic"), (5, "relu", "dynamic"), (5, "topk", "dynamic"),
                                            (5, "relu", "fixed")])
def test_static_step_selects_what_the_sparse_step_selects(c, gate, l0_mode):
    sae, _ = make_sae(c=c, k=6, l0_mode=l0_mode, core_bias=1.0)  # a core that fires: it takes BatchTopK's slots
    sae.core_gate = gate
    x = data(n=200)
    ref = copy.deepcopy(sae)
    want, want_cols, want_vals = sparse_step.train_step(ref, x)
    out = graph_step.static_step(sae, x)
    assert int(out.k_noncore) == want.k_noncore
    assert float(out.l0_noncore) == pytest.approx(want.l0_noncore) and float(out.l0_core) == pytest.approx(want.l0_core)
    keep = out.vals > 0
    got = sorted(zip(out.cols[keep].tolist(), out.vals[keep].tolist(), strict=True))
    expected = sorted(zip(want_cols[want_vals > 0].tolist(), want_vals[want_vals > 0].tolist(), strict=True))
    assert [col for col, _ in got] == [col for col, _ in expected]
    assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-5)
    if c:  # the dynamic L0 really cut candidates: zeros stand where the sparse step kept fewer entries
        assert (l0_mode == "fixed" and gate != "topk") or int((~keep).sum()) > 0


class HostReads(TorchDispatchMode):
    """Records the ops that read a tensor's data back to the host or size their output by it: in a CUDA graph
    each fails the capture (`.item()`, `float()`, `bool()` go through _local_scalar_dense)."""

    READS = {"_local_scalar_dense", "nonzero", "masked_select", "unique_dim", "_unique2", "unique_consecutive",
             "bincount", "repeat_interleave", "equal", "argwhere"}

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's signature
        name = func.overloadpacket.__name__
        bool_index = name.startswith("index") and any(
            isinstance(t, torch.Tensor) and t.dtype == torch.bool for a in args if isinstance(a, (list, tuple))
            for t in a)
        if name in self.READS or bool_index:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("gate", ["relu", "relu_bias", "topk"])
def test_static_step_reads_nothing_back(gate):
    sae = make_gated(gate, False, dead_after=1000)
    with torch.no_grad():
        sae.tokens_since_fired[::3] = 1000
    x = data()
    with HostReads() as reads:
        graph_step.static_step(sae, x)
        graph_step.static_step(sae, x, aux_cap=x.shape[0] * sae.k)
    assert reads.seen == []
    with HostReads() as reads:  # the detector sees the sparse step's reads, so the assertion above can fail
        sparse_step.train_step(copy.deepcopy(sae), x)
    assert "_local_scalar_dense" in reads.seen and "nonzero" in reads.seen


@pytest.mark.parametrize("gate,freeze_bias", GATES)
def test_graphed_step_with_auxk_equals_autograd(gate, freeze_bias, device):
    sae = make_gated(gate, freeze_bias, dead_after=1000)
    with torch.no_grad():
        sae.tokens_since_fired[::3] = 1000  # every third non-core latent is dead
    x = data()
    loss_ref, _, _, p = reference(sae, x)
    step = graph_step.GraphedStep()
    sae.to(device)
    for _ in range(2):
        sae.zero_grad(set_to_none=True)
        stats, _, _ = step(sae, x.to(device))
        assert float(stats.aux_loss) > 0 and float(stats.loss) == pytest.approx(float(loss_ref), rel=1e-5)
        _check_grads(sae, p, ["enc", "b_enc", "dec", "b_dec", "dec_core"] + ([] if freeze_bias else ["b_enc_core"]))
    assert step.counts["auxk"] == 2 and step.fallback is None


def test_auxk_room_without_a_dead_latent_changes_nothing():
    """A graph with AuxK's room replayed when no latent is dead (a dead latent fired again) must be the step
    without AuxK: zero entries, zero loss."""
    sae = make_gated("relu", False)
    x = data()
    plain = graph_step.static_step(sae, x)
    with_room = graph_step.static_step(sae, x, aux_cap=x.shape[0] * sae.k)
    assert float(with_room.aux_loss) == 0 and int(with_room.aux_positive) == 0
    torch.testing.assert_close(with_room.loss, plain.loss)
    for name, grad in plain.grads.items():
        torch.testing.assert_close(with_room.grads[name], grad, msg=name)


def test_auxk_room_grows_when_a_step_has_more_entries(device):
    """Many positive dead pre-activations: more AuxK entries than the first room (B*k); the step runs again with a
    larger one and equals the reference, where the first room alone would not."""
    sae = make_gated("topk", False, k=2, dead_after=1000)
    with torch.no_grad():
        sae.tokens_since_fired[::2] = 1000
        sae.b_enc.add_(1.0)
    x = data()
    loss_ref, _, _, p = reference(sae, x)
    sae.to(device)
    x = x.to(device)
    small = graph_step.static_step(sae, x, aux_cap=x.shape[0] * sae.k)
    assert int(small.aux_positive) > x.shape[0] * sae.k  # the case is exercised
    assert float(small.loss) != pytest.approx(float(loss_ref), rel=1e-5)  # and the first room alone falls short
    step = graph_step.GraphedStep()
    stats, _, _ = step(sae, x)
    assert step.counts["aux_regrown"] == 1 and step.aux_cap >= int(small.aux_positive)
    assert float(stats.loss) == pytest.approx(float(loss_ref), rel=1e-5)
    _check_grads(sae, p, ["enc", "b_enc", "dec", "b_dec"])
    step(sae, x)  # the next step starts with the grown room
    assert step.counts["aux_regrown"] == 1


def test_the_step_under_bf16_autocast_matches_the_sparse_steps(device):
    """Both run the encoder matmul and the gathers in bfloat16 the same way; they differ in summation order only."""
    sae, _ = make_sae(c=5, k=6)
    sae.core_gate = "topk"
    sae.to(device)
    x = data(n=512).to(device)
    ref = copy.deepcopy(sae)
    with torch.autocast(device, dtype=torch.bfloat16):
        want, _, _ = sparse_step.train_step(ref, x)
        got, _, _ = graph_step.GraphedStep()(sae, x)
    assert float(got.loss) == pytest.approx(want.loss, rel=1e-3)
    for name in ["enc", "dec", "b_enc", "b_dec"]:
        cos = torch.nn.functional.cosine_similarity(getattr(sae, name).grad.flatten(),
                                                    getattr(ref, name).grad.flatten(), dim=0)
        assert float(cos) > 0.999, name


def test_training_with_the_graphed_step_follows_the_sparse_step(device):
    """20 steps on the same batches, AuxK from the sixth (latents die after 320 tokens): the curves agree to float
    rounding, the weights stay close."""
    runs = {}
    for name, step_fn in [("sparse", sparse_step.train_step), ("graphed", graph_step.GraphedStep())]:
        sae, _ = make_sae(c=5, k=6, dead_after=320)
        sae.core_gate = "topk"
        curve = train_sae(sae.to(device), _batches(), 20, TRAIN_PARAMS, step_fn=step_fn)
        runs[name] = (sae.cpu(), curve, step_fn)
    (a, curve_a, _), (b, curve_b, graphed) = runs["sparse"], runs["graphed"]
    assert len(curve_a) == len(curve_b)
    for ra, rb in zip(curve_a, curve_b, strict=True):
        assert isinstance(rb["loss"], float) and isinstance(rb["k_noncore"], int)
        assert rb["fvu"] == pytest.approx(ra["fvu"], rel=1e-3, abs=1e-5)
        assert rb["l0"] == pytest.approx(ra["l0"], abs=0.05)
    torch.testing.assert_close(b.dec, a.dec, rtol=0, atol=1e-3)
    torch.testing.assert_close(b.threshold, a.threshold, rtol=1e-3, atol=1e-4)
    assert 0 < graphed.counts["auxk"] < 20
    if device == "cuda":
        assert graphed.fallback is None and graphed.counts["replayed"] >= 20


def test_train_sae_picks_the_graphed_step_only_on_a_gpu():
    assert graph_step.default_step("cpu") is sparse_step.train_step
    assert isinstance(graph_step.default_step("cuda"), graph_step.GraphedStep)


def test_the_statistics_update_reads_nothing_back():
    """The loop's update after each step (dead counters, threshold EMAs) runs between two graph replays: a read
    there would stall the GPU's queue on every step."""
    sae = make_gated("topk", False)
    out = graph_step.static_step(sae, data())
    with HostReads() as reads:
        sparse_step.update_stats_sparse(sae, out.cols, out.vals, out.core_code, 51, 0.9)
    assert reads.seen == []
    assert bool(torch.isfinite(sae.threshold).any()) and int((sae.tokens_since_fired == 0).sum()) > 0

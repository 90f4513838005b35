"""Precision: the fast step under torch.autocast(bfloat16) against the float32 autograd reference, and the rule
that resolves `precision: auto`."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from dmsae import precision, sparse_step
from dmsae.errors import UserError
from tests.unit.test_sae import _reference_loss, data, make_sae


@pytest.mark.parametrize("c,gate,with_dead", [(0, "topk", False), (5, "topk", True), (5, "relu", True)])
def test_the_step_under_bf16_autocast_matches_the_fp32_reference(c, gate, with_dead, device):
    """bfloat16 keeps 8 significant bits, so each non-core pre-activation carries a relative error of at most
    2^-9 (0.2%). The losses and gradients are sums of B*k such terms with errors of both signs, and the few
    entries within that error of the k-th value may trade places, so they stay within 1% of the float32 reference
    (loss) and point the same way (cosine > 0.995). Weights and gradients themselves stay float32. Both steps run
    on `device` (autocast of that device type); the float64 reference on the CPU."""
    sae, _ = make_sae(c=c, k=6, dead_after=1000, aux_alpha=0.5)
    sae.core_gate = gate
    if with_dead:
        with torch.no_grad():
            sae.tokens_since_fired[::3] = 1000
    x = data(n=512)
    loss_ref, aux_ref, p = _reference_loss(sae, x, "dynamic") if gate == "relu" else (None, None, None)
    sae.to(device)
    x = x.to(device)
    fp32 = copy.deepcopy(sae)
    ref_stats, _, _ = sparse_step.train_step(fp32, x)  # the float32 step, itself checked against autograd
    with torch.autocast(device, dtype=torch.bfloat16):
        stats, cols, vals = sparse_step.train_step(sae, x)
    sae.cpu()
    fp32.cpu()
    assert stats.loss == pytest.approx(ref_stats.loss, rel=1e-2)
    assert stats.aux_loss == pytest.approx(ref_stats.aux_loss, rel=1e-2)
    if loss_ref is not None:  # and against float64 autograd directly
        assert stats.loss == pytest.approx(float(loss_ref), rel=1e-2)
    names = ["enc", "b_enc", "dec", "b_dec"] + (["dec_core", "b_enc_core"] if c else [])
    for name in names:
        got, want = getattr(sae, name).grad, getattr(fp32, name).grad
        assert got.dtype == torch.float32, name
        if p is not None:
            want = p[name].grad.float()
        cos = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0)
        assert float(cos) > 0.995, f"{name}: cosine {float(cos):.4f}"
    assert vals.dtype == torch.float32 and stats.l0_noncore == pytest.approx(ref_stats.l0_noncore, rel=0.02)


def test_the_step_differs_under_autocast_so_the_test_above_can_fail(device):
    sae, _ = make_sae(c=0, k=6)
    sae.to(device)
    x = data(n=512).to(device)
    fp32 = copy.deepcopy(sae)
    a, _, _ = sparse_step.train_step(fp32, x)
    with torch.autocast(device, dtype=torch.bfloat16):
        b, _, _ = sparse_step.train_step(sae, x)
    assert a.loss != b.loss  # the encoder really ran in bfloat16


AMX = frozenset({"avx512f", "amx_bf16", "amx_tile"})
AVX512_BF16 = frozenset({"avx512f", "avx512_bf16"})  # AMD Zen 4, Intel Cooper Lake
PLAIN = frozenset({"avx2", "fma"})


def test_auto_picks_bf16_only_where_the_cpu_has_bf16_units():
    assert precision.resolve("auto", "cpu", "precision.sae", AMX).precision == "bf16"
    assert precision.resolve("auto", "cpu", "precision.sae", AVX512_BF16).precision == "bf16"
    assert precision.resolve("auto", "cpu", "precision.sae", PLAIN).precision == "fp32"
    assert precision.resolve("auto", "cpu", "precision.sae", frozenset({"avx512f", "avx512_fp16"})).precision == "fp32"
    assert "AMX" in precision.resolve("auto", "cpu", "precision.sae", AMX).reason
    assert "avx512_bf16" in precision.resolve("auto", "cpu", "precision.sae", AVX512_BF16).reason
    assert precision.resolve("fp32", "cpu", "precision.sae", AMX).precision == "fp32"


def test_bf16_without_native_support_is_refused_in_one_line():
    with pytest.raises(UserError) as e:
        precision.resolve("bf16", "cpu", "precision.sae", PLAIN)
    assert "\n" not in str(e.value) and "precision.sae" in str(e.value) and "fp32" in str(e.value)
    assert precision.resolve("bf16", "cpu", "precision.sae", AMX).precision == "bf16"


def test_precision_eval_sets_the_evaluations_language_model_apart(monkeypatch):
    """precision.eval: `lm` (the default) plans what precision.lm alone plans, key for key; bf16 changes the baseline
    and evaluate stages' keys (autocast in their params) and no other; lm=bf16 with eval=fp32 keeps the evaluation
    in float32; bf16 on a CPU without bf16 units is refused in one line that names precision.eval."""
    from dmsae.config import load_config
    from flows.pipeline import plan

    config = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"

    def nodes(*sets: str) -> dict:
        return {n.label: n for n in plan(load_config(config, ["store=/nonexistent", *sets])).nodes}

    def keys(*sets: str) -> dict:
        return {label: n.key for label, n in nodes(*sets).items()}

    monkeypatch.setattr(precision, "native_bf16", lambda device, flags=None: (False, "no bf16 units"))
    with pytest.raises(UserError) as e:
        nodes("precision.eval=bf16")
    assert "\n" not in str(e.value) and str(e.value).startswith("precision.eval=bf16:")
    monkeypatch.setattr(precision, "native_bf16", lambda device, flags=None: (True, "AMX"))
    base = nodes()
    assert keys("precision.eval=lm") == keys()
    evaluation = nodes("precision.eval=bf16")
    changed = {n.stage for label, n in evaluation.items() if n.key != base[label].key}
    assert changed == {"baseline", "evaluate"}
    assert all(n.params["autocast"] == "bfloat16" for n in evaluation.values() if n.stage in changed)
    lm_only = nodes("precision.lm=bf16", "precision.eval=fp32")
    assert all("autocast" not in n.params for n in lm_only.values() if n.stage in ("baseline", "evaluate"))
    assert lm_only["harvest"].params["autocast"] == "bfloat16"
    assert keys("precision.lm=bf16", "precision.eval=bf16") == keys("precision.lm=bf16")

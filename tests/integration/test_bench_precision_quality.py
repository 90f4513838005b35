"""bench/precision_quality.py's failures in one line: a CPU without bf16 units is refused before anything runs,
and a run that fails (the real CLI in a subprocess) ends the script with one line naming the run."""

from __future__ import annotations

import os

import pytest

from bench import precision_quality
from dmsae.precision import native_bf16


@pytest.mark.skipif(native_bf16("cpu")[0], reason="this CPU has bf16 units: the script would run")
def test_refused_in_one_line_without_bf16_units(tmp_path, capsys):
    assert precision_quality.main(["--field", "lm", "--store", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no native bfloat16" in err and "--set device=cuda" in err
    assert not (tmp_path / "s").exists()


def test_a_failing_run_is_named_in_one_line():
    with pytest.raises(precision_quality.RunFailed, match="the precision-lm-bf16 run exited 2"):
        precision_quality.run(["name=precision-lm-bf16", "sae.no_such_key=1"], dict(os.environ))


def test_emulation_is_refused_for_the_sae_step(tmp_path, capsys):
    """The SAE step calls bf16 kernels outside autocast, which the emulation does not reach: refused, nothing run."""
    assert precision_quality.main(["--field", "sae", "--emulate", "--store", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--field lm" in err
    assert not (tmp_path / "s").exists()


EMULATION_CHECK = r"""
import threading, torch, torch.nn.functional as F
g = torch.Generator().manual_seed(0)
x, w, b = torch.randn(64, 96, generator=g) * 3, torch.randn(80, 96, generator=g), torch.randn(80, generator=g)
q = torch.randn(2, 3, 16, 8, generator=g)
with torch.autocast("cpu", dtype=torch.bfloat16):
    native = F.linear(x, w, b)  # the CPU's own bf16 kernel (bf16 units or a scalar fallback): fp32 sums
fp32_before = F.linear(x, w, b)
from bench import bf16_emulation
from dmsae import precision
bf16_emulation.install()
r = lambda t: t.bfloat16().float()
want = F.linear(r(x), r(w), r(b)).bfloat16()
assert torch.equal(F.linear(x, w, b), fp32_before), "float32 outside autocast is untouched"
got, grads = {}, {}
def step():  # another thread, as Prefect's task runner runs stages, with autograd through the op
    xg = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got["linear"] = F.linear(xg, w, b)
        got["sdpa"] = F.scaled_dot_product_attention(q, q, q, is_causal=True)
    got["linear"].float().pow(2).sum().backward()
    grads["x"] = xg.grad
t = threading.Thread(target=step); t.start(); t.join()
assert torch.equal(got["linear"], want)
# the same rounding as a bf16 unit: at most one step of bfloat16 from the CPU's own kernel (the sums' order)
ulp = 2.0 ** (torch.frexp(native.float().abs().clamp_min(1e-30)).exponent - 8)
assert bool(((got["linear"].float() - native.float()).abs() <= ulp).all())
want_sdpa = F.scaled_dot_product_attention(r(q), r(q), r(q), is_causal=True).bfloat16()
assert got["sdpa"].dtype == torch.bfloat16 and torch.equal(got["sdpa"], want_sdpa)
want_grad = (r(2 * want.float()) @ r(w)).bfloat16().float()  # d(sum y^2)/dx through the rounded matmul
assert torch.equal(grads["x"], want_grad)
assert precision.resolve("bf16", "cpu", "precision.lm").reason.endswith(bf16_emulation.REASON + ")")
print("ok")
"""


def test_emulation_computes_what_bf16_units_compute():
    """bench.bf16_emulation in a fresh process (it changes the dispatcher process-wide): under CPU autocast a
    linear and an attention equal the float32 op on bfloat16-rounded inputs, rounded, in any thread and through
    autograd, within one bfloat16 step of the CPU's own bf16 kernel; float32 is untouched; bf16 is accepted."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(precision_quality.__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", EMULATION_CHECK], cwd=repo, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_the_noise_floor_arm_changes_the_trainings_only(tmp_path):
    """`--noise-floor`'s third run: the fp32 arm with its learning rate moved in the last bits, so every SAE training
    (and what follows it) is computed again while the model, tokens, harvest and baseline are the fp32 arm's."""
    from dmsae.config import load_config
    from flows.pipeline import plan

    runs = precision_quality.arms("sae", str(tmp_path / "s"), [])
    nudged = precision_quality.nudged(runs["fp32"], "sae", 2)
    base, moved = (load_config(precision_quality.CONFIG, sets) for sets in (runs["fp32"], nudged))
    assert moved.train.lr != base.train.lr
    assert moved.train.lr == base.train.lr * (1 + 2 * precision_quality.NUDGE)
    assert moved.name != base.name
    keys = [{n.label: (n.stage, n.key) for n in plan(cfg).nodes} for cfg in (base, moved)]
    assert keys[0].keys() == keys[1].keys()
    for label, (stage, key) in keys[0].items():
        if stage in ("model", "tokens", "harvest", "baseline"):
            assert keys[1][label][1] == key, label
        elif stage in ("train", "reuse"):
            assert keys[1][label][1] != key, label


def test_a_negative_noise_floor_is_refused_in_one_line(tmp_path, capsys):
    assert precision_quality.main(["--noise-floor", "-1", "--store", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--noise-floor" in err
    assert not (tmp_path / "s").exists()

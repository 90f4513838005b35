"""The fused value gradients in MKL's AVX2 dot order, the one a CPU without AVX-512 (an AMD EPYC, say) gets from
MKL: on an Intel CPU with AVX-512, MKL told to stop at AVX2 must be found to use it, and the weight-gradient kernel
then gives torch's bits (tests/unit/test_native.py's comparison, run again in a process where MKL runs AVX2)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dmsae import native

UNIT = Path(__file__).resolve().parents[1] / "unit" / "test_native.py"


def intel_avx512() -> bool:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "GenuineIntel" in info and " avx512f" in info


@pytest.mark.skipif(native.compiler() is None, reason="no C compiler on this machine (set CC)")
@pytest.mark.skipif(not intel_avx512(), reason="MKL takes MKL_ENABLE_INSTRUCTIONS on an Intel CPU with AVX-512")
def test_value_grads_in_mkl_avx2_order(tmp_path):
    env = dict(os.environ, MKL_ENABLE_INSTRUCTIONS="AVX2", XDG_CACHE_HOME=str(tmp_path))
    code = "from dmsae import native; print(native.dot_order(576), native.dot_order(96))"
    found = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert found.stdout.split() == ["8", "8"], found.stdout + found.stderr[-2000:]
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           f"{UNIT}::test_latent_grads_with_value_grads_equal_torchs"],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0 and "skipped" not in done.stdout, done.stdout[-3000:]

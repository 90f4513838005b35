"""Which arithmetic a device gets: `precision: auto` resolved by a measured rule, and bf16 refused where the
device has no native bfloat16.

The rule (BENCHMARKS.md, "Precision" and "Anchors on an AMD EPYC"): a CPU with AMX (`amx_bf16`) or with
AVX512-BF16 (`avx512_bf16`) runs bfloat16 matmuls in hardware. A bfloat16 matmul of the encoder's shape ran 4.5-7.7x
faster than float32 on an Intel Xeon with AMX and 2.6x on an AMD EPYC (Zen 4) with avx512_bf16 alone, and the SAE
step 1.6-1.8x and 1.9x. CPUs with neither emulate bfloat16 and gain nothing, so auto keeps float32 there. On CUDA,
auto picks bf16 where `torch.cuda.is_bf16_supported()` (Ampere and later).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

from dmsae.errors import UserError


@cache
def cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return frozenset(line.split(":", 1)[-1].split())


def native_bf16(device: str, flags: frozenset[str] | None = None) -> tuple[bool, str]:
    """Whether `device` runs bfloat16 matmuls natively, and the evidence in words (`flags`: the CPU's, read from
    /proc/cpuinfo unless given)."""
    if device.startswith("cuda"):
        import torch

        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return ok, "this GPU supports bfloat16" if ok else "this GPU has no bfloat16"
    flags = cpu_flags() if flags is None else flags
    if "amx_bf16" in flags:
        return True, "the CPU has AMX (amx_bf16)"
    if "avx512_bf16" in flags:
        return True, "the CPU has AVX512-BF16 (avx512_bf16)"
    return False, "the CPU has no native bfloat16 (neither amx_bf16 nor avx512_bf16)"


@dataclass(frozen=True)
class Resolved:
    precision: str  # fp32 | bf16
    reason: str


def resolve(setting: str, device: str, field: str, flags: frozenset[str] | None = None) -> Resolved:
    """`setting` (auto | fp32 | bf16) on `device`; bf16 asked for on a device without it is refused in one line
    rather than run emulated (many times slower) or silently replaced by fp32 (another key, other numbers)."""
    if setting == "fp32":
        return Resolved("fp32", f"{field}=fp32 in the config")
    native, why = native_bf16(device, flags)
    if setting == "bf16":
        if not native:
            raise UserError(f"{field}=bf16: {why} on {device}; use {field}=auto (fp32 here) or fp32")
        return Resolved("bf16", f"{field}=bf16 in the config ({why})")
    return Resolved("bf16" if native else "fp32", f"{field}=auto: {why}")

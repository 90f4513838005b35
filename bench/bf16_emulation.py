"""bfloat16 autocast emulated at float32 speed, to measure bf16's quality cost on a CPU without bf16 units.

Such a CPU runs a bfloat16 matmul through a scalar fallback (94x slower than float32 at the encoder's shape here),
so `precision.lm=bf16` is refused there. What a bf16 unit computes is known, though: the product of two bfloat16
numbers is exact in float32, the sums run in float32, and the result is rounded to bfloat16. `install()` replaces
the CPU autocast kernels of the matmul ops (linear, matmul, mm, addmm, bmm, baddbmm, addbmm and
scaled_dot_product_attention) with exactly that: inputs rounded to the autocast type, the op in float32 on the
rounded values, the output rounded. Only the order of the float32 sums differs from the hardware (and, in
attention, the hardware's rounding of the probabilities before their product with V), which is the size of the
difference between two float32 CPUs. Autograd runs through the same float32 ops, so the backward's inputs and
outputs are rounded the same way. Ops outside autocast's bf16 list (norms, softmax, losses) run as they do with
bf16 units: in float32.

    .venv/bin/python -m bench.bf16_emulation ARGS...   # `python -m flows.cli ARGS...` with the emulation

For benchmarks only (bench.precision_quality --emulate); the library never loads it.
"""

from __future__ import annotations

import runpy
import sys
from collections.abc import Callable
from typing import Any

import torch

REASON = "bfloat16 emulated in float32 (bench.bf16_emulation)"
_LIBRARY: list[torch.library.Library] = []  # kept alive: a Library's registrations end when it is collected


def _round(t: Any, dtype: torch.dtype) -> Any:
    """What autocast would hand the op (float32 tensors cast to `dtype`), as float32 values for the float32 op."""
    if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64:
        return t.to(dtype).float()
    return t


def _emulated(op: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def kernel(*args: Any, **kwargs: Any) -> torch.Tensor:
        dtype = torch.get_autocast_dtype("cpu")
        args = tuple(_round(a, dtype) for a in args)
        kwargs = {k: _round(v, dtype) for k, v in kwargs.items()}
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)):
            return op(*args, **kwargs).to(dtype)
    return kernel


OPS: dict[str, Callable[..., torch.Tensor]] = {
    "linear": torch.ops.aten.linear.default,
    "matmul": torch.ops.aten.matmul.default,
    "mm": torch.ops.aten.mm.default,
    "addmm": torch.ops.aten.addmm.default,
    "bmm": torch.ops.aten.bmm.default,
    "baddbmm": torch.ops.aten.baddbmm.default,
    "addbmm": torch.ops.aten.addbmm.default,
    "scaled_dot_product_attention": torch.ops.aten.scaled_dot_product_attention.default,
}


def install() -> None:
    """Emulate bf16 units in this process (every thread) and let `dmsae.precision` accept bf16 on the CPU."""
    if _LIBRARY:
        return
    import warnings

    from dmsae import precision

    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    missing = [name for name in OPS if not has_kernel(f"aten::{name}", "AutocastCPU")]
    if missing:  # this torch does not autocast them: overriding would cast where the hardware would not
        raise RuntimeError(f"bench.bf16_emulation: no CPU autocast kernel for {', '.join(missing)} in torch "
                           f"{torch.__version__}; update OPS to this torch's autocast list")
    lib = torch.library.Library("aten", "IMPL")
    with warnings.catch_warnings():  # "overriding a previously registered kernel": the point
        warnings.simplefilter("ignore")
        for name, op in OPS.items():
            lib.impl(name, _emulated(op), "AutocastCPU")
    _LIBRARY.append(lib)
    native = precision.native_bf16

    def emulated_native(device: str, flags: frozenset[str] | None = None) -> tuple[bool, str]:
        return (True, REASON) if not device.startswith("cuda") else native(device, flags)

    precision.native_bf16 = emulated_native


def main() -> None:
    install()
    sys.argv = ["flows.cli", *sys.argv[1:]]
    runpy.run_module("flows.cli", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()

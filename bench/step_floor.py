"""A lower bound of the bf16 training step on this CPU, measured: the 16-bit encoder matmul plus what the step's
unavoidable memory traffic costs at the bandwidth this CPU gives, as if every pass after the matmul were fused
and bound by nothing but its bytes. It answers whether the step can reach 3x its matmul (issue 25) here at all.

    .venv/bin/python -m bench.step_floor [--threads N]

At the bench shape (batch 4096, d 576, width 4096, k 32, four Matryoshka groups) the step must at least: run the
matmul; read the [4096, 4096] 16-bit pre-activations once to select k x B entries; gather one 16-bit decoder row
per entry for the residuals and write the residuals (float32) and their 16-bit copy; gather one gradient row and
one input row per entry for the weight gradients; read the gradients once for the clipping norm; and run Adam
over the float32 master weights (torch's fused kernel, itself bound by its bytes). Reads of rows use a small C
loop (bench/step_floor.c, built as dmsae/native builds its kernels); the rest are torch's own calls. Medians of
31 after three warm-ups. A second table times the three sparse passes done instead as dense 16-bit products (the
code stored dense), each the size of the encoder's.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from dmsae import memory, native

B, D, WIDTH, K, GROUPS = 4096, 576, 4096, 32, 4
SOURCE = Path(__file__).with_name("step_floor.c")


def median_ms(fn: Callable[[], object], repeats: int = 31) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def read_rows(threads: int) -> Callable[[torch.Tensor, torch.Tensor], int]:
    """The C reader of bench/step_floor.c: (table, idx) -> the wrapping sum of table's rows at idx."""
    errors = []
    for flags in native.flag_sets():
        try:
            fn = ctypes.CDLL(str(native.build(SOURCE, flags))).dmsae_floor_read_rows
            break
        except (OSError, RuntimeError) as e:
            errors.append(str(e))
    else:
        raise SystemExit(f"step_floor: bench/step_floor.c did not build ({errors[-1]})")
    fn.restype = ctypes.c_uint64
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
    return lambda table, idx: fn(table.data_ptr(), idx.data_ptr(), idx.numel(), table.shape[1], threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, not {args.threads}")
    torch.set_num_threads(args.threads)
    memory.keep_freed_heap()  # as train_sae runs the step (and the anchors time the matmul after it)
    gen = torch.Generator().manual_seed(0)
    n = B * K
    rows = read_rows(args.threads)
    x, w = torch.randn(B, D, generator=gen).bfloat16(), torch.randn(D, WIDTH, generator=gen).bfloat16()
    pre = torch.empty(B, WIDTH, dtype=torch.bfloat16)
    table = torch.randint(0, 1 << 15, ((GROUPS + 1) * B, D), generator=gen, dtype=torch.int16)
    decoder_rows = torch.randint(0, 1 << 15, (WIDTH, D), generator=gen, dtype=torch.int16)
    out, low = torch.empty(GROUPS + 1, B, D), torch.empty(GROUPS + 1, B, D, dtype=torch.bfloat16)
    params = [torch.nn.Parameter(torch.randn(*s, generator=gen)) for s in ((D, WIDTH), (WIDTH, D), (WIDTH,), (D,))]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    adam = torch.optim.Adam(params, lr=1e-4, fused=True)
    in_order = torch.arange(B * WIDTH // 512)
    latents, bags, tokens = (torch.randint(0, high, (n,), generator=gen) for high in (WIDTH, (GROUPS + 1) * B, B))
    parts = [
        ("one read of the 16-bit pre-activations (the selection)",
         lambda: rows(pre.view(torch.int16).view(-1, 512), in_order)),
        ("one 16-bit decoder row per entry (the residuals' gather)",
         lambda: rows(decoder_rows, latents)),
        ("the residuals written, float32 and their 16-bit copy", lambda: (out.zero_(), low.zero_())),
        ("one 16-bit gradient row per entry (the decoder gradient's gather)",
         lambda: rows(table, bags)),
        ("one 16-bit input row per entry (the encoder gradient's gather)",
         lambda: rows(x.view(torch.int16), tokens)),
        ("the gradients' norm (clipping)", lambda: torch.nn.utils.get_total_norm([p.grad for p in params])),
        ("Adam on the float32 master weights (torch's fused kernel)", adam.step),
    ]
    # the product into a reused output (what the step does) and into a fresh one (bench/train.py's `a @ b`, which
    # pays the output's page faults where the heap has not grown to hold it yet: 6 against 9-13 ms here)
    matmul = median_ms(lambda: torch.mm(x, w, out=pre))
    fresh = median_ms(lambda: x @ w)
    timed = [(label, median_ms(fn)) for label, fn in parts]
    rest = sum(ms for _, ms in timed)
    print(f"| part of the bf16 step ({args.threads} threads) | ms |\n|---|---:|")
    print(f"| the 16-bit encoder matmul [4096x576]@[576x4096] into a reused output (a fresh one: {fresh:.2f}) "
          f"| {matmul:.2f} |")
    for label, ms in timed:
        print(f"| {label} | {ms:.2f} |")
    print(f"| **the floor after the matmul: all but the first row** | **{rest:.2f}** |")
    print(f"\nA step at 3x its matmul leaves 2x the matmul ({2 * matmul:.1f} ms here) for all it does after it;"
          f" the floor of that is {rest:.1f} ms, {rest / matmul:.2f}x the matmul: the step's floor is"
          f" {1 + rest / matmul:.2f}x.")
    # The sparse passes as dense 16-bit products instead (the code [B, width] stored dense, 99 % zeros, and its
    # transpose written as such: a transposed view as an operand took oneDNN 2-3x as long): each is a product of the
    # encoder's size, so on a CPU whose matmul is this fast it costs more than the gathers do.
    code, code_t = torch.zeros(B, WIDTH, dtype=torch.bfloat16), torch.zeros(WIDTH, B, dtype=torch.bfloat16)
    grad_rows, x_t, w_dec = table[:B].view(torch.bfloat16), x.T.contiguous(), w.T.contiguous()
    x_out, dec_out, enc_out = (torch.empty(*s, dtype=torch.bfloat16) for s in ((B, D), (WIDTH, D), (D, WIDTH)))
    dense = [
        ("the residuals: code @ W_dec", lambda: torch.mm(code, w_dec, out=x_out)),
        ("the decoder gradient: code.T @ the output gradient", lambda: torch.mm(code_t, grad_rows, out=dec_out)),
        ("the encoder gradient: x.T @ the pre-activations' gradient", lambda: torch.mm(x_t, code, out=enc_out)),
    ]
    print(f"\n| the sparse passes as dense 16-bit products, operands contiguous ({args.threads} threads) | ms |\n"
          "|---|---:|")
    for label, fn in dense:
        print(f"| {label} | {median_ms(fn):.2f} |")


if __name__ == "__main__":
    main()

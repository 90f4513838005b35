"""Where the train stage's step spends its time, part by part, at the bench shape: the counterpart of
bench/step_floor.py, which measures what each part must cost at the least.

    .venv/bin/python -m bench.step_phases [--precision fp32|bf16] [--steps N] [--threads N]

Trains the bench's no-core SAE (batch 4096, d 576, width 4096, k 32) through `dmsae.training.train_sae` on the bench
store's harvest (the rows the anchors' full mode trains on; made on the first run), with the step's parts and the
loop's wrapped in timers, and prints each part's median milliseconds over the steps after the first five, largest
first. The encoder matmul and the glue between the parts are what `train_step` spends beyond its timed parts.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from dmsae import native, sparse_step, training
from dmsae.sae import MatryoshkaSAE

SKIP = 5  # the first steps allocate Adam's state and the step's buffers
STEP_PARTS = ("joint_topk", "sort_entries", "aux_entries", "by_latent", "biased_operands", "entry_and_weight_grads",
              "core_and_b_dec_grads")
NATIVE_PARTS = ("group_bag_sums", "latent_grads_f32", "latent_grads_bf16", "suffix_sums_f32")
LOOP_PARTS = ((MatryoshkaSAE, "project_decoder_grads"), (MatryoshkaSAE, "normalize_decoder"),
              (torch.optim.Adam, "step"))


@contextlib.contextmanager
def timed_parts() -> Iterator[dict[str, float]]:
    """While open, the step's and the loop's parts add their seconds to the returned dict (name -> seconds since
    the caller last cleared it); the originals are put back on exit."""
    spent: dict[str, float] = defaultdict(float)
    saved: list[tuple[Any, str, Any]] = []

    def wrap(owner: Any, name: str, label: str) -> None:
        fn = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[label] += time.perf_counter() - start

        saved.append((owner, name, fn))
        setattr(owner, name, timed)

    for name in STEP_PARTS:
        wrap(sparse_step, name, name)
    for name in NATIVE_PARTS:
        wrap(native, name, f"native.{name}")
    for owner, name in LOOP_PARTS:
        wrap(owner, name, "adam" if owner is torch.optim.Adam else name)
    wrap(torch.nn.utils, "clip_grad_norm_", "clip_grad_norm_")
    wrap(training, "update_stats_sparse", "update_stats_sparse")
    try:
        yield spent
    finally:
        for owner, name, fn in reversed(saved):
            setattr(owner, name, fn)


def phase_times(sae: MatryoshkaSAE, batches: list[torch.Tensor], precision: str) -> dict[str, float]:
    """Median milliseconds per step of each part, of `train_step` ("step") and of the loop's whole step ("loop"),
    over the steps after the first SKIP of one `train_sae` run on `batches`."""
    from bench.train import train_params

    per_step: dict[str, list[float]] = defaultdict(list)
    steps = len(batches)

    with timed_parts() as spent:
        def step(sae: MatryoshkaSAE, x: torch.Tensor) -> Any:
            start = time.perf_counter()
            try:
                return sparse_step.train_step(sae, x)
            finally:
                spent["step"] += time.perf_counter() - start

        def stream() -> Iterator[torch.Tensor]:
            for x in batches:
                yield x
                # the next batch is asked for when a step has finished: close that step's books
                for name in list(spent):
                    per_step[name].append(spent[name])
                    spent[name] = 0.0
                per_step["loop"].append(time.perf_counter() - marks[-1])
                marks.append(time.perf_counter())

        marks = [time.perf_counter()]
        training.train_sae(sae, stream(), steps, train_params(steps, precision), step_fn=step)
    return {name: statistics.median(times[SKIP:]) * 1000 for name, times in per_step.items() if len(times) > SKIP}


def bench_batches(steps: int) -> list[torch.Tensor]:
    """`steps` batches of the bench's rows, drawn as bench/train.py draws them (its seed, without the held-out
    rows)."""
    from bench.common import FULL, REPO, Context
    from bench.train import BATCH, pool_rows

    ctx = Context(mode=FULL, device="cpu", threads=torch.get_num_threads(), work=REPO / "bench" / "work",
                  quickstart_store=REPO / "artifacts")  # the full mode reads neither folder: the bench store
    pool, _, _ = pool_rows(ctx)
    rng = np.random.default_rng(0)
    rows = torch.from_numpy(pool)
    return [rows[torch.from_numpy(rng.choice(rows.shape[0], BATCH, replace=False))] for _ in range(steps)]


def table(times: dict[str, float], precision: str, threads: int) -> str:
    parts = {k: v for k, v in times.items() if k not in ("step", "loop")}
    # float32 (and bf16 without its kernel): by_latent and the gradient kernel run within entry_and_weight_grads
    nested = {"by_latent", "native.latent_grads_f32"} if "entry_and_weight_grads" in parts else set()
    inside = sum(v for k, v in parts.items() if (k in STEP_PARTS or k.startswith("native.")) and k not in nested)
    lines = [f"| part of the {precision} step in the loop ({threads} threads) | ms |", "|---|---:|"]
    lines += [f"| {name}{' (within entry_and_weight_grads)' if name in nested else ''} | {ms:.2f} |"
              for name, ms in sorted(parts.items(), key=lambda t: -t[1])]
    lines.append(f"| train_step beyond its timed parts (the encoder matmul and the glue) | "
                 f"{times['step'] - inside:.2f} |")
    lines.append(f"| **train_step** / **the loop's step** | **{times['step']:.2f}** / **{times['loop']:.2f}** |")
    return "\n".join(lines)


def main(argv: list[str] | None = None, batches: Callable[[int], list[torch.Tensor]] = bench_batches) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, not {args.threads}")
    if args.steps <= SKIP:
        parser.error(f"--steps must be more than {SKIP} (the first {SKIP} are not counted), not {args.steps}")
    torch.set_num_threads(args.threads)
    from bench.train import D, sae_params

    data = batches(args.steps)
    sae = training.build_sae(sae_params(), D, None, 0)
    with torch.no_grad():
        sae.b_dec.copy_(data[0].mean(0))
    text = table(phase_times(sae, data, args.precision), args.precision, args.threads)
    print(text)
    return text


if __name__ == "__main__":
    main()

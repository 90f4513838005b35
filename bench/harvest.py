"""1. Harvest: the harvest stage's tokens/s against a bare truncated forward (the ceiling) and against
a full forward with output_hidden_states=True (the common way), over the same windows; and the same stage with
the language model in bf16 (`precision.lm: bf16`, the pipeline's `autocast: bfloat16` param, activations stored
in float16) against a bare bf16 truncated forward and against the fp32 harvest, with the bytes each stores."""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import (
    LAYER,
    LM_BATCH,
    Context,
    FakeArtifact,
    Row,
    bf16_measured,
    bf16_not_measured,
    lm_autocast,
    log,
    median,
    sync,
    time_call,
    write_windows,
)
from dmsae import activations, harvesting, lm, precision, readers
from dmsae.runtime import Runtime
from stages import harvest as harvest_stage

STAGE_PARAMS = {"layer": LAYER, "chunk_rows": 4096, "store_dtype": "float32", "dtype": "float32",
                "outlier_factor": 10.0}  # plus "autocast" on CUDA, as the pipeline plans it


def run_stage(model: torch.nn.Module, model_art: Any, tokens: FakeArtifact, out: Path, device: str,
              overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The real harvest stage function, as `materialize` calls it (partial folder for its resumable state),
    with the model already loaded: loading is a once-per-stage cost, timed separately. `overrides`: params that
    differ from the planned fp32 harvest (a bf16 variant's `autocast` and `store_dtype`); the model must have
    been loaded with the same autocast, since the stage's own load is bypassed."""
    if out.exists():
        shutil.rmtree(out)
    partial = out.parent / (out.name + "-partial")
    if partial.exists():
        shutil.rmtree(partial)
    out.mkdir(parents=True)
    rt = Runtime(device=device, show_progress=False, checkpoint_dir=partial, args={"batch_size": LM_BATCH},
                 label="harvest")
    original = harvest_stage.lm.load_model
    harvest_stage.lm.load_model = lambda *_a, **_k: model  # type: ignore[assignment]
    try:
        autocast = lm_autocast(device)
        params = STAGE_PARAMS | ({"autocast": autocast} if autocast else {}) | (overrides or {})
        params = {k: v for k, v in params.items() if v is not None}  # autocast None: a plain float32 forward
        return harvest_stage.run(out, params, {"model": model_art, "tokens": tokens}, rt)
    finally:
        harvest_stage.lm.load_model = original  # type: ignore[assignment]
        shutil.rmtree(partial, ignore_errors=True)


def host_side_seconds(rows: np.ndarray, n_batches: int, store_dtype: str, work: Path,
                      parts: dict[str, float] | None = None) -> float:
    """The harvest's host side alone: `rows` (a harvest's float32 output) handed over in `n_batches` batches to
    the stage's own BatchStore on a thread of its own, as a GPU harvest runs it (sums, cast, chunk writes, resumable
    state), with no forward: the rate a harvest could reach on a device whose forward cost nothing. `parts`, if
    given, receives the seconds of each part of that work (BatchStore.seconds, plus the last write that `close`
    makes)."""
    shutil.rmtree(work, ignore_errors=True)
    partial = work / "partial"
    partial.mkdir(parents=True)
    array = activations.create(work / activations.ARRAY, rows.shape[0], rows.shape[1], STAGE_PARAMS["chunk_rows"],
                               store_dtype)
    writer = activations.ChunkWriter(array, flush_chunks=harvesting.flush_chunks(array))
    rt = Runtime(show_progress=False, checkpoint_dir=partial)
    store = harvesting.BatchStore(writer, partial, rt, store_dtype, [])
    pieces = [torch.from_numpy(p) for p in np.array_split(rows, n_batches)]
    t0 = time.perf_counter()
    host = harvesting.HostSide(store)
    for i, kept in enumerate(pieces):
        host.put(i, kept, math.inf)
    host.close()
    t1 = time.perf_counter()
    writer.close()
    store.remove_state()
    seconds = time.perf_counter() - t0
    if parts is not None:
        parts.update(store.seconds, **{"last write": time.perf_counter() - t1})
    shutil.rmtree(work, ignore_errors=True)
    return seconds


def host_side_row(out: Path, n_batches: int, store_dtype: str, bare_tps: float, repeats: int, work: Path,
                  label: str) -> Row:
    array = activations.open_array(out / activations.ARRAY)
    rows = np.asarray(array[:], dtype=np.float32)
    runs = []
    for _ in range(repeats):
        parts: dict[str, float] = {}
        runs.append((host_side_seconds(rows, n_batches, store_dtype, work, parts), parts))
    seconds, parts = sorted(runs, key=lambda r: r[0])[len(runs) // 2]  # the median run, with its own split
    split = ", ".join(f"{name} {1000 * s / n_batches:.1f}" for name, s in parts.items())
    tps = rows.shape[0] / seconds
    return Row(f"host side alone ({label}): sums, cast, chunk writes, state, no forward", tps, "tokens/s",
               "bare forward", bare_tps, tps / bare_tps,
               note=f"{n_batches} batches on the writer thread a GPU harvest uses, "
                    f"{1000 * seconds / n_batches:.1f} ms a batch "
                    f"(ms a batch: {split}), "
                    f"{harvesting.flush_chunks(array)} chunks a write "
                    "here; below 1x, a harvest on this device waits for its host side")


# precision.lm=bf16 as the plan passes it to the stage (`autocast`), with the activations stored in 16 bits:
# float16, the store_dtype the config offers (10 mantissa bits against bfloat16's 7, and the residual's range
# fits it); and the plain float32 harvest it is compared with
BF16 = {"autocast": "bfloat16", "store_dtype": "float16"}
FP32 = {"autocast": None, "store_dtype": "float32"}


def stored_bytes(out: Path) -> int:
    """Bytes of the stage's activation array on disk (Zarr chunks, Blosc/zstd-compressed, and metadata)."""
    return sum(f.stat().st_size for f in (out / activations.ARRAY).rglob("*") if f.is_file())


MISMATCH = 0.5  # a relative row error this large is another token, not a rounding (bf16's is about 1 % here)
MAX_SKIP = 8  # the most rows in a row that `common_rows` looks past, on both sides together


def common_rows(x: np.ndarray, y: np.ndarray, max_dropped: int = 64) -> tuple[np.ndarray, np.ndarray] | None:
    """The rows two harvests of the same windows both kept, paired: each kept them in order, but its outlier filter
    (the threshold comes from its own first batch) may have dropped a few rows the other kept. Walking both, the
    first pair further apart than MISMATCH marks rows one or both dropped: the fewest skipped that make a pair
    match again. None when no skip of up to MAX_SKIP rows does, or when more than `max_dropped` gaps are met."""
    pairs_x, pairs_y = [], []
    i = j = skipped = 0

    def rel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.linalg.norm(b - a, axis=-1) / np.maximum(np.linalg.norm(a, axis=-1), 1e-30)

    while i < len(x) and j < len(y):
        n = min(len(x) - i, len(y) - j)
        bad = np.flatnonzero(rel(x[i:i + n], y[j:j + n]) > MISMATCH)
        run = n if bad.size == 0 else int(bad[0])
        pairs_x.append(np.arange(i, i + run))
        pairs_y.append(np.arange(j, j + run))
        i, j = i + run, j + run
        if run == n:
            break
        skipped += 1
        if skipped > max_dropped:
            return None
        # the fewest rows skipped on the two sides together (a + b) that make the next pair match
        skip = next(((a, total - a) for total in range(1, MAX_SKIP + 1) for a in range(total + 1)
                     if i + a < len(x) and j + total - a < len(y) and rel(x[i + a], y[j + total - a]) <= MISMATCH),
                    None)
        if skip is None:
            return None
        i, j = i + skip[0], j + skip[1]
    if len(x) + len(y) - 2 * sum(map(len, pairs_x)) > 2 * max_dropped:
        return None
    return np.concatenate(pairs_x), np.concatenate(pairs_y)


def row_errors(a: Path, b: Path) -> tuple[float, float, int, int] | None:
    """Median and 99th percentile over rows of ||b - a|| / ||a|| for two harvests of the same windows, over the rows
    both kept (`common_rows`), with how many those are and how many only one of them kept; None when they cannot
    be paired."""
    x = activations.open_array(a / activations.ARRAY)[:].astype(np.float64)
    y = activations.open_array(b / activations.ARRAY)[:].astype(np.float64)
    pairs = common_rows(x, y)
    if pairs is None:
        return None
    xi, yi = pairs
    rel = np.linalg.norm(y[yi] - x[xi], axis=1) / np.maximum(np.linalg.norm(x[xi], axis=1), 1e-30)
    return float(np.median(rel)), float(np.quantile(rel, 0.99)), len(xi), len(x) + len(y) - 2 * len(xi)


def run(ctx: Context) -> list[Row]:
    mode, device = ctx.mode, ctx.device
    model_art, tokens_art = ctx.shared["model"], ctx.shared["tokens"]
    bos = int(tokens_art.metrics["bos_id"])
    all_windows = readers.token_windows(tokens_art, "train")
    n_win = min(all_windows.shape[0], mode.harvest_batches * LM_BATCH)
    windows = all_windows[:n_win]
    batches = [windows[i:i + LM_BATCH].long().to(device) for i in range(0, n_win, LM_BATCH)]
    n_tokens = int(windows.numel())
    tokens = write_windows(ctx.work / "harvest-tokens", windows, bos)
    planned = lm_autocast(device)  # None on the CPU (float32); bfloat16 on CUDA, as the pipeline plans it
    load_s = time_call(lambda: lm.load_model(model_art.path, device, "float32", planned), device)
    model = lm.load_model(model_art.path, device, "float32", planned)
    with16 = bf16_measured(device)[0]
    model16 = lm.load_model(model_art.path, device, "float32", BF16["autocast"]) if with16 else None
    # the float32 harvest: the planned one on the CPU; on CUDA, where the plan runs bf16, a model of its own
    model32 = model if planned is None else lm.load_model(model_art.path, device, "float32", None)
    n_layers = lm.num_layers(model)

    def bare_of(m: torch.nn.Module) -> Any:
        def bare() -> None:
            for ids in batches:
                lm.residual_upto(m, ids, LAYER)
        return bare

    @torch.no_grad()
    def full() -> None:
        for ids in batches:
            with lm.autocast(model):
                out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
            out.hidden_states[LAYER + 1]  # hidden_states[0] is the embedding output

    outs = {"stage": ctx.work / "harvest-out", "stage16": ctx.work / "harvest-out-bf16",
            "stage32": ctx.work / "harvest-out-fp32"}
    metrics: dict[str, Any] = {}

    def stage_of(m: torch.nn.Module, name: str, overrides: dict[str, Any] | None) -> Any:
        def stage() -> None:
            got = run_stage(m, model_art, tokens, outs[name], device, overrides)
            if name == "stage":
                metrics.update(got)
        return stage

    fns = {"bare": bare_of(model), "stage": stage_of(model, "stage", None), "full": full}
    if model16 is not None:
        fns |= {"bare16": bare_of(model16), "stage16": stage_of(model16, "stage16", BF16)}
    if model32 is not model:
        fns |= {"bare32": bare_of(model32), "stage32": stage_of(model32, "stage32", FP32)}
    key32 = {"bare": "bare32" if "bare32" in fns else "bare", "stage": "stage32" if "stage32" in fns else "stage"}

    log(f"harvest: {len(batches)} batches of {LM_BATCH}x{windows.shape[1]} tokens, {mode.harvest_repeats} repeats, "
        f"fp32{' and bf16' if with16 else ''}")
    for m in {id(x): x for x in (model, model16, model32) if x is not None}.values():
        lm.residual_upto(m, batches[0], LAYER)  # warm-up (allocator, kernels; bf16's oneDNN primitives)
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(mode.harvest_repeats):  # interleaved, so slow phases of a shared machine hit every variant
        # in an order rotated each pass: a variant is not always timed right after the same one (the full forward
        # leaves a large heap behind, which the next variant refills or trims)
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(time_call(fns[name], device))
    ctx.shared["harvest_out"] = outs["stage"]
    ctx.shared["harvest_metrics"] = metrics
    tps = {k: n_tokens / median(v) for k, v in times.items()}
    spread = {k: f"{min(v):.2f}-{max(v):.2f} s" for k, v in times.items()}
    r_bare = tps["stage"] / tps["bare"]
    r_full = tps["stage"] / tps["full"]
    stage_with_load = n_tokens / (median(times["stage"]) + load_s)
    rows = [
        Row("harvest stage (stages.harvest.run, Zarr + resumable state)", tps["stage"], "tokens/s",
            note=f"{n_tokens} tokens ({metrics.get('n_tokens')} stored), runs {spread['stage']}"),
        Row("vs bare truncated forward, layers 0..15, no storage (ceiling)", tps["stage"], "tokens/s",
            "bare forward", tps["bare"], r_bare, ">= 0.9x", r_bare >= 0.9, note=f"runs {spread['bare']}"),
        Row(f"vs full forward ({n_layers} layers + head), output_hidden_states=True", tps["stage"], "tokens/s",
            "full forward", tps["full"], r_full, ">= 1.8x", r_full >= 1.8, note=f"runs {spread['full']}"),
        Row("harvest stage including the model load", stage_with_load, "tokens/s", "bare forward", tps["bare"],
            stage_with_load / tps["bare"],
            note=f"model load {load_s:.2f} s, once per stage, amortised over a real harvest"),
    ]
    rows.append(host_side_row(outs["stage"], len(batches), "float32", tps["bare"], mode.harvest_repeats,
                              ctx.work / "host-side", "float32 stored"))
    if not with16:
        return [*rows, bf16_not_measured("harvest stage, LM in bf16", device)]
    rows16 = bf16_rows(tps, spread, key32, outs, device)
    rows16.append(host_side_row(outs["stage16"], len(batches), "float16", tps["bare16"], mode.harvest_repeats,
                                ctx.work / "host-side", "float16 stored"))
    return rows + rows16


def bf16_rows(tps: dict[str, float], spread: dict[str, str], key32: dict[str, str], outs: dict[str, Path],
              device: str) -> list[Row]:
    """The harvest with `precision.lm: bf16` against its own ceiling and against the float32 harvest."""
    native, why = precision.native_bf16(device)
    r16 = tps["stage16"] / tps["bare16"]
    speed = tps["stage16"] / tps[key32["stage"]]
    bare_speed = tps["bare16"] / tps[key32["bare"]]
    b32, b16 = stored_bytes(outs[key32["stage"]]), stored_bytes(outs["stage16"])
    err = row_errors(outs[key32["stage"]], outs["stage16"])
    err_note = ("the two harvests' rows could not be paired" if err is None else
                f"per row ||bf16 - fp32|| / ||fp32||: median {err[0]:.4f}, 99th percentile {err[1]:.4f} over the "
                f"{err[2]} rows both kept ({err[3]} kept by one only: the outlier filter)")
    return [
        Row("harvest stage, LM in bf16 (autocast bfloat16, float16 stored)", tps["stage16"], "tokens/s",
            "bare bf16 truncated forward, layers 0..15", tps["bare16"], r16, ">= 0.9x", r16 >= 0.9,
            note=f"runs {spread['stage16']} and {spread['bare16']}; {why}"),
        Row("bf16 harvest vs the fp32 harvest (float32 stored): speed-up", tps["stage16"], "tokens/s",
            "fp32 harvest stage", tps[key32["stage"]], speed,
            note=f"bare forwards alone: bf16 {bare_speed:.2f}x fp32"
                 + ("" if native else "; not native bf16 by dmsae.precision's rule")),
        Row("activations on disk, bf16 harvest (float16) vs fp32 harvest (float32)", b16 / 1e6, "MB",
            "fp32 harvest's array", b32 / 1e6, b16 / b32,
            note=f"Zarr, Blosc {activations.DEFAULT_COMPRESSION} (the stage's default codec); saved "
                 f"{(b32 - b16) / 1e6:.1f} MB "
                 f"({1 - b16 / b32:.0%}); {err_note}"),
    ]

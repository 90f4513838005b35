"""2. SAE training: the train stage's step (`dmsae.training.train_sae` around `dmsae.sparse_step.train_step`)
against SAELens's and dictionary_learning's Matryoshka BatchTopK trainers, EleutherAI's sparsify and a plain
dense PyTorch step, on identical batches of the same harvested activations, compared at equal steps by
held-out FVU; and the step against one bare encoder matmul of the same shape, timed in the same run. Each
comparison of `PRECISIONS` is made in one precision on both sides: fp32, and bf16 (the dmsae step with
`precision.sae=bf16`, the anchors under bfloat16 autocast as their trainers run it)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import (
    ANCHOR_PYTHON,
    LAYER,
    REPO,
    Context,
    Row,
    bf16_measured,
    bf16_not_measured,
    lm_autocast,
    log,
    materialize_inputs,
    median,
    repeat,
    sync,
)
from dmsae import activations, precision, readers
from dmsae.config import SAEConfig, TrainConfig
from dmsae.graph_step import GraphedStep, default_step
from dmsae.sae import MatryoshkaSAE, StepStats, geometric_median
from dmsae.sparse_step import train_step
from dmsae.training import B_DEC_SAMPLE, Step, build_sae, train_sae

D, WIDTH, K, BATCH = 576, 4096, 32, 4096
PREFIXES = [128, 512, 1024, 2048, 4096]
FRACTIONS = [128 / 4096, 384 / 4096, 512 / 4096, 1024 / 4096]  # group ends 128, 512, 1024, 2048 (+ the rest)
CORE = 64
OTHER_GATES = ("relu_bias", "topk")  # besides relu, each gets a row against relu's step
DEFAULT_GATE = SAEConfig().core_gate
EVAL_ROWS = 2048
SEED = 0
PRECISIONS = ("fp32", "bf16")
MATMUL = "bare encoder matmul [4096x576]@[576x4096]"


def sae_params(**overrides: Any) -> dict[str, Any]:
    return SAEConfig(width=WIDTH, k=K, group_fractions=FRACTIONS, **overrides).model_dump()


def train_params(steps: int, precision: str = "fp32") -> dict[str, Any]:
    """The train stage's parameters; bf16 as the pipeline adds it to the key (`flows.pipeline.sae_precision`)."""
    extra = {"precision": precision} if precision != "fp32" else {}
    return (TrainConfig(batch_size=BATCH).model_dump(exclude={"checkpoint_every"}) | {"log_every": max(1, steps)}
            | extra)


def dense_reference_step(sae: MatryoshkaSAE, x: torch.Tensor) -> tuple[StepStats, torch.Tensor, torch.Tensor]:
    """The plain dense PyTorch step: `forward_train` (dense decoder matmuls, a full top-k) and autograd."""
    out = sae.forward_train(x)
    out.loss.backward()
    f = out.f_noncore.detach()
    nz = f.nonzero()
    cols, vals = nz[:, 1], f[nz[:, 0], nz[:, 1]]
    B = x.shape[0]
    stats = StepStats(loss=float(out.loss.detach()), prefix_losses=out.prefix_losses, aux_loss=float(out.aux_loss),
                      l0_core=float((out.f_core > 0).sum()) / B, l0_noncore=float(vals.numel()) / B,
                      k_noncore=out.k_noncore, core_code=out.f_core.detach())
    return stats, cols, vals


class TimedBatches:
    """Hands train_sae the bench's batches; the time between two requests is one training step (the
    gather of the next batch happens before the clock restarts). Also notes whether AuxK will run."""

    def __init__(self, pool: torch.Tensor, idx: torch.Tensor, device: str, sae: MatryoshkaSAE):
        self.pool, self.idx, self.device, self.sae = pool, idx, device, sae
        self.i = 0
        self.last: float | None = None
        self.step_seconds: list[float] = []
        self.n_dead: list[int] = []

    def __iter__(self) -> TimedBatches:
        return self

    def __next__(self) -> torch.Tensor:
        sync(self.device)
        now = time.perf_counter()
        if self.last is not None:
            self.step_seconds.append(now - self.last)
        x = self.pool[self.idx[self.i]].to(self.device)
        self.i += 1
        self.n_dead.append(int(self.sae.dead_mask().sum()))
        sync(self.device)
        self.last = time.perf_counter()
        return x

    def finish(self) -> None:
        sync(self.device)
        assert self.last is not None
        self.step_seconds.append(time.perf_counter() - self.last)


@torch.no_grad()
def eval_fvu(sae: MatryoshkaSAE, x: torch.Tensor) -> float:
    """Held-out FVU with the training-time BatchTopK encoding (as the anchors are measured)."""
    x_hat = sae.forward_train(x).x_hat
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def pool_rows(ctx: Context) -> tuple[np.ndarray, float, str]:
    """Scaled activations for training: the harvest benchmark's output (quick) or the bench store's harvest
    of the quickstart's 118k training tokens (full)."""
    if ctx.mode.train_pool == "store":
        art = materialize_inputs(("model", "tokens", "harvest"))["harvest"]
        array = activations.open_array(art.file(activations.ARRAY))
        scale, source = art.metrics["scale"], f"bench store harvest ({art.metrics['n_tokens']} tokens)"
    else:
        if "harvest_out" not in ctx.shared:  # run alone (--only train): harvest the same windows, untimed
            harvest_once(ctx)
        array = activations.open_array(ctx.shared["harvest_out"] / activations.ARRAY)
        scale = ctx.shared["harvest_metrics"]["scale"]
        source = f"harvest benchmark output ({array.shape[0]} tokens)"
    ctx.shared["train_array"] = (array, float(scale))  # the stage's batch stream is timed on it (`stream_row`)
    return (np.asarray(array[:], dtype=np.float32) * scale), float(scale), source


def harvest_once(ctx: Context) -> None:
    from bench.common import LM_BATCH, write_windows
    from bench.harvest import run_stage
    from dmsae import lm

    model_art, tokens_art = ctx.shared["model"], ctx.shared["tokens"]
    windows = readers.token_windows(tokens_art, "train")[: ctx.mode.harvest_batches * LM_BATCH]
    tokens = write_windows(ctx.work / "harvest-tokens", windows, readers.bos_of(tokens_art))
    model = lm.load_model(model_art.path, ctx.device, "float32", lm_autocast(ctx.device))
    out = ctx.work / "harvest-out"
    ctx.shared["harvest_metrics"] = run_stage(model, model_art, tokens, out, ctx.device)
    ctx.shared["harvest_out"] = out


def write_batches(folder: Path, pool: np.ndarray, steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The shared data: held-out rows for FVU, and each step's batch as row indices (same for every trainer)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    perm = rng.permutation(pool.shape[0])
    n_eval = min(EVAL_ROWS, pool.shape[0] // 4)
    eval_rows, train_rows = pool[perm[:n_eval]], pool[perm[n_eval:]]
    replace = train_rows.shape[0] < BATCH
    idx = np.stack([rng.choice(train_rows.shape[0], BATCH, replace=replace) for _ in range(steps)]).astype(np.int64)
    np.save(folder / "pool.npy", np.ascontiguousarray(train_rows))
    np.save(folder / "idx.npy", idx)
    np.save(folder / "eval.npy", np.ascontiguousarray(eval_rows))
    return torch.from_numpy(train_rows), torch.from_numpy(idx), torch.from_numpy(eval_rows)


def run_dmsae(sae: MatryoshkaSAE, pool: torch.Tensor, idx: torch.Tensor, x_eval: torch.Tensor, steps: int,
              device: str, step_fn: Step | None = None, precision: str = "fp32") -> dict[str, Any]:
    sae.to(device)
    with torch.no_grad():
        sae.b_dec.copy_(geometric_median(pool[: min(B_DEC_SAMPLE, pool.shape[0])]))  # as dmsae.training.fit
    batches = TimedBatches(pool, idx, device, sae)
    step = step_fn or default_step(device)  # the train stage's: on a GPU, the graphed step
    train_sae(sae, batches, steps, train_params(steps, precision), step_fn=step)
    batches.finish()
    # FVU in float32 on the float32 master weights, whatever precision the steps ran in (as for the anchors)
    return {"step_seconds": batches.step_seconds, "n_dead": batches.n_dead, "fvu": eval_fvu(sae, x_eval.to(device)),
            "precision": precision} | ({"graph": step.describe()} if isinstance(step, GraphedStep) else {})


PROFILE_STEPS = 4


def profile_steps(sae: MatryoshkaSAE, pool: torch.Tensor, idx: torch.Tensor, steps: int,
                  device: str) -> dict[str, Any]:
    """Where a step's time goes: torch.profiler's self time per operator over `steps` more train-stage
    steps of `sae` as its run left it (same dead latents, a fresh Adam), in ms per step, largest first."""
    from torch.profiler import ProfilerActivity, profile

    n_dead = int(sae.dead_mask().sum())
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    batches = TimedBatches(pool, idx, device, sae)
    with profile(activities=activities) as prof:
        train_sae(sae, batches, steps, train_params(steps))
        batches.finish()
    attr = "self_device_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    ops = sorted(((e.key, getattr(e, attr) / 1000 / steps) for e in prof.key_averages()), key=lambda t: -t[1])
    return {"steps": steps, "n_dead": n_dead, "step_ms": median(batches.step_seconds) * 1000,
            "ops": [(name, ms) for name, ms in ops if ms > 0]}


def run_anchor(lib: str, data: Path, ctx: Context, decoder_init_norm: float | None = None,
               precision: str = "fp32") -> dict[str, Any]:
    out = data / f"{lib}-{decoder_init_norm}-{precision}.json"
    cmd = [str(ANCHOR_PYTHON), str(REPO / "bench" / "anchors.py"), "--lib", lib, "--data", str(data),
           "--out", str(out), "--device", ctx.device, "--threads", str(ctx.threads), "--precision", precision]
    if decoder_init_norm is not None:
        cmd += ["--decoder-init-norm", str(decoder_init_norm)]
    if not ANCHOR_PYTHON.exists():
        return {"error": f"{ANCHOR_PYTHON.relative_to(REPO)} missing: make bench-venv (BENCHMARKS.md, Reproduce)"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        return {"error": f"{lib} exited {proc.returncode}: {tail}"}
    return json.loads(out.read_text())


def prepare(ctx: Context) -> tuple[Path, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The shared batches, written once for every trainer of this run (dmsae in-process, the anchors in
    bench/.venv): the data folder, the training pool, each step's row indices, the held-out rows."""
    steps = ctx.mode.train_steps
    pool_np, scale, source = pool_rows(ctx)
    data = ctx.work / "train-data"
    pool, idx, x_eval = write_batches(data, pool_np, steps)
    del pool_np
    ctx.shared["sae_scale"] = scale
    meta = {"d": D, "width": WIDTH, "k": K, "prefixes": PREFIXES, "steps": steps, "batch": BATCH, "seed": SEED,
            "lr": train_params(steps)["lr"], "warmup_steps": int(TrainConfig().warmup_fraction * steps),
            "decay_steps": int(TrainConfig().decay_fraction * steps), "layer": LAYER, "model": "SmolLM2-135M"}
    (data / "meta.json").write_text(json.dumps(meta))
    log(f"train: {steps} steps of {BATCH} on {pool.shape[0]} rows from the {source}; {x_eval.shape[0]} held out")
    return data, pool, idx, x_eval


class Matmuls:
    """The bare encoder matmul in each precision (bf16: operands already bfloat16, the product's floor under
    autocast), timed before and after the trainers so that a change of load during the run shows in both."""

    def __init__(self, x: torch.Tensor, device: str, repeats: int):
        w = torch.randn(D, WIDTH, device=device)
        ops = {"fp32": (x, w), "bf16": (x.bfloat16(), w.bfloat16())}
        self.ops = {p: ops[p] for p in measured_precisions(device)}  # an emulated bf16 matmul: minutes, and moot
        self.device, self.repeats = device, repeats
        self.seconds: dict[str, list[float]] = {p: [] for p in self.ops}
        self.time(warmup=2)

    def time(self, warmup: int = 1) -> None:
        for p, (a, b) in self.ops.items():
            self.seconds[p] += repeat(lambda a=a, b=b: a @ b, self.repeats, self.device, warmup=warmup)

    def median(self) -> dict[str, float]:
        return {p: median(s) for p, s in self.seconds.items()}


def precision_runs(ctx: Context, data: Path, pool: torch.Tensor, idx: torch.Tensor, x_eval: torch.Tensor,
                   results: dict[str, dict[str, Any]]) -> None:
    """The no-core dmsae step, dictionary_learning's trainer and sparsify's in each of PRECISIONS, on the same
    batches; adds to `results` whichever of them it does not hold yet."""
    device, steps = ctx.device, ctx.mode.train_steps
    for prec in measured_precisions(device):
        key = "dmsae" if prec == "fp32" else f"dmsae-{prec}"
        if key not in results:
            log(f"train: dmsae train stage step (no core), {prec}")
            results[key] = run_dmsae(build_sae(sae_params(), D, None, SEED), pool, idx, x_eval, steps, device,
                                     precision=prec)
        if device.startswith("cuda") and f"{key}-sparse" not in results:  # what the graph gains on this GPU
            log(f"train: dmsae sparse step without a CUDA graph (no core), {prec}")
            results[f"{key}-sparse"] = run_dmsae(build_sae(sae_params(), D, None, SEED), pool, idx, x_eval, steps,
                                                 device, step_fn=train_step, precision=prec)
        for lib in ("dictionary_learning", "sparsify"):
            key = f"{lib}-None" if (lib, prec) == ("dictionary_learning", "fp32") else f"{lib}-{prec}"
            if key not in results:
                log(f"train: anchor {lib}, {prec}")
                results[key] = run_anchor(lib, data, ctx, precision=prec)


def measured_precisions(device: str) -> tuple[str, ...]:
    """PRECISIONS less bf16 where the device only emulates it (`bench.common.bf16_measured`)."""
    return PRECISIONS if bf16_measured(device)[0] else ("fp32",)


def run_anchors(ctx: Context) -> list[Row]:
    """Only the comparisons in each precision (the `anchors` benchmark): the no-core step in fp32 and bf16
    against sparsify and dictionary_learning in the same precision and against the matmul in that precision."""
    data, pool, idx, x_eval = prepare(ctx)
    mm = Matmuls(pool[idx[0]].to(ctx.device), ctx.device, ctx.mode.matmul_repeats)
    results: dict[str, dict[str, Any]] = {}
    precision_runs(ctx, data, pool, idx, x_eval, results)
    mm.time()
    ctx.shared["anchors_raw"] = results | {"matmul_seconds": mm.seconds}
    return precision_rows(results, mm.median(), ctx.mode.train_steps, ctx.device)


def run(ctx: Context) -> list[Row]:
    mode, device, steps = ctx.mode, ctx.device, ctx.mode.train_steps
    data, pool, idx, x_eval = prepare(ctx)
    mm = Matmuls(pool[idx[0]].to(device), device, mode.matmul_repeats)

    results: dict[str, dict[str, Any]] = {}
    log("train: dmsae train stage step (no core)")
    sae = build_sae(sae_params(), D, None, SEED)
    results["dmsae"] = run_dmsae(sae, pool, idx, x_eval, steps, device)
    ctx.shared["sae"] = sae
    log(f"train: dmsae with a {CORE}-latent core and AuxK")
    core_enc = sae.enc[:, :CORE].detach().clone()
    # the default dead-latent window (100k tokens), shortened to half the run when the run is shorter,
    # so that AuxK runs in the timed steps whenever latents die
    dead_after = min(SAEConfig().dead_after_tokens, max(1, steps // 2) * BATCH)
    core_sae = build_sae(sae_params(dead_after_tokens=dead_after, core_gate="relu"), D, core_enc, SEED + 1)
    results["core"] = run_dmsae(core_sae, pool, idx, x_eval, steps, device)
    # the other core gates on the same core; relu_bias takes the rows' bias and threshold in the no-core SAE
    birth = {"bias": sae.b_enc[:CORE].detach().clone(), "threshold": sae.threshold[:CORE].clone()}
    for gate in OTHER_GATES:
        log(f"train: dmsae with a {CORE}-latent core and AuxK, core_gate={gate}")
        gated = build_sae(sae_params(dead_after_tokens=dead_after, core_gate=gate), D, core_enc, SEED + 1, birth)
        results[f"core-{gate}"] = run_dmsae(gated, pool, idx, x_eval, steps, device)
        if gate == DEFAULT_GATE:
            core_sae = gated
    ctx.shared["train_profile"] = profile_steps(core_sae, pool, idx, PROFILE_STEPS, device)
    log("train: plain dense PyTorch step (MatryoshkaSAE.forward_train + autograd)")
    dense = build_sae(sae_params(), D, None, SEED)
    # same parameters and init, only the step differs
    results["dense"] = run_dmsae(dense, pool, idx, x_eval, steps, device, dense_reference_step)
    anchors = [("dictionary_learning", None), ("saelens", None)]
    if mode.saelens_unit_decoder:
        anchors.append(("saelens", 1.0))
    for lib, norm in anchors:
        log(f"train: anchor {lib}" + (f" (decoder_init_norm={norm})" if norm is not None else ""))
        results[f"{lib}-{norm}"] = run_anchor(lib, data, ctx, norm)
    precision_runs(ctx, data, pool, idx, x_eval, results)
    mm.time()  # before and after
    ctx.shared["train_raw"] = {k: dict(v) for k, v in results.items()} | {"matmul_seconds": mm.seconds}
    step_s = BATCH / (_tps(results["dmsae"]) or 1.0)
    return (rows(results, mm.median()["fp32"], steps, dead_after) + [stream_row(ctx, step_s)]
            + precision_rows(results, mm.median(), steps, device))


STREAM_BATCHES = 48  # three groups of 16 chunks at the bench's batch and the default shuffle_chunks


def stream_row(ctx: Context, step_s: float) -> Row:
    """The train stage's batch stream (`activations.ShuffledBatches` over the harvest's Zarr array: decoding each
    group's chunks, gathering and scaling a batch, on a GPU onto the device with the next group read ahead) in ms
    a batch, against the dmsae step: the benchmark hands every trainer ready batches, the stage does not."""
    array, scale = ctx.shared["train_array"]
    shuffle = TrainConfig().shuffle_chunks
    stream = activations.ShuffledBatches(array, BATCH, shuffle, SEED, scale, device=ctx.device)
    next(stream)  # the first group, read before any step
    sync(ctx.device)
    seconds = []
    for _ in range(STREAM_BATCHES):
        t = time.perf_counter()
        next(stream)
        sync(ctx.device)
        seconds.append(time.perf_counter() - t)
    per_batch = sum(seconds) / len(seconds)  # the mean: a group's decoding lands on one batch in 16
    ahead = "; the next group read ahead on a thread (here nothing overlaps it)" if stream.prefetch else ""
    return Row("train stage's batch stream (ShuffledBatches), per batch", per_batch * 1000, "ms/batch",
               "the dmsae step, no core", step_s * 1000, per_batch / step_s,
               note=f"mean over {len(seconds)} batches of {BATCH} (groups of {shuffle} chunks of "
                    f"{array.chunks[0]} rows, {array.dtype}, {codec_name(array)}); median "
                    f"{median(seconds) * 1000:.1f} ms{ahead}")


def codec_name(array: Any) -> str:
    """The array's compressor as `harvest.compression` names it (a parted harvest: its first part's)."""
    first = array.parts[0] if hasattr(array, "parts") else array
    cnames = [getattr(getattr(c, "cname", None), "value", type(c).__name__) for c in first.compressors]
    return "+".join(cnames) or "uncompressed"


def _timed(r: dict[str, Any]) -> list[float]:
    return r["step_seconds"][1:] if len(r["step_seconds"]) > 2 else r["step_seconds"]  # first step: warm-up


def _tps(r: dict[str, Any]) -> float | None:
    return None if "error" in r else BATCH / median(_timed(r))


def _spread(r: dict[str, Any]) -> str:
    t = _timed(r)
    return f"step median {median(t) * 1000:.0f} ms, fastest {min(t) * 1000:.0f} ms over {len(t)} steps"


def _aux(r: dict[str, Any]) -> str:
    """Whether AuxK ran, and on a GPU how the graphed step ran."""
    dead = [n for n in r["n_dead"] if n > 0]
    graph = f"; {r['graph']}" if "graph" in r else ""
    if not dead:
        return "AuxK idle (no dead latent)" + graph
    return f"AuxK ran in {len(dead)}/{len(r['n_dead'])} steps (median {int(np.median(dead))} dead latents){graph}"


def rows(results: dict[str, dict[str, Any]], matmul_s: float, steps: int, dead_after: int) -> list[Row]:
    ours = results["dmsae"]
    ours_tps, ours_fvu = _tps(ours), ours["fvu"]
    assert ours_tps is not None
    out = [Row("dmsae train stage step (train_sae + sparse_step.train_step), no core", ours_tps, "tokens/s",
               note=f"FVU {ours_fvu:.3f} after {steps} steps; {_spread(ours)}; {_aux(ours)}")]
    fastest = None
    names = {"dictionary_learning-None": "dictionary_learning MatryoshkaBatchTopKTrainer",
             "saelens-None": "SAELens MatryoshkaBatchTopKTrainingSAE (default decoder_init_norm 0.1)",
             "saelens-1.0": "SAELens MatryoshkaBatchTopKTrainingSAE, decoder_init_norm=1.0"}
    for key, label in names.items():
        if key not in results:
            continue
        r = results[key]
        tps = _tps(r)
        if tps is None:
            out.append(Row(f"vs {label}", ours_tps, "tokens/s", label, None, note=r["error"]))
            continue
        if fastest is None or tps > fastest[1]:
            fastest = (f"{label} {r['version']}", tps, r["fvu"])
        out.append(Row(f"vs {label} {r['version']}", ours_tps, "tokens/s", label, tps, ours_tps / tps,
                       note=f"anchor FVU {r['fvu']:.3f} vs {ours_fvu:.3f}; anchor {_spread(r)}"))
    dense = results["dense"]
    dense_tps = _tps(dense)
    assert dense_tps is not None
    out.append(Row("vs plain dense PyTorch step (forward_train + autograd)", ours_tps, "tokens/s", "dense step",
                   dense_tps, ours_tps / dense_tps, note=f"dense FVU {dense['fvu']:.3f} vs {ours_fvu:.3f}; "
                                                         f"dense {_spread(dense)}"))
    if fastest is not None:
        ratio = ours_tps / fastest[1]
        fvu_ok = ours_fvu <= fastest[2] + 0.01
        out.append(Row("target: vs the fastest anchor, at equal or lower FVU", ours_tps, "tokens/s", fastest[0],
                       fastest[1], ratio, ">= 4x, FVU <= anchor's + 0.01", ratio >= 4 and fvu_ok,
                       note=f"FVU {ours_fvu:.3f} vs {fastest[2]:.3f} at {steps} steps"))
    else:
        out.append(Row("target: vs the fastest anchor, at equal or lower FVU", ours_tps, "tokens/s",
                       target=">= 4x", note="no anchor ran"))
    def core_step(r: dict[str, Any]) -> tuple[float, str]:
        times = r["step_seconds"]
        aux_steps = [t for t, n in zip(times, r["n_dead"], strict=True) if n > 0][1:]
        used = aux_steps if len(aux_steps) >= 3 else _timed(r)
        return median(used), (f"median over {'the steps with AuxK' if used is aux_steps else 'all steps'}, fastest "
                              f"{min(used) * 1000:.0f} ms; {_aux(r)}; latents dead after {dead_after:,} tokens "
                              f"without firing; FVU {r['fvu']:.3f}")

    relu_s, relu_note = core_step(results["core"])
    out.append(Row(f"dmsae step with a {CORE}-latent core and AuxK, core_gate=relu", relu_s * 1000, "ms/step",
                   "bare encoder matmul [4096x576]@[576x4096]", matmul_s * 1000, relu_s / matmul_s,
                   "<= 2x" if DEFAULT_GATE == "relu" else "",
                   relu_s / matmul_s <= 2 if DEFAULT_GATE == "relu" else None, note=relu_note))
    for gate in OTHER_GATES:
        if f"core-{gate}" not in results:
            continue
        step_s, note = core_step(results[f"core-{gate}"])
        out.append(Row(f"dmsae step with a {CORE}-latent core and AuxK, core_gate={gate}", step_s * 1000, "ms/step",
                       "the same step with core_gate=relu", relu_s * 1000, step_s / relu_s, "<= 1.2x",
                       step_s / relu_s <= 1.2, note=f"{step_s / matmul_s:.2f}x the encoder matmul; {note}"))
        if gate == DEFAULT_GATE:
            out.append(Row(f"dmsae step with a {CORE}-latent core and AuxK, the default gate ({gate})",
                           step_s * 1000, "ms/step", "bare encoder matmul [4096x576]@[576x4096]", matmul_s * 1000,
                           step_s / matmul_s, "<= 2x", step_s / matmul_s <= 2, note=note))
    plain_s = BATCH / ours_tps
    out.append(Row("dmsae step, no core", plain_s * 1000, "ms/step", "bare encoder matmul", matmul_s * 1000,
                   plain_s / matmul_s, note=_aux(ours)))
    return out


def precision_rows(results: dict[str, dict[str, Any]], matmul: dict[str, float], steps: int,
                   device: str) -> list[Row]:
    """The rows of issue 25's targets, each precision against the anchors in the same precision."""
    native, why = precision.native_bf16(device)
    out: list[Row] = []
    ours_of = {"fp32": results["dmsae"], "bf16": results.get("dmsae-bf16")}
    for prec in PRECISIONS:
        ours = ours_of[prec]
        if ours is None:
            out.append(bf16_not_measured(f"dmsae step, no core, {prec}", device))
            continue
        tps, fvu = _tps(ours), ours["fvu"]
        assert tps is not None
        dl = results["dictionary_learning-None" if prec == "fp32" else f"dictionary_learning-{prec}"]
        sp = results[f"sparsify-{prec}"]
        what = f"dmsae step, no core, {prec}"
        if "error" in sp:
            out.append(Row(f"{what} vs sparsify, {prec}", tps, "tokens/s", "sparsify", target=">= 1.5x",
                           note=sp["error"]))
        else:
            sp_tps = _tps(sp)
            assert sp_tps is not None
            out.append(Row(f"{what} vs sparsify {sp['version']} SparseCoder, {prec}", tps, "tokens/s",
                           f"sparsify, {prec}", sp_tps, tps / sp_tps, ">= 1.5x", tps / sp_tps >= 1.5,
                           note=f"FVU {fvu:.3f} vs sparsify's {sp['fvu']:.3f} (per-token TopK, no prefixes: "
                                f"reported, not a target) after {steps} steps; sparsify {_spread(sp)}; "
                                f"its decoder {sp.get('decoder', '?')}"))
        if "error" in dl:
            out.append(Row(f"{what} vs dictionary_learning, {prec}", tps, "tokens/s", "dictionary_learning",
                           target=">= 4x, FVU <= its + 0.01", note=dl["error"]))
        else:
            dl_tps = _tps(dl)
            assert dl_tps is not None
            ok = tps / dl_tps >= 4 and fvu <= dl["fvu"] + 0.01
            bdec = f"; its b_dec ends {dl['b_dec_dtype']}" if prec != "fp32" and "b_dec_dtype" in dl else ""
            out.append(Row(f"{what} vs dictionary_learning {dl['version']} MatryoshkaBatchTopKTrainer, {prec}", tps,
                           "tokens/s", f"dictionary_learning, {prec}", dl_tps, tps / dl_tps,
                           ">= 4x, FVU <= its + 0.01", ok,
                           note=f"full-width held-out FVU {fvu:.3f} vs {dl['fvu']:.3f} after {steps} steps; "
                                f"dictionary_learning {_spread(dl)}{bdec}"))
        sparse = results.get(f"{'dmsae' if prec == 'fp32' else f'dmsae-{prec}'}-sparse")
        if sparse is not None:
            sparse_tps = _tps(sparse)
            assert sparse_tps is not None
            out.append(Row(f"{what}, CUDA graph (graph_step) vs the sparse step without one", tps, "tokens/s",
                           f"sparse_step.train_step, {prec}", sparse_tps, tps / sparse_tps,
                           note=f"FVU {fvu:.3f} vs {sparse['fvu']:.3f}; sparse step {_spread(sparse)}"))
        step_s = BATCH / tps
        limit = 2 if prec == "fp32" else 3
        out.append(Row(what, step_s * 1000, "ms/step", f"{MATMUL}, {prec}", matmul[prec] * 1000,
                       step_s / matmul[prec], f"<= {limit}x", step_s / matmul[prec] <= limit,
                       note=f"{_spread(ours)}; {_aux(ours)}"))
    fp, bf = ours_of["fp32"], ours_of["bf16"]
    if bf is None:
        return out
    fp_tps, bf_tps = _tps(fp), _tps(bf)
    assert fp_tps is not None and bf_tps is not None
    dfvu = bf["fvu"] - fp["fvu"]
    applies = native or device.startswith("cuda")
    out.append(Row("dmsae step, no core, bf16 vs fp32", bf_tps, "tokens/s", "the same step in fp32", fp_tps,
                   bf_tps / fp_tps, ">= 2x on a CPU with AMX, |dFVU| <= 0.005",
                   (bf_tps / fp_tps >= 2 and abs(dfvu) <= 0.005) if applies else None,
                   note=f"dFVU {dfvu:+.4f} (FVU {bf['fvu']:.4f} vs {fp['fvu']:.4f}); {why}; matmul alone "
                        f"{matmul['fp32'] / matmul['bf16']:.2f}x faster in bf16"))
    for lib, label in (("sparsify", "sparsify"), ("dictionary_learning", "dictionary_learning")):
        a = results["dictionary_learning-None"] if lib == "dictionary_learning" else results["sparsify-fp32"]
        b = results[f"{lib}-bf16"]
        if "error" in a or "error" in b:
            continue
        a_tps, b_tps = _tps(a), _tps(b)
        assert a_tps is not None and b_tps is not None
        out.append(Row(f"{label} step, bf16 autocast vs fp32", b_tps, "tokens/s", f"{label}, fp32", a_tps,
                       b_tps / a_tps, note=f"FVU {b['fvu']:.4f} vs {a['fvu']:.4f}"))
    return out

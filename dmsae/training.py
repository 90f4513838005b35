"""Training one SAE: its construction, the loop (Adam, warm-up and decay, gradient projection and clipping),
resumable checkpoints, and `fit`, the body the train and reuse stages share (docs/design.md section 2)."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from dmsae import activations, faults, memory, readers
from dmsae.errors import UserError
from dmsae.graph_step import default_step
from dmsae.runtime import Runtime
from dmsae.sae import MatryoshkaSAE, StepStats, geometric_median
from dmsae.sparse_step import update_stats_sparse
from dmsae.store import Artifact

CHECKPOINT_FILE = "train.ckpt"  # in the stage's checkpoint folder, never in the artifact
B_DEC_SAMPLE = 8192  # activations the b_dec init (geometric median or mean) is computed on
# one step's loss and gradients (written to .grad): (stats, the active non-core latents, their values)
Step = Callable[[MatryoshkaSAE, torch.Tensor], tuple[StepStats, torch.Tensor, torch.Tensor]]


def derive_seed(*parts: object) -> int:
    """A 32-bit seed from JSON-serialisable parts, the same in every process."""
    return int(hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:8], 16)


def lr_at(step: int, n_steps: int, lr: float, warmup_fraction: float, decay_fraction: float) -> float:
    """Linear warm-up over the first `warmup_fraction` of the steps, linear decay to 0 over the last
    `decay_fraction`."""
    warm = max(1, int(warmup_fraction * n_steps))
    decay = int(decay_fraction * n_steps)
    factor = min(1.0, (step + 1) / warm)
    if decay and step >= n_steps - decay:
        factor *= (n_steps - step) / decay
    return lr * factor


def training_steps(n_tokens: int, tp: dict[str, Any]) -> int:
    """The steps of one training on `n_tokens` harvested rows: `epochs` passes in batches of `batch_size`."""
    return max(1, int(n_tokens * tp["epochs"]) // tp["batch_size"])


def build_sae(sae_params: dict[str, Any], d: int, core_encoder: torch.Tensor | None, seed: int,
              core_birth: dict[str, torch.Tensor] | None = None) -> MatryoshkaSAE:
    """A fresh SAE from the `sae` config section. `core_birth`: the core latents' encoder bias and threshold
    in their birth SAE ("bias", "threshold")."""
    birth = core_birth or {}
    return MatryoshkaSAE(
        d=d, width=sae_params["width"], k=sae_params["k"], group_fractions=sae_params["group_fractions"],
        core_encoder=core_encoder, l0_mode=sae_params.get("l0_mode", "dynamic"), aux_alpha=sae_params["aux_alpha"],
        dead_after_tokens=sae_params["dead_after_tokens"],
        freeze_core_encoder=sae_params.get("freeze_core_encoder", True),
        generator=torch.Generator().manual_seed(seed), core_gate=sae_params.get("core_gate", "relu"),
        core_bias=birth.get("bias"), core_threshold=birth.get("threshold"),
        freeze_core_bias=bool(sae_params.get("freeze_core_bias")),
    )


def train_sae(
    sae: MatryoshkaSAE,
    batches: Any,
    n_steps: int,
    train_params: dict[str, Any],
    rt: Runtime | None = None,
    step_fn: Step | None = None,
) -> list[dict[str, float]]:
    """The training loop; returns the logged curve. `batches` yields scaled [B, d] tensors; `step_fn` computes
    each step's gradients (by default the autograd-free `dmsae.sparse_step.train_step`, on a GPU its graphed form
    `dmsae.graph_step.GraphedStep`; a benchmark swaps in a reference)."""
    rt = rt or Runtime(show_progress=False)
    # each batch goes where the SAE lives, not to rt.device: a caller that moved the SAE to the GPU and passed
    # no Runtime (the benchmarks) would otherwise feed a CUDA SAE CPU batches
    device = sae.b_dec.device
    if device.type == "cpu":
        memory.keep_freed_heap()  # no page faults on the buffers a step frees and takes again (same bits)
    step_fn = step_fn or default_step(device)
    params = [p for p in sae.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=train_params["lr"], fused=True)
    curve: list[dict[str, float]] = []
    log_every = train_params["log_every"]
    every = rt.args.get("checkpoint_every")
    ckpt = rt.checkpoint_dir / CHECKPOINT_FILE if rt.checkpoint_dir is not None and every else None
    if not isinstance(batches, activations.ShuffledBatches):
        ckpt = None  # only a stream with a restorable position can resume
    first = 0
    if ckpt is not None:
        first, curve = load_checkpoint(ckpt, sae, opt, batches)
        if first:
            rt.resumed = {"step": first}
            print(f"dmsae: resuming {rt.label or 'training'} at step {first}/{n_steps}", file=sys.stderr, flush=True)
    # bf16: the step runs under autocast, as sparsify's and dictionary_learning's trainers drive theirs; Adam, the
    # decoder projection and the statistics stay float32
    low_precision = train_params.get("precision") == "bf16"
    bar = tqdm(total=n_steps, initial=first, desc="train SAE", unit="step", disable=not rt.show_progress)
    for step in range(first, n_steps):
        x = next(batches).to(device)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=low_precision):
            stats, active_cols, active_vals = step_fn(sae, x)
        sae.project_decoder_grads()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        lr = lr_at(step, n_steps, train_params["lr"], train_params["warmup_fraction"], train_params["decay_fraction"])
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        sae.normalize_decoder()
        update_stats_sparse(sae, active_cols, active_vals, stats.core_code, x.shape[0], train_params["threshold_ema"])
        if step % log_every == 0 or step == n_steps - 1:
            var = float((x - x.mean(0)).pow(2).sum(-1).mean())
            # float() and int(): the graphed step hands back tensors, read only here
            row = {
                "step": step, "tokens": (step + 1) * x.shape[0], "lr": lr,
                "loss": float(stats.loss), "aux_loss": float(stats.aux_loss),
                "fvu": float(stats.prefix_losses[-1]) / var, "fvu_inner": float(stats.prefix_losses[0]) / var,
                "l0": float(stats.l0_core) + float(stats.l0_noncore), "l0_noncore": float(stats.l0_noncore),
                "k_noncore": int(stats.k_noncore),
                "dead_fraction": float(sae.dead_mask().float().mean()),
            }
            curve.append(row)
            bar.set_postfix(fvu=f"{row['fvu']:.3f}", l0=f"{row['l0']:.1f}")
        bar.update(1)
        rt.report((step + 1) / n_steps, f"step {step + 1}/{n_steps}")
        if ckpt is not None and (step + 1) % every == 0 and step + 1 < n_steps:
            save_checkpoint(ckpt, step + 1, sae, opt, batches, curve)
            rt.checkpoint_saved()
        faults.point(f"{rt.label}:step:{step + 1}")
    bar.close()
    return curve


def save_checkpoint(path: Path, steps_done: int, sae: MatryoshkaSAE, opt: torch.optim.Optimizer,
                    batches: activations.ShuffledBatches, curve: list[dict[str, float]]) -> None:
    """Everything the next step depends on: weights and statistics, Adam moments, the data position
    and the RNG; written whole to a temporary file and renamed, so a kill never leaves half a checkpoint."""
    stream_state, carry = batches.state()
    payload = {"steps_done": steps_done, "sae": sae.state_dict(), "opt": opt.state_dict(), "curve": curve,
               "stream": stream_state, "carry": torch.from_numpy(np.ascontiguousarray(carry)),
               "torch_rng": torch.get_rng_state()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, sae: MatryoshkaSAE, opt: torch.optim.Optimizer,
                    batches: activations.ShuffledBatches) -> tuple[int, list[dict[str, float]]]:
    """Restore a checkpoint if there is a readable one; returns the steps already done and the curve."""
    if not path.is_file():
        return 0, []
    try:
        # onto the CPU: a checkpoint written by a GPU run may be resumed where there is no GPU (device is not in
        # the key); load_state_dict then copies each tensor to the device of the SAE and its Adam state
        payload = torch.load(path, weights_only=False, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - an unreadable checkpoint only costs the steps it held
        print(f"dmsae: warning: ignoring unreadable checkpoint {path} ({type(e).__name__}); training from step 0",
              file=sys.stderr)
        return 0, []
    sae.load_state_dict(payload["sae"])
    opt.load_state_dict(payload["opt"])
    batches.restore(payload["stream"], payload["carry"].numpy())
    torch.set_rng_state(payload["torch_rng"])
    return int(payload["steps_done"]), payload["curve"]


def fit(
    out_dir: Path,
    harvest: Artifact,
    core: Artifact | None,
    sae_params: dict[str, Any],
    tp: dict[str, Any],
    seed: int,
    born_cycle: int,
    rt: Runtime,
    trainings: int = 1,
) -> dict[str, Any]:
    """Train one SAE on the harvested activations, seeded with the core of a select or random_core artifact if
    given, and write its weights, lineage and curve into `out_dir`; returns the metrics. `trainings`: run as many
    steps as that many ordinary trainings (`training_steps` each) in one schedule, continuing the same endless
    batch stream, so its first training's worth of batches are an ordinary training's."""
    array = readers.harvest_array(harvest)
    d, n_tokens, scale = harvest.metrics["d"], harvest.metrics["n_tokens"], harvest.metrics["scale"]
    core_encoder = core_lineage = core_birth = None
    if core is not None:
        tensors = readers.core(core)
        core_encoder, core_lineage = tensors["encoder"], tensors["lineage"]
        core_birth = {"bias": tensors["bias"], "threshold": tensors["threshold"]}
        c, width, k = core_encoder.shape[1], sae_params["width"], sae_params["k"]
        if width - c < k:
            raise UserError(f"the core has {c} latents, too many for an SAE of width {width} at k={k} "
                            f"(only {width - c} non-core latents left); raise the width (sae.width or reuse.width) "
                            "or lower selection.tau")
    sae = build_sae(sae_params, d, core_encoder, seed, core_birth).to(rt.device)
    batches = activations.shuffled_batches(array, tp["batch_size"], tp["shuffle_chunks"], seed, scale, rt.device)
    sample = torch.from_numpy(array[: min(B_DEC_SAMPLE, n_tokens)].astype(np.float32) * scale).to(rt.device)
    use_median = sae_params["b_dec_init"] == "geometric_median"
    with torch.no_grad():
        sae.b_dec.copy_(geometric_median(sample) if use_median else sample.mean(0))
    n_steps = trainings * training_steps(n_tokens, tp)
    curve = train_sae(sae, batches, n_steps, tp, rt)

    c = sae.core_size
    born = torch.stack([torch.full((sae.width - c,), born_cycle), torch.arange(c, sae.width)], dim=1)
    lineage = born if core_lineage is None else torch.cat([core_lineage.long(), born])
    meta = {"core_size": c, "k": sae.k, "group_ends": sae.ends, "scale": scale, "l0_mode": sae.l0_mode,
            "d": d, "width": sae.width, "core_gate": sae.core_gate}
    # one sorted JSON string: safetensors writes a metadata dict in arbitrary order, breaking byte determinism
    tensors = {name: t.cpu() for name, t in sae.full_tensors().items()}
    save_file(tensors, str(out_dir / readers.SAE_FILE),
              metadata={readers.SAE_META_KEY: json.dumps(meta, sort_keys=True)})
    # A latent's birth bias and threshold: its own where it was a BatchTopK latent here, else the ones it was
    # born with (a bias trained inside a dense core is itself dense, so it is never what travels).
    birth_bias, birth_threshold = tensors["b_enc"].clone(), tensors["threshold"].clone()
    if core_birth is not None:
        birth_bias[:c], birth_threshold[:c] = core_birth["bias"], core_birth["threshold"]
    save_file({"lineage": lineage.long().contiguous(), "birth_bias": birth_bias.contiguous(),
               "birth_threshold": birth_threshold.contiguous()}, str(out_dir / readers.LINEAGE_FILE))
    pd.DataFrame(curve).to_parquet(out_dir / readers.CURVE_FILE, index=False)
    tail = curve[-max(1, len(curve) // 10):]
    return {
        "core_size": c, "k": sae.k, "steps": n_steps, "tokens": n_steps * tp["batch_size"],
        "group_ends": sae.ends, "scale": scale,
        "train_fvu": sum(r["fvu"] for r in tail) / len(tail),
        "train_l0": sum(r["l0"] for r in tail) / len(tail),
        # a core that fires on more than k latents per token leaves the non-core one latent (k_nc clipped at 1)
        "core_l0": sum(r["l0"] - r["l0_noncore"] for r in tail) / len(tail),
        "k_noncore": tail[-1]["k_noncore"],
        "core_gate": sae.core_gate,
        "dead_fraction": curve[-1]["dead_fraction"],
    } | ({"trainings": trainings} if trainings != 1 else {})

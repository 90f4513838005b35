"""Drive an anchor SAE trainer step by step on the bench's batches; runs in bench/.venv, never imports dmsae.

    bench/.venv/bin/python bench/anchors.py --lib saelens|dictionary_learning|sparsify --data DIR --out FILE.json \
        [--precision fp32|bf16]

DIR holds what bench/train.py wrote: pool.npy (scaled activations), idx.npy ([steps, batch] row indices
of each step's batch), eval.npy (held-out rows) and meta.json (shapes, lr, schedule). Each step's batch is
gathered before the clock starts; the step is the library's own update (forward, backward, gradient
projection / clipping, optimizer, decoder normalisation as the library does it). FVU is measured after the
last step on the held-out rows with the training-time BatchTopK encoding, the same way for every trainer
(sparsify: its own per-token TopK, which is its algorithm), in float32 on the float32 master weights.

`--precision bf16` runs the step under `torch.autocast(device, dtype=torch.bfloat16)`, the context each
library's own trainer puts around its step on CUDA (both trainers skip it on CPU: dictionary_learning's
trainSAE uses a null context there, sparsify's forward is decorated with a CUDA-only autocast), applied here
on the bench's device as well. The environment is made by `make bench-venv` (bench/requirements-anchors.txt).
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import AbstractContextManager, nullcontext
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def autocast(device: str, precision: str) -> AbstractContextManager[Any]:
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def lr_factor(meta: dict[str, Any]) -> Any:
    """The bench's schedule (linear warm-up, linear decay to 0 at the end; `dmsae.training.lr_at`), as a
    LambdaLR factor, for a library whose trainer would bring its own (sparsify's: 1000 warm-up steps)."""
    steps, warm, decay = meta["steps"], max(1, meta["warmup_steps"]), meta["decay_steps"]

    def factor(step: int) -> float:
        f = min(1.0, (step + 1) / warm)
        if decay and step >= steps - decay:
            f *= (steps - step) / decay
        return f

    return factor


def sparsify(meta: dict[str, Any], device: str, precision: str) -> tuple[Any, Any, Any]:
    """EleutherAI's SparseCoder driven the way sparsify.Trainer.fit drives it with `optimizer="adam"` and its
    other defaults (loss_fn fvu, auxk_alpha 0 so no AuxK, multi_topk off): b_dec set to the first batch's mean,
    the decoder renormalised to unit rows before each forward, loss = FVU (+ the AuxK and Multi-TopK terms the
    config switches off), backward, the gradient parallel to the decoder rows removed, Adam, zero_grad, the
    scheduler; no gradient clipping (its trainer has none). Its Adam is torch.optim.Adam with defaults when
    bitsandbytes is absent (as here). Learning rate: the bench's (5e-4, 5 % warm-up, 20 % decay), not its rule
    (2e-4 / sqrt(width / 2^14) = 4e-4 with 1000 warm-up steps, which 200 steps would never leave). On CPU its
    decoder is the eager embedding_bag (Triton absent)."""
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.config import TrainConfig

    torch.set_float32_matmul_precision("high")  # as Trainer.fit does (TF32 on CUDA; no effect on the CPU)
    cfg = SparseCoderConfig(num_latents=meta["width"], k=meta["k"])
    tcfg = TrainConfig(sae=cfg, optimizer="adam", lr=meta["lr"], log_to_wandb=False)
    torch.manual_seed(meta["seed"])
    sae = SparseCoder(meta["d"], cfg, device, dtype=torch.float32)
    opt = torch.optim.Adam(sae.parameters(), lr=meta["lr"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(meta))
    since_fired = torch.zeros(sae.num_latents, dtype=torch.long, device=device)
    ctx = autocast(device, precision)

    def step(i: int, x: torch.Tensor) -> None:
        if i == 0:
            sae.b_dec.data = x.mean(0).to(sae.dtype)  # its trainer's first-step init (encoder bias stays 0)
        sae.set_decoder_norm_to_unit_norm()
        dead = since_fired > tcfg.dead_feature_threshold if tcfg.auxk_alpha > 0 else None
        with ctx:  # forward only, as on CUDA, where the autocast decorates SparseCoder.forward
            out = sae(x, dead_mask=dead)
        did_fire = torch.zeros_like(since_fired, dtype=torch.bool)
        did_fire[out.latent_indices.flatten()] = True
        loss = out.fvu + tcfg.auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        sched.step()
        with torch.no_grad():  # its dead-latent bookkeeping, kept although AuxK is off by default
            since_fired.add_(x.shape[0])
            since_fired[did_fire] = 0

    @torch.no_grad()
    def reconstruct(x: torch.Tensor) -> torch.Tensor:
        return sae(x).sae_out  # per-token TopK, its encoding

    info = {"library": "eai-sparsify", "version": metadata.version("eai-sparsify"),
            "class": "sparsify.SparseCoder driven as sparsify.Trainer.fit (optimizer=adam)",
            "auxk_alpha": tcfg.auxk_alpha, "decoder": sparsify_decoder()}
    return step, reconstruct, info


def sparsify_decoder() -> str:
    from sparsify import utils

    return getattr(utils.decoder_impl, "__name__", str(utils.decoder_impl))


def saelens(meta: dict[str, Any], device: str, decoder_init_norm: float | None) -> tuple[Any, Any, Any]:
    from sae_lens import MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(meta["seed"])
    kwargs: dict[str, Any] = {}
    if decoder_init_norm is not None:
        kwargs["decoder_init_norm"] = decoder_init_norm
    cfg = MatryoshkaBatchTopKTrainingSAEConfig(
        d_in=meta["d"], d_sae=meta["width"], k=meta["k"], matryoshka_widths=list(meta["prefixes"]),
        dtype="float32", device=device, **kwargs,
    )
    sae = MatryoshkaBatchTopKTrainingSAE(cfg)
    steps, batch = meta["steps"], meta["batch"]
    tcfg = SAETrainerConfig(
        total_training_samples=steps * batch, train_batch_size_samples=batch, lr=meta["lr"],
        lr_end=meta["lr"] / 10,  # LanguageModelSAERunnerConfig's default; the constant schedule decays to 0
        lr_warm_up_steps=meta["warmup_steps"], lr_decay_steps=meta["decay_steps"], device=device,
    )
    trainer = SAETrainer(cfg=tcfg, sae=sae, data_provider=iter(()))

    def step(_i: int, x: torch.Tensor) -> None:
        trainer.step(x)  # SAETrainer's own step: forward, backward, clip, Adam, schedulers
        trainer.n_training_steps += 1

    @torch.no_grad()
    def reconstruct(x: torch.Tensor) -> torch.Tensor:
        sae.eval()
        feats, _ = sae.encode_with_hidden_pre(x)  # BatchTopK over the batch, as in training
        out = sae.decode(feats)
        sae.train()
        return out

    info = {"library": "sae-lens", "version": metadata.version("sae-lens"),
            "class": "sae_lens.MatryoshkaBatchTopKTrainingSAE + sae_lens.training.sae_trainer.SAETrainer.step",
            "decoder_init_norm": cfg.decoder_init_norm}
    return step, reconstruct, info


def dictionary_learning(meta: dict[str, Any], device: str, precision: str) -> tuple[Any, Any, Any]:
    from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKTrainer

    prefixes = [0, *meta["prefixes"]]
    width = meta["width"]
    fractions = [(b - a) / width for a, b in zip(prefixes[:-1], prefixes[1:], strict=True)]
    steps = meta["steps"]
    decay_start = steps - meta["decay_steps"] if meta["decay_steps"] else None
    if decay_start is not None and decay_start <= meta["warmup_steps"]:
        decay_start = None
    trainer = MatryoshkaBatchTopKTrainer(
        steps=steps, activation_dim=meta["d"], dict_size=width, k=meta["k"], layer=meta["layer"],
        lm_name=meta["model"], group_fractions=fractions, lr=meta["lr"], warmup_steps=meta["warmup_steps"],
        decay_start=decay_start, seed=meta["seed"], device=device,
    )

    ctx = autocast(device, precision)
    low = torch.bfloat16 if precision == "bf16" else torch.float32
    info: dict[str, Any] = {
        "library": "dictionary-learning", "version": metadata.version("dictionary-learning"),
        "class": "dictionary_learning.trainers.matryoshka_batch_top_k.MatryoshkaBatchTopKTrainer.update",
        "group_sizes": trainer.group_sizes}

    def step(i: int, x: torch.Tensor) -> None:
        # trainSAE's loop body: the batch cast to autocast_dtype, then the trainer's own update (b_dec = geometric
        # median of the first batch at step 0; in bf16 that makes b_dec a bfloat16 parameter, as it does there)
        with ctx:
            trainer.update(i, x.to(low))
        if i == 0:
            info["b_dec_dtype"] = str(trainer.ae.b_dec.dtype)

    @torch.no_grad()
    def reconstruct(x: torch.Tensor) -> torch.Tensor:
        f = trainer.ae.encode(x, use_threshold=False)  # BatchTopK over the batch, as in training
        return trainer.ae.decode(f)

    return step, reconstruct, info


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", choices=["saelens", "dictionary_learning", "sparsify"], required=True)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="bf16: the step under torch.autocast(bfloat16), as the trainers run it on CUDA")
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decoder-init-norm", type=float, default=None, help="SAELens only; default: the library's")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = Path(args.data)
    meta = json.loads((data / "meta.json").read_text())
    pool = torch.from_numpy(np.load(data / "pool.npy"))
    idx = torch.from_numpy(np.load(data / "idx.npy")).long()
    x_eval = torch.from_numpy(np.load(data / "eval.npy")).to(args.device)
    if args.lib == "saelens":
        if args.precision != "fp32":
            ap.error("--precision bf16: measured for dictionary_learning and sparsify only")
        step, reconstruct, info = saelens(meta, args.device, args.decoder_init_norm)
    elif args.lib == "sparsify":
        step, reconstruct, info = sparsify(meta, args.device, args.precision)
    else:
        step, reconstruct, info = dictionary_learning(meta, args.device, args.precision)
    times = []
    for i in range(meta["steps"]):
        x = pool[idx[i]].to(args.device)
        sync(args.device)
        start = time.perf_counter()
        step(i, x)
        sync(args.device)
        times.append(time.perf_counter() - start)
    result = {**info, "precision": args.precision, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "step_seconds": times,
              "fvu": fvu(x_eval, reconstruct(x_eval)), "steps": meta["steps"], "batch": meta["batch"]}
    Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()

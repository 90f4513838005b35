"""Drive an anchor SAE trainer step by step on the bench's batches; runs in bench/.venv, never imports dmsae.

    bench/.venv/bin/python bench/anchors.py --lib saelens|dictionary_learning --data DIR --out FILE.json

DIR holds what bench/train.py wrote: pool.npy (scaled activations), idx.npy ([steps, batch] row indices
of each step's batch), eval.npy (held-out rows) and meta.json (shapes, lr, schedule). Each step's batch is
gathered before the clock starts; the step is the library's own update (forward, backward, gradient
projection / clipping, optimizer, decoder normalisation as the library does it). FVU is measured after the
last step on the held-out rows with the training-time BatchTopK encoding, the same way for every trainer.
"""

from __future__ import annotations

import argparse
import json
import time
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


def dictionary_learning(meta: dict[str, Any], device: str) -> tuple[Any, Any, Any]:
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

    def step(i: int, x: torch.Tensor) -> None:
        trainer.update(i, x)  # the trainer's own update (b_dec = geometric median of the first batch at step 0)

    @torch.no_grad()
    def reconstruct(x: torch.Tensor) -> torch.Tensor:
        f = trainer.ae.encode(x, use_threshold=False)  # BatchTopK over the batch, as in training
        return trainer.ae.decode(f)

    info = {"library": "dictionary-learning", "version": metadata.version("dictionary-learning"),
            "class": "dictionary_learning.trainers.matryoshka_batch_top_k.MatryoshkaBatchTopKTrainer.update",
            "group_sizes": trainer.group_sizes}
    return step, reconstruct, info


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", choices=["saelens", "dictionary_learning"], required=True)
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
        step, reconstruct, info = saelens(meta, args.device, args.decoder_init_norm)
    else:
        step, reconstruct, info = dictionary_learning(meta, args.device)
    times = []
    for i in range(meta["steps"]):
        x = pool[idx[i]].to(args.device)
        sync(args.device)
        start = time.perf_counter()
        step(i, x)
        sync(args.device)
        times.append(time.perf_counter() - start)
    result = {**info, "torch": torch.__version__, "threads": torch.get_num_threads(), "step_seconds": times,
              "fvu": fvu(x_eval, reconstruct(x_eval)), "steps": meta["steps"], "batch": meta["batch"]}
    Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()

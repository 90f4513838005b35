"""random_core stage: the control core, encoder rows of latents drawn uniformly from the live latents of
the cycle-0 SAE (those that fired in training, so each has a birth threshold, as every distilled latent does).

It has the size of the distilled core and a fixed seed, so the random-core arm differs from the
distilled arm only in which encoder vectors (with their birth bias and threshold) it freezes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from dmsae import readers
from dmsae.runtime import Runtime
from dmsae.sae import UNSET_THRESHOLD
from dmsae.store import Artifact

NAME = "random_core"
VERSION = "2"  # 2: live latents only; birth bias and threshold
READS_ACTIVATIONS = False


def draw_indices(live: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """`size` of the indices in `live`, uniformly, sorted."""
    pick = torch.randperm(live.numel(), generator=torch.Generator().manual_seed(seed))[:size]
    return live[pick].sort().values


def run(out_dir: Path, params: dict[str, Any], inputs: dict[str, Artifact], rt: Runtime) -> dict[str, Any]:
    size = inputs["core"].metrics["core_size"]
    sae = readers.sae_tensors(inputs["cycle0"])
    lineage = readers.lineage(inputs["cycle0"])
    live = (lineage["birth_threshold"] < UNSET_THRESHOLD).nonzero().squeeze(1)  # latents that ever fired
    if live.numel() < size:  # a cycle-0 SAE with fewer live latents than the core: fill with dead ones
        live = torch.arange(sae["W_enc"].shape[1])
    idx = draw_indices(live, size, params["seed"])
    save_file({"indices": idx, "encoder": sae["W_enc"][:, idx].contiguous(),
               "lineage": lineage["lineage"][idx].contiguous(), "bias": lineage["birth_bias"][idx].contiguous(),
               "threshold": lineage["birth_threshold"][idx].contiguous()},
              str(out_dir / readers.CORE_FILE))
    return {"core_size": size, "seed": params["seed"], "n_live": int(live.numel())}


def describe(metrics: dict[str, Any]) -> str:
    """The status line's detail for a finished random_core stage (none)."""
    return ""

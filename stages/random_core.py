"""random_core stage: the control core, encoder rows of latents drawn uniformly from the cycle-0 SAE.

It has the size of the distilled core and a fixed seed, so the random-core arm differs from the
distilled arm only in which encoder vectors it freezes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dmsae.runtime import Runtime
from dmsae.store import Artifact
from stages import train as train_stage

NAME = "random_core"
VERSION = "1"


def draw_indices(width: int, size: int, seed: int) -> torch.Tensor:
    return torch.randperm(width, generator=torch.Generator().manual_seed(seed))[:size].sort().values


def run(out_dir: Path, params: dict[str, Any], inputs: dict[str, Artifact], rt: Runtime) -> dict[str, Any]:
    size = inputs["core"].metrics["core_size"]
    sae = load_file(str(inputs["cycle0"].file(train_stage.SAE_FILE)))
    lineage = load_file(str(inputs["cycle0"].file(train_stage.LINEAGE_FILE)))["lineage"]
    idx = draw_indices(sae["W_enc"].shape[1], size, params["seed"])
    save_file({"indices": idx, "encoder": sae["W_enc"][:, idx].contiguous(), "lineage": lineage[idx].contiguous()},
              str(out_dir / train_stage.CORE_FILE))
    return {"core_size": size, "seed": params["seed"]}

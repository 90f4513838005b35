"""reuse stage: a fresh SAE at one k in one arm — distilled core, random core, or no core.

All arms at a k share the seed, so they see the same batches in the same order and start from the
same non-core initialisation; only the frozen core differs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dmsae.runtime import Runtime
from dmsae.store import Artifact
from dmsae.training import derive_seed, fit

NAME = "reuse"
VERSION = "3"  # 3: trains with train VERSION 4 (core gates)
READS_ACTIVATIONS = True
ARMS = ("distilled", "random", "none")
BORN_IN_REUSE = -1  # lineage cycle of latents born in a reuse SAE


def run(out_dir: Path, params: dict[str, Any], inputs: dict[str, Artifact], rt: Runtime) -> dict[str, Any]:
    seed = derive_seed(params["seed"], "reuse")
    metrics = fit(out_dir, inputs["harvest"], inputs.get("core"), params["sae"], params["train"],
                  seed, BORN_IN_REUSE, rt)
    return {"arm": params["arm"], "seed": params["seed"], **metrics}


def describe(metrics: dict[str, Any]) -> str:
    """The status line's detail for a finished reuse stage (a diverged SAE's metrics are stored as null)."""
    fvu = metrics.get("train_fvu")
    return f"core {metrics['core_size']}, train FVU {'n/a' if fvu is None else f'{fvu:.3f}'}"

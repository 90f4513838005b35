"""reuse stage: a fresh SAE at one k in one arm: the distilled core, a control core (random, frequency), or no
core (none, and none_compute: no core trained on as many tokens as the whole distillation).

All arms at a k share the seed, so they see the same batches in the same order and start from the same
initialisation of the latents they share; only the frozen core (and, for none_compute, the length of the run)
differs. `trainings` (none_compute only; absent from every other arm's params, so their keys are as before)
multiplies the steps: the cycles' trainings plus the reuse SAE's own.
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
ARMS = ("distilled", "random", "none", "frequency", "none_compute")
BORN_IN_REUSE = -1  # lineage cycle of latents born in a reuse SAE


def run(out_dir: Path, params: dict[str, Any], inputs: dict[str, Artifact], rt: Runtime) -> dict[str, Any]:
    seed = derive_seed(params["seed"], "reuse")
    metrics = fit(out_dir, inputs["harvest"], inputs.get("core"), params["sae"], params["train"],
                  seed, BORN_IN_REUSE, rt, trainings=params.get("trainings", 1))
    return {"arm": params["arm"], "seed": params["seed"], **metrics}


def describe(metrics: dict[str, Any]) -> str:
    """The status line's detail for a finished reuse stage (a diverged SAE's metrics are stored as null)."""
    fvu = metrics.get("train_fvu")
    text = f"core {metrics['core_size']}, train FVU {'n/a' if fvu is None else f'{fvu:.3f}'}"
    if metrics.get("trainings", 1) != 1:
        text += f", {metrics['tokens']:,} tokens ({metrics['trainings']} trainings)"
    return text

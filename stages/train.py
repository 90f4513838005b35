"""train stage: fit a Matryoshka BatchTopK SAE, optionally seeded with a transferred core encoder
(the training itself is `dmsae.training`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dmsae.runtime import Runtime
from dmsae.store import Artifact
from dmsae.training import derive_seed, fit

NAME = "train"
VERSION = "4"  # 4: core gates, birth bias/threshold in the lineage; 3: the autograd-free train step
# the bf16 step's own revision, in bf16 keys only (float32 keys stay as they were): 5: the residuals' sums and the
# weight gradients in float32 from the 16-bit rows (native.group_bag_sums, native.latent_grads_bf16; embedding_bag's
# 16-bit sums before); 4: each entry's value gradient
# from the 16-bit copies, summed in float32 (native.bag_dots_bf16); 3: BatchTopK's ties at the
# k-th largest split by order (sparse_step.top_first_ties); 2: the sparse gathers read 16-bit copies too; 1: only
# the encoder matmul in 16 bits
BF16_STEP = "5"
READS_ACTIVATIONS = True


def run(out_dir: Path, params: dict[str, Any], inputs: dict[str, Artifact], rt: Runtime) -> dict[str, Any]:
    cycle = params["cycle"]
    seed = derive_seed(params["seed"], "train", cycle)
    metrics = fit(out_dir, inputs["harvest"], inputs.get("core"), params["sae"], params["train"], seed, cycle, rt)
    return {"cycle": cycle, **metrics}


def describe(metrics: dict[str, Any]) -> str:
    """The status line's detail for a finished train stage."""
    return f"core in {metrics['core_size']}, train FVU {metrics['train_fvu']:.3f}"

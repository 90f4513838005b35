"""frequency_core stage: the control core chosen by how often latents fire instead of by attribution.

From the SAE the distilled core was selected from (the last cycle's), over the same candidates (the latents of the
innermost reconstruction: core and first Matryoshka group) and the same positions of the attribution split (not BOS,
not a massive-activation outlier), each candidate's firing count under the SAE's inference code is taken; the
`size` most frequent (ties by index), with `size` the distilled core's, become the core, with their encoder rows,
lineage and birth bias and threshold, in the layout of the select stage. The mean activation of every candidate is
stored beside the counts (decoder rows are unit norm, so it is also mean activation x decoder norm), and the
manifest says how much of that ranking's top agrees.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm import tqdm

from dmsae import lm, readers
from dmsae.runtime import Runtime
from dmsae.sae import MatryoshkaSAE
from dmsae.store import Artifact

NAME = "frequency_core"
VERSION = "1"
READS_ACTIVATIONS = False


@torch.no_grad()
def candidate_counts(model: nn.Module, sae: MatryoshkaSAE, layer: int, scale: float, windows: Tensor, bos: int,
                     norm_threshold: float, batch: int, device: str = "cpu",
                     rt: Runtime | None = None) -> tuple[Tensor, Tensor, int]:
    """(firing counts [n_inner], summed activations [n_inner], positions) of the candidate latents (core and first
    group) over `windows`, at the positions attribution splices."""
    n_inner = sae.core_size + sae.ends[0]
    counts = torch.zeros(n_inner, dtype=torch.long)
    sums = torch.zeros(n_inner, dtype=torch.float64)
    n_tok = 0
    n_batches = math.ceil(windows.shape[0] / batch)
    for i in tqdm(range(n_batches), desc="frequency core", unit="batch", disable=rt is None or not rt.show_progress):
        ids = windows[i * batch:(i + 1) * batch].long().to(device)
        h = lm.residual_upto(model, ids, layer)
        x = h[lm.kept_positions(h, ids, bos, norm_threshold)].float() * scale
        f_core, f_nc = sae.encode(x)
        f = torch.cat([f_core, f_nc[:, : sae.ends[0]]], dim=1)
        counts += (f > 0).sum(0).cpu()
        sums += f.double().sum(0).cpu()
        n_tok += x.shape[0]
        if rt is not None:
            rt.report((i + 1) / n_batches, f"batch {i + 1}/{n_batches}")
    return counts, sums, n_tok


def top_indices(scores: np.ndarray, size: int) -> np.ndarray:
    """The `size` highest scores' indices, descending, ties by the lower index."""
    scores = np.asarray(scores, dtype=np.float64)
    return np.lexsort((np.arange(scores.size), -scores))[:size]


def run(out_dir: Path, params: dict[str, Any], inputs: dict[str, Artifact], rt: Runtime) -> dict[str, Any]:
    size = int(inputs["core"].metrics["core_size"])
    distilled = set(readers.core(inputs["core"])["indices"].tolist())
    model = lm.load_model(inputs["model"].path, rt.device, params["dtype"], params.get("autocast"))
    sae, scale = readers.load_sae(inputs["train"], rt.device)
    windows, bos, threshold = readers.split_tokens(inputs, "attribution")
    counts, sums, n_tok = candidate_counts(model, sae, params["layer"], scale, windows, bos, threshold,
                                           rt.args.get("batch_size", 8), rt.device, rt)
    kept = torch.from_numpy(top_indices(counts.numpy(), size).copy()).long()
    tensors = readers.sae_tensors(inputs["train"])
    lineage = readers.lineage(inputs["train"])
    dec_norm = tensors["W_dec"][: counts.numel()].double().norm(dim=1)
    magnitude = sums / max(1, n_tok) * dec_norm  # mean activation x decoder norm
    save_file({
        "indices": kept,
        "encoder": tensors["W_enc"][:, kept].contiguous(),
        "lineage": lineage["lineage"][kept].contiguous(),
        "bias": lineage["birth_bias"][kept].contiguous(),
        "threshold": lineage["birth_threshold"][kept].contiguous(),
        "counts": counts, "mean_activation": (sums / max(1, n_tok)).contiguous(),
    }, str(out_dir / readers.CORE_FILE))
    by_magnitude = set(top_indices(magnitude.numpy(), size).tolist())
    chosen = set(kept.tolist())
    freq = counts.double() / max(1, n_tok)
    return {
        "core_size": size, "n_tokens": n_tok, "n_candidates": int(counts.numel()),
        "shared_with_distilled": len(chosen & distilled),
        "shared_with_magnitude_ranking": len(chosen & by_magnitude),
        "magnitude_shared_with_distilled": len(by_magnitude & distilled),
        "mean_frequency": float(freq[kept].mean()) if size else None,
        "distilled_mean_frequency": float(freq[sorted(distilled)].mean()) if distilled else None,
    }


def describe(metrics: dict[str, Any]) -> str:
    """The status line's detail for a finished frequency_core stage."""
    share = metrics.get("mean_frequency")
    return (f"core size {metrics['core_size']}, {metrics['shared_with_distilled']} shared with the distilled core"
            + ("" if share is None else f", firing on {share:.1%} of tokens"))

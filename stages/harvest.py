"""harvest stage: run layers 0..L over the training windows and stream layer-L residuals to Zarr.

BOS positions are excluded (attention-sink outliers, not text). The activation scale that makes
E||x||^2 = d is measured on the way and stored in the manifest.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm import tqdm

from dmsae import activations, lm
from dmsae.errors import UserError
from dmsae.runtime import Runtime
from dmsae.store import Artifact
from stages import tokens as tokens_stage

NAME = "harvest"
VERSION = "2"


def norm_threshold(first_norms: torch.Tensor, factor: float | None) -> float:
    """Raw-space norm above which a token counts as a massive-activation outlier; inf disables it."""
    return math.inf if factor is None else factor * float(first_norms.float().median())


def run(out_dir: Path, params: dict[str, Any], inputs: dict[str, Artifact], rt: Runtime) -> dict[str, Any]:
    model = lm.load_model(inputs["model"].path, rt.device, params["dtype"])
    layer = params["layer"]
    lm.check_layer(model, layer)
    windows = load_file(str(inputs["tokens"].file(tokens_stage.FILE)))["train"]
    bos = inputs["tokens"].metrics["bos_id"]
    max_rows = int((windows != bos).sum())
    d = int(model.config.hidden_size)
    # sized for every non-BOS position, shrunk to the rows kept once the outliers are known
    array = activations.create(out_dir / activations.ARRAY, max_rows, d, params["chunk_rows"], params["store_dtype"])
    writer = activations.ChunkWriter(array)
    batch = rt.args.get("batch_size", 32)
    sq_norm_sum = 0.0
    threshold = math.inf
    n_batches = math.ceil(windows.shape[0] / batch)
    bar = tqdm(total=max_rows, desc=f"harvest layer {layer}", unit="tok", disable=not rt.show_progress)
    for i in range(n_batches):
        ids = windows[i * batch:(i + 1) * batch].long().to(rt.device)
        h = lm.residual_upto(model, ids, layer)
        if i == 0:  # the median of the first batch fixes the outlier threshold for the whole harvest
            threshold = norm_threshold(h[ids != bos].norm(dim=-1), params["outlier_factor"])
        rows = h[lm.kept_positions(h, ids, bos, threshold)].float().cpu().numpy()
        if not np.isfinite(rows).all():
            raise UserError(f"harvest: the model produced NaN or inf activations at layer {layer}; check model.dtype")
        sq_norm_sum += float(np.square(rows, dtype=np.float64).sum())
        writer.append(rows.astype(params["store_dtype"], copy=False))
        bar.update(int((ids != bos).sum()))
        rt.report((i + 1) / n_batches, f"harvested {writer.offset + writer.pending_rows} tokens")
    bar.close()
    n_rows = writer.close()
    mean_sq_norm = sq_norm_sum / n_rows
    return {
        "n_tokens": n_rows, "d": d, "layer": layer, "n_outliers": max_rows - n_rows,
        "norm_threshold": threshold if math.isfinite(threshold) else None,
        "mean_sq_norm": mean_sq_norm, "scale": math.sqrt(d / mean_sq_norm),
    }

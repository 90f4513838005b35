"""attribute stage: score each candidate latent by gradient x activation on next-token loss.

The innermost reconstruction x_hat_0 (core + first Matryoshka group) replaces the layer-L residual at
every non-BOS position; the summed next-token cross-entropy L is backpropagated once, and
A[t, j] = f_j(t) * dL/df_j(t) for all candidates j at once.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm import tqdm

from dmsae import faults, lm, readers
from dmsae.runtime import Runtime
from dmsae.sae import MatryoshkaSAE
from dmsae.store import Artifact

NAME = "attribute"
VERSION = "3"
READS_ACTIVATIONS = False


def attribution_batch(
    model: nn.Module, sae: MatryoshkaSAE, layer: int, scale: float, ids: Tensor, bos: int,
    norm_threshold: float = math.inf,
) -> dict[str, Tensor]:
    """|A| for the spliced positions of one batch, plus what the metrics need."""
    n_inner = sae.core_size + sae.ends[0]
    w_inner = torch.cat([sae.dec_core, sae.dec[: sae.ends[0]]])
    held: dict[str, Tensor] = {}

    def replace(h: Tensor) -> Tensor:
        spliced = lm.kept_positions(h, ids, bos, norm_threshold)
        x = h[spliced].float() * scale
        f_core, f_nc = sae.encode(x)
        f = torch.cat([f_core, f_nc[:, : sae.ends[0]]], dim=1).detach().requires_grad_(True)
        held.update(x=x, f=f, f_full_nc=f_nc, f_core=f_core)
        x_hat0 = sae.b_dec + f @ w_inner
        out = h.clone()
        out[spliced] = (x_hat0 / scale).to(h.dtype)
        return out

    with torch.enable_grad(), lm.splice(model, layer, replace), lm.autocast(model):
        logits = model(input_ids=ids, use_cache=False).logits.float()
        mask = lm.loss_mask(ids, bos)
        losses = lm.token_losses(logits, ids, mask)
        total = losses.sum()
        total.backward()
    f = held["f"]
    assert f.grad is not None and f.shape[1] == n_inner
    return {
        "abs_attr": (f.detach() * f.grad).abs(),
        "loss_sum": total.detach(), "loss_count": mask.sum(),
        "x": held["x"], "f_core": held["f_core"], "f_nc": held["f_full_nc"],
    }


def run(out_dir: Path, params: dict[str, Any], inputs: dict[str, Artifact], rt: Runtime) -> dict[str, Any]:
    model = lm.load_model(inputs["model"].path, rt.device, params["dtype"], params.get("autocast"))
    sae, scale = readers.load_sae(inputs["train"], rt.device)
    windows, bos, threshold = readers.split_tokens(inputs, "attribution")
    batch = rt.args.get("batch_size", 8)
    n_inner = sae.core_size + sae.ends[0]
    abs_sum = torch.zeros(n_inner, dtype=torch.float64)
    kept: list[Tensor] = []
    n_tok = 0
    loss_sum = loss_count = 0.0
    err_full = err_inner = 0.0
    x_sum = torch.zeros(sae.d, dtype=torch.float64)
    x_sq = 0.0
    l0 = 0.0
    n_batches = math.ceil(windows.shape[0] / batch)
    for i in tqdm(range(n_batches), desc="attribute", unit="batch", disable=not rt.show_progress):
        ids = windows[i * batch:(i + 1) * batch].long().to(rt.device)
        r = attribution_batch(model, sae, params["layer"], scale, ids, bos, threshold)
        faults.point(f"{rt.label}:batch:{i + 1}")
        a = r["abs_attr"].double().cpu()
        abs_sum += a.sum(0)
        if params["score"] == "quantile":
            kept.append(a.float())
        n_tok += a.shape[0]
        loss_sum += float(r["loss_sum"])
        loss_count += float(r["loss_count"])
        with torch.no_grad():
            x, f_core, f_nc = r["x"], r["f_core"], r["f_nc"]
            x_hat = sae.decode(f_core, f_nc)
            x_hat0 = sae.prefix_reconstructions(f_core, f_nc)[0]
            err_full += float((x - x_hat).pow(2).sum())
            err_inner += float((x - x_hat0).pow(2).sum())
            x_sum += x.double().sum(0).cpu()
            x_sq += float(x.double().pow(2).sum())
            l0 += float((f_core > 0).sum() + (f_nc > 0).sum())
        rt.report((i + 1) / n_batches, f"batch {i + 1}/{n_batches}")
    if params["score"] == "quantile":
        scores = torch.quantile(torch.cat(kept).double(), params["q"], dim=0) if kept else abs_sum
    else:
        scores = abs_sum / max(1, n_tok)
    save_file({"scores": scores.contiguous(), "candidates": torch.arange(n_inner)}, str(out_dir / readers.SCORES_FILE))
    total_var = x_sq - float(x_sum.pow(2).sum()) / max(1, n_tok)  # sum ||x - mean||^2
    return {
        "n_candidates": n_inner, "n_tokens": n_tok, "score_total": float(scores.sum()),
        "ce_spliced_inner": loss_sum / max(1.0, loss_count),
        "fvu": err_full / total_var if total_var > 0 else math.nan,
        "fvu_inner": err_inner / total_var if total_var > 0 else math.nan,
        "l0": l0 / max(1, n_tok),
        "nonzero_scores": int((scores > 0).sum()),
        "score_quantile_q": params["q"] if params["score"] == "quantile" else None,
    }


def describe(metrics: dict[str, Any]) -> str:
    """The status line's detail for a finished attribute stage."""
    return f"FVU {metrics['fvu']:.3f}, L0 {metrics['l0']:.1f}"

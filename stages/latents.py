"""latents stage: what the latent cards show, for the final core and a sample of other latents.

The SAE is the last cycle's; its card latents are the final core (the last selection, in selection order)
and `cards_noncore` latents drawn (seeded) from the rest of those that fire on the held-out text. Over the
eval split (the windows no SAE trained on), every token's code is kept sparsely, so each latent's density,
activation histogram and top-activating contexts come from one pass of the model. The logit effect is the
latent's decoder direction, in residual units, through the unembedding (W_dec[i] @ W_U^T, no final norm,
as SAE dashboards show it). Lineage gives the cycle a latent was born in and how many cycles selected it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm import tqdm

from dmsae import lm, readers
from dmsae.runtime import Runtime
from dmsae.store import Artifact

NAME = "latents"
VERSION = "1"
READS_ACTIVATIONS = False
WINDOW_BEFORE, WINDOW_AFTER = 12, 4  # tokens of a context around its strongest token
HIST_BINS = 24
N_LOGITS = 10


@torch.no_grad()
def sparse_codes(model: torch.nn.Module, sae: Any, scale: float, windows: Tensor, bos: int, layer: int,
                 norm_threshold: float, batch: int, rt: Runtime) -> tuple[Tensor, Tensor, Tensor, int]:
    """Every non-zero code on the eval windows: (flat token position, latent, activation), sorted by position
    then latent, and the number of positions the SAE models (not BOS, not an outlier)."""
    positions, latents, values = [], [], []
    n_modelled = 0
    width = windows.shape[1]
    n_batches = math.ceil(windows.shape[0] / batch)
    for i in tqdm(range(n_batches), desc="latent cards", unit="batch", disable=not rt.show_progress):
        ids = windows[i * batch:(i + 1) * batch].long().to(rt.device)
        h = lm.residual_upto(model, ids, layer)
        kept = lm.kept_positions(h, ids, bos, norm_threshold)
        n_modelled += int(kept.sum())
        f_core, f_nc = sae.encode(h[kept].float() * scale)
        codes = torch.cat([f_core, f_nc], dim=1)
        row, latent = codes.nonzero(as_tuple=True)
        flat = (kept.flatten().nonzero().squeeze(1) + i * batch * width).to(row.device)
        positions.append(flat[row].cpu())
        latents.append(latent.cpu())
        values.append(codes[row, latent].float().cpu())
        rt.report((i + 1) / n_batches, f"batch {i + 1}/{n_batches}")
    return torch.cat(positions), torch.cat(latents), torch.cat(values), n_modelled


def context_bounds(position: int, window: int) -> tuple[int, int]:
    """[lo, hi) of the flat positions shown around `position`, never crossing into another window."""
    start = position // window * window
    return max(start, position - WINDOW_BEFORE), min(start + window, position + WINDOW_AFTER + 1)


def token_texts(tokenizer: Any, ids: list[int]) -> dict[int, str]:
    """Each token id's text as it appears in the decoded string (a leading space included)."""
    return {i: tokenizer.decode([i]) for i in sorted(set(ids))}


def times_selected(lineage: Tensor, cores: list[Tensor]) -> Tensor:
    """For each latent (its lineage row: born cycle, index at birth), how many selections kept it."""
    ids = [tuple(r) for r in lineage.tolist()]
    counts = torch.zeros(len(ids), dtype=torch.long)
    for core in cores:
        chosen = {tuple(r) for r in core.tolist()}
        counts += torch.tensor([i in chosen for i in ids], dtype=torch.long)
    return counts


def run(out_dir: Path, params: dict[str, Any], inputs: dict[str, Artifact], rt: Runtime) -> dict[str, Any]:
    from transformers import AutoTokenizer

    model = lm.load_model(inputs["model"].path, rt.device, params["dtype"], params.get("autocast"))
    tokenizer = AutoTokenizer.from_pretrained(str(inputs["model"].path))
    sae, scale = readers.load_sae(inputs["train"], rt.device)
    windows, bos, threshold = readers.split_tokens(inputs, "eval")
    pos, lat, val, n_modelled = sparse_codes(model, sae, scale, windows, bos, params["layer"], threshold,
                                             rt.args.get("batch_size", 16), rt)
    fires = torch.bincount(lat, minlength=sae.width)

    selections = sorted((name for name in inputs if name.startswith("select")), key=lambda n: int(n[len("select"):]))
    final = readers.core(inputs[selections[-1]])
    core = final["indices"].tolist()
    rest = sorted(set(torch.nonzero(fires).squeeze(1).tolist()) - set(core))
    rng = np.random.default_rng(params["seed"])
    sample = sorted(rng.choice(rest, size=min(params["noncore"], len(rest)), replace=False).tolist()) if rest else []
    chosen = core + sample

    lineage = readers.lineage(inputs["train"])["lineage"]
    selected = times_selected(lineage, [readers.core(inputs[s])["lineage"] for s in selections])
    scores = readers.attribution_scores(inputs["attribute"]).double()
    w_u = model.get_output_embeddings().weight.detach().float().cpu()  # [vocab, d]
    # the residual-stream direction of one unit of each code
    w_dec = readers.sae_tensors(inputs["train"])["W_dec"].float() / scale
    logits = w_dec[chosen] @ w_u.T
    flat_ids = windows.long().flatten()

    rows, contexts = [], []
    needed_ids: set[int] = set()
    per_latent: dict[int, tuple[Tensor, Tensor, list[int]]] = {}
    for latent in chosen:
        mine = lat == latent
        p, v = pos[mine], val[mine]
        # strongest first; equal activations by position, so the order is reproducible
        vl, pl = v.tolist(), p.tolist()
        order = sorted(range(len(vl)), key=lambda j: (-vl[j], pl[j]))[: params["contexts"]]
        per_latent[latent] = (p, v, order)
        for j in order:
            lo, hi = context_bounds(int(p[j]), windows.shape[1])
            needed_ids.update(flat_ids[lo:hi].tolist())
    texts = token_texts(tokenizer, sorted(needed_ids))
    vocab_text: dict[int, str] = {}
    for i, latent in enumerate(chosen):
        p, v, order = per_latent[latent]
        act_at = dict(zip(p.tolist(), v.tolist(), strict=True))
        for rank, j in enumerate(order):
            lo, hi = context_bounds(int(p[j]), windows.shape[1])
            contexts.append({"latent": latent, "rank": rank,
                             "tokens": [texts[t] for t in flat_ids[lo:hi].tolist()],
                             "acts": [act_at.get(q, 0.0) for q in range(lo, hi)],
                             "center": int(p[j]) - lo, "max_act": float(v[j])})
        top = torch.topk(logits[i], N_LOGITS)
        bottom = torch.topk(-logits[i], N_LOGITS)
        for t in top.indices.tolist() + bottom.indices.tolist():
            if t not in vocab_text:
                vocab_text[t] = tokenizer.decode([t])
        nonzero = v.double()
        edges = torch.linspace(0.0, float(nonzero.max()) if len(nonzero) else 1.0, HIST_BINS + 1, dtype=torch.float64)
        counts = torch.histc(nonzero, bins=HIST_BINS, min=0.0, max=float(edges[-1])) if len(nonzero) else \
            torch.zeros(HIST_BINS, dtype=torch.float64)
        rows.append({
            "latent": latent, "kind": "core" if latent in core else "non-core",
            "born_cycle": int(lineage[latent, 0]), "times_selected": int(selected[latent]),
            "attribution": float(scores[latent]) if latent < len(scores) else float("nan"),
            "density": int(fires[latent]) / max(1, n_modelled),
            "mean_act": float(nonzero.mean()) if len(nonzero) else 0.0,
            "max_act": float(nonzero.max()) if len(nonzero) else 0.0,
            "hist_edges": edges.tolist(), "hist_counts": [int(c) for c in counts.tolist()],
            "top_logit_tokens": [vocab_text[t] for t in top.indices.tolist()],
            "top_logit_values": top.values.tolist(),
            "bottom_logit_tokens": [vocab_text[t] for t in bottom.indices.tolist()],
            "bottom_logit_values": (-bottom.values).tolist(),
        })
    pd.DataFrame(rows).to_parquet(out_dir / readers.LATENTS_FILE, index=False)
    pd.DataFrame(contexts, columns=["latent", "rank", "tokens", "acts", "center", "max_act"]).to_parquet(
        out_dir / readers.CONTEXTS_FILE, index=False)
    return {"n_latents": len(chosen), "n_core": len(core), "n_tokens": n_modelled,
            "mean_density_core": float(np.mean([r["density"] for r in rows[: len(core)]])) if core else 0.0}


def describe(metrics: dict[str, Any]) -> str:
    """The status line's detail for a finished latents stage (none)."""
    return ""

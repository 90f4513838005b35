"""Export an SAE in the SAELens layout: cfg.json + sae_weights.safetensors (JumpReLU architecture).

dmsae trains on activations scaled by s (so that E||s x||^2 = d). The scale is folded into the
weights so the exported SAE reads raw residuals and writes raw residuals:
W_enc' = s W_enc, b_dec' = b_dec / s, W_dec' = W_dec / s; b_enc and thresholds are unchanged,
so the latent activations are exactly dmsae's. Core latents carry their gate's threshold: 0 for `relu` (plain
ReLU), the birth threshold for `relu_bias`, the learned one for `topk`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dmsae import readers
from dmsae.errors import UserError
from dmsae.plan import Node, Plan
from dmsae.store import Artifact

WEIGHTS_FILE = "sae_weights.safetensors"
CONFIG_FILE = "cfg.json"


def choose_sae(p: Plan, run: str, label: str | None, k: int, seed: int) -> Node:
    """The train or reuse node labelled `label`; by default the distilled-core reuse SAE at `k` and `seed`, else
    the last cycle's SAE."""
    saes = [n for n in p.nodes if n.stage in ("train", "reuse")]
    if label:
        chosen = [n for n in saes if n.label == label]
        if not chosen:
            raise UserError(f"--sae {label}: no such SAE in run '{run}'; one of: " + ", ".join(n.label for n in saes))
        return chosen[0]
    preferred = [n for n in saes if n.label == f"reuse[distilled,k={k},seed={seed}]"]
    return preferred[0] if preferred else [n for n in saes if n.stage == "train"][-1]


def saelens_tensors(sae_file: Path, scale: float) -> dict[str, torch.Tensor]:
    """The SAE's weights with the activation scale folded in (see the module docstring)."""
    t = load_file(str(sae_file))
    return {
        "W_enc": (t["W_enc"] * scale).contiguous(),
        "b_enc": t["b_enc"].contiguous(),
        "W_dec": (t["W_dec"] / scale).contiguous(),
        "b_dec": (t["b_dec"] / scale).contiguous(),
        "threshold": t["threshold"].contiguous(),
    }


def export_saelens(artifact: Artifact, out_dir: Path, *, model_name: str, layer: int, context: int,
                   dataset: str, label: str) -> Path:
    """Write the SAE of a train or reuse artifact to `out_dir`; returns the folder."""
    sae, scale = readers.load_sae(artifact)
    tensors = saelens_tensors(artifact.file(readers.SAE_FILE), scale)
    d_in, d_sae = tensors["W_enc"].shape
    cfg: dict[str, Any] = {
        "architecture": "jumprelu",
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "model_name": model_name,
            "hook_name": f"blocks.{layer}.hook_resid_post",
            "hook_head_index": None,
            "prepend_bos": True,
            "context_size": context,
            "dataset_path": dataset,
            "dmsae": {"sae": label, "key": artifact.manifest.key, "stage": artifact.manifest.stage,
                      "core_size": sae.core_size, "k": sae.k, "group_ends": sae.ends,
                      "activation_scale_folded": scale},
        },
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / WEIGHTS_FILE))
    (out_dir / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
    return out_dir


def jumprelu_encode(tensors: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """SAELens' JumpReLU encode on raw activations, for checking an export without SAELens."""
    pre = (x - tensors["b_dec"]) @ tensors["W_enc"] + tensors["b_enc"]
    return torch.relu(pre) * (pre > tensors["threshold"]).to(pre.dtype)

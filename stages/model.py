"""model stage: convert the language model once into a transformers folder of safetensors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dmsae.errors import UserError
from dmsae.runtime import Runtime
from dmsae.store import Artifact

NAME = "model"
VERSION = "1"
READS_ACTIVATIONS = False


def convert(kind: str, location: str, dtype: str, out_dir: Path) -> dict[str, Any]:
    """Load from GGUF, a folder or the hub, and save as a plain transformers folder."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    kwargs: dict[str, Any] = {}
    source = location
    if kind == "gguf":
        source, kwargs["gguf_file"] = str(Path(location).parent), Path(location).name
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        loaded = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"model.path: could not load {location!r}: {str(e).splitlines()[0]}") from None
    if kind == "gguf":
        # A GGUF-loaded model refuses save_pretrained: rebuild it from its config and copy the weights.
        config = AutoConfig.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
        missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
        if unexpected or [m for m in missing if "lm_head" not in m]:
            raise UserError(
                f"model.path: {location} did not convert cleanly (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        model.tie_weights()
    else:
        model = loaded
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    cfg = model.config
    return {
        "architecture": type(model).__name__,
        "num_layers": int(cfg.num_hidden_layers),
        "d_model": int(cfg.hidden_size),
        "vocab_size": int(cfg.vocab_size),
        "parameters": int(sum(p.numel() for p in model.parameters())),
    }


def run(out_dir: Path, params: dict[str, Any], inputs: dict[str, Artifact], rt: Runtime) -> dict[str, Any]:
    return convert(params["kind"], rt.args["location"], params["dtype"], out_dir)


def describe(metrics: dict[str, Any]) -> str:
    """The status line's detail for a finished model stage (none)."""
    return ""

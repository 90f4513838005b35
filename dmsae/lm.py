"""Language-model plumbing: load a converted model, capture or replace one layer's residual output."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dmsae.errors import UserError


def bos_id(tokenizer: Any) -> int:
    """The token that marks document starts: the tokenizer's BOS, else its EOS."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if bos is None:
        raise UserError("the tokenizer has neither a BOS nor an EOS token; dmsae needs one to mark documents")
    return int(bos)


class _StopForward(Exception):
    """Raised from a hook to end the forward pass after the layer we need."""


def load_model(path: Path, device: str = "cpu", dtype: str = "float32", autocast: str | None = None) -> nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype))
    model.requires_grad_(False)
    model.dmsae_autocast = autocast  # read by `autocast(model)` around every forward of a stage
    return model.eval().to(device)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        obj: object = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    raise UserError(f"model of type {type(model).__name__} has no recognised list of decoder layers")


def num_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def check_layer(model: nn.Module, layer: int) -> None:
    n = num_layers(model)
    if not 0 <= layer < n:
        raise UserError(f"harvest.layer={layer} is out of range: the model has layers 0..{n - 1}")


def _hidden(output: object) -> Tensor:
    return output if isinstance(output, Tensor) else output[0]  # type: ignore[index]


def _replace_hidden(output: object, new: Tensor) -> object:
    if isinstance(output, Tensor):
        return new
    return (new, *output[1:])  # type: ignore[index]


def autocast(model: nn.Module) -> torch.autocast:
    """The autocast `load_model` was asked for (the stage's `autocast` param, set by the plan for a float32
    model under precision.lm=bf16, or on CUDA): matmuls in bfloat16; the ops autocast keeps in float32
    (softmax, log-softmax, losses, norms) and every metric sum stay float32."""
    kind = getattr(model, "dmsae_autocast", None)
    p = next(model.parameters())
    return torch.autocast(p.device.type, dtype=getattr(torch, kind or "bfloat16"), enabled=bool(kind))


@torch.no_grad()
def residual_upto(model: nn.Module, input_ids: Tensor, layer: int) -> Tensor:
    """The residual stream after `layer`, running only layers 0..layer."""
    captured: list[Tensor] = []

    def hook(_mod: nn.Module, _inp: object, output: object) -> None:
        captured.append(_hidden(output))
        raise _StopForward

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        with autocast(model):
            model(input_ids=input_ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return captured[0]


@contextmanager
def splice(model: nn.Module, layer: int, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Replace the output of `layer` with fn(output) for forwards inside the block."""

    def hook(_mod: nn.Module, _inp: object, output: object) -> object:
        return _replace_hidden(output, fn(_hidden(output)))

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def kept_positions(h: Tensor, ids: Tensor, bos: int, norm_threshold: float, norms: Tensor | None = None) -> Tensor:
    """Positions whose residual the SAE models: not BOS, and not a massive-activation outlier whose
    norm exceeds `norm_threshold` (the harvest stage's factor x median norm). Everywhere else the
    model keeps its own activation: in harvest, attribution and evaluation alike. `norms`: the rows'
    float32 norms, `h.float().norm(dim=-1)`, when the caller has them already."""
    return (ids != bos) & ((h.float().norm(dim=-1) if norms is None else norms) <= norm_threshold)


def token_losses(logits: Tensor, input_ids: Tensor, mask: Tensor) -> Tensor:
    """Per-position next-token cross-entropy [B, T-1]: entry t is the loss of predicting token t+1
    from position t, zeroed where mask[:, t] is 0 (the mask is indexed by source position)."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return nll * mask[:, :-1]


def loss_mask(ids: Tensor, bos: int) -> Tensor:
    """1 where both the position and its next-token target are real tokens (not BOS)."""
    real = ids != bos
    mask = torch.zeros_like(ids, dtype=torch.float32)
    mask[:, :-1] = (real[:, :-1] & real[:, 1:]).float()
    return mask


def pad_with_bos(ids: list[list[int]], bos: int, device: str) -> Tensor:
    """Right-pad sequences with BOS: causal attention keeps real tokens blind to it, and kept_positions drops it."""
    width = max(len(i) for i in ids)
    return torch.tensor([i + [bos] * (width - len(i)) for i in ids], device=device)

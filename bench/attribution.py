"""3. Attribution: `stages.attribute.attribution_batch` against a forward and backward of the model from
layer L (the layer-L residual as a leaf that requires grad, the same next-token loss), on the same batches."""

from __future__ import annotations

import math

import torch

from bench.common import ATTR_BATCH, LAYER, Context, Row, lm_autocast, log, median, time_call
from bench.train import CORE, SEED, D, build_sae, sae_params
from dmsae import lm, readers
from stages.attribute import attribution_batch


def reference(model: torch.nn.Module, ids: torch.Tensor, bos: int) -> None:
    """Forward (layers 0..L without grad, L+1.. with) and backward from layer L: attribution without the SAE."""

    def leaf(h: torch.Tensor) -> torch.Tensor:
        return h.detach().requires_grad_(True)

    with torch.enable_grad(), lm.splice(model, LAYER, leaf), lm.autocast(model):
        logits = model(input_ids=ids, use_cache=False).logits.float()
        total = lm.token_losses(logits, ids, lm.loss_mask(ids, bos)).sum()
        total.backward()


def run(ctx: Context) -> list[Row]:
    device = ctx.device
    model_art, tokens_art = ctx.shared["model"], ctx.shared["tokens"]
    bos = int(tokens_art.metrics["bos_id"])
    windows = readers.token_windows(tokens_art, "train")
    n = (ctx.mode.attr_batches + 1) * ATTR_BATCH  # the first batch is the warm-up
    batches = [windows[i:i + ATTR_BATCH].long().to(device) for i in range(0, min(n, windows.shape[0]), ATTR_BATCH)]
    model = lm.load_model(model_art.path, device, "float32", lm_autocast(device))
    sae = ctx.shared.get("sae")
    scale = ctx.shared.get("sae_scale")
    note = "SAE: the no-core SAE trained by the training benchmark"
    if sae is None or scale is None:  # the training benchmark did not run: an untrained SAE with open thresholds
        sae = build_sae(sae_params(), D, None, SEED)
        with torch.no_grad():
            sae.threshold.zero_()
        scale, note = 1.0, "SAE: untrained, every positive latent on (the training benchmark did not run)"
    # with a core, as in cycles >= 1: the candidates are the core and the first group
    core_sae = build_sae(sae_params(), D, sae.enc[:, :CORE].detach().clone(), SEED + 1)
    with torch.no_grad():
        core_sae.threshold.copy_(sae.threshold[CORE:])
    sae.requires_grad_(False).eval().to(device)
    core_sae.requires_grad_(False).eval().to(device)
    threshold = math.inf
    harvest_metrics = ctx.shared.get("harvest_metrics") or {}
    if harvest_metrics.get("norm_threshold") is not None:
        threshold = float(harvest_metrics["norm_threshold"])

    def attr(s: torch.nn.Module, ids: torch.Tensor) -> None:
        attribution_batch(model, s, LAYER, scale, ids, bos, threshold)

    log(f"attribution: {len(batches) - 1} batches of {ATTR_BATCH}x{windows.shape[1]} tokens (+1 warm-up)")
    fns = {"attr": lambda ids: attr(sae, ids), "ref": lambda ids: reference(model, ids, bos)}
    if ctx.mode.attr_core:
        fns["core"] = lambda ids: attr(core_sae, ids)
    for fn in fns.values():
        fn(batches[0])
    times: dict[str, list[float]] = {k: [] for k in fns}
    for ids in batches[1:]:  # interleaved per batch
        for k, fn in fns.items():
            times[k].append(time_call(lambda fn=fn, ids=ids: fn(ids), device))
    tokens = ATTR_BATCH * windows.shape[1]
    tps = {k: tokens / median(v) for k, v in times.items()}
    cost = tps["ref"] / tps["attr"]
    rows = [Row("attribution_batch (no core: candidates = first group)", tps["attr"], "tokens/s",
                "forward + backward from layer 15", tps["ref"], cost, "<= 1.3x the cost", cost <= 1.3,
                note=f"ratio = time / reference time; median of {len(times['attr'])} batches; {note}")]
    if "core" in tps:
        core_cost = tps["ref"] / tps["core"]
        rows.append(Row(f"attribution_batch with a {CORE}-latent core", tps["core"], "tokens/s",
                        "forward + backward from layer 15", tps["ref"], core_cost, "<= 1.3x the cost",
                        core_cost <= 1.3, note="ratio = time / reference time"))
    return rows

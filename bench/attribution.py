"""3. Attribution: `stages.attribute.attribution_batch` against a forward and backward of the model from
layer L (the layer-L residual as a leaf that requires grad, the same next-token loss), on the same batches; and
both again with the language model in bf16 (`precision.lm: bf16`: the model loaded with `autocast: bfloat16`, as
the plan passes it), against each other and against fp32, with how far the bf16 scores move."""

from __future__ import annotations

import math

import torch

from bench.common import (
    ATTR_BATCH,
    LAYER,
    Context,
    Row,
    bf16_measured,
    bf16_not_measured,
    lm_autocast,
    log,
    median,
    time_call,
)
from bench.train import CORE, SEED, D, build_sae, sae_params
from dmsae import lm, precision, readers
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
    planned = lm_autocast(device)  # None on the CPU; bfloat16 on CUDA, as the pipeline plans it
    model = lm.load_model(model_art.path, device, "float32", planned)
    with16 = bf16_measured(device)[0]
    model16 = lm.load_model(model_art.path, device, "float32", "bfloat16") if with16 else None
    model32 = model if planned is None else lm.load_model(model_art.path, device, "float32", None)
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

    score_sums: dict[str, torch.Tensor] = {}

    def attr(m: torch.nn.Module, s: torch.nn.Module, ids: torch.Tensor, key: str | None = None) -> None:
        r = attribution_batch(m, s, LAYER, scale, ids, bos, threshold)
        if key is not None:  # the candidates' summed |A|, to compare the fp32 and bf16 scores (one small sum)
            score_sums[key] = score_sums.get(key, 0) + r["abs_attr"].double().sum(0).cpu()

    log(f"attribution: {len(batches) - 1} batches of {ATTR_BATCH}x{windows.shape[1]} tokens (+1 warm-up), "
        f"fp32{' and bf16' if with16 else ''}")
    fns = {"attr": lambda ids: attr(model, sae, ids, "planned"), "ref": lambda ids: reference(model, ids, bos)}
    if model16 is not None:
        fns |= {"attr16": lambda ids: attr(model16, sae, ids, "bf16"),
                "ref16": lambda ids: reference(model16, ids, bos)}
    if model32 is not model:
        fns |= {"attr32": lambda ids: attr(model32, sae, ids, "fp32"),
                "ref32": lambda ids: reference(model32, ids, bos)}
    if ctx.mode.attr_core:
        fns["core"] = lambda ids: attr(model, core_sae, ids)
    for fn in fns.values():
        fn(batches[0])
    score_sums.clear()  # the warm-up batch is not compared
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
    if not with16:
        return [*rows, bf16_not_measured("attribution_batch, LM in bf16", device)]
    k32 = "attr32" if "attr32" in tps else "attr"
    r32 = "ref32" if "ref32" in tps else "ref"
    cost16 = tps["ref16"] / tps["attr16"]
    native, why = precision.native_bf16(device)
    rows += [
        Row("attribution_batch, LM in bf16 (autocast bfloat16)", tps["attr16"], "tokens/s",
            "bf16 forward + backward from layer 15", tps["ref16"], cost16, "<= 1.3x the cost", cost16 <= 1.3,
            note=f"ratio = time / reference time; {why}"),
        Row("bf16 attribution vs fp32 attribution: speed-up", tps["attr16"], "tokens/s", "fp32 attribution_batch",
            tps[k32], tps["attr16"] / tps[k32],
            note=f"the references alone: bf16 {tps['ref16'] / tps[r32]:.2f}x fp32"
                 + ("" if native else "; not native bf16 by dmsae.precision's rule")),
    ]
    a, b = score_sums.get("planned" if k32 == "attr" else "fp32"), score_sums.get("bf16")
    if a is not None and b is not None:
        top = min(CORE, a.numel())
        top_a, top_b = set(a.topk(top).indices.tolist()), set(b.topk(top).indices.tolist())
        rel = float((b - a).norm() / a.norm().clamp_min(1e-30))
        rows.append(Row(f"bf16 attribution scores vs fp32: Jaccard of the top {top} candidates",
                        len(top_a & top_b) / len(top_a | top_b), "", note=f"relative L2 difference of the "
                        f"candidates' mean |A|: {rel:.4f}, over {len(times['attr16'])} batches; {note}"))
    return rows

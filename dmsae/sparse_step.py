"""The fast training step of `MatryoshkaSAE`: the loss and hand-derived gradients of `forward_train`
without autograd, touching only the active (token, latent) entries past the encoder matmul.

`forward_train` with autograd is the reference; tests/test_sae.py checks this step against it for every
core gate, with and without AuxK.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmsae import native
from dmsae.sae import MatryoshkaSAE, StepStats, Workspace, ema_thresholds, smallest_active, workspace

# the signed integer type whose order matches a 16-bit float type's above zero (float32 compares as fast as int32)
SAME_ORDER_INT = {torch.bfloat16: torch.int16, torch.float16: torch.int16}
SMALL = 1 << 18  # up to this many entries `above` runs the plain nonzero (its cost is small beside the step's)


def above(flat: Tensor, thr: Tensor) -> tuple[Tensor, Tensor]:
    """The indices of the entries of `flat` greater than `thr`, in order (the same as (flat > thr).nonzero()), and
    those entries."""
    if flat.numel() <= SMALL or flat.device.type != "cpu":  # a GPU runs the one pass in parallel
        idx = (flat > thr).nonzero().squeeze(1)
        return idx, flat.index_select(0, idx)
    # one read of the pre-activations in C where it builds (16-bit entries: above a positive threshold), the same
    found = native.above_f32(flat, thr) if flat.dtype == torch.float32 else native.above_16(flat, thr)
    if found is not None:
        return found
    as_int = SAME_ORDER_INT.get(flat.dtype)
    if as_int is None or not float(thr) > 0:
        idx = _above_by_words(flat, thr)
        return idx, flat.index_select(0, idx)
    # Above a positive threshold, 16-bit floats order as their bit patterns read as signed integers (a negative
    # float reads negative), and the CPU compares integers faster than it converts bfloat16 to compare. Only a
    # positive NaN reads above every number: the float compare over the few survivors drops it.
    cand = _above_by_words(flat.view(as_int), thr.view(as_int))
    vals = flat.index_select(0, cand)
    keep = vals > thr
    return cand[keep], vals[keep]


def _above_by_words(flat: Tensor, thr: Tensor) -> Tensor:
    """(flat > thr).nonzero() for a sparse mask, faster on the CPU: nonzero over the whole mask (16.7M flags at the
    bench shape) cost three times the compare; read as 8-byte words it scans an eighth as many, and only the few
    words with a flag set (about 1 in 10 when 1.6 % of the entries pass) are opened."""
    mask = flat > thr
    n8 = mask.numel() // 8 * 8
    words = mask[:n8].view(-1, 8)
    hit = words.view(torch.int64).squeeze(1).nonzero().squeeze(1)
    word, bit = words.index_select(0, hit).nonzero().unbind(1)
    idx = hit.index_select(0, word).mul_(8).add_(bit)
    if n8 < mask.numel():
        idx = torch.cat([idx, mask[n8:].nonzero().squeeze(1).add_(n8)])
    return idx


def sampled_kth(flat: Tensor, stride: int, rank: int) -> Tensor:
    """flat[::stride].kthvalue(rank).values, in C where it builds: a float32 input read in place, a 16-bit one through
    a float32 copy of the sample (exact, and the order is the same, so the same value: torch's own 16-bit kthvalue
    took 0.85 ms at the bench shape, the copy and the search 0.3)."""
    if flat.dtype == torch.float32:
        found = native.kth_smallest_f32(flat, stride, rank)
    else:
        found = native.kth_smallest_f32(flat[::stride].float(), 1, rank)
        found = None if found is None else found.to(flat.dtype)
    return found if found is not None else flat[::stride].kthvalue(rank).values


def select_topk(pre_nc: Tensor, k: int, any_order: bool = False) -> tuple[Tensor, Tensor]:
    """BatchTopK as (flat indices, values): a threshold from a strided sample keeps about twice the
    k*B entries, then an exact top-k runs over those survivors only. Same selection as a full top-k.
    With `any_order` (the caller sorts the entries itself) they may come in index order rather than topk's: then
    the compiled selection runs where it builds (the same set, in half of topk's time or less), and 16-bit entries
    tied with the k-th largest are split by `top_first_ties`'s rule."""
    flat = pre_nc.flatten()
    n_keep = min(k * pre_nc.shape[0], flat.numel())
    stride = max(1, flat.numel() // 65536) | 1  # odd: a power-of-two stride would sample only a few latents
    n_sample = (flat.numel() + stride - 1) // stride
    q = 1.0 - min(1.0, 2.0 * n_keep / flat.numel())
    cand = None
    if q > 0:
        rank = max(1, int(q * n_sample))
        thr = sampled_kth(flat, stride, rank)
        cand, cand_vals = above(flat, thr)
        if cand.numel() < n_keep:  # the sample under-estimated the tail: fall back to the exact path
            cand = None
    if cand is None:
        vals, idx = flat.topk(n_keep, sorted=False)
        return idx, vals
    if any_order and cand_vals.dtype != torch.float32:
        return top_first_ties(cand_vals, cand, n_keep)
    if any_order and (found := native.top_f32(cand_vals, cand, n_keep)) is not None:
        return found
    vals, pos = cand_vals.topk(n_keep, sorted=False)
    return cand.index_select(0, pos), vals


def top_first_ties(values: Tensor, index: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(index, float32 values) of the k largest `values` in their order, where those tied with the k-th largest
    that do not all fit are taken first in order: the bf16 step's rule (16-bit pre-activations tie often, and which
    of them torch.topk keeps is its algorithm's choice, slow to reproduce). In C where it builds (with the C sample's
    threshold, the bf16 step's selection took 8.0 ms instead of 11.5 at the bench shape), else the same entries in
    torch."""
    found = native.top_f32(values.float(), index, k, first_ties=True)
    if found is not None:
        return found
    kth = values.topk(k, sorted=False).values.min()
    greater = values > kth
    tied = values == kth
    pos = (greater | (tied & (tied.cumsum(0) <= k - greater.sum()))).nonzero().squeeze(1)
    if pos.numel() != k:  # a NaN (topk ranks it above every number): topk's own pick
        pos = values.topk(k, sorted=False).indices.sort().values
    return index.index_select(0, pos), values.index_select(0, pos).float()


def joint_topk(pre_core: Tensor, pre_nc: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """One BatchTopK of k*B entries over [core | non-core] (`core_gate: topk`) without concatenating the
    batch: the winners lie among all core entries and the non-core's own top k*B. Returns the non-core
    winners as (flat indices, values) and the core's code, dense [B, c]."""
    B, c = pre_core.shape
    nc_idx, nc_vals = select_topk(pre_nc, k, any_order=c == 0)  # with a core, the joint top-k's ties read the order
    if c == 0:  # no core: the non-core's top k*B win, the same entries in another order (the step sorts them)
        return nc_idx, nc_vals.to(pre_core.dtype), pre_core
    n_keep = min(k * B, pre_core.numel() + pre_nc.numel())
    vals, pos = torch.cat([pre_core.flatten(), nc_vals.to(pre_core.dtype)]).topk(n_keep, sorted=False)
    in_core = pos < B * c
    f_core = torch.zeros_like(pre_core).flatten().index_put_((pos[in_core],), vals[in_core]).view(B, c)
    return nc_idx[pos[~in_core] - B * c], vals[~in_core], f_core


def aux_entries(sae: MatryoshkaSAE, pre_nc: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
    """AuxK's active entries as (token, latent, value): each token's k_aux largest pre-activations among
    the dead latents, keeping only the positive ones. None when no latent is dead (or AuxK is off)."""
    dead = sae.dead_mask()
    n_dead = int(dead.sum())
    if n_dead == 0 or sae.aux_alpha == 0:
        return None
    dead_idx = dead.nonzero().squeeze(1)
    dead_pre = pre_nc.index_select(1, dead_idx)
    # Entries at or below zero add nothing to the loss and get no gradient through the ReLU. Dead latents
    # usually rarely fire: then keep each token's positive ones and top-k only the tokens with more than
    # k_aux of them. When most tokens have more (many dead latents that would fire), top-k them all.
    keep = dead_pre > 0
    # an int32 sum: count_nonzero would first copy the whole [B, dead] mask into int64
    crowded = (keep.sum(1, dtype=torch.int32) > sae.k_aux).nonzero().squeeze(1)
    if crowded.numel() > dead_pre.shape[0] // 4:
        top_vals, top_pos = dead_pre.topk(sae.k_aux, dim=1, sorted=False)
        rows, j = (top_vals > 0).nonzero().unbind(1)
        return rows, dead_idx[top_pos[rows, j]], top_vals[rows, j].float()
    if crowded.numel():
        pos = dead_pre[crowded].topk(sae.k_aux, dim=1, sorted=False).indices
        keep[crowded] = keep.new_zeros(crowded.numel(), keep.shape[1]).scatter_(1, pos, True)
    rows, pos = keep.nonzero().unbind(1)
    return rows, dead_idx[pos], dead_pre[rows, pos].float()


def narrow_keys(keys: Tensor, bound: int) -> Tensor:
    """Sort keys in [0, bound) in the narrowest integer type that holds them: the CPU sorted 131k int16 keys in 37 % of
    the time of int64 ones, int32 in about 60 %. The same permutation (stable, or unique keys), so the same step."""
    if bound <= torch.iinfo(torch.int16).max:
        return keys.to(torch.int16)
    return keys.to(torch.int32) if bound <= torch.iinfo(torch.int32).max else keys


def sort_entries(flat_idx: Tensor, vals: Tensor, m: int, B: int, ends: list[int]
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The selected entries of the [B, m] pre-activations, from their flat indices, as (rows, cols, bags, values)
    sorted by (bag, latent), where bag = group * B + row and the group counts the `ends` <= latent (the Matryoshka
    groups'). In C in one call where it builds (the same arrays: integer work only)."""
    found = native.sorted_entries(flat_idx, vals, m, B, ends)
    if found is not None:
        return found
    rows, cols = flat_idx // m, flat_idx % m
    bag = torch.bucketize(cols, torch.tensor(ends, device=cols.device), right=True) * B + rows
    order = torch.sort(narrow_keys(bag * m + cols, (len(ends) + 1) * B * m)).indices  # unique keys: one order
    return rows[order], cols[order], bag[order], vals[order]


def by_latent(cols: Tensor, m: int, bag: Tensor, rows: Tensor, w_dec: Tensor, w_enc: Tensor
              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The entries grouped by latent for the weight gradients: each latent's count in [0, m), and bag, rows, w_dec,
    w_enc in the stable order of cols. In C in one call where it builds (the same arrays)."""
    found = native.by_latent(cols, m, bag, rows, w_dec, w_enc)
    if found is not None:
        return found
    order = torch.sort(narrow_keys(cols, m), stable=True).indices
    return torch.bincount(cols, minlength=m), bag[order], rows[order], w_dec[order], w_enc[order]


def weighted_bags(indices: Tensor, table: Tensor, offsets: Tensor, weights: Tensor, low: torch.dtype | None) -> Tensor:
    """Per bag, the sum of `table`'s rows at `indices` times `weights` (embedding_bag). With `low` (the step under
    autocast): on 16-bit copies of the table and the weights, the result in 16 bits: the gather reads half the
    bytes (with the 16-bit candidate search, the bf16 step at the bench shape became 1.17x faster)."""
    if low is not None:
        table, weights = table.to(low), weights.to(low)
    return F.embedding_bag(indices, table, offsets, mode="sum", per_sample_weights=weights)


def biased_operands(ws: Workspace, xc: Tensor, enc: Tensor, b_enc: Tensor, low: torch.dtype) -> tuple[Tensor, Tensor]:
    """16-bit copies [xc | 1 | 0 ...] and [W_enc; b_enc; 0 ...], padded to a multiple of 16 columns (rows), whose
    product is the biased pre-activations: the bias as one more term of the float32 sum. The 16-bit addmm wrote the
    bias into its output and read it back, 6.6 ms at the bench shape where this matmul takes 4.9 (the same bits
    there). The buffers are reused; their few constant columns are rewritten every step."""
    B, d = xc.shape
    width = (d + 1 + 15) // 16 * 16
    xb = ws.get("xc_biased", (B, width), low, xc.device)
    xb[:, :d].copy_(xc)
    xb[:, d:].zero_()
    xb[:, d].fill_(1)
    wb = ws.get("enc_biased", (width, enc.shape[1]), low, xc.device)
    wb[:d].copy_(enc)
    wb[d].copy_(b_enc)
    wb[d + 1:].zero_()
    return xb, wb


def encoder_dtype(device_type: str) -> torch.dtype | None:
    """The 16-bit type of the encoder matmul when the step runs under torch.autocast (bfloat16 or float16),
    else None (float32)."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def core_and_b_dec_grads(sae: MatryoshkaSAE, xc: Tensor, f_core: Tensor, g_base: Tensor, grad_b_enc: Tensor,
                         scale: float) -> dict[str, Tensor]:
    """The gradients of the core's parameters and of b_dec, by name, from `g_base`, the unscaled loss gradient at
    b_dec + f_core W_core, and the non-core encoder bias's gradient. Every gate passes the gradient to the core's
    pre-activation where its code is active (a frozen threshold or a top-k mask is a constant gate), and to
    nothing else."""
    g_core = torch.mm(g_base, sae.dec_core.T).mul_(scale) * (f_core > 0)
    grads = {"dec_core": torch.mm(f_core.T, g_base).mul_(scale)}
    if isinstance(sae.b_enc_core, nn.Parameter):
        grads["b_enc_core"] = g_core.sum(0)
    if isinstance(sae.enc_core, nn.Parameter):
        grads["enc_core"] = xc.T @ g_core
    grads["b_dec"] = g_base.sum(0).mul_(scale) - sae.enc @ grad_b_enc - sae.enc_core @ g_core.sum(0)
    return grads


def entry_and_weight_grads(sae: MatryoshkaSAE, table: Tensor, table_low: Tensor | None, xc: Tensor, xc_low: Tensor,
                           dec: Tensor, cols: Tensor, rows: Tensor, bag: Tensor, offsets: Tensor, vals: Tensor,
                           entry_scale: Tensor, n_main: int, low: torch.dtype | None, dec_grad: Tensor,
                           enc_grad: Tensor) -> Tensor:
    """The step's weight gradients, written into dec_grad and enc_grad, and the encoder bias's, returned: each
    entry's value gradient first (from `table`, the loss gradient at each bag's output), then the sums by latent.
    float32: in one C pass where it builds, the same bits as torch's calls that run elsewhere."""
    m, d = dec_grad.shape
    # float32: each entry's value gradient in the same C pass as the weight gradients, from the table row that pass
    # reads anyway, where its dot's order is found to be torch's (MKL's); `gate` then stands in its place: the loss
    # scale, times zero where BatchTopK clamped the value (g * (scale * 0) is torch's (g * scale) * 0 while a scale
    # <= 1 cannot overflow the product: the same bits)
    if low is None and native.value_grads_in_pass(table, dec) and entry_scale.max() <= 1:
        gate = entry_scale.clone()
        gate[:n_main] *= vals[:n_main] > 0
        col_counts, bag_by, rows_by, w_dec_by, gate_by = by_latent(cols, m, bag, rows, vals * entry_scale, gate)
        grad_b_enc = native.latent_grads_f32(table, xc, col_counts, bag_by, rows_by, w_dec_by, gate_by, dec_grad,
                                             enc_grad, dec=dec)
        if grad_b_enc is not None:
            return grad_b_enc
    # each entry's value gradient: under autocast from the 16-bit copies, products and sums in float32, in C where
    # it builds (half the bytes of the decoder rows it reads; torch's 16-bit version rounds its output to 16 bits)
    g_vals = None if table_low is None else native.bag_dots_bf16(table_low.view(-1, d), dec, cols, bag)
    if g_vals is None:
        g_vals = torch.ops.aten._embedding_bag_per_sample_weights_backward(table, sae.dec, cols, offsets, bag, 0)
    g_vals *= entry_scale
    g_vals[:n_main] *= vals[:n_main] > 0  # BatchTopK's values are clamped at zero

    col_counts, bag_by, rows_by, w_dec_by, w_enc_by = by_latent(cols, m, bag, rows, vals * entry_scale, g_vals)
    # float32: both weight gradients and the bias's in one C call where it builds, the encoder's written transposed
    # (torch's two sums and the transpose after them took about 15 ms in the bench's step, this 13; the same bits)
    grad_b_enc = None if low is not None else native.latent_grads_f32(
        table, xc, col_counts, bag_by, rows_by, w_dec_by, w_enc_by, dec_grad, enc_grad)
    if grad_b_enc is None:
        col_offsets = col_counts.cumsum(0) - col_counts
        table_by = table if table_low is None else table_low.view(-1, d)
        dec_grad.copy_(weighted_bags(bag_by, table_by, col_offsets, w_dec_by, low))
        by_latent_sums = weighted_bags(rows_by, xc_low, col_offsets, w_enc_by, low)
        if not native.transpose_f32(by_latent_sums, enc_grad):  # in tiles, in C where it builds: a third of the time
            enc_grad.copy_(by_latent_sums.T)
        del by_latent_sums
        grad_b_enc = torch.zeros(m, dtype=xc.dtype, device=xc.device).index_add_(0, cols, g_vals)
    return grad_b_enc


@torch.no_grad()
def train_step(sae: MatryoshkaSAE, x: Tensor) -> tuple[StepStats, Tensor, Tensor]:
    """The step as `train_sae` drives it. Under torch.autocast (how sparsify's and dictionary_learning's
    trainers run theirs), the non-core encoder matmul, the one dense product, runs in the autocast type with
    float32 accumulation and the BatchTopK selection reads its 16-bit output, the three sparse gathers (the
    decoder's output, the decoder's and the encoder's weight gradients) read 16-bit copies, and so do the
    per-entry gradients (summed in float32, in C where it builds); the core, the residuals, the losses and the
    weights stay float32 (the float32 master weights)."""
    low = encoder_dtype(x.device.type)
    with torch.autocast(x.device.type, enabled=False):
        return _train_step(sae, x, low)


def _train_step(sae: MatryoshkaSAE, x: Tensor, low: torch.dtype | None) -> tuple[StepStats, Tensor, Tensor]:
    """Loss and gradients (written to .grad, replacing what was there) with one dense matmul, the
    encoder forward, and no autograd.

    Every active non-core entry (token, latent, value) of BatchTopK and of AuxK goes into one embedding_bag
    whose bags are (Matryoshka group, token) plus (AuxK, token). Its output, summed cumulatively over
    the groups, gives each prefix's residual; summed in reverse, the gradient at each group's output.
    The per-entry value gradients come from those through embedding_bag's own backward kernel, and
    the decoder and encoder weight gradients, zero off the active entries, are accumulated from the
    entries in one pass ordered by latent. The core (small) stays a dense [B, c] code whatever its gate.
    Returns the stats (with the core's code) and the BatchTopK entries (latent index, value) for
    `update_stats_sparse`."""
    B, d = x.shape
    G, m = len(sae.ends), sae.width - sae.core_size
    dev = x.device
    ws = workspace(sae)
    xc = torch.sub(x, sae.b_dec, out=ws.get("xc", (B, d), x.dtype, dev))  # reused: a fresh one paid page faults
    pre_nc = ws.get("pre_nc", (B, m), low or x.dtype, dev)
    if low is None:
        xc_low = xc  # the encoder gradient's gathered rows
        torch.addmm(sae.b_enc, xc, sae.enc, out=pre_nc)
    else:  # the 16-bit copies cost one pass over W_enc; the product accumulates in float32
        xc_biased, enc_biased = biased_operands(ws, xc, sae.enc, sae.b_enc, low)
        torch.mm(xc_biased, enc_biased, out=pre_nc)
        xc_low = xc_biased[:, :d]
    pre_core = F.relu(torch.addmm(sae.b_enc_core, xc, sae.enc_core))  # c latents: cheap, kept float32
    if sae.core_gate == "topk":
        flat_idx, vals, f_core = joint_topk(pre_core, pre_nc, sae.k)
        k_nc = round(float((vals > 0).sum()) / B)
    else:
        f_core = sae.gate_core(pre_core)
        k_nc = sae.k_noncore(f_core)
        flat_idx, vals = select_topk(pre_nc, k_nc, any_order=True)  # sort_entries sorts them below
    vals = vals.float()
    del pre_core
    rows, cols, bag, vals = sort_entries(flat_idx, vals, m, B, sae.ends[:-1])  # bags contiguous, a fixed order inside
    vals = vals.clamp_min(0)
    n_main = vals.numel()
    aux = aux_entries(sae, pre_nc)
    del pre_nc
    if aux is not None:
        aux_rows, aux_cols, aux_vals = aux
        rows, cols = torch.cat([rows, aux_rows]), torch.cat([cols, aux_cols])
        bag, vals = torch.cat([bag, G * B + aux_rows]), torch.cat([vals, aux_vals])
    n_groups = G + (aux is not None)  # the Matryoshka groups' bags, then AuxK's
    bag_counts = torch.bincount(bag, minlength=n_groups * B)
    offsets = bag_counts.cumsum(0) - bag_counts
    bounds = offsets[::B].tolist() + [bag.numel()]  # each group's entries: bags are sorted by group, then token
    # The residuals go into a reused buffer: one embedding_bag call's fresh [G, B, d] output (47 MB at the bench
    # shape) paid its page faults on every step, 7 of its 16 ms. Without the C pass, a call per group. The same sums.
    out = ws.get("out", (G + 1, B, d), x.dtype, dev)[:n_groups]  # one size, with or without AuxK
    dec = sae.dec.detach() if low is None else sae.dec.detach().to(low)  # cast once, not in every group's call
    # resid[g] = x_hat_g - x, the nested reconstructions' residuals
    if f_core.shape[1]:
        torch.addmm(xc, f_core, sae.dec_core, beta=-1, out=out[0])  # b_dec + f_core W_core - x
    else:  # no core: what addmm does then (copy xc, scale it by -1) in one pass
        torch.mul(xc, -1, out=out[0])
    # every group's sums and adds in one C pass where it builds (float32: the same bits; under autocast from the
    # 16-bit decoder rows, the sums float32 where embedding_bag's were 16-bit); AuxK's bag is added to the last
    # residual too: e_hat - (x - x_hat), minus AuxK's error. Under autocast the same pass also takes each row's sum
    # of squares (the losses), the suffix sums below and their 16-bit copy, while the token's rows are in cache
    table_low = None if low is None else ws.get("table_low", (G + 1, B, d), low, dev)[:n_groups]
    squares = None if low is None else ws.get("squares", (G + 1, B), x.dtype, dev)[:n_groups]
    fused = low is not None and native.group_bag_sums(dec, cols, vals, offsets, out, (G, table_low, squares))
    # float32, where the kernel's sum of squares is torch's dot (MKL's order and thread split, checked): the losses
    # and the suffix sums in the same pass too, the same bits
    group_dots = torch.empty(n_groups, dtype=x.dtype) if low is None and dev.type == "cpu" else None
    fused_f32 = group_dots is not None and native.group_bag_sums(dec, cols, vals, offsets, out, (G, None, group_dots))
    summed = fused or fused_f32 or native.group_bag_sums(dec, cols, vals, offsets, out)
    for g in range(0 if not summed else n_groups, n_groups):
        lo, hi = bounds[g], bounds[g + 1]
        part = weighted_bags(cols[lo:hi], dec, offsets[g * B:(g + 1) * B] - lo, vals[lo:hi], low)
        if g == 0:
            out[0] += part
        else:
            torch.add(part, out[g - 1], out=out[g])
        del part
    resid = out[:G]  # when fused, already their suffix sums, but for the last (and AuxK's row after them)
    if fused:
        prefix_losses = squares[:G].sum(1) / B
    elif fused_f32:
        prefix_losses = group_dots[:G] / B
    else:
        prefix_losses = torch.stack([r.flatten().dot(r.flatten()) for r in resid]) / B
    loss = prefix_losses.mean()
    aux_loss = x.new_zeros(())
    scale_aux = 0.0
    if aux is not None:
        last = resid[G - 1]
        denom = (last - last.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
        e = out[G]
        e_dot = squares[G].sum() if fused else group_dots[G] if fused_f32 else e.flatten().dot(e.flatten())
        aux_loss = e_dot / B / denom
        loss = loss + sae.aux_alpha * aux_loss
        scale_aux = 2 * sae.aux_alpha / (B * float(denom))
    # gradient at group g's output: 2/(B G) * sum of resid[j] for j >= g (kept unscaled in place); under autocast
    # also its 16-bit copy for the decoder gradient's gather, in the same pass where the kernel builds (a reused
    # buffer: a fresh 28 MB one paid its page faults every step)
    if not fused and not fused_f32 and not native.suffix_sums_f32(out, G, table_low):
        for g in range(G - 2, -1, -1):
            resid[g] += resid[g + 1]
        if table_low is not None:
            table_low.copy_(out)
    scale = 2.0 / (B * G)
    # out now holds, unscaled, the loss gradient at every bag's output: row g*B+t for group g of token t,
    # row G*B+t for AuxK's reconstruction of token t's error
    table = out.view(-1, d)
    entry_scale = torch.full_like(vals, scale)
    entry_scale[n_main:] = scale_aux
    enc_grad = ws.get("enc_grad", (d, m), x.dtype, dev)  # set_to_none drops it from .grad, never frees it
    dec_grad = ws.get("dec_grad", (m, d), x.dtype, dev)
    grad_b_enc = None
    if table_low is not None and dev.type == "cpu":
        # under autocast, where the CPU has a bfloat16 dot instruction: each entry's value gradient (its bag's
        # gradient row . its decoder row) in the same C pass by latent as the weight gradients, which reads the
        # bag's row anyway, all from the 16-bit rows with float32 sums. `gate` scales it: zero where BatchTopK
        # clamped the value (AuxK's values are all positive)
        gate = entry_scale * (vals > 0)
        col_counts, bag_by, rows_by, w_dec_by, gate_by = by_latent(cols, m, bag, rows, vals * entry_scale, gate)
        grad_b_enc = native.latent_grads_bf16(table_low.view(-1, d), xc_low, dec, col_counts, bag_by, rows_by,
                                              w_dec_by, gate_by, dec_grad, enc_grad)
    if grad_b_enc is None:
        grad_b_enc = entry_and_weight_grads(sae, table, table_low, xc, xc_low, dec, cols, rows, bag, offsets, vals,
                                            entry_scale, n_main, low, dec_grad, enc_grad)
    sae.dec.grad, sae.enc.grad, sae.b_enc.grad = dec_grad, enc_grad, grad_b_enc
    # resid[0]: the unscaled gradient at b_dec + f_core W_core (every prefix contains it)
    for name, grad in core_and_b_dec_grads(sae, xc, f_core, resid[0], grad_b_enc, scale).items():
        getattr(sae, name).grad = grad
    main_vals = vals[:n_main]
    stats = StepStats(
        loss=float(loss), prefix_losses=prefix_losses, aux_loss=float(aux_loss),
        l0_core=float((f_core > 0).sum()) / B, l0_noncore=float((main_vals > 0).sum()) / B, k_noncore=k_nc,
        core_code=f_core,
    )
    return stats, cols[:n_main], main_vals


@torch.no_grad()
def update_stats_sparse(sae: MatryoshkaSAE, cols: Tensor, vals: Tensor, core_code: Tensor | None, batch_tokens: int,
                        ema: float) -> None:
    """`MatryoshkaSAE.update_stats` from the active non-core (latent, value) pairs instead of a dense code,
    and the core's code of the step (its thresholds are learned only under `core_gate: topk`)."""
    m = sae.width - sae.core_size
    # Masks rather than gathers of the active entries: no read back to the host (the graphed step's entries hold
    # zeros where it selected nothing), the same results.
    found = native.fired_minimum(cols, vals, m) if cols.device.type == "cpu" else None  # one pass in C: the same
    if found is not None:
        fired, smallest = found
    else:
        active = vals > 0
        fired = torch.zeros(m, dtype=torch.int32, device=cols.device).index_add_(0, cols, active.int()) > 0
        smallest = torch.full((m,), float("inf"), dtype=vals.dtype, device=vals.device).scatter_reduce(
            0, cols, torch.where(active, vals, float("inf")), "amin")
    sae.tokens_since_fired.add_(batch_tokens).masked_fill_(fired, 0)
    sae.threshold.copy_(ema_thresholds(sae.threshold, smallest, ema))
    if sae.core_gate == "topk" and sae.core_size and core_code is not None:
        sae.core_threshold.copy_(ema_thresholds(sae.core_threshold, smallest_active(core_code), ema))

"""The training step for the GPU: `sparse_step.train_step`'s maths with fixed shapes and no read back to the host,
so that one CUDA graph holds the whole step and each training step replays it with one launch.

On an H200 the eager step took 12x its encoder matmul: a hundred small kernels, each launched from Python, and
host reads (a threshold's count, the groups' bounds, the loss) that stall the queue between them. Here every size
is known before the step runs: BatchTopK keeps the k*B largest entries with one top-k (under a dynamic L0 the ones
past the step's k_noncore*B are zeroed, not dropped), the entries are sorted by (group, token, latent) and cut into
bags by a search instead of a count read back, and the statistics stay tensors until the loop logs them.

AuxK's entries vary in number with the dead latents: they get a fixed room (B*k entries at first), its padding
zero-valued, and a step that finds more positive ones than that runs again in a graph with twice the room. On
the CPU training keeps the sparse step, whose C kernels are faster there and give the artifacts their bits.
`static_step` runs anywhere (the tests check it on the CPU against the float64 autograd reference);
`GraphedStep` captures it on a CUDA device and falls back to running it eagerly, with a one-line warning, if
the capture fails.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dmsae.sae import MatryoshkaSAE, StepStats, workspace
from dmsae.sparse_step import core_and_b_dec_grads, encoder_dtype, train_step, weighted_bags

WARMUP_STEPS = 3  # eager runs on a side stream before the capture: cuBLAS and the allocator settle


@dataclass
class StaticOut:
    """One step's results as device tensors (a captured graph rewrites them in place on every replay)."""

    grads: dict[str, Tensor]  # parameter name -> its gradient
    loss: Tensor
    prefix_losses: Tensor  # [G]
    aux_loss: Tensor
    l0_core: Tensor
    l0_noncore: Tensor
    k_noncore: Tensor
    core_code: Tensor  # [B, c]
    cols: Tensor  # [N] the BatchTopK candidates' latents
    vals: Tensor  # [N] their values, zero where not selected
    aux_positive: Tensor  # AuxK's positive entries before its cap (0 without AuxK)


def _device_ends(sae: MatryoshkaSAE, device: torch.device) -> Tensor:
    """The inner group ends as a device tensor, made once per device (before a capture: a copy from the host is
    not allowed inside one). An SAE's groups never change."""
    buffers = workspace(sae).buffers
    name = f"group_ends@{device}"
    if name not in buffers:
        buffers[name] = torch.tensor(sae.ends[:-1], dtype=torch.int64, device=device)
    return buffers[name]


def select(sae: MatryoshkaSAE, pre_core: Tensor, pre_nc: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """BatchTopK with fixed sizes: (flat indices into pre_nc, float32 values zero where not selected, the core's
    code [B, c], k_noncore as a tensor). The selected set is `sparse_step`'s (ties aside)."""
    B, c = pre_core.shape
    n_cand = min(sae.k * B, pre_nc.numel())
    if sae.core_gate == "topk":
        nc_vals, idx = pre_nc.flatten().topk(n_cand, sorted=False)
        vals = nc_vals.float()
        f_core = pre_core
        if c:  # one BatchTopK of k*B over [core | non-core]: the winners lie among the core and these candidates
            n_keep = min(sae.k * B, B * c + n_cand)
            won_vals, pos = torch.cat([pre_core.flatten(), vals]).topk(n_keep, sorted=False)
            in_core = pos < B * c
            # scatters of fixed size: the losers write to one spare slot past the end
            f_core = (torch.zeros(B * c + 1, dtype=pre_core.dtype, device=pre_core.device)
                      .index_put_((torch.where(in_core, pos, B * c),), torch.where(in_core, won_vals, 0))[:-1]
                      .view(B, c))
            won = (torch.zeros(n_cand + 1, dtype=torch.bool, device=pos.device)
                   .index_put_((torch.where(in_core, n_cand, pos - B * c),), torch.ones((), dtype=torch.bool,
                                                                                         device=pos.device))[:-1])
            vals = torch.where(won, vals, 0)
        k_nc = torch.round((vals > 0).sum().double() / B).long()
        return idx, vals, f_core, k_nc
    f_core = sae.gate_core(pre_core)
    dynamic = sae.l0_mode != "fixed" and c > 0
    nc_vals, idx = pre_nc.flatten().topk(n_cand, sorted=dynamic)
    vals = nc_vals.float()
    if not dynamic:
        return idx, vals, f_core, torch.full((), sae.k, dtype=torch.int64, device=pre_nc.device)
    core_l0 = (f_core > 0).sum(dim=1).float().mean()  # as MatryoshkaSAE.k_noncore reads it
    k_nc = (sae.k - torch.round(core_l0).long()).clamp_min(1)
    # the candidates come sorted: the first k_nc*B are this step's BatchTopK, the rest are zeroed
    keep = torch.arange(n_cand, device=idx.device) < k_nc * B
    return idx, torch.where(keep, vals, 0), f_core, k_nc


def aux_select(sae: MatryoshkaSAE, pre_nc: Tensor, cap: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """AuxK's entries in a fixed number `cap`: each token's k_aux largest pre-activations among the dead latents,
    the positive ones, as (token, latent, float32 value) sorted by (token, latent) and padded with zero values;
    and how many positive ones there were (more than `cap`: the smallest were left out, and the caller runs the
    step again with a larger cap). Without a dead latent every value is zero."""
    B, m = pre_nc.shape
    k_aux = min(sae.k_aux, m)
    top_vals, top_cols = pre_nc.masked_fill(~sae.dead_mask(), float("-inf")).topk(k_aux, dim=1, sorted=False)
    flat = top_vals.flatten().float()
    n_positive = (flat > 0).sum()
    if cap < flat.numel():
        flat, pos = flat.topk(cap, sorted=False)
    else:
        pos = torch.arange(flat.numel(), device=flat.device)
    rows, cols = pos // k_aux, top_cols.flatten()[pos]
    order = torch.argsort(rows * m + cols)  # a token's latents are distinct: unique keys
    return rows[order], cols[order], flat[order].clamp_min(0), n_positive


@torch.no_grad()
def static_step(sae: MatryoshkaSAE, x: Tensor, low: torch.dtype | None = None, aux_cap: int | None = None
                ) -> StaticOut:
    """The loss and gradients of `forward_train` with fixed shapes and no host read: the maths of
    `sparse_step._train_step` (see there), the gradients returned rather than written. `low`: the encoder matmul's
    and the gathers' 16-bit type under autocast (None: float32). `aux_cap`: with AuxK, room for this many of its
    entries (`aux_select`); None: no AuxK."""
    with torch.autocast(x.device.type, enabled=False):
        return _static_step(sae, x, low, aux_cap)


def _static_step(sae: MatryoshkaSAE, x: Tensor, low: torch.dtype | None, aux_cap: int | None) -> StaticOut:
    B, d = x.shape
    G, m = len(sae.ends), sae.width - sae.core_size
    dev = x.device
    xc = x - sae.b_dec
    xc_low = xc if low is None else xc.to(low)
    if low is None:
        pre_nc = torch.addmm(sae.b_enc, xc, sae.enc)
    else:  # the product accumulates in float32, its output in 16 bits as autocast gives it
        pre_nc = torch.addmm(sae.b_enc.to(low), xc_low, sae.enc.to(low))
    pre_core = F.relu(torch.addmm(sae.b_enc_core, xc, sae.enc_core))
    flat_idx, vals, f_core, k_nc = select(sae, pre_core, pre_nc)
    aux = None if aux_cap is None else aux_select(sae, pre_nc, aux_cap)
    del pre_nc
    vals = vals.clamp_min(0)
    rows, cols = flat_idx // m, flat_idx % m
    bag = torch.bucketize(cols, _device_ends(sae, dev), right=True) * B + rows
    order = torch.argsort(bag * m + cols)  # unique keys: one order
    rows, cols, bag, vals = rows[order], cols[order], bag[order], vals[order]
    n_main = vals.numel()
    n_positive = torch.zeros((), dtype=torch.int64, device=dev)
    if aux is not None:  # AuxK's bags (G*B + token) follow the groups', its entries already in their order
        aux_rows, aux_cols, aux_vals, n_positive = aux
        rows, cols = torch.cat([rows, aux_rows]), torch.cat([cols, aux_cols])
        bag, vals = torch.cat([bag, G * B + aux_rows]), torch.cat([vals, aux_vals])
    n_bags = (G + (aux is not None)) * B
    # each bag's first entry by a search over the sorted bags (a count would be read back to size the cut)
    offsets = torch.searchsorted(bag, torch.arange(n_bags, device=dev))
    dec = sae.dec.detach()
    parts = weighted_bags(cols, dec, offsets, vals, low).float()
    base = f_core @ sae.dec_core - xc  # b_dec + f_core W_core - x
    resid = parts[:G * B].view(G, B, d).cumsum(0) + base  # x_hat_g - x, the nested reconstructions' residuals
    prefix_losses = resid.pow(2).sum(dim=(1, 2)) / B
    loss = prefix_losses.mean()
    # the loss gradient at group g's output, unscaled: the sum of resid[j] for j >= g
    table = resid.flip(0).cumsum(0).flip(0).reshape(G * B, d)
    scale = 2.0 / (B * G)
    entry_scale = torch.full((n_main,), scale, device=dev)
    aux_loss = torch.zeros((), device=dev)
    if aux is not None:
        last = resid[G - 1]
        denom = (last - last.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
        e = parts[G * B:] + last  # e_hat - (x - x_hat): minus AuxK's error
        any_dead = sae.dead_mask().any()  # none: AuxK is off, its entries all zero
        aux_loss = e.pow(2).sum() / B / denom * any_dead
        loss = loss + sae.aux_alpha * aux_loss
        scale_aux = 2 * sae.aux_alpha / (B * denom) * any_dead
        entry_scale = torch.cat([entry_scale, scale_aux.expand(vals.numel() - n_main)])
        table = torch.cat([table, e])  # row G*B + t: the gradient at AuxK's reconstruction of token t, unscaled
    g_vals = torch.ops.aten._embedding_bag_per_sample_weights_backward(table, sae.dec, cols, offsets, bag, 0)
    g_vals = g_vals * entry_scale * (vals > 0)  # values are clamped at zero
    by_col = torch.argsort(cols, stable=True)
    col_offsets = torch.searchsorted(cols[by_col], torch.arange(m, device=dev))
    grads = {
        "dec": weighted_bags(bag[by_col], table, col_offsets, (vals * entry_scale)[by_col], low).float(),
        "enc": weighted_bags(rows[by_col], xc_low, col_offsets, g_vals[by_col], low).float().T.contiguous(),
    }
    grads["b_enc"] = grad_b_enc = torch.zeros(m, dtype=x.dtype, device=dev).index_add_(0, cols, g_vals)
    # table[:B]: the unscaled gradient at b_dec + f_core W_core (every prefix contains it)
    grads |= core_and_b_dec_grads(sae, xc, f_core, table[:B], grad_b_enc, scale)
    main_vals = vals[:n_main]
    return StaticOut(grads=grads, loss=loss, prefix_losses=prefix_losses, aux_loss=aux_loss,
                     l0_core=(f_core > 0).sum() / B, l0_noncore=(main_vals > 0).sum() / B, k_noncore=k_nc,
                     core_code=f_core, cols=cols[:n_main], vals=main_vals, aux_positive=n_positive)


def aux_active(sae: MatryoshkaSAE) -> bool:
    """Whether this step runs AuxK (a latent is dead): one read from the device per step, at its start."""
    return sae.aux_alpha != 0 and bool(sae.dead_mask().any())


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    x: Tensor  # the graph's input: each step's batch is copied into it
    out: StaticOut  # the graph's outputs, rewritten by every replay


class GraphedStep:
    """A `Step` for `train_sae` on a CUDA device: `static_step` captured as a CUDA graph at its first call and
    replayed on the steps after it, one graph per AuxK cap (without AuxK, and with room for B*k of its entries,
    doubled while a step has more); captured again when the batch's shape or type, the autocast type or a tensor
    of the SAE moves. A step with AuxK reads one count back to know its cap sufficed. Elsewhere, and after a
    failed capture, `static_step` runs eagerly. The gradients it hands back are the graph's own tensors: valid
    until the next step, as a step's gradients are."""

    def __init__(self) -> None:
        self.graphs: dict[tuple, _Captured] = {}
        self.where: tuple | None = None  # the SAE's tensors' addresses the graphs read
        self.aux_cap: int | None = None  # AuxK's room, in entries, once a step has run it
        self.fallback: str | None = None  # why no graph is used, once a capture failed
        self.counts = {"replayed": 0, "eager": 0, "auxk": 0, "aux_regrown": 0}

    def __call__(self, sae: MatryoshkaSAE, x: Tensor) -> tuple[StepStats, Tensor, Tensor]:
        low = encoder_dtype(x.device.type)
        B = x.shape[0]
        cap = None
        if aux_active(sae):
            self.counts["auxk"] += 1
            full = B * min(sae.k_aux, sae.width - sae.core_size)
            cap = self.aux_cap = min(full, self.aux_cap or B * sae.k)
        out = self.run(sae, x, low, cap)
        if cap is not None and (positive := int(out.aux_positive)) > cap:  # the smallest were left out: again
            while cap < positive:
                cap *= 2
            cap = self.aux_cap = min(cap, B * min(sae.k_aux, sae.width - sae.core_size))
            self.counts["aux_regrown"] += 1
            out = self.run(sae, x, low, cap)
        for name, grad in out.grads.items():
            getattr(sae, name).grad = grad
        # tensors, not floats: the loop reads them when it logs, so a step costs no host read
        stats = StepStats(loss=out.loss, prefix_losses=out.prefix_losses, aux_loss=out.aux_loss,  # type: ignore[arg-type]
                          l0_core=out.l0_core, l0_noncore=out.l0_noncore,  # type: ignore[arg-type]
                          k_noncore=out.k_noncore, core_code=out.core_code)  # type: ignore[arg-type]
        return stats, out.cols, out.vals

    def run(self, sae: MatryoshkaSAE, x: Tensor, low: torch.dtype | None, aux_cap: int | None) -> StaticOut:
        if x.device.type != "cuda" or self.fallback is not None:
            self.counts["eager"] += 1
            return static_step(sae, x, low, aux_cap)
        where = tuple(t.data_ptr() for t in (*sae.parameters(), *sae.buffers()))
        if where != self.where:  # the SAE moved: every graph reads the old addresses
            self.graphs.clear()
            self.where = where
        key = (tuple(x.shape), x.dtype, x.device, low, aux_cap)
        captured = self.graphs.get(key) or self.capture(sae, x, low, aux_cap, key)
        if captured is None:
            self.counts["eager"] += 1
            return static_step(sae, x, low, aux_cap)
        captured.x.copy_(x)
        captured.graph.replay()
        self.counts["replayed"] += 1
        return captured.out

    def capture(self, sae: MatryoshkaSAE, x: Tensor, low: torch.dtype | None, aux_cap: int | None,
                key: tuple) -> _Captured | None:
        static_x = x.clone()
        _device_ends(sae, x.device)
        try:
            side = torch.cuda.Stream(device=x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(side):
                before = torch.cuda.get_sync_debug_mode()
                torch.cuda.set_sync_debug_mode("error")  # a host read would fail the capture: find it here first
                try:
                    for _ in range(WARMUP_STEPS):
                        static_step(sae, static_x, low, aux_cap)
                finally:
                    torch.cuda.set_sync_debug_mode(before)
            torch.cuda.current_stream(x.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = static_step(sae, static_x, low, aux_cap)
        except RuntimeError as e:
            torch.cuda.synchronize(x.device)
            first = (str(e).strip().splitlines() or [""])[0]
            self.fallback = f"{type(e).__name__}: {first[:200]}"
            self.graphs.clear()
            print(f"dmsae: warning: the training step could not be captured as a CUDA graph ({self.fallback}); "
                  "it runs without one", file=sys.stderr, flush=True)
            return None
        captured = self.graphs[key] = _Captured(graph, static_x, out)
        return captured

    def describe(self) -> str:
        """How the steps ran, for a log or a benchmark's note."""
        c = self.counts
        text = (f"CUDA graph replayed {c['replayed']} times ({len(self.graphs)} graphs), eager static step "
                f"{c['eager']} times; AuxK in {c['auxk']} steps, its cap raised in {c['aux_regrown']}")
        return text + (f"; no graph: {self.fallback}" if self.fallback else "")


def default_step(device: torch.device | str) -> Callable[[MatryoshkaSAE, Tensor], tuple[StepStats, Tensor, Tensor]]:
    """The step `train_sae` uses on `device`: the graphed step on a GPU, the sparse step elsewhere."""
    return GraphedStep() if torch.device(device).type == "cuda" else train_step

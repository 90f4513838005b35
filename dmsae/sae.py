"""The Matryoshka BatchTopK SAE with a shared core (DESIGN.md section 2).

Latents are ordered [core | non-core]. Core and non-core parameters are separate tensors so a frozen
transferred core encoder stays bit-identical (it is a buffer, never touched by the optimizer).
All maths run on activations already scaled so that E||x||^2 = d.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def group_ends(n_noncore: int, fractions: list[float]) -> list[int]:
    """Cumulative ends of the Matryoshka groups over the non-core latents; the last group is the rest."""
    sizes = [max(1, round(f * n_noncore)) for f in fractions]
    ends, total = [], 0
    for s in sizes:
        total += s
        ends.append(total)
    if total >= n_noncore:
        raise ValueError(f"group fractions {fractions} leave no latents for the last group of {n_noncore}")
    ends.append(n_noncore)
    return ends


@dataclass
class StepStats:
    loss: float
    prefix_losses: Tensor  # [G]
    aux_loss: float
    l0_core: float
    l0_noncore: float
    k_noncore: int


@dataclass
class ForwardOut:
    loss: Tensor
    prefix_losses: Tensor  # [G] mean squared error (sum over d) per Matryoshka prefix
    aux_loss: Tensor
    x_hat: Tensor  # full reconstruction
    f_core: Tensor
    f_noncore: Tensor
    k_noncore: int


class MatryoshkaSAE(nn.Module):
    def __init__(
        self,
        d: int,
        width: int,
        k: int,
        group_fractions: list[float],
        core_encoder: Tensor | None = None,
        l0_mode: str = "dynamic",
        aux_alpha: float = 1 / 32,
        dead_after_tokens: int = 100_000,
        freeze_core_encoder: bool = True,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        c = 0 if core_encoder is None else core_encoder.shape[1]
        if c >= width:
            raise ValueError(f"core size {c} must be smaller than the width {width}")
        self.d, self.width, self.k, self.core_size = d, width, k, c
        self.l0_mode, self.aux_alpha, self.dead_after_tokens = l0_mode, aux_alpha, dead_after_tokens
        self.ends = group_ends(width - c, group_fractions)
        self.k_aux = d // 2

        # One draw of the full decoder, so arms with equal core size share their non-core init.
        w = torch.randn(width, d, generator=generator)
        w = w / w.norm(dim=1, keepdim=True)
        self.dec_core = nn.Parameter(w[:c].clone())
        self.dec = nn.Parameter(w[c:].clone())
        self.enc = nn.Parameter(w[c:].T.clone().contiguous())
        core_enc = torch.zeros(d, 0) if core_encoder is None else core_encoder.detach().clone().float()
        if freeze_core_encoder:
            self.register_buffer("enc_core", core_enc)
        else:
            self.enc_core = nn.Parameter(core_enc)
        self.b_enc_core = nn.Parameter(torch.zeros(c))
        self.b_enc = nn.Parameter(torch.zeros(width - c))
        self.b_dec = nn.Parameter(torch.zeros(d))
        # inference thresholds for non-core latents; +inf until a latent has been selected once
        self.register_buffer("threshold", torch.full((width - c,), float("inf")))
        self.register_buffer("tokens_since_fired", torch.zeros(width - c, dtype=torch.long))

    # -- encoding -----------------------------------------------------------------------------
    def pre_acts(self, x: Tensor) -> tuple[Tensor, Tensor]:
        xc = x - self.b_dec
        pre_core = F.relu(xc @ self.enc_core + self.b_enc_core)
        pre_nc = F.relu(xc @ self.enc + self.b_enc)
        return pre_core, pre_nc

    def k_noncore(self, pre_core: Tensor) -> int:
        if self.l0_mode == "fixed" or self.core_size == 0:
            return self.k
        core_l0 = (pre_core > 0).sum(dim=1).float().mean().item()
        return max(1, self.k - round(core_l0))

    @staticmethod
    def batch_topk(pre: Tensor, k: int) -> Tensor:
        """Keep the k*B largest entries of the whole batch (BatchTopK); zero the rest."""
        flat = pre.flatten()
        n_keep = min(k * pre.shape[0], flat.numel())
        vals, idx = flat.topk(n_keep, sorted=False)
        return torch.zeros_like(flat).scatter(0, idx, vals).view_as(pre)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Inference encoding: per-latent thresholds replace BatchTopK, so a token's code is batch-independent."""
        pre_core, pre_nc = self.pre_acts(x)
        return pre_core, torch.where(pre_nc > self.threshold, pre_nc, torch.zeros_like(pre_nc))

    # -- decoding -----------------------------------------------------------------------------
    def prefix_reconstructions(self, f_core: Tensor, f_nc: Tensor) -> Tensor:
        """[G, B, d]: x_hat_i = b_dec + f_core W_core + f_nc[:, :m_i] W[:m_i], as cumulative sums per group."""
        base = self.b_dec + f_core @ self.dec_core
        starts = [0] + self.ends[:-1]
        parts = torch.stack([f_nc[:, s:e] @ self.dec[s:e] for s, e in zip(starts, self.ends, strict=True)])
        return base + parts.cumsum(dim=0)

    def decode(self, f_core: Tensor, f_nc: Tensor) -> Tensor:
        return self.b_dec + f_core @ self.dec_core + f_nc @ self.dec

    # -- training -----------------------------------------------------------------------------
    def forward_train(self, x: Tensor) -> ForwardOut:
        pre_core, pre_nc = self.pre_acts(x)
        k_nc = self.k_noncore(pre_core)
        f_nc = self.batch_topk(pre_nc, k_nc)
        recon = self.prefix_reconstructions(pre_core, f_nc)
        prefix_losses = (recon - x).pow(2).sum(dim=-1).mean(dim=-1)
        aux = self.aux_loss(x, recon[-1], pre_nc)
        loss = prefix_losses.mean() + self.aux_alpha * aux
        return ForwardOut(loss, prefix_losses.detach(), aux.detach(), recon[-1].detach(), pre_core, f_nc, k_nc)

    def dead_mask(self) -> Tensor:
        """[width - core] bool: the non-core latents that have not fired for `dead_after_tokens` tokens."""
        return self.tokens_since_fired >= self.dead_after_tokens

    def aux_loss(self, x: Tensor, x_hat: Tensor, pre_nc: Tensor) -> Tensor:
        """AuxK: dead non-core latents reconstruct the residual error (normalised by its variance)."""
        dead = self.dead_mask()
        n_dead = int(dead.sum())
        if n_dead == 0 or self.aux_alpha == 0:
            return x.new_zeros(())
        resid = (x - x_hat).detach()
        vals, idx = pre_nc[:, dead].topk(min(self.k_aux, n_dead), dim=1)
        f_aux = torch.zeros(pre_nc.shape[0], n_dead, dtype=x.dtype, device=x.device).scatter(1, idx, vals)
        err = (resid - f_aux @ self.dec[dead]).pow(2).sum(-1).mean()
        denom = (resid - resid.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
        return err / denom

    @torch.no_grad()
    def update_stats(self, f_nc: Tensor, ema: float) -> None:
        """Dead-latent counters and the EMA of each latent's smallest selected activation."""
        fired = (f_nc > 0).any(dim=0)
        self.tokens_since_fired += f_nc.shape[0]
        self.tokens_since_fired[fired] = 0
        smallest = torch.where(f_nc > 0, f_nc, torch.full_like(f_nc, float("inf"))).amin(dim=0)
        self._update_thresholds(smallest, ema)

    def _update_thresholds(self, smallest: Tensor, ema: float) -> None:
        seen = torch.isfinite(smallest)
        first = seen & torch.isinf(self.threshold)
        again = seen & ~first
        self.threshold[first] = smallest[first]
        self.threshold[again] = ema * self.threshold[again] + (1 - ema) * smallest[again]

    # -- fast training step -------------------------------------------------------------------
    def select_topk(self, pre_nc: Tensor, k_nc: int) -> tuple[Tensor, Tensor]:
        """BatchTopK as (flat indices, values): a threshold from a strided sample keeps about twice the
        k*B entries, then an exact top-k runs over those survivors only. Same selection as a full top-k."""
        flat = pre_nc.flatten()
        n_keep = min(k_nc * pre_nc.shape[0], flat.numel())
        stride = max(1, flat.numel() // 65536) | 1  # odd: a power-of-two stride would sample only a few latents
        sample = flat[::stride]
        q = 1.0 - min(1.0, 2.0 * n_keep / flat.numel())
        cand = None
        if q > 0:
            thr = sample.kthvalue(max(1, int(q * sample.numel()))).values
            cand = (flat > thr).nonzero().squeeze(1)
            if cand.numel() < n_keep:  # the sample under-estimated the tail: fall back to the exact path
                cand = None
        if cand is None:
            vals, idx = flat.topk(n_keep, sorted=False)
            return idx, vals
        vals, pos = flat[cand].topk(n_keep, sorted=False)
        return cand[pos], vals

    def aux_entries(self, pre_nc: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
        """AuxK's active entries as (token, latent, value): each token's k_aux largest pre-activations among
        the dead latents, keeping only the positive ones. None when no latent is dead (or AuxK is off)."""
        dead = self.dead_mask()
        n_dead = int(dead.sum())
        if n_dead == 0 or self.aux_alpha == 0:
            return None
        dead_idx = dead.nonzero().squeeze(1)
        dead_pre = pre_nc.index_select(1, dead_idx)
        # Entries at or below zero add nothing to the loss and get no gradient through the ReLU. Dead latents
        # usually rarely fire: then keep each token's positive ones and top-k only the tokens with more than
        # k_aux of them. When most tokens have more (many dead latents that would fire), top-k them all.
        keep = dead_pre > 0
        # an int32 sum: count_nonzero would first copy the whole [B, dead] mask into int64
        crowded = (keep.sum(1, dtype=torch.int32) > self.k_aux).nonzero().squeeze(1)
        if crowded.numel() > dead_pre.shape[0] // 4:
            top_vals, top_pos = dead_pre.topk(self.k_aux, dim=1, sorted=False)
            rows, j = (top_vals > 0).nonzero().unbind(1)
            return rows, dead_idx[top_pos[rows, j]], top_vals[rows, j]
        if crowded.numel():
            pos = dead_pre[crowded].topk(self.k_aux, dim=1, sorted=False).indices
            keep[crowded] = keep.new_zeros(crowded.numel(), keep.shape[1]).scatter_(1, pos, True)
        rows, pos = keep.nonzero().unbind(1)
        return rows, dead_idx[pos], dead_pre[rows, pos]

    @torch.no_grad()
    def train_step(self, x: Tensor) -> tuple[StepStats, Tensor, Tensor]:
        """Loss and gradients (written to .grad, replacing what was there) with one dense matmul, the
        encoder forward, and no autograd.

        Every active entry (token, latent, value) of BatchTopK and of AuxK goes into one embedding_bag
        whose bags are (Matryoshka group, token) plus (AuxK, token). Its output, summed cumulatively over
        the groups, gives each prefix's residual; summed in reverse, the gradient at each group's output.
        The per-entry value gradients come from those through embedding_bag's own backward kernel, and
        the decoder and encoder weight gradients, zero off the active entries, are accumulated from the
        entries in one pass ordered by latent. Returns the stats and the BatchTopK entries (latent
        index, value) for `update_stats_sparse`."""
        B, d = x.shape
        G, m = len(self.ends), self.width - self.core_size
        dev = x.device
        xc = x - self.b_dec
        pre_nc = torch.addmm(self.b_enc, xc, self.enc)
        pre_core = F.relu(torch.addmm(self.b_enc_core, xc, self.enc_core))
        k_nc = self.k_noncore(pre_core)
        flat_idx, vals = self.select_topk(pre_nc, k_nc)
        rows, cols = flat_idx // m, flat_idx % m
        group = torch.bucketize(cols, torch.tensor(self.ends[:-1], device=dev), right=True)
        bag = group * B + rows
        order = torch.sort(bag * m + cols).indices  # bags contiguous, a fixed order inside each
        rows, cols, bag, vals = rows[order], cols[order], bag[order], vals[order].clamp_min(0)
        n_main = vals.numel()
        aux = self.aux_entries(pre_nc)
        del pre_nc
        if aux is not None:
            aux_rows, aux_cols, aux_vals = aux
            rows, cols = torch.cat([rows, aux_rows]), torch.cat([cols, aux_cols])
            bag, vals = torch.cat([bag, G * B + aux_rows]), torch.cat([vals, aux_vals])
        n_bags = (G + (aux is not None)) * B
        bag_counts = torch.bincount(bag, minlength=n_bags)
        offsets = bag_counts.cumsum(0) - bag_counts
        out = F.embedding_bag(cols, self.dec.detach(), offsets, mode="sum", per_sample_weights=vals).view(-1, B, d)

        # resid[g] = x_hat_g - x, the nested reconstructions' residuals, built in place from the group outputs
        resid = out[:G]
        resid[0] += torch.addmm(xc, pre_core, self.dec_core, beta=-1)  # b_dec + f_core W_core - x
        for g in range(1, G):
            resid[g] += resid[g - 1]
        prefix_losses = torch.stack([r.flatten().dot(r.flatten()) for r in resid]) / B
        loss = prefix_losses.mean()
        aux_loss = x.new_zeros(())
        scale_aux = 0.0
        if aux is not None:
            last = resid[G - 1]
            denom = (last - last.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
            e = out[G]
            e += last  # e_hat - (x - x_hat): minus AuxK's error
            aux_loss = e.flatten().dot(e.flatten()) / B / denom
            loss = loss + self.aux_alpha * aux_loss
            scale_aux = 2 * self.aux_alpha / (B * float(denom))
        # gradient at group g's output: 2/(B G) * sum of resid[j] for j >= g (kept unscaled in place)
        for g in range(G - 2, -1, -1):
            resid[g] += resid[g + 1]
        scale = 2.0 / (B * G)
        # out now holds, unscaled, the loss gradient at every bag's output: row g*B+t for group g of token t,
        # row G*B+t for AuxK's reconstruction of token t's error
        table = out.view(-1, d)
        g_vals = torch.ops.aten._embedding_bag_per_sample_weights_backward(table, self.dec, cols, offsets, bag, 0)
        entry_scale = torch.full_like(vals, scale)
        entry_scale[n_main:] = scale_aux
        g_vals *= entry_scale
        g_vals[:n_main] *= vals[:n_main] > 0  # BatchTopK's values are clamped at zero

        by_col = torch.sort(cols, stable=True).indices
        col_counts = torch.bincount(cols, minlength=m)
        col_offsets = col_counts.cumsum(0) - col_counts
        self.dec.grad = F.embedding_bag(bag[by_col], table, col_offsets, mode="sum",
                                        per_sample_weights=(vals * entry_scale)[by_col])
        self.enc.grad = F.embedding_bag(rows[by_col], xc, col_offsets, mode="sum",
                                        per_sample_weights=g_vals[by_col]).T.contiguous()
        grad_b_enc = torch.zeros(m, dtype=x.dtype, device=dev).index_add_(0, cols, g_vals)
        self.b_enc.grad = grad_b_enc
        g_base = resid[0]  # unscaled gradient at b_dec + f_core W_core (every prefix contains it)
        g_core = torch.mm(g_base, self.dec_core.T).mul_(scale) * (pre_core > 0)
        self.dec_core.grad = torch.mm(pre_core.T, g_base).mul_(scale)
        self.b_enc_core.grad = g_core.sum(0)
        if isinstance(self.enc_core, nn.Parameter):
            self.enc_core.grad = xc.T @ g_core
        self.b_dec.grad = g_base.sum(0).mul_(scale) - self.enc @ grad_b_enc - self.enc_core @ g_core.sum(0)
        main_vals = vals[:n_main]
        stats = StepStats(
            loss=float(loss), prefix_losses=prefix_losses, aux_loss=float(aux_loss),
            l0_core=float((pre_core > 0).sum()) / B, l0_noncore=float((main_vals > 0).sum()) / B, k_noncore=k_nc,
        )
        return stats, cols[:n_main], main_vals

    @torch.no_grad()
    def update_stats_sparse(self, cols: Tensor, vals: Tensor, batch_tokens: int, ema: float) -> None:
        """`update_stats` from the active (latent, value) pairs instead of a dense code."""
        m = self.width - self.core_size
        active = vals > 0
        cols, vals = cols[active], vals[active]
        self.tokens_since_fired += batch_tokens
        self.tokens_since_fired[cols] = 0
        smallest = torch.full((m,), float("inf"), dtype=vals.dtype, device=vals.device).scatter_reduce(
            0, cols, vals, "amin")
        self._update_thresholds(smallest, ema)

    def decoder_params(self) -> list[nn.Parameter]:
        return [self.dec_core, self.dec]

    @torch.no_grad()
    def project_decoder_grads(self) -> None:
        """Remove the gradient component parallel to each unit-norm decoder row."""
        for w in self.decoder_params():
            if w.grad is not None and w.numel():
                w.grad -= (w.grad * w).sum(dim=1, keepdim=True) * w

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        for w in self.decoder_params():
            if w.numel():
                w /= w.norm(dim=1, keepdim=True).clamp_min(1e-12)

    # -- (de)serialisation ----------------------------------------------------------------------
    def full_tensors(self) -> dict[str, Tensor]:
        """Flat [core | non-core] tensors, the layout written to disk."""
        inf_free = torch.where(torch.isinf(self.threshold), torch.full_like(self.threshold, 3.0e38), self.threshold)
        return {
            "W_enc": torch.cat([self.enc_core, self.enc], dim=1).detach().contiguous(),
            "b_enc": torch.cat([self.b_enc_core, self.b_enc]).detach().contiguous(),
            "W_dec": torch.cat([self.dec_core, self.dec]).detach().contiguous(),
            "b_dec": self.b_dec.detach().clone(),
            "threshold": torch.cat([torch.zeros(self.core_size, device=inf_free.device), inf_free]).contiguous(),
        }

    @classmethod
    def from_tensors(cls, t: dict[str, Tensor], core_size: int, k: int, group_fractions: list[float],
                     l0_mode: str = "dynamic") -> MatryoshkaSAE:
        d, width = t["W_enc"].shape
        c = core_size
        sae = cls(d, width, k, group_fractions, core_encoder=t["W_enc"][:, :c], l0_mode=l0_mode)
        with torch.no_grad():
            sae.enc.copy_(t["W_enc"][:, c:])
            sae.b_enc_core.copy_(t["b_enc"][:c])
            sae.b_enc.copy_(t["b_enc"][c:])
            sae.dec_core.copy_(t["W_dec"][:c])
            sae.dec.copy_(t["W_dec"][c:])
            sae.b_dec.copy_(t["b_dec"])
            sae.threshold.copy_(t["threshold"][c:])
        return sae


def geometric_median(x: Tensor, iters: int = 50, eps: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm, in float64 for a stable b_dec init."""
    x = x.double()
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(eps)
        y_new = (w[:, None] * x).sum(0) / w.sum()
        if (y_new - y).norm() < eps * (1 + y.norm()):
            y = y_new
            break
        y = y_new
    return y.float()


def fvu(x: Tensor, x_hat: Tensor) -> float:
    """Fraction of variance unexplained, mean-centred."""
    num = (x - x_hat).pow(2).sum()
    den = (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
    return float(num / den)

"""The Matryoshka BatchTopK SAE with a shared core (docs/design.md section 2).

Latents are ordered [core | non-core]. Core and non-core parameters are separate tensors so a frozen
transferred core encoder stays bit-identical (it is a buffer, never touched by the optimizer).
All maths run on activations already scaled so that E||x||^2 = d.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmsae import native


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


def smallest_active(f: Tensor) -> Tensor:
    """[n] each column's smallest positive value, +inf where none is positive."""
    return torch.where(f > 0, f, torch.full_like(f, float("inf"))).amin(dim=0)


def ema_thresholds(threshold: Tensor, smallest: Tensor, ema: float) -> Tensor:
    """A latent's first selection sets its threshold; later ones move it by an EMA; unseen ones keep it."""
    seen = torch.isfinite(smallest)
    first = seen & torch.isinf(threshold)
    again = seen & ~first
    # by masks, not boolean indexing: nothing is read back to the host (the GPU's graphed step), the same bits
    blended = ema * threshold + (1 - ema) * smallest
    return torch.where(first, smallest, torch.where(again, blended, threshold))


class Workspace:
    """Buffers a training step reuses from one step to the next: the [B, width] pre-activations (67 MB at
    d 576, width 4096, batch 4096), the residuals, the encoder gradient, the decoder projection's product. A fresh
    tensor that large pays its page faults on every step (the bias broadcast into a new addmm output alone took a
    third of the matmul's time here); a reused one pays them once. Kept on the SAE it serves, so two trainings in
    two threads never share one."""

    def __init__(self) -> None:
        self.buffers: dict[str, Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        buf = self.buffers.get(name)
        if buf is None or buf.shape != shape or buf.dtype != dtype or buf.device != device:
            buf = self.buffers[name] = torch.empty(shape, dtype=dtype, device=device)
        return buf


def workspace(sae: MatryoshkaSAE) -> Workspace:
    ws = sae.__dict__.get("_step_workspace")  # a plain attribute: never in the state dict or a checkpoint
    if ws is None:
        ws = sae.__dict__["_step_workspace"] = Workspace()
    return ws


@dataclass
class StepStats:
    loss: float
    prefix_losses: Tensor  # [G]
    aux_loss: float
    l0_core: float
    l0_noncore: float
    k_noncore: int
    core_code: Tensor | None = None  # [B, c] the core's code of the step, for its threshold EMA


@dataclass
class ForwardOut:
    loss: Tensor
    prefix_losses: Tensor  # [G] mean squared error (sum over d) per Matryoshka prefix
    aux_loss: Tensor
    x_hat: Tensor  # full reconstruction
    f_core: Tensor
    f_noncore: Tensor
    k_noncore: int


CORE_GATES = ("relu", "relu_bias", "topk")
UNSET_THRESHOLD = 3.0e38  # how a threshold still at +inf (a latent never selected) is written to disk


class MatryoshkaSAE(nn.Module):
    """Encode, gate, decode and the losses, with autograd (`forward_train`) as the reference for the
    fast step `dmsae.sparse_step.train_step(sae, x)` that training uses.

    How the core is gated (`core_gate`):
    - `relu`: every positive core pre-activation is kept, outside BatchTopK; the non-core k shrinks by the
      core's mean L0 (`l0_mode: dynamic`). The core bias starts at zero.
    - `relu_bias`: the core bias starts at the bias each core latent had in its birth SAE (`core_bias`) and
      a core latent fires only above the inference threshold it had there (`core_threshold`), as a JumpReLU:
      its sparsity travels with its encoder row. Dynamic L0 as for `relu`.
    - `topk`: core and non-core pre-activations compete in one BatchTopK of k x B entries, so the total L0
      is k; the core stays in every Matryoshka prefix. Core thresholds are learned like the non-core ones.
    """

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
        core_gate: str = "relu",
        core_bias: Tensor | None = None,
        core_threshold: Tensor | None = None,
        freeze_core_bias: bool = False,
    ):
        super().__init__()
        c = 0 if core_encoder is None else core_encoder.shape[1]
        if c >= width:
            raise ValueError(f"core size {c} must be smaller than the width {width}")
        if core_gate not in CORE_GATES:
            raise ValueError(f"core_gate must be one of {CORE_GATES}, not {core_gate!r}")
        if core_gate == "relu_bias" and c and (core_bias is None or core_threshold is None):
            raise ValueError("core_gate='relu_bias' needs the core's birth bias and threshold")
        self.d, self.width, self.k, self.core_size = d, width, k, c
        self.l0_mode, self.aux_alpha, self.dead_after_tokens = l0_mode, aux_alpha, dead_after_tokens
        self.core_gate = core_gate
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
        bias = torch.zeros(c)
        if core_gate == "relu_bias" and c:
            assert core_bias is not None
            bias = core_bias.detach().clone().float()
        if freeze_core_bias:
            self.register_buffer("b_enc_core", bias)
        else:
            self.b_enc_core = nn.Parameter(bias)
        self.b_enc = nn.Parameter(torch.zeros(width - c))
        self.b_dec = nn.Parameter(torch.zeros(d))
        # inference thresholds for non-core latents; +inf until a latent has been selected once
        self.register_buffer("threshold", torch.full((width - c,), float("inf")))
        # the core's: 0 (plain ReLU), the birth thresholds (relu_bias), or learned like the non-core's (topk)
        core_thr = torch.zeros(c)
        if core_gate == "relu_bias" and c:
            assert core_threshold is not None
            core_thr = core_threshold.detach().clone().float()
        elif core_gate == "topk":
            core_thr = torch.full((c,), float("inf"))
        self.register_buffer("core_threshold", core_thr)
        self.register_buffer("tokens_since_fired", torch.zeros(width - c, dtype=torch.long))

    # -- encoding -----------------------------------------------------------------------------
    def pre_acts(self, x: Tensor) -> tuple[Tensor, Tensor]:
        xc = x - self.b_dec
        pre_core = F.relu(xc @ self.enc_core + self.b_enc_core)
        pre_nc = F.relu(xc @ self.enc + self.b_enc)
        return pre_core, pre_nc

    def gate_core(self, pre_core: Tensor) -> Tensor:
        """The core's training-time code for the gates outside BatchTopK (`relu`, `relu_bias`)."""
        if self.core_gate == "relu_bias":
            return torch.where(pre_core > self.core_threshold, pre_core, torch.zeros_like(pre_core))
        return pre_core

    def k_noncore(self, f_core: Tensor) -> int:
        if self.l0_mode == "fixed" or self.core_size == 0:
            return self.k
        core_l0 = (f_core > 0).sum(dim=1).float().mean().item()
        return max(1, self.k - round(core_l0))

    @staticmethod
    def batch_topk(pre: Tensor, k: int) -> Tensor:
        """Keep the k*B largest entries of the whole batch (BatchTopK); zero the rest."""
        flat = pre.flatten()
        n_keep = min(k * pre.shape[0], flat.numel())
        vals, idx = flat.topk(n_keep, sorted=False)
        return torch.zeros_like(flat).scatter(0, idx, vals).view_as(pre)

    def training_codes(self, pre_core: Tensor, pre_nc: Tensor) -> tuple[Tensor, Tensor, int]:
        """(f_core, f_noncore, k_noncore) as in training: the core gated, the non-core by BatchTopK."""
        if self.core_gate == "topk":
            both = self.batch_topk(torch.cat([pre_core, pre_nc], dim=1), self.k)
            f_core, f_nc = both[:, : self.core_size], both[:, self.core_size:]
            return f_core, f_nc, round(float((f_nc > 0).sum()) / max(1, pre_nc.shape[0]))
        f_core = self.gate_core(pre_core)
        k_nc = self.k_noncore(f_core)
        return f_core, self.batch_topk(pre_nc, k_nc), k_nc

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Inference encoding: per-latent thresholds replace BatchTopK (and gate the core), so a token's code
        is batch-independent."""
        pre_core, pre_nc = self.pre_acts(x)
        f_core = torch.where(pre_core > self.core_threshold, pre_core, torch.zeros_like(pre_core))
        return f_core, torch.where(pre_nc > self.threshold, pre_nc, torch.zeros_like(pre_nc))

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
        f_core, f_nc, k_nc = self.training_codes(pre_core, pre_nc)
        recon = self.prefix_reconstructions(f_core, f_nc)
        prefix_losses = (recon - x).pow(2).sum(dim=-1).mean(dim=-1)
        aux = self.aux_loss(x, recon[-1], pre_nc)
        loss = prefix_losses.mean() + self.aux_alpha * aux
        return ForwardOut(loss, prefix_losses.detach(), aux.detach(), recon[-1].detach(), f_core, f_nc, k_nc)

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
    def update_stats(self, f_core: Tensor, f_nc: Tensor, ema: float) -> None:
        """Dead-latent counters and the EMA of each latent's smallest selected activation (the core's too
        when it is selected by BatchTopK)."""
        fired = (f_nc > 0).any(dim=0)
        self.tokens_since_fired += f_nc.shape[0]
        self.tokens_since_fired[fired] = 0
        self.threshold.copy_(ema_thresholds(self.threshold, smallest_active(f_nc), ema))
        if self.core_gate == "topk" and self.core_size:
            self.core_threshold.copy_(ema_thresholds(self.core_threshold, smallest_active(f_core), ema))

    def decoder_params(self) -> list[nn.Parameter]:
        return [self.dec_core, self.dec]

    @torch.no_grad()
    def project_decoder_grads(self) -> None:
        """Remove the gradient component parallel to each unit-norm decoder row."""
        for i, w in enumerate(self.decoder_params()):
            if w.grad is not None and w.numel() and not native.project_rows(w.grad, w.detach()):
                tmp = workspace(self).get(f"projection{i}", tuple(w.shape), w.dtype, w.device)
                coef = torch.mul(w.grad, w, out=tmp).sum(dim=1, keepdim=True)
                w.grad -= torch.mul(coef, w, out=tmp)  # the product (g . w) w, in a reused buffer: the same bits

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        for w in self.decoder_params():
            if w.numel():
                w /= w.norm(dim=1, keepdim=True).clamp_min(1e-12)

    # -- (de)serialisation ----------------------------------------------------------------------
    def full_tensors(self) -> dict[str, Tensor]:
        """Flat [core | non-core] tensors, the layout written to disk (an unset threshold, +inf, as 3e38)."""
        threshold = torch.cat([self.core_threshold, self.threshold])
        threshold = torch.where(torch.isinf(threshold), torch.full_like(threshold, UNSET_THRESHOLD), threshold)
        return {
            "W_enc": torch.cat([self.enc_core, self.enc], dim=1).detach().contiguous(),
            "b_enc": torch.cat([self.b_enc_core, self.b_enc]).detach().contiguous(),
            "W_dec": torch.cat([self.dec_core, self.dec]).detach().contiguous(),
            "b_dec": self.b_dec.detach().clone(),
            "threshold": threshold.contiguous(),
        }

    @classmethod
    def from_tensors(cls, t: dict[str, Tensor], core_size: int, k: int, group_fractions: list[float],
                     l0_mode: str = "dynamic", core_gate: str = "relu") -> MatryoshkaSAE:
        """The SAE for inference: every gate encodes through its stored thresholds."""
        d, width = t["W_enc"].shape
        c = core_size
        sae = cls(d, width, k, group_fractions, core_encoder=t["W_enc"][:, :c], l0_mode=l0_mode)
        sae.core_gate = core_gate
        with torch.no_grad():
            sae.enc.copy_(t["W_enc"][:, c:])
            sae.b_enc_core.copy_(t["b_enc"][:c])
            sae.b_enc.copy_(t["b_enc"][c:])
            sae.dec_core.copy_(t["W_dec"][:c])
            sae.dec.copy_(t["W_dec"][c:])
            sae.b_dec.copy_(t["b_dec"])
            sae.core_threshold.copy_(t["threshold"][:c])
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


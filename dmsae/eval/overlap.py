"""Which latents two dictionaries share, as Paulo & Belrose (2025, "Sparse Autoencoders Trained on the Same Data
Learn Different Features") count them.

The encoder directions of A and B are matched one to one by the Hungarian algorithm on their cosine similarities
(maximising the total), and so are the decoder directions, separately. A latent of A is *shared* when both
matchings pair it with the same latent of B and both cosines are at least 0.7. Dictionaries of different sizes match
min(n_a, n_b) pairs; the shared fraction is over that number.

The chance level is the same count for random unit vectors of the same sizes in the same dimension, with each
latent's encoder direction equal to its decoder direction: the two matchings then always agree, so this is the
higher of the two natural nulls (independent random encoders would rarely agree).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

SHARED_COSINE = 0.7
# the Hungarian algorithm is cubic: 2048 latents take under a second, 8192 about a minute; reports leave wider
# whole dictionaries out
MAX_WIDTH = 8192


@dataclass(frozen=True)
class Overlap:
    n_a: int
    n_b: int
    shared: int  # latents matched to the same partner by both matchings, with both cosines >= the threshold
    agree: int  # latents both matchings pair with the same partner, whatever the cosines
    mean_encoder_cosine: float  # over the encoder matching's pairs
    mean_decoder_cosine: float  # over the decoder matching's pairs

    @property
    def matched(self) -> int:
        return min(self.n_a, self.n_b)

    @property
    def fraction(self) -> float:
        """Shared latents over the pairs matched (min(n_a, n_b)); NaN for an empty dictionary."""
        return self.shared / self.matched if self.matched else float("nan")


def unit_rows(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm, float64 (a zero row stays zero)."""
    a = np.asarray(x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    norms = np.linalg.norm(a, axis=1, keepdims=True)
    return a / np.where(norms > 0, norms, 1.0)


def hungarian(sim: np.ndarray) -> np.ndarray:
    """For each row of `sim`, the column the maximum-total one-to-one matching gives it (-1 when unmatched)."""
    rows, cols = linear_sum_assignment(sim, maximize=True)
    partner = np.full(sim.shape[0], -1, dtype=np.int64)
    partner[rows] = cols
    return partner


def dictionary_overlap(enc_a: torch.Tensor | np.ndarray, dec_a: torch.Tensor | np.ndarray,
                       enc_b: torch.Tensor | np.ndarray, dec_b: torch.Tensor | np.ndarray,
                       threshold: float = SHARED_COSINE) -> Overlap:
    """The shared latents of two dictionaries, given as [n, d] encoder and decoder directions (one row per latent;
    the encoder of an SAE is W_enc transposed)."""
    ea, da, eb, db = (unit_rows(t) for t in (enc_a, dec_a, enc_b, dec_b))
    if ea.shape != da.shape or eb.shape != db.shape or ea.shape[1] != eb.shape[1]:
        raise ValueError(f"encoders and decoders must be [n, d] with one d: {ea.shape}, {da.shape}, {eb.shape}, "
                         f"{db.shape}")
    n_a, n_b = ea.shape[0], eb.shape[0]
    if not n_a or not n_b:
        return Overlap(n_a, n_b, 0, 0, float("nan"), float("nan"))
    sim_enc, sim_dec = ea @ eb.T, da @ db.T
    by_enc, by_dec = hungarian(sim_enc), hungarian(sim_dec)
    i_enc, i_dec = np.flatnonzero(by_enc >= 0), np.flatnonzero(by_dec >= 0)
    cos_enc, cos_dec = sim_enc[i_enc, by_enc[i_enc]], sim_dec[i_dec, by_dec[i_dec]]
    both = (by_enc >= 0) & (by_enc == by_dec)
    idx = np.flatnonzero(both)
    strong = (sim_enc[idx, by_enc[idx]] >= threshold) & (sim_dec[idx, by_dec[idx]] >= threshold)
    return Overlap(n_a, n_b, int(strong.sum()), int(both.sum()), float(cos_enc.mean()), float(cos_dec.mean()))


def random_dictionary(n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    """`n` random unit vectors in `d` dimensions (uniform on the sphere)."""
    return unit_rows(rng.standard_normal((n, d)))


def chance_overlap(n_a: int, n_b: int, d: int, threshold: float = SHARED_COSINE, draws: int = 3,
                   seed: int = 0) -> float:
    """The mean shared fraction of `draws` pairs of random dictionaries of sizes n_a and n_b in `d` dimensions, each
    latent's encoder equal to its decoder (the module's docstring says why); deterministic given `seed`."""
    if not n_a or not n_b:
        return float("nan")
    rng = np.random.default_rng(seed)
    fractions = []
    for _ in range(draws):
        a, b = random_dictionary(n_a, d, rng), random_dictionary(n_b, d, rng)
        fractions.append(dictionary_overlap(a, a, b, b, threshold).fraction)
    return float(np.mean(fractions))

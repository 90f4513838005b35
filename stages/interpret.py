"""interpret stage: one SAE's features judged on the probes stage's data, with no language model.

- Sparse probing: each probing text's SAE codes, mean-pooled over its tokens; per task, k-sparse probes
  (latents ranked by class-mean difference on the train split) scored on the test split (`dmsae.probing`).
- Absorption: the first-letter task's residuals through the SAE against the letter probe
  (`dmsae.absorption`): per letter the main latents, the absorption fraction and the full-absorption rate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors.torch import load_file

from dmsae import absorption, probing
from dmsae.runtime import Runtime
from dmsae.sae import MatryoshkaSAE
from dmsae.store import Artifact
from stages import probes as probes_stage
from stages import train as train_stage

NAME = "interpret"
VERSION = "1"
PROBING_FILE = "sparse_probing.parquet"
LETTERS_FILE = "absorption_letters.parquet"
WORDS_FILE = "absorption_words.parquet"


def encoder(sae: MatryoshkaSAE, scale: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Residual rows -> the SAE's codes (core and non-core side by side), in the SAE's input scale."""
    def encode(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat(sae.encode(x.float() * scale), dim=1)
    return encode


def pooled_codes(sae: MatryoshkaSAE, scale: float, data: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per probing text of the probes stage's tensors, the mean of the SAE's codes over its tokens."""
    return probes_stage.pooled(data["text_residuals"], data["text_offsets"], encoder(sae, scale))


def sparse_probing(features: torch.Tensor, probes: Artifact, ks: list[int] | tuple[int, ...],
                   skip_latents: int = 0) -> pd.DataFrame:
    """Per task of the probes artifact and per k, the k-sparse probe on pooled codes `features` (texts x
    latents). `skip_latents` leaves the first n latents (a core) out of the candidates; the `latents` column
    keeps the SAE's own indices."""
    rows = []
    for task, ids, labels, is_test in probes_stage.load_tasks(probes):
        test, y = torch.tensor(is_test), torch.tensor(labels)
        x = features[ids][:, skip_latents:]
        table = probing.sparse_probe(x[~test], y[~test], x[test], y[test], ks=tuple(k for k in ks if k <= x.shape[1]))
        rows += [{"task": task, **r, "latents": [i + skip_latents for i in r["latents"]]}
                 for r in table.to_dict("records")]
    return pd.DataFrame(rows)


def run(out_dir: Path, params: dict[str, Any], inputs: dict[str, Artifact], rt: Runtime) -> dict[str, Any]:
    sae, scale = train_stage.load_sae(inputs["sae"])
    w_dec = load_file(str(inputs["sae"].file(train_stage.SAE_FILE)))["W_dec"].float()
    data = load_file(str(inputs["probes"].file(probes_stage.TENSORS_FILE)))

    probing_table = sparse_probing(pooled_codes(sae, scale, data), inputs["probes"], params["probe_k"])
    probing_table.to_parquet(out_dir / PROBING_FILE, index=False)
    by_k = probing_table.groupby("k")["test_accuracy"].mean()

    # absorption, in the SAE's input space (residual x scale)
    letters = data["word_letters"]
    probe = absorption.LetterProbe(data["letter_probe_weight"], data["letter_probe_bias"], data["letter_probe_train"],
                                   data["letter_probe_test"], float("nan"), data["letter_probe_f1"])
    # no words (a vocabulary without single-token alphabetic words) gives NaN means and a reason, not an error
    result = absorption.absorption(data["word_residuals"] * scale, letters, probe, encoder(sae, scale), w_dec)
    result.letters.to_parquet(out_dir / LETTERS_FILE, index=False)
    result.words.to_parquet(out_dir / WORDS_FILE, index=False)

    def finite(v: float) -> float | None:
        return None if v is None or math.isnan(v) else float(v)

    return {
        "k": sae.k, "core_size": sae.core_size,
        **{f"sparse_probe_k{k}": float(acc) for k, acc in by_k.items()},
        "dense_probe": inputs["probes"].metrics["dense_probe_mean"],
        "absorption_fraction": finite(result.means["absorption_fraction"]),
        "absorption_rate": finite(result.means["absorption_rate"]),
        "absorption_letters": int(result.means["n_letters"]),
        "absorption_note": result.reason,
    }

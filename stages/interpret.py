"""interpret stage: one SAE's features judged on the probes stage's data, with no language model.

- Sparse probing: each probing text's SAE codes, mean-pooled over its tokens; per task, k-sparse probes
  (latents ranked by class-mean difference on the train split) scored on the test split (`dmsae.eval.probing`).
- Absorption: the first-letter task's residuals through the SAE against the letter probe
  (`dmsae.eval.absorption`): per letter the main latents, the absorption fraction and the full-absorption rate.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from dmsae import readers
from dmsae.eval import absorption
from dmsae.eval.probing import encoder, pooled_codes, sparse_probing
from dmsae.runtime import Runtime
from dmsae.store import Artifact

NAME = "interpret"
VERSION = "1"
READS_ACTIVATIONS = False


def run(out_dir: Path, params: dict[str, Any], inputs: dict[str, Artifact], rt: Runtime) -> dict[str, Any]:
    sae, scale = readers.load_sae(inputs["sae"])
    w_dec = readers.sae_tensors(inputs["sae"])["W_dec"].float()
    data = readers.probe_data(inputs["probes"])

    probing_table = sparse_probing(pooled_codes(sae, scale, data), readers.probe_tasks(inputs["probes"]),
                                   params["probe_k"])
    probing_table.to_parquet(out_dir / readers.SPARSE_PROBING_FILE, index=False)
    by_k = probing_table.groupby("k")["test_accuracy"].mean()

    # absorption, in the SAE's input space (residual x scale)
    letters = data["word_letters"]
    probe = absorption.LetterProbe(data["letter_probe_weight"], data["letter_probe_bias"], data["letter_probe_train"],
                                   data["letter_probe_test"], float("nan"), data["letter_probe_f1"])
    # no words (a vocabulary without single-token alphabetic words) gives NaN means and a reason, not an error
    result = absorption.absorption(data["word_residuals"] * scale, letters, probe, encoder(sae, scale), w_dec)
    result.letters.to_parquet(out_dir / readers.ABSORPTION_LETTERS_FILE, index=False)
    result.words.to_parquet(out_dir / readers.ABSORPTION_WORDS_FILE, index=False)

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


def describe(metrics: dict[str, Any]) -> str:
    """The status line's detail for a finished interpret stage (none)."""
    return ""

"""What one stage writes and another reads: the file names inside each stage's artifact and typed readers.

The store (`dmsae.store`) owns where an artifact lives; this module owns what is inside it, so a stage
that writes a file and every stage, report or command that reads it agree on one name.
"""

from __future__ import annotations

import json
import math
from typing import NamedTuple

import pandas as pd
import torch
import zarr
from safetensors import safe_open
from safetensors.torch import load_file

from dmsae import activations
from dmsae.sae import MatryoshkaSAE
from dmsae.store import Artifact

# harvest
HARVEST_PARTS_FILE = "parts.json"  # a harvest in parts: the key and rows of each harvest_part artifact, in order


def harvest_array(harvest: Artifact) -> zarr.Array | activations.PartedArray:
    """The harvested activations: the artifact's array, or its parts' arrays read as one (the parts are
    attached to the artifact by whoever loaded it: flows.pipeline.load_input)."""
    if not harvest.file(HARVEST_PARTS_FILE).is_file():
        return activations.open_array(harvest.file(activations.ARRAY))
    listed = [p["key"] for p in json.loads(harvest.file(HARVEST_PARTS_FILE).read_text())["parts"]]
    if [p.manifest.key for p in harvest.parts] != listed:
        raise RuntimeError(f"harvest {harvest.manifest.key} is in {len(listed)} parts, but {len(harvest.parts)} were "
                           "attached; load it with flows.pipeline.load_input")
    return activations.PartedArray([activations.open_array(p.file(activations.ARRAY)) for p in harvest.parts])


# tokens
TOKENS_FILE = "tokens.safetensors"  # per split: windows [n, context] int32 and the document ids dealt to it
SPLITS = ("train", "attribution", "eval")
# train and reuse
SAE_FILE = "sae.safetensors"  # the full weights, metadata under META_KEY
SAE_META_KEY = "dmsae"
LINEAGE_FILE = "lineage.safetensors"  # lineage [width, 2] (born cycle, index at birth), birth bias and threshold
CURVE_FILE = "curve.parquet"  # the logged training curve
# select and random_core: encoder [d, c], lineage [c, 2], and each core latent's birth bias and threshold
CORE_FILE = "core.safetensors"
# attribute
SCORES_FILE = "scores.safetensors"
# evaluate
FREQUENCIES_FILE = "frequencies.safetensors"
# probes
PROBES_TENSORS_FILE = "probes.safetensors"
PROBES_TASKS_FILE = "tasks.parquet"
PROBES_TEXTS_FILE = "texts.parquet"
PROBES_WORDS_FILE = "words.parquet"
# interpret
SPARSE_PROBING_FILE = "sparse_probing.parquet"
ABSORPTION_LETTERS_FILE = "absorption_letters.parquet"
ABSORPTION_WORDS_FILE = "absorption_words.parquet"
# latents
LATENTS_FILE = "latents.parquet"
CONTEXTS_FILE = "contexts.parquet"


def token_windows(tokens: Artifact, split: str) -> torch.Tensor:
    """One split's windows [n, context] (int32), each starting with BOS."""
    return load_file(str(tokens.file(TOKENS_FILE)))[split]


def bos_of(tokens: Artifact) -> int:
    """The BOS id the tokens stage marked documents with."""
    return int(tokens.metrics["bos_id"])


def norm_threshold_of(harvest: Artifact) -> float:
    """The harvest's outlier threshold (raw norm), inf when outliers are kept."""
    value = harvest.metrics.get("norm_threshold")
    return math.inf if value is None else float(value)


class SplitTokens(NamedTuple):
    """What a stage that runs the model over one split needs from the tokens and harvest artifacts."""

    windows: torch.Tensor  # [n, context] int32, each starting with BOS
    bos: int
    norm_threshold: float  # the harvest's outlier threshold: positions above it are not modelled


def split_tokens(inputs: dict[str, Artifact], split: str) -> SplitTokens:
    """One split's windows, the BOS id and the outlier threshold, from a stage's `tokens` and `harvest` inputs."""
    return SplitTokens(token_windows(inputs["tokens"], split), bos_of(inputs["tokens"]),
                       norm_threshold_of(inputs["harvest"]))


def sae_meta(artifact: Artifact) -> dict:
    """The metadata a train or reuse artifact stored beside its weights (core size, k, scale, gate, ...)."""
    with safe_open(str(artifact.file(SAE_FILE)), framework="pt") as f:
        return json.loads(f.metadata()[SAE_META_KEY])


def load_sae(artifact: Artifact, device: str = "cpu") -> tuple[MatryoshkaSAE, float]:
    """The trained SAE of a train or reuse artifact in inference mode on `device`, and the activation scale it was
    trained with."""
    meta = sae_meta(artifact)
    tensors = load_file(str(artifact.file(SAE_FILE)))
    p = artifact.manifest.params["sae"]
    sae = MatryoshkaSAE.from_tensors(
        tensors, int(meta["core_size"]), int(meta["k"]), p["group_fractions"], p.get("l0_mode", "dynamic"),
        meta.get("core_gate", "relu"),
    )
    sae.requires_grad_(False)
    return sae.eval().to(device), float(meta["scale"])


def sae_tensors(artifact: Artifact) -> dict[str, torch.Tensor]:
    """The raw weights of a train or reuse artifact (W_enc, W_dec, b_enc, b_dec, threshold, ...)."""
    return load_file(str(artifact.file(SAE_FILE)))


def lineage(artifact: Artifact) -> dict[str, torch.Tensor]:
    """A train or reuse artifact's lineage, birth bias and birth threshold."""
    return load_file(str(artifact.file(LINEAGE_FILE)))


def core(artifact: Artifact) -> dict[str, torch.Tensor]:
    """A select or random_core artifact's core: indices, encoder, lineage, bias, threshold (and, from select,
    the score order and cumulative attribution)."""
    return load_file(str(artifact.file(CORE_FILE)))


def attribution_scores(artifact: Artifact) -> torch.Tensor:
    """An attribute artifact's score per candidate latent."""
    return load_file(str(artifact.file(SCORES_FILE)))["scores"]


def probe_data(artifact: Artifact) -> dict[str, torch.Tensor]:
    """A probes artifact's tensors: text residuals and offsets, word residuals and letters, the letter probe."""
    return load_file(str(artifact.file(PROBES_TENSORS_FILE)))


def probe_tasks(artifact: Artifact) -> list[tuple[str, list[int], list[int], list[bool]]]:
    """(task, text rows, labels, is_test) of every task of a probes artifact, in the stored order."""
    df = pd.read_parquet(artifact.file(PROBES_TASKS_FILE))
    return [(name, g["text"].tolist(), g["label"].tolist(), g["is_test"].tolist())
            for name, g in df.groupby("task", sort=False)]

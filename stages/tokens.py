"""tokens stage: tokenize the corpus and split it by document into train / attribution / eval.

Documents are shuffled (data.split_seed) and dealt out whole, so the three splits never share a
document. Within a split, documents are joined by BOS and cut into windows of `context` tokens, each
starting with BOS; nothing is padded.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from dmsae import readers
from dmsae.errors import UserError
from dmsae.lm import bos_id
from dmsae.runtime import Runtime
from dmsae.sources import CorpusSource, read_documents
from dmsae.store import Artifact

NAME = "tokens"
VERSION = "1"
READS_ACTIVATIONS = False
HUB_CHARS_PER_TOKEN = 8  # generous: English runs about 4-5 characters per token


def split_documents(
    doc_tokens: list[list[int]], bos: int, context: int, split_tokens: dict[str, int], seed: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Deal shuffled whole documents to each split until it fills ceil(tokens/context) windows."""
    order = np.random.default_rng(seed).permutation(len(doc_tokens))
    available = sum(len(t) + 1 for t in doc_tokens)
    needed = sum(math.ceil(n / context) * context for n in split_tokens.values())
    pos = 0
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, n_tokens in split_tokens.items():
        n_windows = math.ceil(n_tokens / context)
        need = n_windows * (context - 1)
        stream: list[int] = []
        docs: list[int] = []
        while len(stream) < need:
            if pos >= len(order):
                raise UserError(
                    f"data: too few tokens: the corpus has about {available} tokens in {len(doc_tokens)} documents, "
                    f"the splits need about {needed}; lower data.train_tokens/attribution_tokens/eval_tokens "
                    "or add documents"
                )
            doc = int(order[pos])
            pos += 1
            if not doc_tokens[doc]:
                continue
            if stream:
                stream.append(bos)
            stream.extend(doc_tokens[doc])
            docs.append(doc)
        body = np.asarray(stream[:need], dtype=np.int32).reshape(n_windows, context - 1)
        windows = np.concatenate([np.full((n_windows, 1), bos, dtype=np.int32), body], axis=1)
        out[name] = (windows, np.asarray(docs, dtype=np.int64))
    return out


def run(out_dir: Path, params: dict[str, Any], inputs: dict[str, Artifact], rt: Runtime) -> dict[str, Any]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(inputs["model"].path))
    src = CorpusSource(params["kind"], rt.args["location"], params["fingerprint"])
    wanted = sum(params[f"{s}_tokens"] for s in readers.SPLITS)
    docs = read_documents(src, params["field"], params["split"], max_chars=HUB_CHARS_PER_TOKEN * wanted)
    doc_tokens = tokenizer(docs, add_special_tokens=False)["input_ids"]
    bos = bos_id(tokenizer)
    sizes = {s: params[f"{s}_tokens"] for s in readers.SPLITS}
    splits = split_documents(doc_tokens, bos, params["context"], sizes, params["split_seed"])
    tensors: dict[str, torch.Tensor] = {}
    for name, (windows, doc_ids) in splits.items():
        tensors[name] = torch.from_numpy(windows)
        tensors[f"{name}_docs"] = torch.from_numpy(doc_ids)
    save_file(tensors, str(out_dir / readers.TOKENS_FILE))
    metrics: dict[str, Any] = {"bos_id": bos, "documents": len(docs), "context": params["context"]}
    for name, (windows, doc_ids) in splits.items():
        metrics[f"{name}_windows"] = int(windows.shape[0])
        metrics[f"{name}_documents"] = int(doc_ids.shape[0])
        metrics[f"{name}_tokens"] = int((windows != bos).sum())  # positions with an activation (BOS excluded)
    return metrics


def describe(metrics: dict[str, Any]) -> str:
    """The status line's detail for a finished tokens stage (none)."""
    return ""

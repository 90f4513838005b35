"""probes stage: the labelled data every SAE's interpret stage is judged on, computed once per model and layer.

- Sparse probing (`dmsae.eval.probing`, tasks from `dmsae.eval.tasks`): the offline tasks (language id and
  topic on the embedded Wikipedia summaries) plus an optional task from the user's JSONL file. Each distinct
  text is cut to `probe_context` tokens after BOS and run to layer L; the residual of every modelled token
  (not BOS, not an outlier) is kept in float16, so an SAE's pooled codes need no language model. The dense
  baseline probe (all residual dimensions, mean-pooled) is trained here.
- Absorption (`dmsae.eval.absorption`): single-token words of the model's vocabulary in the first-letter
  prompt; the residual at the word's token and the letter probe trained on them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from dmsae import lm, readers
from dmsae.eval import absorption, tasks
from dmsae.eval.probing import dense_probe, pooled
from dmsae.runtime import Runtime
from dmsae.store import Artifact

NAME = "probes"
VERSION = "1"
READS_ACTIVATIONS = False


def probe_tasks(params: dict[str, Any], location: str | None) -> list[tasks.ProbeTask]:
    """The offline tasks, and the user's JSONL task when a file is given."""
    found = tasks.offline_tasks(max_per_class=params["probe_examples"], seed=params["seed"])
    if location is not None:
        found.append(tasks.jsonl_task(location, max_per_class=params["probe_examples"], seed=params["seed"]))
    return found


@torch.no_grad()
def text_residuals(model: torch.nn.Module, tokenizer: Any, texts: list[str], bos: int, layer: int, context: int,
                   norm_threshold: float, batch: int, rt: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """Residuals of every modelled token of each text ([T, d] float16) and each text's row range (offsets [N+1])."""
    rows, counts = [], []
    n_batches = math.ceil(len(texts) / batch)
    for b in tqdm(range(n_batches), desc="probe texts", unit="batch", disable=not rt.show_progress):
        chunk = texts[b * batch:(b + 1) * batch]
        ids = [[bos] + tokenizer(t, add_special_tokens=False)["input_ids"][: context - 1] for t in chunk]
        padded = lm.pad_with_bos(ids, bos, rt.device)
        h = lm.residual_upto(model, padded, layer)
        kept = lm.kept_positions(h, padded, bos, norm_threshold)
        for j in range(len(chunk)):
            rows.append(h[j][kept[j]].to(torch.float16).cpu())
            counts.append(int(kept[j].sum()))
        rt.report((b + 1) / n_batches, f"batch {b + 1}/{n_batches}")
    offsets = torch.zeros(len(texts) + 1, dtype=torch.long)
    offsets[1:] = torch.tensor(counts, dtype=torch.long).cumsum(0)
    return torch.cat(rows), offsets


@torch.no_grad()
def word_residuals(model: torch.nn.Module, tokenizer: Any, bos: int, params: dict[str, Any], norm_threshold: float,
                   batch: int, rt: Runtime) -> tuple[list[absorption.VocabWord], torch.Tensor]:
    """The first-letter task's words (single tokens of this vocabulary) and the residual at each word's token
    in its few-shot prompt ([N, d] float32). Words whose prompt does not tokenize back to the word's own
    token at that position, or whose residual is an outlier, are dropped."""
    words = absorption.first_letter_words(tokenizer.get_vocab(), max_words=params["absorption_words"],
                                          seed=params["seed"])
    if not words:
        return [], torch.zeros(0, int(model.config.hidden_size))
    examples = [w.text for w in words]
    kept_words, rows = [], []
    n_batches = math.ceil(len(words) / batch)
    for b in tqdm(range(n_batches), desc="absorption words", unit="batch", disable=not rt.show_progress):
        chunk = words[b * batch:(b + 1) * batch]
        prompts = [absorption.prompt_for(w.text, examples, seed=params["seed"]) for w in chunk]
        encoded = [tokenizer(pr.text, add_special_tokens=False, return_offsets_mapping=True) for pr in prompts]
        ids = [[bos] + e["input_ids"] for e in encoded]
        at = [1 + absorption.token_index(e["offset_mapping"], pr.word_end) for e, pr in zip(encoded, prompts,
                                                                                           strict=True)]
        padded = lm.pad_with_bos(ids, bos, rt.device)
        h = lm.residual_upto(model, padded, params["layer"])
        kept = lm.kept_positions(h, padded, bos, norm_threshold)
        for j, w in enumerate(chunk):
            if ids[j][at[j]] == w.token_id and bool(kept[j, at[j]]):
                kept_words.append(w)
                rows.append(h[j, at[j]].float().cpu())
        rt.report((b + 1) / n_batches, f"batch {b + 1}/{n_batches}")
    d = int(model.config.hidden_size)
    return kept_words, torch.stack(rows) if rows else torch.zeros(0, d)


def run(out_dir: Path, params: dict[str, Any], inputs: dict[str, Artifact], rt: Runtime) -> dict[str, Any]:
    from transformers import AutoTokenizer

    model = lm.load_model(inputs["model"].path, rt.device, params["dtype"], params.get("autocast"))
    tokenizer = AutoTokenizer.from_pretrained(str(inputs["model"].path))
    bos = readers.bos_of(inputs["tokens"])
    threshold = readers.norm_threshold_of(inputs["harvest"])
    batch = rt.args.get("batch_size", 16)

    all_tasks = probe_tasks(params, rt.args.get("probe_data_location"))
    texts = sorted({t for task in all_tasks for t in task.texts})  # each distinct text is run once
    index = {t: i for i, t in enumerate(texts)}
    residuals, offsets = text_residuals(model, tokenizer, texts, bos, params["layer"], params["probe_context"],
                                        threshold, batch, rt)
    features = pooled(residuals, offsets)
    task_rows, dense = [], {}
    for task in all_tasks:
        ids = [index[t] for t in task.texts]
        dense[task.name] = dense_probe(*task.split(features[ids]))
        task_rows += [{"task": task.name, "text": i, "label": y, "is_test": s, "source": task.source}
                      for i, y, s in zip(ids, task.labels, task.is_test, strict=True)]

    words, word_x = word_residuals(model, tokenizer, bos, params, threshold, batch, rt)
    letters = torch.tensor([absorption.LETTERS.index(w.letter) for w in words], dtype=torch.long)
    # in the SAE's input space: every SAE of a run is trained on this harvest's scale
    scale = inputs["harvest"].metrics["scale"]
    probe = absorption.train_letter_probe(word_x * scale, letters, seed=params["seed"])

    save_file({"text_residuals": residuals.contiguous(), "text_offsets": offsets,
               "word_residuals": word_x.contiguous(), "word_letters": letters,
               "letter_probe_weight": probe.weight.contiguous(), "letter_probe_bias": probe.bias.contiguous(),
               "letter_probe_train": probe.train_idx.contiguous(), "letter_probe_test": probe.test_idx.contiguous(),
               "letter_probe_f1": probe.f1.contiguous()}, str(out_dir / readers.PROBES_TENSORS_FILE))
    pd.DataFrame([w._asdict() for w in words], columns=list(absorption.VocabWord._fields)).to_parquet(
        out_dir / readers.PROBES_WORDS_FILE, index=False)
    pd.DataFrame(task_rows).to_parquet(out_dir / readers.PROBES_TASKS_FILE, index=False)
    pd.DataFrame({"text": texts}).to_parquet(out_dir / readers.PROBES_TEXTS_FILE, index=False)
    return {"n_texts": len(texts), "n_tokens": int(offsets[-1]), "tasks": [t.name for t in all_tasks],
            "n_words": len(words), "n_letters": int(letters.unique().numel()),
            "letter_probe_accuracy": probe.accuracy,
            "dense_probe_accuracy": dense,
            "dense_probe_mean": sum(dense.values()) / len(dense)}



def describe(metrics: dict[str, Any]) -> str:
    """The status line's detail for a finished probes stage (none)."""
    return ""

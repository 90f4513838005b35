"""harvest stage: the training windows' layer-L residuals in Zarr (dmsae/harvesting.py has the loop).

One part (`harvest.parts: 1`): this stage runs the whole harvest into one array. Several parts: each part
(stage harvest_part) is its own task, artifact and checkpoint, and this stage only joins them: it checks that
they belong together, writes their list, and computes the scale from their per-batch sums, so the rows and
the metrics are those of a one-part harvest. Readers get the parts attached (`Artifact.parts`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dmsae import harvesting, lm, readers
from dmsae.runtime import Runtime
from dmsae.store import Artifact

NAME = "harvest"
VERSION = "2"
READS_ACTIVATIONS = False
PARTS_FILE = readers.HARVEST_PARTS_FILE


def run(out_dir: Path, params: dict[str, Any], inputs: dict[str, Artifact], rt: Runtime) -> dict[str, Any]:
    if params.get("parts"):
        return _join(out_dir, params, inputs)
    model = lm.load_model(inputs["model"].path, rt.device, params["dtype"], params.get("autocast"))
    layer = params["layer"]
    lm.check_layer(model, layer)
    windows = readers.token_windows(inputs["tokens"], "train")
    bos = readers.bos_of(inputs["tokens"])
    done = harvesting.harvest(model, windows, bos, params, rt, out_dir)
    return harvesting.summary(done.n_rows, int(model.config.hidden_size), layer, int((windows != bos).sum()),
                              done.threshold, done.sq_norm_sum)


def _join(out_dir: Path, params: dict[str, Any], inputs: dict[str, Artifact]) -> dict[str, Any]:
    """The parts' metrics joined in part order (their data stays in their own artifacts)."""
    parts = [inputs[f"part{i}"].manifest for i in range(params["parts"])]
    thresholds = {p.metrics["norm_threshold"] for p in parts}
    if len(thresholds) != 1 or [p.metrics["part"] for p in parts] != list(range(params["parts"])):
        raise RuntimeError("harvest: the parts disagree on the outlier threshold or their order")
    sq_norm_sum = harvesting.Harvested(0, 0.0, [s for p in parts for s in p.metrics["batch_sums"]]).sq_norm_sum
    n_rows = sum(p.metrics["n_tokens"] for p in parts)
    threshold = parts[0].metrics["norm_threshold"]
    (out_dir / PARTS_FILE).write_text(json.dumps(
        {"parts": [{"key": p.key, "rows": p.metrics["n_tokens"]} for p in parts]}, indent=2))
    return harvesting.summary(n_rows, parts[0].metrics["d"], params["layer"],
                              sum(p.metrics["n_tokens"] + p.metrics["n_outliers"] for p in parts),
                              float("inf") if threshold is None else threshold, sq_norm_sum)


def describe(metrics: dict[str, Any]) -> str:
    """The status line's detail for a finished harvest stage."""
    return f"{metrics['n_tokens']} tokens, d={metrics['d']}"

"""harvest_part stage: one row range of the training windows harvested into its own sharded Zarr array.

Part i of P takes windows [i*W, (i+1)*W), W = ceil(windows / P) rounded up to whole batches, so that every
batch is the batch a one-part harvest runs (same windows, same numbers). It measures the outlier threshold on the
harvest's first batch, as a one-part harvest does, so it keeps exactly the rows a one-part harvest keeps there;
it writes whole shards only and is the only writer of its array; killed, it resumes from its own checkpoint.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from dmsae import harvesting, lm, readers
from dmsae.errors import UserError
from dmsae.runtime import Runtime
from dmsae.store import Artifact

NAME = "harvest_part"
VERSION = "1"
READS_ACTIVATIONS = False


def window_range(n_windows: int, part: int, parts: int, batch: int) -> tuple[int, int]:
    width = math.ceil(math.ceil(n_windows / parts) / batch) * batch
    return min(n_windows, part * width), min(n_windows, (part + 1) * width)


def run(out_dir: Path, params: dict[str, Any], inputs: dict[str, Artifact], rt: Runtime) -> dict[str, Any]:
    model = lm.load_model(inputs["model"].path, rt.device, params["dtype"], params.get("autocast"))
    layer = params["layer"]
    lm.check_layer(model, layer)
    windows = readers.token_windows(inputs["tokens"], "train")
    bos = readers.bos_of(inputs["tokens"])
    batch = rt.args.get("batch_size", 32)
    start, stop = window_range(windows.shape[0], params["part"], params["parts"], batch)
    if start >= stop:
        raise UserError(f"harvest.parts={params['parts']}: the {windows.shape[0]} training windows make only "
                        f"{math.ceil(windows.shape[0] / batch)} batches of data.batch_size={batch}; "
                        "lower harvest.parts")
    threshold = harvesting.first_batch_threshold(model, windows, bos, layer, batch, rt.device,
                                                 params["outlier_factor"])
    mine = windows[start:stop]
    done = harvesting.harvest(model, mine, bos, params, rt, out_dir, threshold=threshold,
                              shard_chunks=params["shard_chunks"],
                              desc=f"harvest part {params['part'] + 1}/{params['parts']}")
    max_rows = int((mine != bos).sum())
    return {"part": params["part"], "windows": [start, stop], "n_tokens": done.n_rows,
            "d": int(model.config.hidden_size), "n_outliers": max_rows - done.n_rows,
            "norm_threshold": threshold if math.isfinite(threshold) else None, "batch_sums": done.batch_sums}


def describe(metrics: dict[str, Any]) -> str:
    start, stop = metrics["windows"]
    return f"windows {start}-{stop}: {metrics['n_tokens']} tokens"

"""The harvest loop the harvest stages share: run layers 0..L over a range of training windows and stream the
kept layer-L residuals into a Zarr array, resumable after every batch.

BOS positions are excluded (attention-sink outliers, not text), and so are massive-activation tokens whose
norm exceeds `outlier_factor` x the median norm of the harvest's first batch. After every batch the write
position is saved beside the array, so a killed harvest continues from its last complete block. The sum of
squared norms is kept per batch: summed in order over one part or over every part, it gives the same float.
"""

from __future__ import annotations

import json
import math
import os
import queue
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from dmsae import activations, faults, lm
from dmsae.errors import UserError
from dmsae.memory import release_free_heap
from dmsae.runtime import Runtime

STATE_FILE = "harvest-state.safetensors"
PENDING_DIR = "harvest-pending"  # the resumable state's pending rows (_StateLog)
FLUSH_BYTES = 256 << 20  # at most this much of whole chunks gathered before one Zarr write


def norm_threshold(first_norms: torch.Tensor, factor: float | None) -> float:
    """Raw-space norm above which a token counts as a massive-activation outlier; inf disables it."""
    return math.inf if factor is None else factor * float(first_norms.float().median())


def first_batch_threshold(model: Any, windows: torch.Tensor, bos: int, layer: int, batch: int, device: str,
                          factor: float | None) -> float:
    """The outlier threshold of a harvest, from its first batch: what a part of a harvest computes for itself
    so that every part drops the tokens a one-part harvest drops."""
    if factor is None:
        return math.inf
    ids = windows[:batch].long().to(device)
    h = lm.residual_upto(model, ids, layer)
    return norm_threshold(h[ids != bos].norm(dim=-1), factor)


@dataclass
class Harvested:
    n_rows: int
    threshold: float
    batch_sums: list[float] = field(default_factory=list)  # squared norms of the kept rows, per batch

    @property
    def sq_norm_sum(self) -> float:
        total = 0.0
        for s in self.batch_sums:  # in order: the same float however the batches are split into parts
            total += s
        return total


def stored_rows(rows: torch.Tensor, store_dtype: str) -> np.ndarray:
    """float32 rows in the array's type. torch's float16 cast (F16C) rounds to nearest even as numpy's astype does,
    the same bytes, in a tenth of the time (0.6 ms against 7.7 ms for a batch of 4096 x 576 rows here)."""
    return rows.to(getattr(torch, store_dtype)).numpy()


def _write_rows(path: Path, rows: np.ndarray, dtype: np.dtype) -> None:
    tmp = path.with_suffix(".tmp")
    np.ascontiguousarray(rows, dtype=dtype).tofile(tmp)
    os.replace(tmp, path)


class _StateLog:
    """The resumable state of a harvest, after every batch: the rows no chunk holds yet, in files of their own
    under PENDING_DIR (the rows carried over from the last chunk write, then one file per batch since), then the
    small state file that lists them. A batch's rows are written once, and a remote store uploads only the new
    file (nested files go up before the top-level state that names them); a file the state does not list (a
    kill between the two) is ignored by a resume and removed."""

    def __init__(self, work: Path, writer: activations.ChunkWriter, files: list[str] | None = None):
        """`files`: the pending files of the state being resumed, which stay as they are (rewriting them would
        leave that state naming files that changed under it)."""
        self.writer, self.path, self.dir = writer, work / STATE_FILE, work / PENDING_DIR
        self.dir.mkdir(exist_ok=True)
        self.offset = writer.offset
        if files is None:
            self._carry()  # a fresh start, or a state from before PENDING_DIR: its rows in the first file
        else:
            self.files = list(files)
        self._remove_unlisted()

    def _carry(self) -> None:
        """The pending rows as of a chunk write (or a resume) in the current offset's first file."""
        self.files = []
        if self.writer.pending_rows:
            name = f"{self.offset}-carry.bin"
            _write_rows(self.dir / name, np.concatenate(self.writer.pending), self.writer.array.dtype)
            self.files.append(name)

    def _remove_unlisted(self) -> None:
        for f in self.dir.iterdir():
            if f.name not in self.files:
                f.unlink()

    def after_batch(self, rows: np.ndarray, next_batch: int, threshold: float, batch_sums: list[float]) -> None:
        """`rows`: what the batch appended to the writer."""
        wrote_chunks = self.writer.offset != self.offset
        if wrote_chunks:
            self.offset = self.writer.offset
            self._carry()
        elif rows.shape[0]:
            name = f"{self.offset}-{next_batch - 1}.bin"
            _write_rows(self.dir / name, rows, self.writer.array.dtype)
            self.files.append(name)
        state = {"next_batch": next_batch, "offset": self.offset, "pending_rows": self.writer.pending_rows,
                 "pending_files": self.files, "threshold": threshold, "batch_sums": batch_sums}
        tmp = self.path.with_suffix(".tmp")
        save_file({}, str(tmp), metadata={"state": json.dumps(state)})
        os.replace(tmp, self.path)
        if wrote_chunks:  # the older offset's files, once the state no longer names them
            self._remove_unlisted()

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        shutil.rmtree(self.dir, ignore_errors=True)


def _load_state(path: Path, d: int, dtype: np.dtype) -> tuple[dict[str, Any], np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            state = json.loads(f.metadata()["state"])
            if "batch_sums" not in state:  # written by an older dmsae: start over rather than guess
                return None
            if "pending_files" not in state:  # the pending rows inside the state file (dmsae before 2026-12-04)
                return state, f.get_tensor("pending").numpy()
        parts = [np.fromfile(path.parent / PENDING_DIR / name, dtype=dtype) for name in state["pending_files"]]
        pending = np.concatenate(parts) if parts else np.empty((0,), dtype)
        if pending.size != state["pending_rows"] * d:
            return None
        return state, pending.reshape(-1, d)
    except Exception:  # noqa: BLE001 - an unreadable state only costs the batches it held
        return None


def flush_chunks(array: Any) -> int:
    """Chunks per Zarr write: one per CPU the process may use (zarr compresses a write's chunks concurrently),
    at most FLUSH_BYTES of them."""
    rows = array.shards[0] if array.shards else array.chunks[0]
    unit = rows * array.shape[1] * array.dtype.itemsize
    return max(1, min(activations.cpu_count(), FLUSH_BYTES // max(unit, 1)))


class BatchStore:
    """What a harvest does with a batch's kept rows after the forward: their float64 sum of squares, the cast to
    the stored dtype, the chunk writes, and (with a checkpoint folder) the resumable state."""

    def __init__(self, writer: activations.ChunkWriter, work: Path, rt: Runtime, store_dtype: str,
                 batch_sums: list[float], pending_files: list[str] | None = None):
        self.writer, self.rt, self.store_dtype, self.batch_sums = writer, rt, store_dtype, batch_sums
        self.log = _StateLog(work, writer, pending_files) if rt.checkpoint_dir is not None else None
        # seconds spent in each part, summed over the batches: where a host-bound harvest's time goes (the bench)
        self.seconds = dict.fromkeys(("sums", "cast", "chunk writes", "state", "heap trim"), 0.0)

    def __call__(self, i: int, kept: torch.Tensor, threshold: float) -> None:
        t0 = time.perf_counter()
        self.batch_sums.append(float(np.square(kept.numpy(), dtype=np.float64).sum()))
        t1 = time.perf_counter()
        rows = stored_rows(kept, self.store_dtype)
        t2 = time.perf_counter()
        self.writer.append(rows)
        t3 = time.perf_counter()
        if self.log is not None:
            self.log.after_batch(rows, i + 1, threshold, self.batch_sums)
            self.rt.checkpoint_saved()
        t4 = time.perf_counter()
        release_free_heap()
        t5 = time.perf_counter()
        for name, a, b in (("sums", t0, t1), ("cast", t1, t2), ("chunk writes", t2, t3), ("state", t3, t4),
                           ("heap trim", t4, t5)):
            self.seconds[name] += b - a
        faults.point(f"{self.rt.label}:batch:{i + 1}")

    def remove_state(self) -> None:
        if self.log is not None:
            self.log.remove()


class HostSide:
    """A batch's work after the forward, batches in order, the same bytes either way. `threaded` (for a forward on
    a GPU): on a thread of its own, so that the next forward runs meanwhile; the caller's thread keeps the forward
    and the progress reports, and an error on the host side is raised there at its next hand-over or at the end.
    Not threaded (for a forward on the CPU): on the caller's thread, after each forward. A CPU forward already
    keeps every core busy, and a thread beside it only slows it (its thread team waits at every op for the core the
    host work holds): on a 2-core Xeon with AMX the bf16 harvest ran at 0.76x its bare forward with the thread and
    0.82-0.94x without (BENCHMARKS.md)."""

    def __init__(self, work: Callable[[int, torch.Tensor, float], None], depth: int = 2, threaded: bool = True):
        self.work = work
        self.queue: queue.Queue[tuple[int, torch.Tensor, float] | None] = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="harvest-host-side", daemon=True) if threaded else None
        if self.thread is not None:
            self.thread.start()

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:  # after an error: drain, so that the caller's put never blocks
                try:
                    self.work(*item)
                except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
                    self.error = e

    def put(self, i: int, kept: torch.Tensor, threshold: float) -> None:
        if self.thread is None:
            self.work(i, kept, threshold)
            return
        self._raise()
        self.queue.put((i, kept, threshold))

    def close(self, raise_error: bool = True) -> None:
        """Wait for every batch handed over; re-raise the first error (not while another is propagating)."""
        if self.thread is None:
            return
        self.queue.put(None)
        self.thread.join()
        if raise_error:
            self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error


def harvest(model: Any, windows: torch.Tensor, bos: int, params: dict[str, Any], rt: Runtime, out_dir: Path,
            threshold: float | None = None, shard_chunks: int | None = None, desc: str = "") -> Harvested:
    """Harvest `windows` into out_dir/activations.zarr. `threshold` None: measured on the first batch (a whole
    harvest); given: a part of a harvest. Checkpoints go to rt.checkpoint_dir when there is one."""
    layer = params["layer"]
    max_rows = int((windows != bos).sum())
    d = int(model.config.hidden_size)
    # Written where a killed run can find it again (the stage's partial folder), moved into the
    # artifact when complete. The array is sized for every non-BOS position and shrunk at the end.
    work = rt.checkpoint_dir if rt.checkpoint_dir is not None else out_dir
    work.mkdir(parents=True, exist_ok=True)
    dtype = np.dtype(params["store_dtype"])
    resumed = _load_state(work / STATE_FILE, d, dtype) if (work / activations.ARRAY).exists() else None
    measure_threshold = threshold is None
    if resumed is None:
        array = activations.create(work / activations.ARRAY, max_rows, d, params["chunk_rows"], params["store_dtype"],
                                   shard_chunks=shard_chunks,
                                   compression=rt.args.get("compression", activations.DEFAULT_COMPRESSION))
        writer = activations.ChunkWriter(array, flush_chunks=flush_chunks(array))
        first_batch, batch_sums, threshold = 0, [], math.inf if threshold is None else threshold
        pending_files = None
    else:
        state, pending = resumed
        array = activations.open_array(work / activations.ARRAY, mode="r+")
        writer = activations.ChunkWriter(array, offset=state["offset"], pending=pending,
                                         flush_chunks=flush_chunks(array))
        first_batch, batch_sums, threshold = state["next_batch"], list(state["batch_sums"]), state["threshold"]
        pending_files = state.get("pending_files")
        rt.resumed = {"batch": first_batch}
        print(f"dmsae: resuming {rt.label or 'harvest'} at batch {first_batch} (offset {writer.offset} rows)",
              file=sys.stderr, flush=True)
    store_batch = BatchStore(writer, work, rt, params["store_dtype"], batch_sums, pending_files)
    batch = rt.args.get("batch_size", 32)
    n_batches = math.ceil(windows.shape[0] / batch)
    real = windows != bos
    bar = tqdm(total=max_rows, initial=int(real[:first_batch * batch].sum()), desc=desc or f"harvest layer {layer}",
               unit="tok", disable=not rt.show_progress)
    host = HostSide(store_batch, threaded=torch.device(rt.device).type != "cpu")
    handed = writer.offset + writer.pending_rows
    try:
        for i in range(first_batch, n_batches):
            ids = windows[i * batch:(i + 1) * batch].long().to(rt.device)
            h = lm.residual_upto(model, ids, layer)
            # the row norms the outlier filter needs, computed once: a NaN or inf anywhere in a row makes its norm
            # NaN or inf, so they are also the finite check (one pass fewer over the batch than checking every entry)
            real_ids = ids != bos
            norms = h.float().norm(dim=-1)
            if not torch.isfinite(norms[real_ids]).all():
                raise UserError(f"harvest: the model produced NaN or inf activations at layer {layer}; "
                                "check model.dtype (float32 is safest) and the model weights")
            if i == 0 and measure_threshold:  # the median of the first batch fixes the threshold for the whole harvest
                threshold = norm_threshold(h[real_ids].norm(dim=-1), params["outlier_factor"])
            kept = h[lm.kept_positions(h, ids, bos, threshold, norms)].float().cpu()
            host.put(i, kept, threshold)
            handed += kept.shape[0]
            bar.update(int(real[i * batch:(i + 1) * batch].sum()))
            rt.report((i + 1) / n_batches, f"harvested {handed} tokens")
    except BaseException:
        host.close(raise_error=False)  # the batches handed over are stored: a resume starts after them
        raise
    host.close()
    bar.close()
    n_rows = writer.close()
    if work != out_dir:
        os.replace(work / activations.ARRAY, out_dir / activations.ARRAY)
    store_batch.remove_state()
    return Harvested(n_rows, threshold, batch_sums)


def summary(n_rows: int, d: int, layer: int, max_rows: int, threshold: float, sq_norm_sum: float) -> dict[str, Any]:
    """The harvest's metrics: the activation scale that makes E||x||^2 = d among them."""
    if n_rows == 0:
        raise UserError("harvest: no training tokens left after excluding BOS and outliers; "
                        "raise data.train_tokens or harvest.outlier_factor")
    mean_sq_norm = sq_norm_sum / n_rows
    return {
        "n_tokens": n_rows, "d": d, "layer": layer, "n_outliers": max_rows - n_rows,
        "norm_threshold": threshold if math.isfinite(threshold) else None,
        "mean_sq_norm": mean_sq_norm, "scale": math.sqrt(d / mean_sq_norm),
    }

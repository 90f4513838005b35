"""Activation arrays in Zarr: chunk-aligned streaming writes and shuffled, chunk-aligned reads.

Random row batches from a compressed array would decode nearly every chunk per batch, so reads take
whole chunks, mix a few of them in memory and cut batches from that buffer.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec

ARRAY = "activations.zarr"
# How an array's chunks are compressed (`harvest.compression`). Residual-stream activations barely compress: on
# SmolLM2's layer 15, zstd level 3 saves 9 % of float32 chunks and 7 % of float16 ones, lz4 4 % and none, but
# zstd took 6x lz4's time to write a chunk (44 ms against 7 ms for 4096 x 576 float32 on one Zen 2 core) and to
# read it (15 ms against 2.5): the harvest's host side and the training's batch stream, which a GPU waits on.
# Any choice stores the same values, so it is not in a stage's key.
COMPRESSIONS: dict[str, BloscCodec | None] = {
    "lz4": BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),
    "zstd": BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"),
    "none": None,
}
DEFAULT_COMPRESSION = "lz4"


def cpu_count() -> int:
    """The CPUs this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def create(path: Path, n_rows: int, d: int, chunk_rows: int, dtype: str = "float32",
           shard_chunks: int | None = None, compression: str = DEFAULT_COMPRESSION) -> zarr.Array:
    """A new array of `chunk_rows`-row chunks; with `shard_chunks`, grouped that many to a shard (one file, one
    object on an object store), each written whole by the one writer of its part. `compression`: a key of
    COMPRESSIONS."""
    return zarr.create_array(
        store=str(path), shape=(n_rows, d), chunks=(chunk_rows, d), dtype=dtype,
        shards=(chunk_rows * shard_chunks, d) if shard_chunks else None,
        compressors=COMPRESSIONS[compression], fill_value=0.0,
    )


def open_array(path: Path, mode: Literal["r", "r+"] = "r") -> zarr.Array:
    return zarr.open_array(str(path), mode=mode)


class ChunkWriter:
    """Buffers rows and writes them to the array in whole chunks (whole shards of a sharded array), in order.
    `flush_chunks`: how many whole chunks to gather before a write; zarr compresses the chunks of one write
    concurrently (one thread each), and each chunk's bytes are the same whichever write it is part of."""

    def __init__(self, array: zarr.Array, offset: int = 0, pending: np.ndarray | None = None, flush_chunks: int = 1):
        """`offset` and `pending` continue an interrupted write: rows before `offset` are on disk."""
        # Every chunk is written: zarr's default first compares each chunk with the fill value, to skip writing
        # an all-zero one, and that pass took as long as the write itself here (11 of 22 ms a 4096 x 576
        # float32 chunk). A residual chunk is never all zeros, and one that were would read back the same.
        self.array = array.with_config({"write_empty_chunks": True})
        self.chunk_rows = array.shards[0] if array.shards else array.chunks[0]
        self.flush_rows = self.chunk_rows * max(1, flush_chunks)
        if offset % self.chunk_rows:
            raise ValueError(f"offset {offset} is not chunk-aligned ({self.chunk_rows} rows per chunk)")
        self.offset = offset
        self.pending: list[np.ndarray] = [pending] if pending is not None and pending.shape[0] else []
        self.pending_rows = sum(p.shape[0] for p in self.pending)

    def append(self, rows: np.ndarray) -> None:
        self.pending.append(rows)
        self.pending_rows += rows.shape[0]
        if self.pending_rows >= self.flush_rows:
            block = np.concatenate(self.pending)
            n_full = (block.shape[0] // self.chunk_rows) * self.chunk_rows
            self._write(block[:n_full])
            rest = block[n_full:]
            self.pending, self.pending_rows = ([rest] if rest.shape[0] else []), rest.shape[0]

    def _write(self, block: np.ndarray) -> None:
        end = self.offset + block.shape[0]
        self.array[self.offset:end] = block
        self.offset = end

    def close(self) -> int:
        """Flush, and shrink the array to the rows written (it may be created for an upper bound)."""
        if self.pending_rows:
            self._write(np.concatenate(self.pending))
            self.pending, self.pending_rows = [], 0
        if self.offset > self.array.shape[0]:
            raise RuntimeError(f"wrote {self.offset} rows into an array of {self.array.shape[0]}")
        if self.offset < self.array.shape[0]:
            self.array.resize((self.offset, self.array.shape[1]))
        return self.offset


class PartedArray:
    """The arrays of a harvest's parts read as one [rows, d] array (rows of part 0, then part 1, ...), with the
    chunk size of the parts: what the readers take of a zarr.Array (shape, chunks, row slices)."""

    def __init__(self, parts: list[zarr.Array]):
        if not parts:
            raise ValueError("a parted harvest needs at least one part")
        self.parts = parts
        d, chunk = parts[0].shape[1], parts[0].chunks[0]
        if any(p.shape[1] != d or p.chunks[0] != chunk for p in parts):
            raise ValueError("the parts of a harvest differ in width or chunk size")
        self.starts = np.cumsum([0] + [p.shape[0] for p in parts])
        self.shape = (int(self.starts[-1]), d)
        self.chunks = (chunk, d)
        self.dtype = parts[0].dtype

    def __getitem__(self, rows: slice) -> np.ndarray:
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("a parted harvest is read by contiguous row slices")
        start, stop, _ = rows.indices(self.shape[0])
        pieces = []
        for i, part in enumerate(self.parts):
            lo, hi = max(start, self.starts[i]), min(stop, self.starts[i + 1])
            if lo < hi:
                pieces.append(part[lo - self.starts[i]:hi - self.starts[i]])
        if not pieces:
            return np.empty((0, self.shape[1]), dtype=self.dtype)
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


class ShuffledBatches:
    """Endless stream of shuffled [batch_size, d] float32 batches, scaled; reproducible from `seed`.

    Each epoch visits the chunks in a random order, `shuffle_chunks` at a time: those chunks (plus the
    rows left over from the previous group) are permuted in memory and cut into batches. `state()` and
    `restore()` capture the position between two batches, so a resumed training run sees exactly the
    batches an uninterrupted one would have seen.
    """

    def __init__(self, array: zarr.Array | PartedArray, batch_size: int, shuffle_chunks: int, seed: int,
                 scale: float, device: str | torch.device = "cpu", prefetch: bool | None = None):
        """`device`: where the batches are made. On a GPU a group's rows travel there once and each batch is
        gathered there, and (`prefetch`, the default there) the next group's chunks are read on a thread while
        the GPU trains on this group's: its step is shorter than a group's decoding. The same batches."""
        self.array, self.batch_size, self.shuffle_chunks, self.scale = array, batch_size, shuffle_chunks, scale
        self.device = torch.device(device)
        self.prefetch = self.device.type == "cuda" if prefetch is None else prefetch
        self.ahead: tuple[tuple[int, int], Future[np.ndarray]] | None = None  # (epoch, group_start), the rows
        self.epoch = 0
        self.groups_read_ahead = 0
        self.on_device: tuple[torch.Tensor, torch.Tensor] | None = None  # the group's rows and order, off the CPU
        self.n_rows, self.chunk_rows = array.shape[0], array.chunks[0]
        self.n_chunks = -(-self.n_rows // self.chunk_rows)
        self.rng = np.random.default_rng(seed)
        self.order: np.ndarray | None = None
        self.group_start = 0  # index into `order` of the group in the buffer
        self.carry = np.empty((0, array.shape[1]), dtype=np.float32)  # rows the buffer was built on top of
        self.group_rng_state: dict[str, Any] = {}
        self.buf: np.ndarray | None = None  # the group's rows, unshuffled
        self.perm: np.ndarray | None = None  # the group's order: its i-th row is buf[perm[i]]
        self.pos = self.n_full = 0

    def __iter__(self) -> ShuffledBatches:
        return self

    def __next__(self) -> torch.Tensor:
        while self.buf is None or self.pos >= self.n_full:
            self._next_group()
        assert self.perm is not None
        # the group's rows in permuted order, gathered a batch at a time: buf[perm[i]] is the i-th row of the
        # shuffled group, and torch's gather runs on every thread (permuting the whole group in numpy up front,
        # one scattered row at a time, cost more than reading the chunks)
        if self.on_device is not None:
            buf, perm = self.on_device
            rows = perm[self.pos:self.pos + self.batch_size]
        else:
            buf, rows = torch.from_numpy(self.buf), torch.from_numpy(self.perm[self.pos:self.pos + self.batch_size])
        batch = torch.index_select(buf, 0, rows).mul_(self.scale)
        self.pos += self.batch_size
        return batch

    def _next_group(self) -> None:
        if self.buf is not None:
            assert self.perm is not None
            # a copy, and the old buffer dropped before the next is built: two live buffers would
            # raise the peak memory by a whole buffer
            self.carry = self.buf[self.perm[self.n_full:]]
            self.buf = self.perm = self.on_device = None
            self.group_start += self.shuffle_chunks
        if self.order is None or self.group_start >= self.n_chunks:
            self.order = self.rng.permutation(self.n_chunks)
            self.group_start = 0
            self.epoch += 1
        self.group_rng_state = self.rng.bit_generator.state
        self._fill()
        self.pos = 0

    def _fill(self) -> None:
        """The group's rows, the carry then its chunks, in `buf` (float32), and the group's permutation."""
        assert self.order is not None
        ahead, self.ahead = self.ahead, None
        if ahead is not None and ahead[0] == (self.epoch, self.group_start):
            buf = ahead[1].result()
            self.groups_read_ahead += 1
        else:
            if ahead is not None:
                ahead[1].result()  # a resume moved elsewhere: let the read end before reading again
            buf = self._rows(self.order, self.group_start, self.carry)
        total = buf.shape[0]
        perm = self.rng.permutation(total)
        self.buf, self.perm = buf, perm
        self.n_full = (total // self.batch_size) * self.batch_size
        if self.device.type != "cpu":
            self.on_device = (torch.from_numpy(buf).to(self.device), torch.from_numpy(perm).to(self.device))
        nxt = self.group_start + self.shuffle_chunks
        if self.prefetch and nxt < self.n_chunks:  # the next group of this epoch: its chunks and carry are known
            carry = buf[perm[self.n_full:]]
            reader = ThreadPoolExecutor(1, thread_name_prefix="batches-ahead")
            self.ahead = ((self.epoch, nxt), reader.submit(self._rows, self.order, nxt, carry))
            reader.shutdown(wait=False)  # the thread ends with its one read

    def _rows(self, order: np.ndarray, group_start: int, carry: np.ndarray) -> np.ndarray:
        """A group's rows, unshuffled: `carry`, then the chunks order[group_start:+shuffle_chunks], as float32."""
        r = self.chunk_rows
        chunks = order[group_start:group_start + self.shuffle_chunks]
        sizes = [carry.shape[0], *(min((c + 1) * r, self.n_rows) - c * r for c in chunks)]
        starts = np.cumsum([0, *sizes])
        buf = np.empty((int(starts[-1]), self.array.shape[1]), dtype=np.float32)
        buf[:sizes[0]] = carry

        def read(i: int) -> None:  # each chunk straight into its place: the peak is one buffer and a chunk a thread
            c = int(chunks[i])
            buf[starts[i + 1]:starts[i + 2]] = self.array[c * r:c * r + sizes[i + 1]]

        # decompression is most of a group's cost, and zarr decodes one chunk per call: a thread per CPU
        with ThreadPoolExecutor(max(1, min(len(chunks), cpu_count()))) as pool:
            list(pool.map(read, range(len(chunks))))
        return buf

    def state(self) -> tuple[dict[str, Any], np.ndarray]:
        """(JSON-able position, leftover rows under the current buffer)."""
        if self.buf is None:
            return {"started": False}, self.carry
        assert self.order is not None
        return ({"started": True, "order": self.order.tolist(), "group_start": self.group_start, "pos": self.pos,
                 "rng": self.group_rng_state}, self.carry)

    def restore(self, state: dict[str, Any], carry: np.ndarray) -> None:
        if not state["started"]:
            return
        self.order = np.asarray(state["order"], dtype=np.int64)
        self.group_start, self.carry = state["group_start"], carry.astype(np.float32, copy=False)
        self.rng.bit_generator.state = state["rng"]
        self.group_rng_state = state["rng"]
        self._fill()
        self.pos = state["pos"]


def shuffled_batches(
    array: zarr.Array | PartedArray, batch_size: int, shuffle_chunks: int, seed: int, scale: float,
    device: str | torch.device = "cpu",
) -> ShuffledBatches:
    return ShuffledBatches(array, batch_size, shuffle_chunks, seed, scale, device)

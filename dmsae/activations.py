"""Activation arrays in Zarr: chunk-aligned streaming writes and shuffled, chunk-aligned reads.

Random row batches from a compressed array would decode nearly every chunk per batch, so reads take
whole chunks, mix a few of them in memory and cut batches from that buffer.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec

ARRAY = "activations.zarr"


def create(path: Path, n_rows: int, d: int, chunk_rows: int, dtype: str = "float32") -> zarr.Array:
    return zarr.create_array(
        store=str(path), shape=(n_rows, d), chunks=(chunk_rows, d), dtype=dtype,
        compressors=BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"), fill_value=0.0,
    )


def open_array(path: Path) -> zarr.Array:
    return zarr.open_array(str(path), mode="r")


class ChunkWriter:
    """Buffers rows and writes them to the array in whole chunks, in order."""

    def __init__(self, array: zarr.Array):
        self.array = array
        self.chunk_rows = array.chunks[0]
        self.offset = 0
        self.pending: list[np.ndarray] = []
        self.pending_rows = 0

    def append(self, rows: np.ndarray) -> None:
        self.pending.append(rows)
        self.pending_rows += rows.shape[0]
        if self.pending_rows >= self.chunk_rows:
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


def shuffled_batches(
    array: zarr.Array, batch_size: int, shuffle_chunks: int, seed: int, scale: float
) -> Iterator[torch.Tensor]:
    """Endless stream of shuffled [batch_size, d] float32 batches, scaled; reproducible from `seed`."""
    rng = np.random.default_rng(seed)
    n_rows, chunk_rows = array.shape[0], array.chunks[0]
    n_chunks = -(-n_rows // chunk_rows)
    carry = np.empty((0, array.shape[1]), dtype=np.float32)
    while True:
        order = rng.permutation(n_chunks)
        for g in range(0, n_chunks, shuffle_chunks):
            blocks = [array[c * chunk_rows:min((c + 1) * chunk_rows, n_rows)] for c in order[g:g + shuffle_chunks]]
            buf = np.concatenate([carry, *(b.astype(np.float32, copy=False) for b in blocks)])
            buf = buf[rng.permutation(buf.shape[0])]
            n_full = (buf.shape[0] // batch_size) * batch_size
            for i in range(0, n_full, batch_size):
                yield torch.from_numpy(buf[i:i + batch_size]) * scale
            carry = buf[n_full:]

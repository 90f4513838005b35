"""bench/step_floor.py's row reader: it must read the rows asked for (a floor measured on the wrong bytes would
mislead), checked against the same wrapping 16-bit sums in torch."""

from __future__ import annotations

import pytest
import torch

from bench import step_floor
from dmsae import native


@pytest.mark.skipif(native.compiler() is None, reason="no C compiler on this machine (set CC)")
@pytest.mark.parametrize("threads", [1, 2])
def test_read_rows_reads_the_rows_asked_for(tmp_path, monkeypatch, threads):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    g = torch.Generator().manual_seed(threads)
    table = torch.randint(0, 1 << 15, (50, 96), generator=g, dtype=torch.int16)
    idx = torch.randint(0, 50, (300,), generator=g)
    lanes = table[idx].view(300, 3, 32).to(torch.int64).sum(1) % (1 << 16)  # each lane's 16-bit sum, wrapped
    per_row = lanes.sum()
    read = step_floor.read_rows(threads)
    assert read(table, idx) == int(per_row)
    assert read(table, idx.flip(0)) == int(per_row)  # the same rows in another order
    assert read(table, idx[:-1]) != int(per_row)

"""The harvest's host side: the chunk writes gathered several chunks at a time, the batches stored after each
forward (on a thread of their own where the forward runs on a GPU), and the resumable state (each batch's pending
rows in a file of their own, listed by the state) on the tests' real tiny Llama and real Zarr: the same bytes
however the writes are grouped, and a harvest stopped midway resumes to the bytes of one that never stopped, also
past a pending file no state lists."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dmsae import activations, harvesting, lm
from dmsae.runtime import Runtime
from tests.conftest import BOS_ID, VOCAB_SIZE

D = 8
PARAMS = {"layer": 2, "chunk_rows": 16, "store_dtype": "float32", "outlier_factor": 10.0}


def tree_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_chunk_bytes_do_not_depend_on_how_many_chunks_a_write_gathers(tmp_path: Path) -> None:
    rows = np.random.default_rng(0).standard_normal((203, D)).astype(np.float32)
    for flush in (1, 3):
        array = activations.create(tmp_path / f"f{flush}" / activations.ARRAY, 203, D, 16)
        writer = activations.ChunkWriter(array, flush_chunks=flush)
        for start in range(0, 203, 11):  # appends that straddle chunk boundaries
            writer.append(rows[start:start + 11])
        if flush == 3:
            assert writer.offset % (16 * 3) == 0 or writer.offset == 0
        assert writer.close() == 203
    assert tree_hashes(tmp_path / "f1") == tree_hashes(tmp_path / "f3")
    np.testing.assert_array_equal(activations.open_array(tmp_path / "f3" / activations.ARRAY)[:], rows)


def test_flush_chunks_is_bounded_by_the_cpus_and_the_bytes(tmp_path: Path) -> None:
    small = activations.create(tmp_path / "s", 100, D, 16)
    assert 1 <= harvesting.flush_chunks(small) <= len(os.sched_getaffinity(0))
    huge_rows = harvesting.FLUSH_BYTES // (4 * D)  # one chunk is FLUSH_BYTES already: one chunk a write
    huge = activations.create(tmp_path / "h", huge_rows, D, huge_rows)
    assert harvesting.flush_chunks(huge) == 1


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> torch.nn.Module:
    return lm.load_model(tiny_model_dir, "cpu", "float32")


def windows(n: int = 20, ctx: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    w = torch.randint(4, VOCAB_SIZE, (n, ctx), generator=g)
    w[:, 0] = BOS_ID
    return w


def run(model: torch.nn.Module, out: Path, ck: Path | None, store_dtype: str = "float32") -> harvesting.Harvested:
    out.mkdir(parents=True, exist_ok=True)
    rt = Runtime(show_progress=False, checkpoint_dir=ck, label="harvest", args={"batch_size": 3})
    return harvesting.harvest(model, windows(), BOS_ID, PARAMS | {"store_dtype": store_dtype}, rt, out)


def stopped_run(model, out: Path, ck: Path, store_dtype: str, stop_at: int, monkeypatch) -> dict:
    """A run stopped at its `stop_at`-th forward as a user's Ctrl-C stops it; the state it left."""
    real_forward = lm.residual_upto
    calls = {"n": 0}

    def stops(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == stop_at:
            raise KeyboardInterrupt  # the batches handed over before it are stored first
        return real_forward(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(lm, "residual_upto", stops)
        with pytest.raises(KeyboardInterrupt):
            run(model, out, ck, store_dtype)
    with safe_open(str(ck / harvesting.STATE_FILE), "pt") as f:
        return json.loads(f.metadata()["state"])


@pytest.mark.parametrize("store_dtype", ["float32", "float16"])
def test_a_stopped_harvest_resumes_to_the_same_bytes(model, tmp_path: Path, monkeypatch, store_dtype: str) -> None:
    ref = run(model, tmp_path / "ref", None, store_dtype)
    d, itemsize, ck = model.config.hidden_size, np.dtype(store_dtype).itemsize, tmp_path / "ck"
    pending_dir = ck / harvesting.PENDING_DIR

    def on_disk() -> set[str]:
        return {f.name for f in pending_dir.iterdir()}

    state = stopped_run(model, tmp_path / "out", ck, store_dtype, 5, monkeypatch)
    assert state["next_batch"] == 4 and state["pending_rows"] > 0
    assert on_disk() == set(state["pending_files"])
    assert sum((pending_dir / n).stat().st_size for n in on_disk()) == state["pending_rows"] * d * itemsize
    # a kill between a batch's rows and the state that lists them: a file no state names
    np.full((5, d), 7.0, store_dtype).tofile(pending_dir / f"{state['offset']}-{state['next_batch']}.bin")
    # resumed and stopped before its first batch: the unnamed file is gone, the named ones are untouched
    again = stopped_run(model, tmp_path / "out", ck, store_dtype, 1, monkeypatch)
    assert again == state and on_disk() == set(state["pending_files"])
    state = stopped_run(model, tmp_path / "out", ck, store_dtype, 3, monkeypatch)
    assert state["next_batch"] == 6 and on_disk() == set(state["pending_files"])

    got = run(model, tmp_path / "out", ck, store_dtype)
    assert (got.n_rows, got.threshold, got.batch_sums) == (ref.n_rows, ref.threshold, ref.batch_sums)
    assert tree_hashes(tmp_path / "out") == tree_hashes(tmp_path / "ref")
    assert not any(ck.iterdir())  # the state and the pending rows are gone once the array is complete


def test_a_state_written_before_the_pending_file_still_resumes(tmp_path: Path) -> None:
    """The state of a harvest killed under an older dmsae (its pending rows inside the state file)."""
    pending = np.arange(6 * D, dtype=np.float32).reshape(6, D)
    state = {"next_batch": 2, "offset": 32, "threshold": 1.5, "batch_sums": [1.0, 2.0]}
    save_file({"pending": torch.from_numpy(pending)}, str(tmp_path / harvesting.STATE_FILE),
              metadata={"state": json.dumps(state)})
    loaded = harvesting._load_state(tmp_path / harvesting.STATE_FILE, D, np.dtype("float32"))
    assert loaded is not None
    assert loaded[0] == state
    np.testing.assert_array_equal(loaded[1], pending)


def test_a_pending_file_shorter_than_its_state_starts_over(tmp_path: Path) -> None:
    state = {"next_batch": 2, "offset": 0, "pending_rows": 4, "pending_files": ["0-carry.bin", "0-1.bin"],
             "threshold": 1.5, "batch_sums": [1.0, 2.0]}
    save_file({}, str(tmp_path / harvesting.STATE_FILE), metadata={"state": json.dumps(state)})
    (tmp_path / harvesting.PENDING_DIR).mkdir()
    np.zeros((2, D), np.float32).tofile(tmp_path / harvesting.PENDING_DIR / "0-carry.bin")
    np.zeros((1, D), np.float32).tofile(tmp_path / harvesting.PENDING_DIR / "0-1.bin")
    assert harvesting._load_state(tmp_path / harvesting.STATE_FILE, D, np.dtype("float32")) is None
    np.zeros((2, D), np.float32).tofile(tmp_path / harvesting.PENDING_DIR / "0-1.bin")
    loaded = harvesting._load_state(tmp_path / harvesting.STATE_FILE, D, np.dtype("float32"))
    assert loaded is not None and loaded[1].shape == (4, D)


@pytest.mark.parametrize("threaded", [True, False])
def test_an_error_on_the_host_side_is_raised_in_the_caller(threaded: bool) -> None:
    def fails_on_the_second(i: int, kept: torch.Tensor, threshold: float) -> None:
        if i == 1:
            raise OSError("disk full")

    host = harvesting.HostSide(fails_on_the_second, threaded=threaded)
    host.put(0, torch.zeros(1), 1.0)
    with pytest.raises(OSError, match="disk full"):
        for i in range(1, 10):  # raised at once, or at a later hand-over or at the end: never lost
            host.put(i, torch.zeros(1), 1.0)
        host.close()
    host.close(raise_error=False)


def test_a_cpu_harvest_stores_on_the_forwards_thread_a_gpu_one_beside_it_the_same_bytes(
        model, tmp_path: Path, monkeypatch) -> None:
    """On a CPU the host side runs after each forward on the caller's thread (a second thread only slows a forward
    that fills every core), as the threads it ran on say; the threaded host side of a GPU harvest writes the same
    files, byte for byte."""
    seen: list[str] = []
    store_call = harvesting.BatchStore.__call__

    def noting(self, *args) -> None:
        seen.append(threading.current_thread().name)
        store_call(self, *args)

    monkeypatch.setattr(harvesting.BatchStore, "__call__", noting)
    inline = run(model, tmp_path / "inline", None)
    assert seen and set(seen) == {threading.current_thread().name}

    class Threaded(harvesting.HostSide):  # what a GPU harvest does
        def __init__(self, work, threaded: bool) -> None:
            super().__init__(work, threaded=True)

    seen.clear()
    monkeypatch.setattr(harvesting, "HostSide", Threaded)
    threaded = run(model, tmp_path / "threaded", None)
    assert seen and set(seen) == {"harvest-host-side"}
    assert (inline.n_rows, inline.batch_sums) == (threaded.n_rows, threaded.batch_sums)
    assert tree_hashes(tmp_path / "inline") == tree_hashes(tmp_path / "threaded")  # the same bytes either way


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_the_compression_changes_the_files_not_the_rows(model, tmp_path: Path, compression: str) -> None:
    """`harvest.compression` reaches the array (its metadata names the codec), and the rows read back are the
    default's, bit for bit: why the choice is not in the stage's key."""
    ref = run(model, tmp_path / "ref", None)
    out = tmp_path / "out"
    out.mkdir()
    rt = Runtime(show_progress=False, label="harvest", args={"batch_size": 3, "compression": compression})
    got = harvesting.harvest(model, windows(), BOS_ID, PARAMS | {"store_dtype": "float32"}, rt, out)
    assert (got.n_rows, got.batch_sums) == (ref.n_rows, ref.batch_sums)
    a, b = (activations.open_array(p / activations.ARRAY) for p in (tmp_path / "ref", out))
    assert np.array_equal(a[:], b[:])
    names = [type(c).__name__ + getattr(getattr(c, "cname", None), "value", "") for c in b.compressors]
    assert names == ([] if compression == "none" else ["BloscCodeczstd"])
    assert [getattr(c.cname, "value", "") for c in a.compressors] == ["lz4"]  # the default


def test_the_compression_is_not_in_any_key() -> None:
    from dmsae.config import load_config
    from flows.pipeline import plan

    default, zstd = plan(load_config(None, [])), plan(load_config(None, ["harvest.compression=zstd"]))
    assert [n.key for n in default.nodes] == [n.key for n in zstd.nodes]
    assert zstd.find("harvest").args["compression"] == "zstd" != default.find("harvest").args["compression"]

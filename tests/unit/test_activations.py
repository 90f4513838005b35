"""The shuffled batch stream over a real Zarr array: every row once per epoch, the documented order
(carry and chunks concatenated, then permuted), and a position that restores exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dmsae import activations, harvesting

CHUNK, D = 10, 3


def row_ids(n_rows: int) -> np.ndarray:
    """Rows whose first column is their index, so a batch says which rows it took."""
    rows = np.zeros((n_rows, D), np.float32)
    rows[:, 0] = np.arange(n_rows)
    rows[:, 1] = 1.0
    return rows


def make_array(tmp_path: Path, n_rows: int) -> np.ndarray:
    array = activations.create(tmp_path / activations.ARRAY, n_rows, D, CHUNK)
    writer = activations.ChunkWriter(array)
    rows = row_ids(n_rows)
    for start in range(0, n_rows, 7):  # appends that straddle chunk boundaries
        writer.append(rows[start:start + 7])
    assert writer.close() == n_rows
    return rows


def test_every_row_once_per_epoch_even_with_a_partial_last_chunk(tmp_path: Path) -> None:
    n_rows, batch = 95, 8  # 10 chunks, the last one half full; groups of 3 chunks leave carries
    make_array(tmp_path, n_rows)
    stream = activations.shuffled_batches(activations.open_array(tmp_path / activations.ARRAY), batch, 3, 0, 2.0)
    taken = np.concatenate([next(stream).numpy() for _ in range(3 * n_rows // batch)])
    assert np.all(taken[:, 1] == 2.0)  # scaled
    ids = (taken[:, 0] / 2.0).astype(int)
    # the stream carries unused rows into the next group, so within any epoch's worth of batches
    # no row repeats until every row of that epoch has been served
    first = ids[: (n_rows // batch) * batch]
    assert len(set(first.tolist())) == first.size
    assert set(ids.tolist()) == set(range(n_rows))


def test_buffer_is_the_concatenation_permuted(tmp_path: Path) -> None:
    """The batches gathered from each group's rows by its permutation are those of concatenating carry and
    chunks and permuting them, so the batches (and every train artifact) are those of the documented order."""
    n_rows, batch, group, seed = 95, 8, 3, 5
    rows = make_array(tmp_path, n_rows)
    stream = activations.shuffled_batches(activations.open_array(tmp_path / activations.ARRAY), batch, group, seed, 1.0)
    rng = np.random.default_rng(seed)
    order = rng.permutation(-(-n_rows // CHUNK))
    carry = np.empty((0, D), np.float32)
    for g in range(2):
        chunks = order[g * group:(g + 1) * group]
        pieces = [carry, *(rows[c * CHUNK:(c + 1) * CHUNK] for c in chunks)]
        joined = np.concatenate(pieces)
        expected = joined[rng.permutation(joined.shape[0])]
        n_full = (expected.shape[0] // batch) * batch
        got = np.concatenate([next(stream).numpy() for _ in range(n_full // batch)])
        np.testing.assert_array_equal(got, expected[:n_full])
        carry = expected[n_full:]


def test_state_restores_the_same_batches(tmp_path: Path) -> None:
    make_array(tmp_path, 95)
    array = activations.open_array(tmp_path / activations.ARRAY)
    stream = activations.shuffled_batches(array, 8, 3, 1, 1.0)
    for _ in range(5):
        next(stream)
    state, carry = stream.state()
    expected = [next(stream).numpy() for _ in range(12)]
    resumed = activations.shuffled_batches(array, 8, 3, 1, 1.0)
    resumed.restore(state, carry)
    for want in expected:
        np.testing.assert_array_equal(next(resumed).numpy(), want)


def test_stored_rows_casts_to_float16_as_numpy_does():
    """The harvest casts with torch; the bytes must be numpy's astype's, on normal values and on the edges of
    float16: its subnormals, values halfway between two float16s (ties to even), overflow to infinity, signed zero."""
    gen = np.random.default_rng(0)
    ulp_half = np.float32(2.0**-11)  # half a float16 ulp at 1.0: exact ties
    edges = np.array([0.0, -0.0, 1.0 + ulp_half, 1.0 + 3 * ulp_half, 6.0e-8, -3.0e-5, 2.0**-24 * 1.5, 65504.0,
                      65519.0, 65520.0, -70000.0, 1e-9], dtype=np.float32)
    rows = np.concatenate([gen.standard_normal(4096 * 8).astype(np.float32) * 40, edges]).reshape(-1, 4)
    got = harvesting.stored_rows(torch.from_numpy(rows), "float16")
    with np.errstate(over="ignore"):  # the overflow to infinity is one of the edges
        want = rows.astype("float16")
    assert got.dtype == want.dtype and np.array_equal(got.view(np.uint16), want.view(np.uint16))
    assert np.array_equal(harvesting.stored_rows(torch.from_numpy(rows), "float32"), rows)


@pytest.mark.parametrize("prefetch", [False, True])
def test_the_batches_are_the_same_on_any_device_and_read_ahead_or_not(tmp_path: Path, device: str,
                                                                      prefetch: bool) -> None:
    """A GPU gathers batches from the group's rows on the device and reads the next group while it trains; the
    batches must be the CPU's, across epochs (7 groups of 3 chunks over 10 chunks) and after a resume."""
    make_array(tmp_path, 95)
    array = activations.open_array(tmp_path / activations.ARRAY)
    # a scale that rounds: the device's multiply must round as the CPU's does
    plain = activations.ShuffledBatches(array, 8, 3, 4, 1.37)
    other = activations.ShuffledBatches(array, 8, 3, 4, 1.37, device=device, prefetch=prefetch)
    for i in range(40):
        got = next(other)
        assert got.device.type == device
        np.testing.assert_array_equal(got.cpu().numpy(), next(plain).numpy(), err_msg=f"batch {i}")
        if i == 17:
            state, carry = other.state()
            assert state == plain.state()[0]
            np.testing.assert_array_equal(carry, plain.state()[1])
    resumed = activations.ShuffledBatches(array, 8, 3, 4, 1.37, device=device, prefetch=prefetch)
    resumed.restore(state, carry)
    replay = activations.ShuffledBatches(array, 8, 3, 4, 1.37)
    replay.restore(state, carry)
    for i in range(20):
        np.testing.assert_array_equal(next(resumed).cpu().numpy(), next(replay).numpy(), err_msg=f"resumed {i}")
    assert (other.groups_read_ahead > 0) == prefetch  # the read ahead really served groups

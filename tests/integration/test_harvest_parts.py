"""A harvest in parts (`harvest.parts`): each part its own task, artifact and sharded Zarr array, resumable
on its own; joined, the rows and the scale equal a one-part harvest's, so everything trained on it is
byte-identical to the same config harvested in one part."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from dmsae import activations, readers
from flows.pipeline import load_input, plan
from stages.harvest_part import window_range

REPO = Path(__file__).resolve().parents[2]
PARTS = 3


@pytest.fixture(scope="module")
def parted_run(make_config, pipeline_runner, tmp_path_factory):
    return pipeline_runner(make_config(tmp_path_factory.mktemp("parts"), f"harvest.parts={PARTS}",
                                       "harvest.shard_chunks=2"))


def test_the_window_ranges_cover_every_window_once_in_whole_batches():
    for n, parts, batch in [(133, 3, 16), (10, 4, 3), (64, 2, 32), (5, 5, 1)]:
        ranges = [window_range(n, i, parts, batch) for i in range(parts)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
        assert all(start % batch == 0 for start, _ in ranges)


def test_the_parts_are_separate_sharded_artifacts(parted_run):
    parts = parted_run.plan.of_stage("harvest_part")
    assert [n.label for n in parts] == [f"harvest_part[part={i}]" for i in range(PARTS)]
    for node in parts:
        art = parted_run.store.load(node.stage, node.key)
        meta = json.loads((art.file(activations.ARRAY) / "zarr.json").read_text())
        assert [c["name"] for c in meta["codecs"]] == ["sharding_indexed"]
        assert meta["codecs"][0]["configuration"]["chunk_shape"][0] == 256  # harvest.chunk_rows of the tiny config
    harvest = parted_run.store.load("harvest", parted_run.plan.find("harvest").key)
    assert not harvest.file(activations.ARRAY).exists()  # the data stays in the parts: nothing is copied
    listed = json.loads(harvest.file(readers.HARVEST_PARTS_FILE).read_text())["parts"]
    assert [p["key"] for p in listed] == [n.key for n in parts]


def test_joined_rows_and_metrics_equal_a_one_part_harvest(parted_run, pipeline_run):
    node = parted_run.plan.find("harvest")
    train = parted_run.plan.find("train", 0)
    joined = readers.harvest_array(load_input(parted_run.store, train, node))
    single = activations.open_array(pipeline_run.artifact("harvest").file(activations.ARRAY))
    assert joined.shape == single.shape and joined.chunks == single.chunks
    assert np.array_equal(joined[0:joined.shape[0]], single[:])
    assert np.array_equal(joined[100:700], single[100:700])  # a slice across part boundaries
    assert parted_run.store.manifest("harvest", node.key).metrics == pipeline_run.artifact("harvest").metrics
    # the tests' own reader attaches the parts too (tests/integration/test_cuda.py reads a parted harvest with it)
    assert np.array_equal(readers.harvest_array(parted_run.artifact("harvest"))[:], single[:])


def test_everything_trained_on_it_is_byte_identical(parted_run, pipeline_run):
    for node in parted_run.plan.nodes:
        if node.stage in ("harvest", "harvest_part", "model", "tokens"):
            continue
        ref = next(n for n in pipeline_run.plan.nodes if n.label == node.label)
        assert node.key != ref.key  # keys move with the harvest's ...
        assert (parted_run.store.manifest(node.stage, node.key).files
                == pipeline_run.store.manifest(ref.stage, ref.key).files), node.label  # ... the bytes do not


def test_a_harvest_without_its_parts_attached_is_refused(parted_run):
    harvest = parted_run.store.load("harvest", parted_run.plan.find("harvest").key)
    with pytest.raises(RuntimeError, match="load_input"):
        readers.harvest_array(harvest)


def test_a_killed_part_resumes_on_its_own_and_the_others_are_not_redone(make_config, parted_run, tmp_path,
                                                                        prefect_server):
    store = tmp_path / "store"
    cfg = make_config(store, f"harvest.parts={PARTS}", "harvest.shard_chunks=2", "cycles=1", "reuse.k=[]",
                      "interpret.enabled=false", f"report_dir={tmp_path / 'reports'}")
    config = tmp_path / "parts.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    # the session's Prefect server: the runs do not start temporary ones (a SIGKILL of the run is what is tested)
    env = {**prefect_server.env, "PREFECT_LOGGING_LEVEL": "INFO", "PYTHONPATH": str(REPO)}
    outputs = []
    for kill_at in ("harvest_part[part=1]:batch:2", None):
        run_env = {**env, "DMSAE_KILL_AT": kill_at} if kill_at else {k: v for k, v in env.items()
                                                                      if k != "DMSAE_KILL_AT"}
        proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(config), "--no-progress"], env=run_env,
                              capture_output=True, text=True, timeout=600, start_new_session=True)
        outputs.append(proc)
    assert outputs[0].returncode == -signal.SIGKILL and outputs[1].returncode == 0, outputs[1].stderr[-2000:]
    assert "resuming harvest_part[part=1] at batch 2" in outputs[1].stdout + outputs[1].stderr
    from dmsae.store import Store

    s = Store(store)
    parts = plan(cfg).of_stage("harvest_part")
    assert s.manifest("harvest_part", parts[1].key).resumed == {"batch": 2}
    assert s.manifest("harvest_part", parts[0].key).resumed == {}
    for node in parts:  # the same bytes as the uninterrupted parted run
        ref = next(n for n in parted_run.plan.nodes if n.label == node.label)
        assert s.manifest(node.stage, node.key).files == parted_run.store.manifest(ref.stage, ref.key).files


def test_parts_on_two_dask_workers_give_the_one_process_bytes(make_config, parted_run, tmp_path, prefect_server):
    store = tmp_path / "store"
    cfg = make_config(store, f"harvest.parts={PARTS}", "harvest.shard_chunks=2", "cycles=1", "reuse.k=[]",
                      "interpret.enabled=false", "runner=dask", "dask.workers=2", f"report_dir={tmp_path / 'r'}")
    config = tmp_path / "parts.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = {k: v for k, v in prefect_server.env.items() if k != "DMSAE_KILL_AT"}
    env.update(PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(config), "--no-progress"], env=env,
                          capture_output=True, text=True, timeout=600, start_new_session=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from dmsae.store import Store

    s = Store(store)
    for node in plan(cfg).nodes:
        if node.stage in ("harvest_part", "harvest", "train"):
            ref = next(n for n in parted_run.plan.nodes if n.label == node.label)
            assert node.key == ref.key  # the runner is in no key
            assert s.manifest(node.stage, node.key).files == parted_run.store.manifest(ref.stage, ref.key).files

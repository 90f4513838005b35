"""Crash and resume: `dmsae run` SIGKILLed at six places (mid-harvest, mid-training twice, mid-attribution,
and twice between writing an artifact and publishing it), restarted each time, ends with artifacts
byte-identical to an uninterrupted run, and never redoes a completed stage.

Five kills come from crash points (`DMSAE_KILL_AT`, a real SIGKILL of the process group); one comes from
outside, the moment a training checkpoint appears on disk. The runs report to the session's Prefect server, as a
user watching the UI runs them (the killed runs' flow runs stay "Running" there); test_s3_cli kills runs together
with the temporary server a command starts on its own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dmsae.store import Store
from flows.pipeline import plan

KILLS = [  # (crash point or "poll", what the next run must say it resumed)
    ("harvest:batch:3", "resuming harvest at batch 3"),
    ("train[0]:step:20", "resuming train[0] at step 16/"),
    ("attribute[0]:batch:1", None),
    ("write:select", None),  # select[0] complete in .tmp, never renamed into place
    ("poll", "resuming train[1] at step"),  # killed from outside when train[1] writes its first checkpoint
    ("write:attribute", None),  # attribute[1]
]
RUN_TIMEOUT_S = 300


def start_run(config: Path, server_env: dict[str, str], kill_at: str | None) -> subprocess.Popen:
    # INFO: dmsae's notices inside a stage reach the console through Prefect's print logging
    env = {**server_env, "PREFECT_LOGGING_LEVEL": "INFO"}
    env.pop("DMSAE_KILL_AT", None)
    if kill_at is not None and kill_at != "poll":
        env["DMSAE_KILL_AT"] = kill_at
    # a session of its own: a kill takes the CLI and every process it started
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(config), "--no-progress"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def kill_when_checkpoint_appears(proc: subprocess.Popen, store: Path) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        if any((store / ".partial" / "train").glob("*/train.ckpt")):
            os.killpg(proc.pid, signal.SIGKILL)
            return
        time.sleep(0.02)
    raise AssertionError("the run ended before any training checkpoint appeared")


def published(store: Path) -> list[Path]:
    """Manifests of published artifacts (not those in .tmp/, .partial/ or .corrupt/)."""
    return [p for p in store.glob("*/*/manifest.json") if not p.parent.parent.name.startswith(".")]


def complete_manifests(store: Path) -> dict[str, int]:
    return {str(p.relative_to(store)): p.stat().st_mtime_ns for p in published(store)}


@pytest.fixture(scope="module")
def killed_and_resumed(make_config, tmp_path_factory, prefect_server):
    root = tmp_path_factory.mktemp("resume")
    store = root / "store"
    cfg = make_config(store, "train.checkpoint_every=8", "retries=0")
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    outputs, returncodes, completed_before = [], [], []
    for kill_at, _ in [*KILLS, (None, None)]:
        completed_before.append(complete_manifests(store))
        proc = start_run(config, prefect_server.env, kill_at)
        if kill_at == "poll":
            kill_when_checkpoint_appears(proc, store)
        try:
            out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        outputs.append(out + err)
        returncodes.append(proc.returncode)
    return {"store": store, "cfg": cfg, "outputs": outputs, "returncodes": returncodes,
            "completed_before": completed_before, "completed_after": complete_manifests(store)}


def test_every_kill_killed_and_the_last_run_finished(killed_and_resumed):
    codes = killed_and_resumed["returncodes"]
    assert codes[:-1] == [-signal.SIGKILL] * len(KILLS), killed_and_resumed["outputs"][-1][-2000:]
    assert codes[-1] == 0, killed_and_resumed["outputs"][-1][-3000:]


def test_interrupted_stages_resumed_from_their_checkpoints(killed_and_resumed):
    for i, (kill_at, message) in enumerate(KILLS):
        if message is not None:
            assert message in killed_and_resumed["outputs"][i + 1], f"after the kill at {kill_at}"
    # and their manifests say where they were picked up; a stage computed in one go records nothing
    store, nodes = Store(killed_and_resumed["store"]), {n.label: n for n in plan(killed_and_resumed["cfg"]).nodes}
    resumed = {label: store.load(n.stage, n.key).manifest.resumed for label, n in nodes.items()}
    assert resumed["harvest"] == {"batch": 3} and resumed["train[0]"] == {"step": 16}
    assert resumed.pop("train[1]")["step"] > 0 and resumed.pop("harvest") and resumed.pop("train[0]")
    assert resumed and all(r == {} for r in resumed.values())


def test_no_completed_stage_was_redone(killed_and_resumed):
    after = killed_and_resumed["completed_after"]
    for before in killed_and_resumed["completed_before"]:
        for manifest, mtime in before.items():
            assert after[manifest] == mtime, f"{manifest} was rewritten"
    # and the kills happened at different stages: each restart found more complete artifacts
    counts = [len(b) for b in killed_and_resumed["completed_before"]]
    assert counts == sorted(counts) and len(set(counts)) >= 5


def test_resumed_artifacts_are_byte_identical_to_an_uninterrupted_run(killed_and_resumed, pipeline_run):
    resumed, reference = Store(killed_and_resumed["store"]), pipeline_run.store
    nodes = plan(killed_and_resumed["cfg"]).nodes
    assert [n.key for n in nodes] == [n.key for n in pipeline_run.plan.nodes]  # checkpoint_every is not in keys
    for node in nodes:
        a = resumed.load(node.stage, node.key)  # verifies every file against its checksum
        b = reference.load(node.stage, node.key)
        assert a.manifest.files == b.manifest.files, f"{node.label} differs from the uninterrupted run"
        assert a.manifest.metrics == b.manifest.metrics, node.label
    on_disk = {(p.parent.parent.name, p.parent.name) for p in published(killed_and_resumed["store"])}
    assert on_disk == {(n.stage, n.key) for n in nodes}


def test_no_leftovers_after_the_final_run(killed_and_resumed):
    store = killed_and_resumed["store"]
    assert not any((store / ".tmp").iterdir()), "temporary folders of killed writers were cleaned up"
    partial = store / ".partial"
    assert not partial.exists() or not any(p for p in partial.rglob("*") if p.is_file())

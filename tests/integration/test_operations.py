"""Running it like a production pipeline: damaged artifacts, two processes at once, branches, garbage
collection and retries, each on a real store of the tiny run (copied, so the shared one stays intact)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from dmsae.store import Store
from flows import pipeline
from flows.cli import main
from flows.distill import INVALID_INPUT, distill
from flows.pipeline import plan, run_record

ALL_LABELS = ["model", "tokens", "harvest", "train[0]", "attribute[0]", "select[0]",
              "train[1]", "attribute[1]", "select[1]"]
AFTER_SELECT0 = {"select[0]", "train[1]", "attribute[1]", "select[1]"}


@pytest.fixture
def copied(pipeline_run, make_config, tmp_path):
    """(config, store) on a private copy of the shared tiny run's store."""
    root = tmp_path / "store"
    shutil.copytree(pipeline_run.store.root, root, ignore=shutil.ignore_patterns(".locks"))
    cfg = make_config(root, f"report_dir={tmp_path / 'reports'}")
    return cfg, Store(root)


def run_all(cfg) -> dict[str, bool]:
    store = Store(cfg.store)
    from dmsae.runtime import Runtime

    return {n.label: pipeline.materialize(store, n, Runtime(show_progress=False))[1] for n in plan(cfg).nodes}


def same_files(a: Store, b: Store, cfg) -> None:
    for n in plan(cfg).nodes:
        assert a.load(n.stage, n.key).manifest.files == b.load(n.stage, n.key).manifest.files, n.label


# -- integrity ----------------------------------------------------------------------------------

def test_truncated_chunk_is_detected_moved_aside_and_recomputed(copied, pipeline_run, capfd):
    cfg, store = copied
    node = plan(cfg).find("harvest")
    chunk = next(p for p in sorted((store.artifact_dir("harvest", node.key) / "activations.zarr").rglob("*"))
                 if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(chunk.read_bytes()[:10])  # truncated
    computed = run_all(cfg)
    assert {label for label, c in computed.items() if c} == {"harvest"}  # downstream was intact
    err = capfd.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("dmsae: warning:")]
    assert len(warnings) == 1 and f"harvest/{node.key}" in warnings[0] and "checksum" in warnings[0]
    aside = list((store.root / ".corrupt" / "harvest").iterdir())
    assert len(aside) == 1 and aside[0].name.startswith(node.key)
    same_files(store, pipeline_run.store, cfg)


def test_unreadable_manifest_is_moved_aside_and_recomputed(copied, pipeline_run, capfd):
    cfg, store = copied
    node = plan(cfg).find("select", 0)
    manifest = store.artifact_dir("select", node.key) / "manifest.json"
    manifest.write_text(manifest.read_text()[:40])
    computed = run_all(cfg)
    assert {label for label, c in computed.items() if c} == {"select[0]"}
    assert "manifest.json is unreadable" in capfd.readouterr().err
    same_files(store, pipeline_run.store, cfg)


def test_a_folder_without_manifest_never_counts_as_complete(copied, pipeline_run):
    cfg, store = copied
    node = plan(cfg).find("train", 1)
    (store.artifact_dir("train", node.key) / "manifest.json").unlink()
    assert not store.has("train", node.key)
    computed = run_all(cfg)
    assert {label for label, c in computed.items() if c} == {"train[1]"}
    assert len(list((store.root / ".corrupt" / "train").iterdir())) == 1  # the incomplete folder, kept aside
    same_files(store, pipeline_run.store, cfg)


# -- concurrency --------------------------------------------------------------------------------

def parse_computed(output: str) -> set[str]:
    m = re.search(r"computed (\d+) of (\d+) stages(?: \((.*)\))?", output)
    assert m, output[-3000:]
    if m.group(3) is None or m.group(3) == "everything was cached":
        return set()
    return set(m.group(3).split(", "))


WAITING = "being computed by another process; waiting"


class OutputReader:
    """Collects a subprocess's output on a thread, so the test can watch it while the process runs."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc, self.lines = proc, []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def saw(self, text: str) -> bool:
        return any(text in line for line in list(self.lines))

    def result(self, timeout: float) -> str:
        self.proc.wait(timeout=timeout)
        self.thread.join(timeout=30)
        return "".join(self.lines)


def test_two_runs_at_once_compute_each_stage_once(make_config, pipeline_run, tmp_path, prefect_server):
    """Two `dmsae run`s of one config at once. The test holds the harvest's lock until both runs wait
    on it, so they meet there for certain (tiny stages alone rarely overlap): when it lets go, one
    computes the harvest while the other waits and then reuses it, and every stage is computed once."""
    cfg = make_config(tmp_path / "store", f"report_dir={tmp_path / 'reports'}")
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    # both report to the session's Prefect server (no temporary server each)
    env = {**prefect_server.env, "PREFECT_LOGGING_LEVEL": "INFO"}
    harvest = plan(cfg).find("harvest")
    with Store(cfg.store).lock("harvest", harvest.key):
        procs = [subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(config), "--no-progress"],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  start_new_session=True) for _ in range(2)]
        readers = [OutputReader(p) for p in procs]
        deadline = time.monotonic() + 300
        while not all(r.saw(f"harvest {harvest.key} is {WAITING}") for r in readers):
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                for p in procs:
                    p.kill()
                pytest.fail("both runs should wait on the held harvest lock:\n" +
                            "".join(readers[0].lines)[-2000:] + "".join(readers[1].lines)[-2000:])
            time.sleep(0.05)
    outputs = [r.result(timeout=600) for r in readers]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    a, b = (parse_computed(o) for o in outputs)
    assert a | b == set(ALL_LABELS) and not a & b, (a, b)
    assert ("harvest" in a) != ("harvest" in b)  # one computed it; the other found it done after waiting
    same_files(Store(cfg.store), pipeline_run.store, cfg)
    published = [p for p in Path(cfg.store).glob("*/*/manifest.json") if not p.parent.parent.name.startswith(".")]
    assert len(published) == len(ALL_LABELS)
    assert not any((Path(cfg.store) / ".tmp").iterdir())


# -- branch, status tree, gc --------------------------------------------------------------------

def test_branch_status_tree_run_and_gc(copied, capfd):
    cfg, store = copied
    store.write_run(run_record(cfg, plan(cfg), "complete"))
    st = str(store.root)
    capfd.readouterr()
    assert main(["branch", "tiny", "--store", st, "--set", "selection.tau=0.5", "--name", "tau05"]) == 0
    out = capfd.readouterr().out
    assert "shares 5 of 9 stages" in out and "4 to compute" in out
    record = store.read_run("tau05")
    branch_cfg = cfg.model_copy(update={"name": "tau05", "selection": cfg.selection.model_copy(update={"tau": 0.5})})
    assert record.parent == "tiny" and record.status == "planned"
    assert record.keys == {n.label: n.key for n in plan(branch_cfg).nodes}

    assert main(["status", "--store", st]) == 0
    lines = capfd.readouterr().out.splitlines()
    assert "tiny  [complete]  9/9 stages done" in lines
    assert "`-- tau05  [planned]  5/9 stages done; shares 5 with tiny (model, tokens, harvest, train[0], " \
           "attribute[0]), 4 own" in lines

    assert main(["run", "tau05", "--store", st, "--no-progress"]) == 0
    out = capfd.readouterr().out
    assert parse_computed(out) == AFTER_SELECT0
    assert store.read_run("tau05").status == "complete"

    assert main(["gc", "--store", st]) == 0
    assert "nothing to remove" in capfd.readouterr().out
    own = {(record.stages[label], key) for label, key in record.keys.items() if label in AFTER_SELECT0}
    store.run_path("tau05").unlink()  # forget the branch: its own artifacts become garbage
    assert main(["gc", "--store", st]) == 0
    out = capfd.readouterr().out
    assert out.count("would remove") == 4 and all(store.has(*sk) for sk in own)
    assert main(["gc", "--store", st, "--yes"]) == 0
    assert capfd.readouterr().out.count("  removed ") == 4
    assert not any(store.has(*sk) for sk in own)
    for n in plan(cfg).nodes:  # the recorded run keeps everything
        store.load(n.stage, n.key)


def test_branch_mistakes_exit_2(copied, capfd):
    cfg, store = copied
    store.write_run(run_record(cfg, plan(cfg), "complete"))
    st = str(store.root)
    assert main(["branch", "nosuchrun", "--store", st, "--set", "selection.tau=0.5"]) == 2
    assert main(["branch", "tiny", "--store", st, "--set", "selection.tau=0.5", "--name", "tiny"]) == 2
    assert main(["branch", "tiny", "--store", st]) == 2
    assert main(["branch", "tiny", "--store", st, "--set", "selection.tau=7", "--name", "x"]) == 2
    err = capfd.readouterr().err
    assert err.count("dmsae: error:") == 4 and "Traceback" not in err
    assert "no run named 'nosuchrun'" in err and "already recorded" in err and "selection.tau" in err


# -- retries ------------------------------------------------------------------------------------

def task_runs(flow_run_id) -> dict[str, object]:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name: r for r in runs}


def test_transient_failure_is_retried(copied, monkeypatch):
    cfg, store = copied
    cfg = cfg.model_copy(update={"retries": 2, "retry_delay_seconds": 0.0})
    node = plan(cfg).find("select", 0)
    shutil.rmtree(store.artifact_dir("select", node.key))
    real_run, calls = pipeline.STAGES["select"].run, []

    def flaky(*args, **kwargs):  # the first attempt hits a transient I/O error
        calls.append(1)
        if len(calls) == 1:
            raise OSError("simulated transient I/O error")
        return real_run(*args, **kwargs)

    monkeypatch.setattr(pipeline.STAGES["select"], "run", flaky)
    state = distill(cfg.model_dump(mode="json"), show_progress=False, return_state=True)
    assert state.is_completed(), state.message
    assert len(calls) == 2
    runs = task_runs(state.state_details.flow_run_id)
    assert runs["select[0]"].run_count == 2 and runs["select[0]"].state.is_completed()
    assert state.result()["computed"] == ["select[0]"]


def test_user_error_is_not_retried(copied):
    cfg, _ = copied
    bad = cfg.model_copy(update={"retries": 2, "retry_delay_seconds": 0.0,
                                 "data": cfg.data.model_copy(update={"train_tokens": 40_000})})  # past its ~7k tokens
    state = distill(bad.model_dump(mode="json"), show_progress=False, return_state=True)
    assert state.is_failed() and state.name == INVALID_INPUT
    assert "train" in state.message and "tokens" in state.message
    runs = task_runs(state.state_details.flow_run_id)
    assert runs["tokens"].run_count == 1 and runs["tokens"].state.is_failed()


def _probe(folder: str) -> str | None:
    from dmsae.store import probe_writable

    try:
        probe_writable(Path(folder))
    except OSError as e:
        return repr(e)
    return None


def test_many_processes_probe_one_new_folder_at_once(tmp_path):
    """Runs that start together check the same new report folder: none may refuse the others, and the check
    leaves nothing behind (the old probe made and removed the folder, and failed 30 rounds of 30 here)."""
    import multiprocessing

    # one pool for every round: its workers are up before the first map, so each round's 12 probes start at once
    # (and the rounds do not pay a process spawn each)
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        for i in range(5):
            root = tmp_path / f"round{i}"
            root.mkdir()
            errors = [e for e in pool.map(_probe, [str(root / "reports" / "run")] * 12) if e]
            assert not errors
            assert not any(root.iterdir())

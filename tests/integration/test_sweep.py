"""`dmsae sweep` on a real Dask LocalCluster (2 worker processes) and the tiny model: a 2x2 grid computes
each distinct stage once, its artifacts are byte-identical to four sequential runs, and a sweep whose
workers are SIGKILLed mid-training finishes with the same bytes."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from dmsae.config import Config, load_config
from dmsae.store import Store
from flows.cli import main
from flows.pipeline import plan

GRID = ["--grid", "selection.tau=0.5,0.9", "--grid", "selection.max_core=2,4"]


def write_base(make_config, root: Path, *extra: str) -> Path:
    # 12 epochs: trainings long enough (seconds) that two points' trainings overlap on the two workers. With 6, on
    # a fast CPU (1-3 s trainings), one sweep in a loaded full suite ran all 21 stages one after another (not seen
    # alone or beside a CPU hog; plain Dask spreads such tasks over both workers at once); 12 has not failed so
    cfg = make_config(root / "store", f"report_dir={root / 'reports'}", "threads=1", "train.checkpoint_every=8",
                      "train.epochs=12", *extra)
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return path


def artifact_bytes(store: Path) -> dict[tuple[str, str], dict[str, str]]:
    """(stage, key) -> {file: sha256} for every published artifact, manifest aside (it records timings)."""
    out = {}
    for manifest in store.glob("*/*/manifest.json"):
        art = manifest.parent
        if art.parent.name.startswith(".") or art.parent.name in ("runs", "sweeps"):
            continue
        out[(art.parent.name, art.name)] = {
            str(f.relative_to(art)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(art.rglob("*")) if f.is_file() and f.name != "manifest.json"}
    return out


def sequential_reference(base: Path, root: Path, single_thread) -> dict[tuple[str, str], dict[str, str]]:
    """The four points run one after the other with `dmsae run`, no Dask, in one store of their own (what they
    share is computed once, by the first)."""
    store = root / "sequential"
    for tau, cap in [(t, c) for t in ("0.5", "0.9") for c in ("2", "4")]:
        with single_thread():
            assert main(["run", str(base), "--no-progress", "--set", f"store={store}", "--set", f"selection.tau={tau}",
                         "--set", f"selection.max_core={cap}", "--set", f"report_dir={root / 'seq-reports'}"]) == 0
    return artifact_bytes(store)


@pytest.fixture(scope="module")
def swept(make_config, tmp_path_factory, single_thread):
    root = tmp_path_factory.mktemp("sweep")
    base = write_base(make_config, root)
    with single_thread():
        code = main(["sweep", str(base), *GRID, "--name", "grid", "--workers", "2", "--no-progress"])
    return {"root": root, "base": base, "code": code,
            "reference": sequential_reference(base, root, single_thread)}


def test_sweep_records_four_branches_and_computes_each_distinct_stage_once(swept, capsys):
    assert swept["code"] == 0
    store = Store(swept["root"] / "store")
    sweep = store.read_sweep("grid")
    assert sweep.status == "complete" and len(sweep.points) == 4
    runs = {r.name: r for r in store.read_runs()}
    keys = set()
    for point in sweep.points:
        record = runs[point["run"]]
        assert record.status == "complete" and record.parent == "tiny"
        keys |= {(record.stages[label], key) for label, key in record.keys.items()}
    published = set(artifact_bytes(store.root))
    assert published == keys  # every stage the four plans need, and nothing twice or extra
    shared = {(n.stage, n.key) for n in plan(load_config(str(swept["base"]))).nodes if n.stage in
              ("model", "tokens", "harvest")} | {(n.stage, n.key) for n in plan(load_config(str(swept["base"]))).nodes
                                                 if n.label in ("train[0]", "attribute[0]")}
    assert shared <= keys and len(keys) < sum(len(r.keys) for r in (runs[p["run"]] for p in sweep.points))
    # `dmsae status` shows the sweep as one node with its points under it
    assert main(["status", "--store", str(store.root)]) == 0
    out = capsys.readouterr().out
    assert "sweep grid  [complete]  4 points over selection.tau=0.5,0.9, selection.max_core=2,4" in out
    assert sum(line.strip().startswith(("|-- grid-", "`-- grid-")) for line in out.splitlines()) == 4


def test_sweep_on_dask_is_byte_identical_to_sequential_runs(swept):
    got = artifact_bytes(swept["root"] / "store")
    assert got and got == {k: swept["reference"][k] for k in got}


def test_a_second_sweep_computes_nothing(swept, single_thread, capsys):
    with single_thread():
        assert main(["sweep", str(swept["base"]), *GRID, "--name", "grid", "--runner", "local", "--no-progress"]) == 0
    assert "computed 0 of" in capsys.readouterr().out


def dask_workers(pid: int) -> list[psutil.Process]:
    """The worker processes a LocalCluster spawned under `pid` (multiprocessing spawn children)."""
    return [p for p in psutil.Process(pid).children(recursive=True)
            if any("spawn_main" in part for part in p.cmdline())]


def test_workers_killed_mid_training_are_survived_with_identical_bytes(swept, make_config, tmp_path, prefect_server):
    base = write_base(make_config, tmp_path)
    # reporting to the session's Prefect server: the fixture's sweep covers the temporary one a sweep starts
    env = {**prefect_server.env, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "sweep", str(base), *GRID, "--name", "grid",
                             "--workers", "2", "--no-progress"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    killed = []
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not killed:
        # a cycle-1 training with a checkpoint on disk: a worker is mid-training
        if any((tmp_path / "store" / ".partial" / "train").glob("*/*")):
            for worker in dask_workers(proc.pid):
                worker.send_signal(signal.SIGKILL)
                killed.append(worker.pid)
        time.sleep(0.05)
    out, _ = proc.communicate(timeout=900)
    assert killed, "the sweep finished before a training checkpoint appeared"
    assert proc.returncode == 0, out[-3000:]
    got = artifact_bytes(tmp_path / "store")
    assert got == {k: swept["reference"][k] for k in got} and set(got) == set(artifact_bytes(swept["root"] / "store"))
    assert not any((tmp_path / "store" / ".partial").rglob("*.safetensors"))
    # the retried training picked up the killed one's checkpoint rather than starting over
    resumed = [m.resumed for m in (Store(tmp_path / "store").load("train", p.parent.name).manifest
                                   for p in (tmp_path / "store" / "train").glob("*/manifest.json")) if m.resumed]
    assert resumed and all(r["step"] > 0 for r in resumed), "no training resumed from its checkpoint"


@pytest.mark.parametrize("argv, expect", [
    (["--grid", "sae.widht=64,128"], "sae.widht: unknown key"),
    (["--grid", "selection.tau="], "--grid selection.tau: no values"),
    ([], "the grid is empty"),
    (["--grid", "sae.k=many,6"], "sae.k: Input should be a valid integer"),
    (["--grid", "store=a,b"], "--grid store: every point shares"),
    (["--grid", "seed=0,1", "--dask-address", "tcp://127.0.0.1:9"], "no Dask scheduler answers there"),
])
def test_bad_sweep_input_is_one_line_exit_2_and_writes_nothing(argv, expect, make_config, tmp_path, capsys):
    base = write_base(make_config, tmp_path)
    assert main(["sweep", str(base), *argv, "--no-progress"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and "warning" not in ln]
    assert len(err) == 1 and expect in err[0], err
    assert not (tmp_path / "store").exists()


def test_sweep_report_tables_match_the_store(swept, capsys):
    import pandas as pd

    store = Store(swept["root"] / "store")
    out = swept["root"] / "sweep-report"
    assert main(["report", "--sweep", "grid", "--store", str(store.root), "--out", str(out)]) == 0
    assert (swept["root"] / "reports" / "grid" / "sweep.md").is_file()  # the sweep flow wrote one too
    text = (out / "sweep.md").read_text()
    assert "4 of 4 points complete" in text and (out / "sweep.png").stat().st_size > 10_000
    points = pd.read_csv(out / "sweep_points.csv")
    assert len(points) == 4
    for _, row in points.iterrows():
        cfg = Config.model_validate(store.read_run(row["run"]).config)
        final = plan(cfg).last_core()
        assert row["core_size"] == store.manifest("select", final.key).metrics["core_size"]
        assert row["core_size"] <= row["selection.max_core"] == cfg.selection.max_core
    assert main(["report", "--sweep", "nope", "--store", str(store.root)]) == 2


def test_prefect_records_concurrent_task_runs(swept):
    """What the UI shows: the sweep's flow run with task runs whose running times overlap on the two workers."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        flow_runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["dmsae-sweep"])))
        assert flow_runs
        first = min(flow_runs, key=lambda r: r.start_time)  # the fixture's sweep, on Dask
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[first.id])))
    spans = sorted((t.start_time, t.end_time, t.name) for t in tasks if t.start_time and t.end_time
                   and t.state and t.state.name == "Completed")
    assert len(spans) >= 10
    overlapping = [(a[2], b[2]) for i, a in enumerate(spans) for b in spans[i + 1:] if b[0] < a[1]]
    assert overlapping, f"no two stages ran at the same time: {[(str(a), str(b), n) for a, b, n in spans]}"

"""6. Parallel stages on Dask: the quickstart's reuse-and-evaluate phase with 2 single-thread Dask workers
against 1 two-thread process, and (full mode) a 3-point tau sweep against three sequential runs.

Both run the real CLI in subprocesses on copies of the quickstart store with the phase under test removed
(cycles kept cached), so the two sides compute the same stages from the same inputs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.common import CONFIG, REPO, Context, Row, log

# computed by the reuse-and-evaluate phase: everything after the last cycle's selection
PHASE = ("random_core", "reuse", "baseline", "evaluate")
CYCLE_STAGES = ("model", "tokens", "harvest", "train", "attribute", "select")
TAUS = ("0.6", "0.7", "0.8")


def cycles_cached(store_root: Path) -> tuple[int, int]:
    from dmsae.config import load_config
    from dmsae.store import Store
    from flows.pipeline import plan

    store = Store(store_root)
    nodes = [n for n in plan(load_config(CONFIG, [f"store={store_root}"])).nodes if n.stage in CYCLE_STAGES]
    return sum(store.has(n.stage, n.key) for n in nodes), len(nodes)


def copy_cycles(src: Path, dst: Path) -> None:
    """The store with only the cycle stages: the phase under test is computed again on each side."""
    shutil.rmtree(dst, ignore_errors=True)

    def ignore(folder: str, names: list[str]) -> set[str]:
        if Path(folder).resolve() == src.resolve():
            return {n for n in names if n not in CYCLE_STAGES and n != "dmsae-store.json"}
        return {".locks", ".tmp", ".partial"} & set(names)

    shutil.copytree(src, dst, ignore=ignore)


def dmsae(env: dict[str, str], *argv: str) -> tuple[float, str]:
    cmd = [str(Path(sys.executable).parent / "dmsae"), *argv]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:2])} exited {proc.returncode}: "
                           + " | ".join(proc.stderr.strip().splitlines()[-3:]))
    summary = next((ln for ln in proc.stdout.splitlines() if "finished in" in ln), "")
    return wall, summary


def computed(summary: str) -> str:
    m = re.search(r"computed (\d+) of (\d+)", summary)
    return f"{m.group(1)} of {m.group(2)} computed" if m else summary


def run(ctx: Context) -> list[Row]:
    done, total = cycles_cached(ctx.quickstart_store)
    phase_label = "quickstart reuse-and-evaluate phase: 2 Dask workers x 1 thread vs 1 process x 2 threads"
    sweep_label = "3-point tau sweep (dmsae sweep, 2 Dask workers x 1 thread) vs 3 sequential runs (2 threads)"
    if done < total:
        why = f"not measured: the quickstart's cycles are not in {ctx.quickstart_store} ({done}/{total})"
        return [Row(phase_label, None, "s", note=why), Row(sweep_label, None, "s", note=why)]
    env = dict(os.environ)
    env["PREFECT_HOME"] = str(ctx.work / "prefect-home-parallel")
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
    env.pop("PREFECT_API_URL", None)
    config = str(CONFIG.relative_to(REPO))
    reports = str(ctx.work / "reports-parallel")
    rows = []
    local_s, dask_s = [], []
    for i in range(1):  # one of each: a phase takes minutes on 2 cores
        for runner, walls in (("local", local_s), ("dask", dask_s)):  # interleaved, so drift hits both
            store = ctx.work / f"par-{runner}-{i}"
            copy_cycles(ctx.quickstart_store, store)
            log(f"parallel: reuse-and-evaluate phase, runner {runner} (repeat {i + 1})")
            wall, summary = dmsae(env, "run", config, "--no-progress", "--set", f"store={store}",
                                  "--set", f"report_dir={reports}", "--set", f"runner={runner}",
                                  "--set", f"threads={2 if runner == 'local' else 1}",
                                  "--set", "dask.workers=2", "--set", "dask.threads=1")
            walls.append(wall)
            shutil.rmtree(store, ignore_errors=True)
    lo, da = sorted(local_s)[len(local_s) // 2], sorted(dask_s)[len(dask_s) // 2]
    rows.append(Row(phase_label, da, "s", versus="runner local, threads 2", versus_value=lo, ratio=da / lo,
                    note=f"{computed(summary)}; wall of `dmsae run` including the Prefect server and the cluster's "
                         f"start; local {', '.join(f'{w:.0f}' for w in local_s)} s, dask "
                         f"{', '.join(f'{w:.0f}' for w in dask_s)} s"))
    if ctx.mode.name != "full":
        return rows
    seq_store, sweep_store = ctx.work / "par-seq", ctx.work / "par-sweep"
    copy_cycles(ctx.quickstart_store, seq_store)
    seq = 0.0
    for tau in TAUS:
        log(f"parallel: sequential run tau={tau}")
        wall, _ = dmsae(env, "run", config, "--no-progress", "--set", f"store={seq_store}", "--set",
                        f"report_dir={reports}", "--set", f"selection.tau={tau}", "--set", f"name=seq-{tau}",
                        "--set", "threads=2")
        seq += wall
    copy_cycles(ctx.quickstart_store, sweep_store)
    log("parallel: the same three points as one sweep on Dask")
    sweep_wall, summary = dmsae(env, "sweep", config, "--no-progress", "--grid", f"selection.tau={','.join(TAUS)}",
                                "--set", f"store={sweep_store}", "--set", f"report_dir={reports}",
                                "--set", "threads=1", "--workers", "2")
    rows.append(Row(sweep_label, sweep_wall, "s", versus="three `dmsae run`", versus_value=seq,
                    ratio=sweep_wall / seq, note=f"{computed(summary)}; one of each"))
    for folder in (seq_store, sweep_store):
        shutil.rmtree(folder, ignore_errors=True)
    return rows

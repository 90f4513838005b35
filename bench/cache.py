"""4. Cache: wall time of a fully cached quickstart re-run, and (full mode) of a tau branch.

Both run the real CLI in a subprocess against a copy of the quickstart store, so the user's store and
reports are never touched: `store` and `report_dir` are not part of any stage key, so the copy is as
cached as the original. Nothing is computed when the quickstart is not complete in the store.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.common import CONFIG, REPO, Context, Row, log, median

CACHED_TARGET_S = 30.0


def quickstart_done(store_root: Path) -> tuple[int, int]:
    from dmsae.config import load_config
    from dmsae.store import Store
    from flows.pipeline import plan

    cfg = load_config(CONFIG, [f"store={store_root}"])
    store = Store(store_root)
    nodes = plan(cfg).nodes
    return sum(store.has(n.stage, n.key) for n in nodes), len(nodes)


def dmsae_run(store: Path, reports: Path, env: dict[str, str], *sets: str) -> tuple[float, str]:
    cmd = [str(Path(sys.executable).parent / "dmsae"), "run", str(CONFIG.relative_to(REPO)), "--no-progress",
           "--set", f"store={store}", "--set", f"report_dir={reports}", *[a for s in sets for a in ("--set", s)]]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise RuntimeError(f"dmsae run exited {proc.returncode}: {tail}")
    summary = next((line for line in proc.stdout.splitlines() if "finished in" in line), "")
    return wall, summary


def command_line(*sets: str) -> str:
    extra = "".join(f" --set {s}" for s in sets)
    return f"dmsae run configs/quickstart.yaml --no-progress --set store=COPY --set report_dir=TMP{extra}"


def run(ctx: Context) -> list[Row]:
    done, total = quickstart_done(ctx.quickstart_store)
    cached_label = "fully cached quickstart re-run (`dmsae run`, all stages Cached)"
    tau_label = "tau branch run (`--set selection.tau=0.8`)"
    if done < total:
        why = (f"not measured: the quickstart is not in the store {ctx.quickstart_store} "
               f"({done}/{total} stages done); run `make quickstart` first")
        rows = [Row(cached_label, None, "s", target=f"< {CACHED_TARGET_S:.0f} s", note=why)]
        if ctx.mode.tau_branch:
            rows.append(Row(tau_label, None, "s", note=why))
        return rows
    copy = ctx.work / "quickstart-store"
    log(f"cache: copying {ctx.quickstart_store} to a scratch store")
    shutil.copytree(ctx.quickstart_store, copy, ignore=shutil.ignore_patterns(".locks", ".tmp", ".partial"))
    reports = ctx.work / "reports"
    env = dict(os.environ)
    env["PREFECT_HOME"] = str(ctx.work / "prefect-home")  # its own Prefect database, warmed up below
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.setdefault("DO_NOT_TRACK", "1")
    env.pop("PREFECT_API_URL", None)
    try:
        log("cache: warm-up run (creates the Prefect database)")
        dmsae_run(copy, reports, env)
        walls, summary = [], ""
        for _ in range(ctx.mode.cache_repeats):
            wall, summary = dmsae_run(copy, reports, env)
            walls.append(wall)
        cached_s = median(walls)
        rows = [Row(cached_label, cached_s, "s", target=f"< {CACHED_TARGET_S:.0f} s",
                    passed=cached_s < CACHED_TARGET_S and "everything was cached" in summary,
                    note=f"median of {len(walls)}: {', '.join(f'{w:.1f}' for w in walls)} s; `{summary.strip()}`; "
                         f"`{command_line()}`")]
        if ctx.mode.tau_branch:
            log("cache: tau branch run (computes every stage downstream of select[0])")
            tau_set = ("selection.tau=0.8", "name=bench-tau")
            wall, summary = dmsae_run(copy, reports, env, *tau_set)
            m = re.search(r"computed (\d+) of (\d+)", summary)
            computed = f"{m.group(1)} of {m.group(2)} stages computed" if m else summary
            rows.append(Row(tau_label, wall, "s", note=f"{computed}; one run; `{command_line(*tau_set)}`"))
        return rows
    finally:
        shutil.rmtree(copy, ignore_errors=True)
        shutil.rmtree(reports, ignore_errors=True)

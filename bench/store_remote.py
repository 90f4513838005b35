"""The store on object storage: the reuse-and-evaluate phase from an `s3://` store on loopback against a local
store, and the bytes each run moves (issue 24's benchmark acceptance).

    .venv/bin/python -m bench.store_remote            # the figures to quote (about 10 minutes on 2 cores)
    .venv/bin/python -m bench.store_remote --quick    # the tiny test setup, a check that it works (~1 minute)

A real S3 server (SeaweedFS, tests/s3server.py) runs in a temporary folder on 127.0.0.1 and is stopped at the
end. Every timed run is a fresh process (`python -m bench.store_remote --child ...`) that plans the config and
materializes every node in order, as `dmsae run` does without Prefect (flows.pipeline.plan and materialize);
it times that loop and reports the store traffic it made (dmsae.remote_store.Traffic).

1. Both stores hold the same distillation cycles (model to the last selection): they are computed once on the
   s3 store (the first run, fresh cache) and copied into the local store (`store` is in no key). Then the
   remaining stages (random core, reuse arms, baseline, evaluations, probes, interpret, latent cards) are
   computed on each side, interleaved: local, s3 with a fresh empty cache (cold, the worst case: every input
   is downloaded), s3 with the cache of the machine that ran the cycles (warm); the phase's artifacts are
   deleted from the store (`garbage`/`remove`, as `dmsae gc` does) before each run, so each must recompute.
2. The bytes of each s3 run: the first run, the phase runs, a re-run on the same machine (everything cached:
   nothing may be uploaded) and a re-run on a second machine (a fresh cache: it downloads what it reads,
   each distinct file once).

The default runs configs/quickstart.yaml reduced by REDUCED (fewer tokens, one reuse k, light interpret
settings) so that it fits in about 10 minutes on an idle 2-core machine; `--unreduced` runs the quickstart as
configured (its phase alone took 395 s on 2 cores, so count on an hour). The model (SmolLM2-135M, 514 MB) is the
quickstart's in both, so the store's fixed costs (the download, the checks of each stage's inputs) weigh more in
the reduced phase than in the quickstart's. On a machine shared with other jobs, two torch threads per process
slow down by up to 10x (the phase took 14 s idle and 150 s under load in one session), so the load average at
each run's start is in the table. Writes docs/benchmarks-store.md (--quick: bench/results/, never the
committed file) and the raw result to bench/results/<time>-store-remote.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.common import CONFIG, REPO, RESULTS, load_average, log, median

GENERATED = REPO / "docs" / "benchmarks-store.md"
NOTES = REPO / "BENCHMARKS.md"
CYCLE_STAGES = ("model", "tokens", "harvest", "train", "attribute", "select")
TARGET = 1.3  # the s3 phase (cold cache) at most 1.3x the local one
REDUCED = [  # the quickstart cut to fit the benchmark in ~10 minutes on 2 cores (phase: 6 reuse SAEs, 8 evaluations)
    "data.train_tokens=40000",
    "data.attribution_tokens=1024",
    "data.eval_tokens=1024",
    "cycles=2",
    "reuse.k=[32]",
    "train.epochs=1",
    "interpret.absorption_words=26",
    "interpret.probe_examples=4",
]


# -- the child: one run in a fresh process ------------------------------------------------------------------
def child(spec: dict[str, Any]) -> dict[str, Any]:
    """Plan the config and materialize its nodes (all, or only the cycles) into the store; time the loop."""
    from bench.common import set_threads

    set_threads(spec["threads"])
    from dmsae.config import load_config
    from dmsae.remote_store import Traffic
    from dmsae.runtime import Runtime
    from dmsae.stores import store_for
    from flows.pipeline import materialize, plan

    cfg = load_config(spec["config"], spec["sets"])
    p = plan(cfg)
    nodes = [n for n in p.nodes if spec["nodes"] == "all" or n.stage in CYCLE_STAGES]
    wire = count_requests()
    inside = time_stage_functions()
    Traffic.up = Traffic.down = 0
    start = time.perf_counter()
    store = store_for(cfg)
    store.ensure_writable()
    computed, seconds, stage_seconds = [], {}, {}
    for node in nodes:
        t0 = time.perf_counter()
        inside[0] = 0.0
        _, was_computed = materialize(store, node, Runtime(show_progress=False))
        seconds[node.label] = round(time.perf_counter() - t0, 3)
        stage_seconds[node.label] = round(inside[0], 3)
        if was_computed:
            computed.append(node.label)
    return {"wall_s": time.perf_counter() - start, "nodes": len(nodes), "computed": computed, "seconds": seconds,
            "stage_seconds": stage_seconds, **wire, "traffic_up": Traffic.up, "traffic_down": Traffic.down}


def time_stage_functions() -> list[float]:
    """Time the stage functions themselves (`<stage>.run`, as materialize calls them), less the checkpoint
    uploads they trigger, so that a node's time splits into the stage's computation and the store's work
    around it (lock or lease, reading and checking the inputs, upload, publishing). Instrumentation only."""
    from dmsae.remote_store import RemoteStore
    from dmsae.store import Store
    from flows.pipeline import STAGES

    inside = [0.0]
    for module in STAGES.values():
        original = module.run

        def timed(*a: Any, _run: Any = original, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return _run(*a, **kw)
            finally:
                inside[0] += time.perf_counter() - t0

        module.run = timed
    for cls in (Store, RemoteStore):
        sync = cls.sync_partial

        def synced(self: Any, *a: Any, _sync: Any = sync, **kw: Any) -> None:
            t0 = time.perf_counter()
            try:
                _sync(self, *a, **kw)
            finally:
                inside[0] -= time.perf_counter() - t0

        cls.sync_partial = synced
    return inside


def count_requests() -> dict[str, int]:
    """Count what this process sends to and receives from the object store, call by call, under a lock: data
    files (`put_file`, `get_file`: what `Traffic` counts), small objects (manifests, leases, records) and
    requests. Instrumentation only: every call goes through unchanged. (`Traffic`'s own counters are reported
    beside these as a cross-check: until commit 79ef7c4 they were incremented from the store's upload and
    download threads without a lock and lost updates.)"""
    import threading

    from dmsae.objects import ObjectClient

    counts = {"up": 0, "down": 0, "meta_up": 0, "meta_down": 0, "requests": 0}
    lock = threading.Lock()

    def add(**kw: int) -> None:
        with lock:
            counts["requests"] += 1
            for k, v in kw.items():
                counts[k] += v

    def wrap(name: str, after: Any) -> None:
        original = getattr(ObjectClient, name)

        def call(self: Any, *a: Any, **kw: Any) -> Any:
            out = None
            try:
                out = original(self, *a, **kw)
                return out
            finally:
                add(**after(a, out))

        setattr(ObjectClient, name, call)

    size = os.path.getsize
    wrap("put_file", lambda a, out: {"up": size(a[1])})
    wrap("get_file", lambda a, out: {"down": size(a[1]) if os.path.exists(a[1]) else 0})
    for name in ("put", "create"):
        wrap(name, lambda a, out: {"meta_up": len(a[1])})
    wrap("put_if_unchanged", lambda a, out: {"meta_up": len(a[1])})
    wrap("get", lambda a, out: {"meta_down": len(out) if out is not None else 0})
    wrap("get_with_tag", lambda a, out: {"meta_down": len(out[0]) if out is not None else 0})
    for name in ("exists", "delete", "list", "folders"):
        wrap(name, lambda a, out: {})
    return counts


# -- the parent ---------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args: argparse.Namespace, work: Path, server_env: dict[str, str]):
        self.args, self.work = args, work
        self.env = {**os.environ, **server_env, "OMP_NUM_THREADS": str(args.threads),
                    "MKL_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                    "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}
        self.url = f"s3://dmsae/bench-{uuid.uuid4().hex[:12]}"
        self.local = work / "local-store"
        self.config: str | None = None
        self.sets: list[str] = []
        self.runs = 0

    def run(self, store: str, cache: Path, nodes: str = "all") -> dict[str, Any]:
        spec = {"config": self.config, "sets": [*self.sets, f"store={store}"], "nodes": nodes,
                "threads": self.args.threads}
        self.runs += 1
        logfile = self.work / f"run-{self.runs:02d}.log"
        cmd = [sys.executable, "-m", "bench.store_remote", "--child", json.dumps(spec)]
        load = load_average()
        t0 = time.perf_counter()
        with open(logfile, "w") as err:
            proc = subprocess.run(cmd, cwd=REPO, env={**self.env, "DMSAE_CACHE": str(cache)}, stdout=subprocess.PIPE,
                                  stderr=err, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            tail = "\n".join(logfile.read_text().strip().splitlines()[-15:])
            raise RuntimeError(f"run on {store} exited {proc.returncode}:\n{tail}")
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        out["process_s"] = wall
        out["load_start"] = load[0] if load else None
        return out

    def stores(self) -> tuple[Any, Any]:
        from dmsae.remote_store import RemoteStore
        from dmsae.store import Store

        return Store(self.local), RemoteStore(self.url, cache_dir=self.work / "parent-cache")

    def plan(self) -> Any:
        from dmsae.config import load_config
        from flows.pipeline import plan

        return plan(load_config(self.config, [*self.sets, f"store={self.local}"]))


def clear_phase(store: Any, cycle_keys: set[tuple[str, str]]) -> int:
    """Delete everything but the cycles' artifacts, as `dmsae gc` does; returns how many were deleted."""
    items = store.garbage(cycle_keys)
    for item in items:
        if not store.remove(item):
            raise RuntimeError(f"{item.label} is locked: another run is computing it")
    return len(items)


def distinct_bytes(remote: Any, nodes: list[Any]) -> int:
    """Bytes of the distinct files (by sha256) of these nodes' artifacts on the remote store: what a machine
    with an empty cache downloads when it reads all of them."""
    sizes: dict[str, int] = {}
    for n in nodes:
        listed = {o["path"]: int(o["size"]) for o in remote.client.list(f"{n.stage}/{n.key}")}
        for rel, digest in remote.manifest(n.stage, n.key).files.items():
            sizes[digest] = listed[f"{n.stage}/{n.key}/{rel}"]
    return sum(sizes.values())


def tiny_setup(folder: Path) -> list[str]:
    """The tiny model, corpus and overrides, built the way tests/conftest.py builds them (no downloads)."""
    import random

    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from tests.conftest import (
        BOS_ID,
        D_MODEL,
        N_DOCS,
        N_LAYERS,
        REUSE_OVERRIDES,
        SPECIALS,
        TINY_OVERRIDES,
        VOCAB_SIZE,
        WORDS,
    )

    model_dir = folder / "tiny-llama"
    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(model_dir)
    config = LlamaConfig(hidden_size=D_MODEL, intermediate_size=128, num_hidden_layers=N_LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB_SIZE,
                         max_position_embeddings=128, bos_token_id=BOS_ID, eos_token_id=2, initializer_range=0.1)
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        LlamaForCausalLM(config).save_pretrained(model_dir)
    rng = random.Random(7)
    weights = [1.0 / (i + 1) for i in range(len(WORDS))]
    corpus = folder / "corpus.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        for _ in range(N_DOCS):
            f.write(json.dumps({"text": " ".join(rng.choices(WORDS, weights, k=rng.randint(4, 40)))}) + "\n")
    return [f"model.path={model_dir}", f"data.path={corpus}", *TINY_OVERRIDES, *REUSE_OVERRIDES]


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    from bench.common import _cpu_model

    return _cpu_model()


def machine() -> dict[str, Any]:
    import platform

    import torch

    from bench.common import _mem_total_gib

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "ram_gib": _mem_total_gib(),
            "python": platform.python_version(), "torch": torch.__version__,
            "os": f"{platform.system()} {platform.release()}", "load_average_start": load_average()}


def measure(b: Bench) -> dict[str, Any]:
    from dmsae.remote_store import RemoteStore

    p = b.plan()
    cycle_nodes = [n for n in p.nodes if n.stage in CYCLE_STAGES]
    phase_nodes = [n for n in p.nodes if n.stage not in CYCLE_STAGES]
    cycle_keys = {(n.stage, n.key) for n in cycle_nodes}
    log(f"plan: {len(p.nodes)} nodes, {len(cycle_nodes)} in the cycles, {len(phase_nodes)} in the phase")

    machine_a = b.work / "cache-machine-a"  # the machine that runs the cycles, and the warm runs
    log(f"first run on {b.url}: the cycles, computed, cache {machine_a.name} (fresh)")
    first = b.run(b.url, machine_a, nodes="cycles")
    log(f"  {first['wall_s']:.1f} s, {len(first['computed'])} computed, up {first['up']:,} B, down {first['down']:,} B")
    local, remote = b.stores()
    local.ensure_writable()
    for n in cycle_nodes:  # the local store gets the same cycles: a copy, as `store` is in no key
        art = remote.load(n.stage, n.key)
        shutil.copytree(art.path, local.artifact_dir(n.stage, n.key))
        local.load(n.stage, n.key)  # checks every file against its manifest
    shutil.rmtree(b.work / "parent-cache", ignore_errors=True)
    warm_copies = RemoteStore(b.url, cache_dir=machine_a).local

    sides: dict[str, list[dict[str, Any]]] = {"local": [], "s3 cold": [], "s3 warm": []}
    for i in range(b.args.repeats):
        for side in sides:
            store = local if side == "local" else remote
            clear_phase(store, cycle_keys)
            if side == "local":
                where, cache = str(b.local), b.work / "cache-unused"
            elif side == "s3 cold":
                where, cache = b.url, b.work / f"cache-cold-{i}"
            else:  # the cycles' machine: its cache holds the cycles, not the phase deleted from the store
                where, cache = b.url, machine_a
                for n in phase_nodes:
                    shutil.rmtree(warm_copies / n.stage / n.key, ignore_errors=True)
            log(f"repeat {i + 1}/{b.args.repeats}: {side}")
            out = b.run(where, cache)
            if len(out["computed"]) != len(phase_nodes):
                raise RuntimeError(f"{side}: computed {len(out['computed'])} nodes, the phase has {len(phase_nodes)}")
            log(f"  {out['wall_s']:.1f} s (process {out['process_s']:.1f} s), up {out['up']:,} B, "
                f"down {out['down']:,} B")
            sides[side].append(out)
            if side == "s3 cold":
                shutil.rmtree(cache, ignore_errors=True)

    log("re-run on the same machine (the warm cache), everything cached")
    rerun = b.run(b.url, machine_a)
    log(f"  {rerun['wall_s']:.1f} s, {len(rerun['computed'])} computed, up {rerun['up']:,} B, down {rerun['down']:,} B")
    log("re-run on a second machine (a fresh cache), everything cached")
    second = b.run(b.url, b.work / "cache-machine-b")
    log(f"  {second['wall_s']:.1f} s, {len(second['computed'])} computed, up {second['up']:,} B, "
        f"down {second['down']:,} B")
    remote = b.stores()[1]
    return {"nodes": len(p.nodes), "cycle_nodes": len(cycle_nodes), "phase_nodes": len(phase_nodes),
            "phase_labels": [n.label for n in phase_nodes], "first": first, "sides": sides, "rerun": rerun,
            "second": second, "bytes_cycles": distinct_bytes(remote, cycle_nodes),
            "bytes_plan": distinct_bytes(remote, p.nodes),
            "bytes_phase": distinct_bytes(remote, phase_nodes)}


# -- the report ---------------------------------------------------------------------------------------------
def mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB" if n else "0 B"


def kb(n: float) -> str:
    return f"{n / 1e3:,.1f} kB"


def markdown(r: dict[str, Any]) -> str:
    m, res = r["machine"], r["result"]
    walls = {side: [o["wall_s"] for o in runs] for side, runs in res["sides"].items()}
    med = {side: median(ws) for side, ws in walls.items()}
    cold, warm = med["s3 cold"] / med["local"], med["s3 warm"] / med["local"]
    loads = {side: ", ".join("?" if o.get("load_start") is None else f"{o['load_start']:.1f}" for o in runs)
             for side, runs in res["sides"].items()}
    config = r["config_text"]
    lines = [f"> Generated by `{r['command']}`; do not edit: the next run overwrites this file. The notes are "
             f"in [{NOTES.name}](../{NOTES.name}) (section \"Object store (s3:// on loopback)\").", "",
             "# Benchmarks: the store on object storage (s3:// on loopback) against a local store", "",
             f"Made by `{r['command']}` on {r['date']} ({r['wall_s'] / 60:.1f} min in all). An S3 server "
             "(SeaweedFS `weed mini`, tests/s3server.py) ran on 127.0.0.1 on the same machine. Every run is a fresh "
             "process that plans the config and materializes every node in order (`flows.pipeline.plan`, "
             "`materialize`, as `dmsae run` does, without Prefect); its time is that loop's, from opening the store "
             "to the last node (interpreter and imports excluded). Ratios are of medians measured interleaved in "
             "this one run (local, s3 cold, s3 warm, repeated).", "",
             "## Machine", "", "| | |", "|---|---|",
             f"| CPU (`lscpu` Model name) | {m['cpu']}, {m['cores']} cores visible |",
             f"| RAM | {m['ram_gib']:.1f} GiB |" if m.get("ram_gib") else "| RAM | ? |",
             f"| torch | {m['torch']}, {r['threads']} threads |",
             f"| Python | {m['python']} |", f"| OS | {m['os']} |",
             f"| load average (1, 5, 15 min) | {_load(m['load_average_start'])} at the start, "
             f"{_load(m['load_average_end'])} at the end |", "",
             "## Config", "", config, "",
             f"Plan: {res['nodes']} nodes; the cycles (model to the last selection, {res['cycle_nodes']} nodes) are "
             f"in both stores before the timed runs; the phase ({res['phase_nodes']} nodes: "
             f"{', '.join(_stage_counts(res['phase_labels']))}) is computed by every timed run.", "",
             "## 1. The reuse-and-evaluate phase: s3:// vs a local store", "",
             "| store | median | runs | load average (1 min) at each run's start | vs local | target | result |",
             "|---|---:|---|---|---:|---|---|",
             f"| local folder | {med['local']:.1f} s | {_list(walls['local'])} | {loads['local']} | 1.00x | | |",
             f"| s3, cold cache (fresh `DMSAE_CACHE` every run: every input downloaded) | {med['s3 cold']:.1f} s | "
             f"{_list(walls['s3 cold'])} | {loads['s3 cold']} | {cold:.2f}x | <= {TARGET}x | "
             f"{'PASS' if cold <= TARGET else 'MISS'} |",
             f"| s3, warm cache (the cache of the machine that computed the cycles) | {med['s3 warm']:.1f} s | "
             f"{_list(walls['s3 warm'])} | {loads['s3 warm']} | {warm:.2f}x | <= {TARGET}x | "
             f"{'PASS' if warm <= TARGET else 'MISS'} |",
             "", "Where the time goes (medians): reading the cycles' artifacts (the cached nodes; on a cold cache "
             "this is their download and check) and computing the phase's nodes (each reads its inputs, computes, "
             "then uploads and publishes its artifact).", "",
             "| store | reading the cycles (cached nodes) | computing the phase | of which in the stage functions "
             "| of which the store's work around them | whole run |", "|---|---:|---:|---:|---:|---:|",
             *[f"| {side} | {median(_part(runs, res, cached=True)):.1f} s | "
               f"{median(_part(runs, res, cached=False)):.1f} s | {_inside(runs, res, 'stage')} | "
               f"{_inside(runs, res, 'store')} | {med[side]:.1f} s |" for side, runs in res["sides"].items()],
             "", "The stage functions' time is the computation (the same on both sides, up to the machine's noise); "
             "the store's work is the rest of each computed node: the lock (a lease object on s3), loading and "
             "checking its inputs, uploading its files and publishing the manifest, loading the result.",
             "", f"Extra seconds of a cold s3 run over a local one (median): {med['s3 cold'] - med['local']:.1f} s; "
             f"of a warm one: {med['s3 warm'] - med['local']:.1f} s. Process walls (with the interpreter's start): "
             + "; ".join(f"{side} {_list([o['process_s'] for o in runs])}" for side, runs in res["sides"].items())
             + ".", "",
             "## 2. Bytes moved per run on s3", "",
             "Counted in each run's process: the data files it uploaded and downloaded (every `put_file` and "
             "`get_file` call of the store's object client, counted under a lock), then what "
             "`dmsae.remote_store.Traffic` says for the same run, then the small objects (manifests, leases, "
             "records: bytes sent / received) and the number of requests.", "",
             "| run | computed | data up | data down | expected | check | `Traffic` up / down | small objects up / "
             "down | requests |", "|---|---:|---:|---:|---|---|---|---|---:|"]
    first, rerun, second = res["first"], res["rerun"], res["second"]
    cold_runs, warm_runs = res["sides"]["s3 cold"], res["sides"]["s3 warm"]
    rows = [
        ("first run: the cycles, computed (fresh cache)", first, "uploads the cycles' artifacts, downloads nothing",
         first["down"] == 0 and first["up"] > 0),
        ("phase, cold cache (first repeat)", cold_runs[0],
         f"downloads the cycles' distinct files once ({mb(res['bytes_cycles'])}); uploads the phase's files",
         cold_runs[0]["down"] == res["bytes_cycles"]),
        ("phase, warm cache (first repeat)", warm_runs[0], "downloads nothing; uploads the phase's files",
         warm_runs[0]["down"] == 0),
        ("re-run, same machine, everything cached", rerun, "0 B up (cached work never re-sent), 0 B down",
         rerun["up"] == 0 and rerun["down"] == 0 and not rerun["computed"]),
        ("re-run, second machine (fresh cache), everything cached", second,
         f"0 B up; down = the plan's distinct files, each once ({mb(res['bytes_plan'])})",
         second["up"] == 0 and second["down"] == res["bytes_plan"] and not second["computed"]),
    ]
    for label, o, expected, ok in rows:
        lines.append(f"| {label} | {len(o['computed'])} of {o['nodes']} | {mb(o['up'])} | {mb(o['down'])} | "
                     f"{expected} | {'ok' if ok else 'NOT AS EXPECTED'} | {mb(o['traffic_up'])} / "
                     f"{mb(o['traffic_down'])} | {kb(o['meta_up'])} / {kb(o['meta_down'])} | {o['requests']:,} |")
    phase_runs = cold_runs + warm_runs
    ups = sorted({o["up"] for o in phase_runs})
    lost = [(o["up"] - o["traffic_up"], o["down"] - o["traffic_down"]) for o in [first, *phase_runs, rerun, second]]
    lines += ["", f"Every phase run uploaded {' / '.join(f'{u:,} B' for u in ups)} of data files (the phase's "
              f"artifacts hold {res['bytes_phase']:,} B of distinct files; a file equal to another is still uploaded "
              f"under each artifact). Exact bytes: first run up {first['up']:,}; cold phase down "
              f"{cold_runs[0]['down']:,} (the cycles' distinct files: {res['bytes_cycles']:,}); second machine down "
              f"{second['down']:,} (the plan's distinct files: {res['bytes_plan']:,}).", ""]
    if any(u or d for u, d in lost):
        lines += [f"`Traffic` fell short of the bytes moved in {sum(1 for u, d in lost if u or d)} of {len(lost)} "
                  "s3 runs (by up to "
                  f"{mb(max(max(u, d) for u, d in lost))}): concurrent increments from the store's 8 upload and "
                  "download threads were lost (no lock before commit 79ef7c4); the data columns above are counted "
                  "under a lock.", ""]
    lines += ["## Reproduce", "", "```bash", r["command"], "```", ""]
    return "\n".join(lines)


def _part(runs: list[dict[str, Any]], res: dict[str, Any], cached: bool) -> list[float]:
    """Per run, the seconds of its cached nodes (the cycles) or of the nodes it computed (the phase)."""
    phase = set(res["phase_labels"])
    return [sum(t for label, t in o["seconds"].items() if (label not in phase) == cached) for o in runs]


def _inside(runs: list[dict[str, Any]], res: dict[str, Any], which: str) -> str:
    """Median over runs of the phase's seconds inside the stage functions, or around them (the store's work)."""
    if not all("stage_seconds" in o for o in runs):
        return "-"
    phase = set(res["phase_labels"])
    stage = [sum(o["stage_seconds"][label] for label in phase) for o in runs]
    if which == "stage":
        return f"{median(stage):.1f} s"
    total = [sum(o["seconds"][label] for label in phase) for o in runs]
    return f"{median([t - s for t, s in zip(total, stage, strict=True)]):.1f} s"


def _stage_counts(labels: list[str]) -> list[str]:
    counts: dict[str, int] = {}
    for label in labels:
        stage = label.split("[", 1)[0]
        counts[stage] = counts.get(stage, 0) + 1
    return [f"{n} {s}" for s, n in counts.items()]


def _list(xs: list[float]) -> str:
    return ", ".join(f"{x:.1f}" for x in xs) + " s"


def _load(la: Any) -> str:
    return ", ".join(f"{x:.2f}" for x in la) if la else "?"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.store_remote", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the tiny test setup instead of the reduced quickstart")
    ap.add_argument("--unreduced", action="store_true", help="configs/quickstart.yaml as configured, without "
                    "REDUCED (about an hour on 2 cores)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each side (default 3)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default 2; --quick: 1)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="more config overrides, after the built-in ones")
    ap.add_argument("--out", default=None, help=f"markdown output (default {GENERATED.relative_to(REPO)}; "
                    "--quick: bench/results/store-remote-quick.md)")
    ap.add_argument("--keep-work", action="store_true", help="keep the scratch folder (stores, caches, logs)")
    ap.add_argument("--render", metavar="RAW.json", help="measure nothing: rewrite the markdown from a raw result "
                    "of an earlier run (bench/results/*-store-remote.json)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads is None:
        args.threads = 1 if args.quick else 2
    if args.render and not Path(args.render).is_file():
        ap.error(f"--render {args.render}: no such file")
    quick = args.quick or bool(args.render and "--quick" in json.loads(Path(args.render).read_text())["command"])
    if args.out is None:
        args.out = str(RESULTS / "store-remote-quick.md") if quick else str(GENERATED)
    if Path(args.out).resolve() == NOTES.resolve():
        ap.error(f"--out: {NOTES.name} holds the hand-written notes")
    if args.quick and args.unreduced:
        ap.error("--quick and --unreduced: choose one")
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return 0
    if args.render:
        text = markdown(json.loads(Path(args.render).read_text()))
        Path(args.out).write_text(text)
        print(text)
        log(f"wrote {args.out} from {args.render}")
        return 0
    from tests.s3server import S3Server

    given = argv if argv is not None else sys.argv[1:]
    command = shlex.join([".venv/bin/python", "-m", "bench.store_remote", *given])
    started, stamp = time.perf_counter(), time.strftime("%Y%m%d-%H%M%S")
    info = machine()
    RESULTS.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="dmsae-bench-store-"))
    server = S3Server(work / "s3")
    try:
        server.start()
        log(f"S3 server (SeaweedFS) on {server.endpoint}, scratch {work}")
        os.environ.update(server.env())  # this process deletes the phase between runs and reads sizes
        b = Bench(args, work, server.env())
        if args.quick:
            b.config, b.sets = None, [*tiny_setup(work / "tiny"), *args.sets]
            config_text = ("The tiny test setup (tests/conftest.py: a random 4-layer Llama, d=64, and a generated "
                           "corpus) with its reuse arms: `" + " ".join(b.sets[2:]) + "`.")
        elif args.unreduced:
            b.config, b.sets = str(CONFIG), list(args.sets)
            config_text = (f"`{CONFIG.relative_to(REPO)}` as configured (the embedded SmolLM2-135M-Instruct, 514 MB "
                           "of safetensors, and the embedded corpus)"
                           + "".join(f" `--set {x}`" for x in b.sets) + ".")
        else:
            b.config, b.sets = str(CONFIG), [*REDUCED, *args.sets]
            config_text = (f"`{CONFIG.relative_to(REPO)}` (the embedded SmolLM2-135M-Instruct, 514 MB of "
                           "safetensors, and the embedded corpus) reduced to fit the benchmark in about 10 minutes: "
                           + " ".join(f"`--set {x}`" for x in b.sets)
                           + ". The model is the quickstart's, so a cold cache downloads as much model as the "
                           "quickstart's would (and a harvest 3x smaller) and every stage that loads it checks as "
                           "much, over a much shorter phase (the quickstart's took 395 s on `runner: local`, "
                           "BENCHMARKS.md, 2026-11-30): the store's fixed costs weigh more here. `--unreduced` runs "
                           "the quickstart itself.")
        result = measure(b)
    finally:
        server.stop()
        if args.keep_work:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    info["load_average_end"] = load_average()
    report = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": info,
              "threads": args.threads, "config": b.config, "sets": b.sets, "config_text": config_text,
              "result": result, "wall_s": time.perf_counter() - started}
    raw = RESULTS / f"{stamp}-store-remote{'-quick' if args.quick else ''}.json"
    raw.write_text(json.dumps(report, indent=1, default=str))
    text = markdown(report)
    Path(args.out).write_text(text)
    print(text)
    log(f"wrote {args.out} and {raw.relative_to(REPO)} in {report['wall_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())

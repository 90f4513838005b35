"""5. Memory: peak RSS of the harvest stage and of training at N and 4N tokens, each in a fresh process.

Streaming means the peak does not grow with the number of tokens: the harvest writes chunk-aligned blocks
to Zarr and training reads a bounded shuffle buffer (16 chunks of 4096 rows), so neither ever holds the
whole array. Run as a worker: `python -m bench.memory harvest|train ...` (bench/run.py does it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import LM_BATCH, REPO, Context, FakeArtifact, Row, log, peak_rss_mb, set_threads

RATIO_TARGET = 1.15


def _current_rss_mb() -> float | None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return None


def worker_harvest(args: argparse.Namespace) -> dict[str, Any]:
    from safetensors.torch import load_file

    from bench.common import write_windows
    from bench.harvest import STAGE_PARAMS
    from dmsae.readers import TOKENS_FILE
    from dmsae.runtime import Runtime
    from stages import harvest as harvest_stage

    work = Path(args.work)
    windows = load_file(str(Path(args.tokens) / TOKENS_FILE))["train"][: args.windows]
    tokens = write_windows(work / "tokens", windows, args.bos)
    out = work / "out"
    out.mkdir(parents=True)
    baseline = _current_rss_mb()
    rt = Runtime(show_progress=False, checkpoint_dir=work / "partial", args={"batch_size": LM_BATCH}, label="harvest")
    metrics = harvest_stage.run(out, STAGE_PARAMS, {"model": FakeArtifact(Path(args.model)), "tokens": tokens}, rt)
    return {"baseline_mb": baseline, "rows": metrics["n_tokens"], "tokens": int(windows.numel())}


def worker_train(args: argparse.Namespace) -> dict[str, Any]:
    from bench.train import BATCH, D, sae_params
    from dmsae.config import TrainConfig
    from dmsae.runtime import Runtime
    from dmsae.training import fit

    work = Path(args.work)
    harvest = FakeArtifact(Path(args.array), {"d": D, "n_tokens": args.n_tokens_train, "scale": args.scale})
    tp = TrainConfig(batch_size=BATCH, epochs=1.0).model_dump(exclude={"checkpoint_every"})
    out = work / "out"
    out.mkdir(parents=True)
    baseline = _current_rss_mb()
    rt = Runtime(show_progress=False, checkpoint_dir=work / "partial", args={"checkpoint_every": 200}, label="train")
    metrics = fit(out, harvest, None, sae_params(), tp, 0, 0, rt)
    return {"baseline_mb": baseline, "steps": metrics["steps"], "tokens": args.n_tokens_train}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=["harvest", "train"])
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model")
    ap.add_argument("--tokens-dir", dest="tokens")
    ap.add_argument("--bos", type=int)
    ap.add_argument("--windows", type=int)
    ap.add_argument("--array", help="folder holding activations.zarr")
    ap.add_argument("--scale", type=float)
    ap.add_argument("--n-tokens", dest="n_tokens_train", type=int)
    args = ap.parse_args()
    set_threads(args.threads)
    result = worker_harvest(args) if args.kind == "harvest" else worker_train(args)
    result.update(peak_rss_mb=peak_rss_mb())
    Path(args.out).write_text(json.dumps(result))


def _run_worker(ctx: Context, name: str, extra: list[str]) -> dict[str, Any]:
    work = ctx.work / "memory" / name
    work.mkdir(parents=True, exist_ok=True)
    out = work / "result.json"
    cmd = [sys.executable, "-m", "bench.memory", *extra, "--work", str(work), "--out", str(out),
           "--threads", str(ctx.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise RuntimeError(f"memory worker {name} exited {proc.returncode}: {tail}")
    return json.loads(out.read_text())


def build_array(folder: Path, n_rows: int, source: np.ndarray) -> Path:
    """An activation array of n_rows, the source rows tiled, written chunk by chunk like the harvest does."""
    from dmsae import activations

    folder.mkdir(parents=True, exist_ok=True)
    array = activations.create(folder / activations.ARRAY, n_rows, source.shape[1], 4096, "float32")
    writer = activations.ChunkWriter(array)
    written = 0
    while written < n_rows:
        block = source[: min(source.shape[0], n_rows - written)]
        writer.append(block)
        written += block.shape[0]
    writer.close()
    return folder


def _row(what: str, small: dict[str, Any], big: dict[str, Any], n: int, unit_n: str, array_mb: float) -> Row:
    ratio = big["peak_rss_mb"] / small["peak_rss_mb"]
    return Row(what, big["peak_rss_mb"], "MB peak RSS (4N)", f"peak RSS at N = {n:,} {unit_n}", small["peak_rss_mb"],
               ratio, f"<= {RATIO_TARGET:.2f}x", ratio <= RATIO_TARGET,
               note=f"4N peak {big['peak_rss_mb']:.0f} MB vs N {small['peak_rss_mb']:.0f} MB; the 4N activations "
                    f"alone are {array_mb:.0f} MB; RSS after imports {big['baseline_mb']:.0f} MB")


def run(ctx: Context) -> list[Row]:
    mode = ctx.mode
    rows: list[Row] = []
    model_art, tokens_art = ctx.shared["model"], ctx.shared["tokens"]
    bos = int(tokens_art.metrics["bos_id"])
    res = {}
    for label, windows in (("N", mode.mem_harvest_windows), ("4N", 4 * mode.mem_harvest_windows)):
        log(f"memory: harvest stage over {windows} windows ({label}) in a fresh process")
        res[label] = _run_worker(ctx, f"harvest-{label}", ["harvest", "--model", str(model_art.path),
                                                           "--tokens-dir", str(tokens_art.path), "--bos", str(bos),
                                                           "--windows", str(windows)])
    rows.append(_row("harvest stage, N vs 4N tokens", res["N"], res["4N"], res["N"]["tokens"], "tokens",
                     res["4N"]["rows"] * 576 * 4 / 2**20))

    n = mode.mem_train_tokens
    src_note = ""
    if "harvest_out" in ctx.shared:
        from dmsae import activations

        source = np.asarray(activations.open_array(ctx.shared["harvest_out"] / activations.ARRAY)[:], np.float32)
        scale = float(ctx.shared["harvest_metrics"]["scale"])
    else:
        source = np.random.default_rng(0).standard_normal((8192, 576), dtype=np.float32)
        scale, src_note = 1.0, "; random rows (the harvest benchmark did not run)"
    res = {}
    for label, tokens in (("N", n), ("4N", 4 * n)):
        folder = build_array(ctx.work / "memory" / f"array-{label}", tokens, source)
        log(f"memory: training on {tokens} tokens ({label}) in a fresh process")
        res[label] = _run_worker(ctx, f"train-{label}", ["train", "--array", str(folder), "--scale", str(scale),
                                                         "--n-tokens", str(tokens)])
    row = _row("train stage (dmsae.training.fit, 1 epoch), N vs 4N tokens", res["N"], res["4N"], n, "tokens",
               4 * n * 576 * 4 / 2**20)
    row.note += f"; harvested rows tiled to 4N{src_note}"
    rows.append(row)
    return rows


if __name__ == "__main__":
    main()

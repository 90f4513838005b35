"""Run every benchmark in one process tree and write docs/benchmarks-latest.md: the generated tables and the
command that made them. That file is overwritten by every run; the hand-written notes (machines, targets,
readings) live in BENCHMARKS.md, which this script never writes.

    .venv/bin/python -m bench.run --quick            # under 5 minutes on an idle 2-core machine
    .venv/bin/python -m bench.run --full             # the figures to quote (about 40 minutes on 2 cores)
    .venv/bin/python -m bench.run --full --device cuda --out docs/benchmarks-cuda.md

Raw results (every timing, the machine, the mode) go to bench/results/<time>-<mode>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from bench import attribution, cache, harvest, memory, parallel, train
from bench.common import (
    MODES,
    REPO,
    RESULTS,
    Context,
    Row,
    fmt,
    load_average,
    log,
    machine_info,
    materialize_inputs,
    set_threads,
)

GENERATED = REPO / "docs" / "benchmarks-latest.md"  # written by every run
NOTES = REPO / "BENCHMARKS.md"  # hand-written; never written here

BENCHES: dict[str, tuple[str, Callable[[Context], list[Row]]]] = {
    "harvest": ("1. Harvest: SmolLM2-135M, layer 15 of 30, context 128, batches of 32 windows", harvest.run),
    "train": ("2. SAE training: d=576, width 4096, k=32, prefixes [128, 512, 1024, 2048, 4096], batch 4096, fp32 "
              "(and the no-core step in fp32 and bf16 against sparsify and dictionary_learning)", train.run),
    "anchors": ("2b. SAE training in fp32 and bf16: the no-core step against sparsify and dictionary_learning in the "
                "same precision, d=576, width 4096, k=32, batch 4096", train.run_anchors),
    "attribution": ("3. Attribution: batches of 8 windows of 128 tokens, layer 15", attribution.run),
    "cache": ("4. Cache: the quickstart, fully cached, and a tau branch", cache.run),
    "memory": ("5. Memory: peak RSS at N and 4N tokens, each in a fresh process", memory.run),
    "parallel": ("6. Parallel stages on Dask: the reuse-and-evaluate phase, and a 3-point tau sweep", parallel.run),
}

EXPLAIN = {
    "parallel": "The real CLI in subprocesses on copies of the quickstart store holding only its cycles "
                "(model to the last selection), so each side computes the same reuse, random-core, baseline and "
                "evaluate stages. Walls include the Prefect server's and the Dask cluster's start.",
    "harvest": "Tokens/s over the same windows, all three timed in interleaved passes, each pass in an order "
               "rotated by one (median over passes). "
               "The stage is `stages.harvest.run` as the pipeline calls it (Zarr writes, outlier filter, "
               "resumable state after every batch), with the model already loaded; the bare forward runs "
               "layers 0..15 (`dmsae.lm.residual_upto`) and stores nothing; the full forward is "
               "`model(ids, output_hidden_states=True)` over all 30 layers and the LM head. The bf16 rows run the "
               "same stage and bare forward with the model under bfloat16 autocast (`precision.lm: bf16`, the "
               "`autocast` param the plan passes) and the activations stored as float16, interleaved with the "
               "others; the fp32 harvest they are compared with stores float32. The host-side rows hand the "
               "stage's own output rows, in as many batches, to the stage's writer (`harvesting.BatchStore` on a "
               "`HostSide` thread, as a GPU harvest runs it; a CPU harvest runs it after each forward on the "
               "forward's thread) with no forward: what the stage does beside the model, against the bare forward.",
    "train": "Every trainer gets the same batches (row indices saved once, gathered before each step's clock "
             "starts) and is timed per step (median, first step excluded); FVU is measured after the last step "
             "on the same held-out rows with the training-time BatchTopK encoding. The anchors run in "
             "`bench/.venv` (torch pinned to the project's version) as subprocesses, through their own update "
             "functions. Same lr (5e-4) and a 5 % warm-up / 20 % decay schedule for all. The dmsae rows call "
             "`dmsae.training.train_sae`, the train stage's loop (Adam, gradient projection, clipping, decoder "
             "normalisation, dead-latent and threshold statistics).",
    "anchors": "Only the comparisons made in each precision (the train benchmark makes them too, after its own "
               "rows): the no-core dmsae step (`train_sae`, as the train stage runs it; bf16 is "
               "`precision.sae=bf16`: the encoder matmul and the three sparse gathers in bfloat16 under autocast, "
               "losses, residuals and the float32 master weights in float32), dictionary_learning's "
               "MatryoshkaBatchTopKTrainer.update and EleutherAI sparsify's "
               "SparseCoder (driven as its Trainer.fit drives it with optimizer=adam: unit-norm decoder, gradient "
               "parallel to the decoder rows removed, loss = FVU, no AuxK by its default, Adam), all on the same "
               "batches with the same lr (5e-4) and schedule (5 % warm-up, 20 % decay), timed per step (median, "
               "first step excluded). In bf16 each anchor's step runs under `torch.autocast(device, bfloat16)`, the "
               "context its own trainer puts around it on CUDA (dictionary_learning's trainSAE also casts the batch "
               "to bfloat16; on CPU both trainers leave autocast off, so bf16 on a CPU is this bench's choice, "
               "applied alike to all three). FVU: full width, held-out rows, float32, after the last step "
               "(dictionary_learning and dmsae with the training-time BatchTopK, sparsify with its per-token TopK). "
               "The encoder matmul is timed in each precision (bf16: both operands already bfloat16) before and "
               "after the trainers.",
    "attribution": "Per-batch times, interleaved, median over batches (after one warm-up batch). The reference "
                   "runs the model with the layer-15 residual replaced by a leaf that requires grad and "
                   "backpropagates the same summed next-token loss: attribution's cost without the SAE. The ratio "
                   "is attribution's time over the reference's. The bf16 rows load the model with bfloat16 "
                   "autocast (`precision.lm: bf16`) for both attribution and its reference, interleaved with the "
                   "fp32 ones on the same batches and the same SAE.",
    "cache": "The real CLI in a subprocess, on a copy of the quickstart store (`store` and `report_dir` are not in "
             "any stage key, so the copy is exactly as cached), with its own Prefect home warmed up by one untimed "
             "run. The quickstart itself is never computed here.",
    "memory": "Peak RSS (VmHWM) of a fresh Python process that runs only that stage function "
              "(`stages.harvest.run` with its own model load; `dmsae.training.fit` for one epoch at batch 4096). "
              "The peak includes Python, torch and the model; the note gives the size the 4N activations would "
              "take if they were held in memory. N is at least one LM batch (harvest) and one full shuffle buffer "
              "(training: 16 chunks of 4096 rows), so the N run is not smaller for reasons unrelated to streaming. "
              "What keeps the peak flat: the shuffle buffer is filled by scattering each chunk straight to its "
              "shuffled rows (one buffer alive, not the three of concatenate-then-permute, which landed on top "
              "of training's own memory at every refill), and the harvest hands the heap's free pages back to "
              "the OS after each batch (glibc `malloc_trim`; without it the varying block sizes fragment the "
              "heap and RSS creeps up by about 10 MB a batch).",
}


def train_profile(ctx: Context) -> list[str]:
    prof = ctx.shared.get("train_profile")
    if not prof:
        return []
    ops, total = prof["ops"], sum(ms for _, ms in prof["ops"])
    top = ops[:12]
    lines = ["", f"Where the time of the step with the core and AuxK goes: torch.profiler over {prof['steps']} more "
             f"steps of that SAE as its run left it ({prof['n_dead']} dead latents), self time per operator in ms "
             f"per step (profiled step {prof['step_ms']:.0f} ms; the profiler adds a little to each operator call).",
             "", "| operator | ms/step | share |", "|---|---:|---:|"]
    lines += [f"| `{name}` | {ms:.1f} | {ms / total:.0%} |" for name, ms in top]
    rest = total - sum(ms for _, ms in top)
    lines += [f"| {len(ops) - len(top)} other operators | {rest:.1f} | {rest / total:.0%} |"]
    return lines


EXTRA: dict[str, Callable[[Context], list[str]]] = {"train": train_profile}

READING = {
    "train": [
        "", "Reading the profile. `addmm` is the encoder's dense product (and the core's small one), the floor "
        "of any step. The rest is work on the active entries (token, latent, value): BatchTopK keeps k_nc x 4096 "
        "of them, and AuxK adds each token's top k_aux = d/2 = 288 dead latents with a positive pre-activation, up "
        "to 4096 x 288 = 1.18M entries. With a core that fires on most tokens, dynamic L0 leaves k_nc near 1 and "
        "latents die by the thousand (as in the pipeline's own later cycles), so nearly every entry is AuxK's. Each "
        "entry is read by four passes: the decode (`_embedding_bag_forward_only`, one call for every group and "
        "AuxK), its value gradient (`_embedding_bag_per_sample_weights_backward`), and the decoder and the "
        "encoder gradients (`_embedding_bag_forward_only` again, one pass each, in latent order: the `sort`); "
        "AuxK's per-token `topk` over the dead latents, the gathers that order the entries (`index`) and "
        "casts and copies (`copy_`) come on top. Without dead latents the same step is the `dmsae step, no core` row.",
        "", "What would close the gap to 2x with this many dead latents: (1) one fused pass per latent that "
        "computes each entry's value gradient and its decoder and encoder contributions together, turning three "
        "passes over about a million rows of 576 floats into one; (2) a per-token threshold from a sample before "
        "AuxK's top-k, as BatchTopK already does for the whole batch, so that the top-k sorts a few hundred "
        "survivors per token instead of every dead latent. (1) needs a compiled kernel (C++ or Triton); "
        "`torch.compile` of the per-entry dot product alone measured 30 ms against the native kernel's 38 ms "
        "after a 15 s compile, so the step stays in plain PyTorch operators.",
    ],
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--quick", dest="mode", action="store_const", const="quick", help="under 5 minutes (default)")
    group.add_argument("--full", dest="mode", action="store_const", const="full", help="the figures to quote")
    ap.add_argument("--out", default=str(GENERATED), help="markdown output, overwritten (default: "
                    f"{GENERATED.relative_to(REPO)}; never {NOTES.name}, which holds the hand-written notes)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--only", default=",".join(BENCHES), help=f"comma-separated subset of {','.join(BENCHES)}")
    ap.add_argument("--quickstart-store", default=str(REPO / "artifacts"),
                    help="store holding the completed quickstart, for the cache benchmark (default: artifacts)")
    ap.add_argument("--note", default="", help="a line to print at the top of the markdown")
    ap.add_argument("--keep-work", action="store_true", help="keep the scratch folder under bench/results/")
    ap.add_argument("--render", metavar="RAW.json",
                    help="measure nothing: rewrite --out from a raw result of an earlier run (bench/results/*.json)")
    args = ap.parse_args(argv)
    args.mode = args.mode or "quick"
    if Path(args.out).resolve() == NOTES.resolve():
        ap.error(f"--out {args.out}: {NOTES.name} holds the hand-written notes; write the generated tables elsewhere "
                 f"(default {GENERATED.relative_to(REPO)})")
    unknown = set(args.only.split(",")) - set(BENCHES)
    if unknown:
        ap.error(f"--only: unknown benchmark(s) {sorted(unknown)}; choose from {','.join(BENCHES)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: no CUDA device is available here")
    return args


def ratio_text(r: Row) -> str:
    return "-" if r.ratio is None else f"{r.ratio:.2f}x"


def result_text(r: Row) -> str:
    if r.passed is None:
        return "not measured" if r.value is None and r.target else ""
    return "PASS" if r.passed else "MISS"


def table(rows: list[Row]) -> list[str]:
    out = ["| measured | value | unit | compared with | its value | ratio | target | result | notes |",
           "|---|---:|---|---|---:|---:|---|---|---|"]
    for r in rows:
        cells = [r.what, fmt(r.value), r.unit, r.versus, fmt(r.versus_value), ratio_text(r), r.target,
                 result_text(r), r.note]
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return out


def notes_link(out: Path) -> str:
    """A link to the notes from where `out` lies; outside the repository (a GPU machine's $OUT, copied into docs/
    later) a relative link would point nowhere, so it names the file at the repository's root instead."""
    parent = Path(out).resolve().parent
    if not parent.is_relative_to(REPO):
        return f"{NOTES.name} at the repository's root"
    return f"[{NOTES.name}]({Path(os.path.relpath(NOTES, parent)).as_posix()})"


def markdown(report: dict, out: Path = GENERATED) -> str:
    m = report["machine"]
    lines = [f"> Generated by `python -m bench.run`; do not edit: the next run overwrites this file. Notes, readings "
             f"and the targets we quote are in {notes_link(out)}.", "",
             "# Benchmarks: the tables of the last run", ""]
    if report["note"]:
        lines += [f"> {report['note']}", ""]
    lines += [f"Made by `{report['command']}` on {report['date']} ({report['mode']} mode, "
              f"{report['wall_s'] / 60:.1f} min in all). Every benchmark ran in this one process tree; each figure "
              "is a median over repeats (counts in the notes), and the ratios, measured side by side in the same "
              "run, are the figures that count: the machine is shared and its absolute speed varies.", ""]
    lines += ["## Machine", "", "| | |", "|---|---|"]
    load = m.get("load_average_start")
    load_end = m.get("load_average_end")
    flags = m.get("cpu_bf16_flags")  # absent from raw results made before it was recorded
    flags_text = "not recorded" if flags is None else ", ".join(f"`{f}`" for f in flags) or "none"
    items = [("CPU", f"{m['cpu']}, {m['cores']} cores visible"),
             ("CPU bf16 flags (`lscpu`: amx_bf16, amx_tile, avx512_bf16, avx512_fp16)", flags_text),
             ("RAM", f"{m['ram_gib']:.1f} GiB" if m.get("ram_gib") else "?"),
             ("torch", f"{m['torch']}, {m['torch_threads']} threads"), ("transformers", m["transformers"]),
             ("Python", m["python"]), ("OS", m["os"]), ("device", m["device"] + (f" ({m['gpu']})" if m["gpu"] else "")),
             ("torch parallel backend", m.get("parallel_backend", "?")),
             ("environment", ", ".join(f"`{k}={v}`" for k, v in m.get("env", {}).items()) or "no threading or "
              "allocator variables set (OMP_WAIT_POLICY, GOMP_SPINCOUNT, GLIBC_TUNABLES, ...)"),
             ("load average (1, 5, 15 min)", f"{_load(load)} at the start, {_load(load_end)} at the end")]
    lines += [f"| {k} | {v} |" for k, v in items]
    lines += [""]
    if not report["cuda_available"]:
        lines += ["No GPU was available to this task: the harness takes `--device cuda` "
                  "(`.venv/bin/python -m bench.run --full --device cuda`), but no GPU table has been measured.", ""]
    lines += ["## Targets", "", "| benchmark | measured | ratio | target | result |", "|---|---|---:|---|---|"]
    for name, section in report["benchmarks"].items():
        for r in section["rows"]:
            row = Row(**r)
            if row.target:
                lines.append(f"| {name} | {row.what} | {ratio_text(row) if row.ratio is not None else fmt(row.value)} "
                             f"| {row.target} | {result_text(row) or '-'} |")
    lines += [""]
    for name, section in report["benchmarks"].items():
        lines += [f"## {BENCHES[name][0]}", "", EXPLAIN[name], ""]
        lines += table([Row(**r) for r in section["rows"]])
        lines += section.get("extra", [])
        if section.get("extra"):
            lines += READING.get(name, [])
        lines += ["", f"({section['seconds']:.0f} s)", ""]
    lines += ["## Reproduce", "", "```bash",
              "# the anchors, once, in their own environment bench/.venv (never project dependencies): the pins of",
              "# bench/requirements-anchors.txt, CPU torch, torchvision removed (it does not load against it)",
              "make bench-venv",
              report["command"], "```", ""]
    return "\n".join(lines)


def _without_note(argv: list[str]) -> list[str]:
    """The command line as quoted in the markdown: --note only labels the file, it changes no figure."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--note":
            skip = True
        elif not a.startswith("--note="):
            out.append(a)
    return out


def _load(load: list[float] | tuple[float, ...] | None) -> str:
    return "?" if not load else ", ".join(f"{x:.2f}" for x in load)


def render(raw: Path, out: Path) -> int:
    try:
        report = json.loads(raw.read_text())
    except (OSError, ValueError) as e:
        print(f"bench: --render {raw}: not a readable raw result ({e})", file=sys.stderr)
        return 2
    out.write_text(markdown(report, out))
    log(f"wrote {out} from {raw}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        return render(Path(args.render), Path(args.out))
    mode = MODES[args.mode]
    machine = machine_info(args.device, args.threads)  # before set_threads, which exports OMP_NUM_THREADS
    set_threads(args.threads)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    RESULTS.mkdir(parents=True, exist_ok=True)
    work = RESULTS / f"work-{stamp}"
    work.mkdir(parents=True)
    command = ".venv/bin/python -m bench.run " + " ".join(shlex.quote(a) for a in _without_note(argv or sys.argv[1:]))
    ctx = Context(mode=mode, device=args.device, threads=args.threads, work=work,
                  quickstart_store=Path(args.quickstart_store).resolve())
    started = time.perf_counter()
    log(f"{mode.name} mode on {machine['cpu']} ({machine['cores']} cores), torch {machine['torch']}, "
        f"{args.threads} threads, device {args.device}; load average {_load(machine['load_average_start'])}")
    report: dict = {"command": command.strip(), "mode": mode.name, "date": time.strftime("%Y-%m-%d %H:%M UTC",
                    time.gmtime()), "note": args.note, "machine": machine, "benchmarks": {},
                    "cuda_available": torch.cuda.is_available(), "mode_settings": mode.__dict__}
    try:
        t0 = time.perf_counter()
        ctx.shared.update(materialize_inputs())
        log(f"bench inputs (model and tokens stages of the bench store) ready in {time.perf_counter() - t0:.1f} s")
        for name in args.only.split(","):
            title, fn = BENCHES[name]
            log(f"--- {title}")
            t0 = time.perf_counter()
            try:
                rows = fn(ctx)
            except Exception as e:  # noqa: BLE001 - one failing benchmark must not lose the others
                traceback.print_exc()
                rows = [Row(f"{name} benchmark failed", None, "", note=f"error: {type(e).__name__}: {e}")]
            seconds = time.perf_counter() - t0
            report["benchmarks"][name] = {"rows": [r.to_dict() for r in rows], "seconds": seconds,
                                          "extra": EXTRA.get(name, lambda _: [])(ctx)}
            log(f"{name}: {seconds:.0f} s")
        report["raw"] = {"train": ctx.shared.get("train_raw"), "anchors": ctx.shared.get("anchors_raw")}
    finally:
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    machine["load_average_end"] = load_average()
    report["wall_s"] = time.perf_counter() - started
    raw_path = RESULTS / f"{stamp}-{mode.name}.json"
    raw_path.write_text(json.dumps(report, indent=1, default=str))
    text = markdown(report, Path(args.out))
    Path(args.out).write_text(text)
    print(text)
    log(f"wrote {args.out} and {raw_path.relative_to(REPO)} in {report['wall_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The quality cost of bf16, measured: the quickstart run twice at equal steps, `precision.sae` (or, with `--field
lm`, `precision.lm`: the model's forward in harvest, attribution, evaluation and probes) fp32 and bf16, the other
field fp32 in both (same data order, same initialisation), compared on every evaluated SAE (explained variance,
CE-loss score, dead fraction) and on the distillation (training FVU and the core chosen at each cycle: Jaccard
overlap of the selected latents' ids); for `lm`, also the harvested activations themselves.

    .venv/bin/python -m bench.precision_quality [--field sae|lm] [--store DIR] [--out FILE] [--compare-only]
                                                [--set KEY=VALUE ...] [--emulate] [--noise-floor N]

Targets (issue 25): |dFVU| <= 0.005, |dCE-loss score| <= 0.002, core overlap >= 0.9 Jaccard. Writes the table to
docs/benchmarks-precision.md (`sae`) or docs/benchmarks-precision-lm.md (`lm`), generated, or to --out (one file
per machine). Needs a CPU (or GPU) with native bfloat16: elsewhere the bf16 arm is refused, and this says so first;
with `--field lm --emulate` the bf16 arm runs with bf16 units emulated in float32 (bench/bf16_emulation.py), which
measures bf16's quality cost (not its speed) on any CPU. With `--noise-floor N`, N more runs: the fp32 arm with
`train.lr` changed in its last bits (x (1 + n 2^-20), n = 1..N), each compared with the fp32 arm on the same
measures: how far the pipeline's results move under a change far smaller than bf16's, the scale against which
bf16's moves are read.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "quickstart.yaml"
OUT = {"sae": REPO / "docs" / "benchmarks-precision.md", "lm": REPO / "docs" / "benchmarks-precision-lm.md"}
TARGETS = {"fvu": 0.005, "ce_loss_score": 0.002, "jaccard": 0.9}
NUDGE = 2.0**-20  # the noise floor's learning rates are lr x (1 + n NUDGE): every Adam step moves in its last bits


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "unknown")


class RunFailed(Exception):
    pass


def run(sets: list[str], env: dict[str, str], emulate: bool = False) -> float:
    start = time.perf_counter()
    cli = "bench.bf16_emulation" if emulate else "flows.cli"  # the same command line, bf16 units emulated
    done = subprocess.run([sys.executable, "-m", cli, "run", str(CONFIG), "--no-progress",
                           *[a for s in sets for a in ("--set", s)]], cwd=REPO, env=env)
    if done.returncode:
        name = next((s.split("=", 1)[1] for s in sets if s.startswith("name=")), "a")
        raise RunFailed(f"the {name} run exited {done.returncode} (its messages are above); the store keeps what "
                        "it finished, so the same command resumes it")
    return time.perf_counter() - start


def arms(field: str, store: str, extra: list[str]) -> dict[str, list[str]]:
    """The two runs' overrides: `precision.<field>` fp32 and bf16, the other field fp32 in both. The fp32 arm is
    the same config whichever the field, so its stages are computed once for both tables."""
    other = "lm" if field == "sae" else "sae"
    common = [f"store={store}", "interpret.enabled=false", f"precision.{other}=fp32", *extra]
    return {p: [*common, f"precision.{field}={p}", f"name=precision-{field}-{p}"] for p in ("fp32", "bf16")}


def nudged(fp32: list[str], field: str, n: int = 1) -> list[str]:
    """The fp32 arm's overrides with its learning rate times (1 + n NUDGE), under a name of its own."""
    from dmsae.config import load_config

    lr = load_config(CONFIG, fp32).train.lr * (1 + n * NUDGE)
    return [*(s for s in fp32 if not s.startswith("name=")), f"train.lr={lr!r}", f"name=precision-{field}-nudged-{n}"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--field", choices=["sae", "lm"], default="sae", help="which precision setting to compare")
    ap.add_argument("--store", default=str(REPO / "artifacts"), help="store (the quickstart's is reused)")
    ap.add_argument("--out", help="the generated table's file (default: docs/benchmarks-precision[-lm].md)")
    ap.add_argument("--set", action="append", default=[], help="extra overrides for both runs")
    ap.add_argument("--compare-only", action="store_true", help="run nothing: compare what the store holds")
    ap.add_argument("--emulate", action="store_true",
                    help="with --field lm on a CPU without bf16 units: emulate them (bench.bf16_emulation)")
    ap.add_argument("--noise-floor", type=int, default=0, metavar="N",
                    help="also run fp32 N times with train.lr x (1 + n 2^-20) and compare each with fp32 the same way")
    args = ap.parse_args(argv)
    if args.noise_floor < 0:
        print(f"bench.precision_quality: --noise-floor takes a number of runs (0 or more), not {args.noise_floor}",
              file=sys.stderr)
        return 2
    from dmsae import precision

    device = next((s.split("=", 1)[1] for s in reversed(args.set) if s.startswith("device=")), "cpu")
    if args.emulate:
        if args.field != "lm" or device != "cpu":  # the SAE step calls bf16 kernels directly, outside autocast
            print("bench.precision_quality: --emulate emulates the CPU's autocast, so it takes --field lm on the "
                  "cpu device only", file=sys.stderr)
            return 2
        from bench import bf16_emulation

        bf16_emulation.install()  # planning the bf16 arm (compare) resolves precision.lm=bf16 here too
    native, why = precision.native_bf16(device)
    if not native:  # planning the bf16 arm refuses it, so even --compare-only needs native bf16
        print(f"bench.precision_quality: {why} on {device}, so the bf16 arm would be refused; run this where "
              "bfloat16 is native (a CPU with amx_bf16 or avx512_bf16, or a GPU with --set device=cuda)"
              + (", or with --field lm --emulate" if device == "cpu" else ""), file=sys.stderr)
        return 2
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    runs = arms(args.field, args.store, args.set)
    for n in range(1, args.noise_floor + 1):
        runs[f"nudged {n}"] = nudged(runs["fp32"], args.field, n)
    try:
        wall = {} if args.compare_only else {name: run(sets, env, args.emulate and name == "bf16")
                                             for name, sets in runs.items()}
    except RunFailed as e:
        print(f"bench.precision_quality: {e}", file=sys.stderr)
        return 1
    table, summary, worst = compare(runs, activations_too=args.field == "lm", emulated=args.emulate)
    floor = "" if not args.noise_floor else noise_floor(runs, worst, args.noise_floor)
    text = "\n".join([
        "<!-- generated by `python -m bench.precision_quality`; do not edit -->",
        f"# precision.{args.field}: bf16 against fp32 on the quickstart ({cpu_model()}, {time.strftime('%Y-%m-%d')})",
        "",
        "Equal steps, same data order and initialisation; interpretation stages off."
        + (" **bf16 emulated** (`--emulate`, bench/bf16_emulation.py): each matmul of the autocast computed in float32 "
           "from bfloat16-rounded inputs and rounded to bfloat16, what bf16 units compute up to the order of the "
           "sums; the times are not bf16's." if args.emulate else "")
        + (f" Wall time of each run (the stages both share, model to harvest and the baseline, computed by the "
           f"first only, so not a speed comparison): fp32 {wall['fp32']:.0f} s, bf16 {wall['bf16']:.0f} s."
           if wall else ""),
        "",
        table,
        "",
        summary,
    ]) + floor
    print(text)
    Path(args.out or OUT[args.field]).write_text(text + "\n")
    return 0


def compare(arms: dict[str, list[str]], activations_too: bool = False, emulated: bool = False, other: str = "bf16",
            with_speed: bool = True) -> tuple[str, str, dict[str, Any]]:
    """The fp32 arm against `other` (the bf16 arm, or a noise floor's run): the table of every evaluated SAE, the
    verdict lines, and the worst moves (|dFVU|, |dCE| and its SAE, the cores' Jaccard per cycle)."""
    import pandas as pd

    from dmsae import readers
    from dmsae.config import load_config
    from dmsae.reports.tables import md_table, results_table
    from dmsae.stores import store_for
    from flows.pipeline import plan

    tables, cores, fvus, seconds, harvests = {}, {}, {}, {}, {}
    for name, sets in ((name, arms[name]) for name in ("fp32", other)):
        cfg = load_config(CONFIG, sets)
        p, store = plan(cfg), store_for(cfg)
        manifests = {n.label: store.manifest(n.stage, n.key) for n in p.nodes}  # each read once
        seconds[name] = {n.label: (n.stage, n.key, manifests[n.label].timings.get("seconds", 0.0)) for n in p.nodes}
        tables[name] = results_table(store, p).set_index("sae")
        cores[name] = [{tuple(r) for r in readers.core(store.load("select", n.key))["lineage"].tolist()}
                       for n in p.of_stage("select")]
        fvus[name] = [manifests[n.label].metrics["train_fvu"] for n in p.of_stage("train")]
        if activations_too:
            harvests[name] = [store.load("harvest", n.key).path for n in p.of_stage("harvest")]
    a, b = tables["fp32"], tables[other]
    rows = pd.DataFrame({
        "fvu fp32": 1 - a.explained_variance, f"fvu {other}": 1 - b.explained_variance,
        "dFVU": (1 - b.explained_variance) - (1 - a.explained_variance),
        "CE fp32": a.ce_loss_score, f"CE {other}": b.ce_loss_score, "dCE": b.ce_loss_score - a.ce_loss_score,
        "dead fp32": a.dead_fraction, f"dead {other}": b.dead_fraction,
    }).reset_index()
    jaccard = [len(x & y) / max(1, len(x | y)) for x, y in zip(cores["fp32"], cores[other], strict=True)]
    worst_fvu, worst_ce = float(rows.dFVU.abs().max()), float(rows.dCE.abs().max())
    cycles = "; ".join(f"cycle {i}: train FVU {f:.4f} vs {g:.4f}, core Jaccard {j:.2f}"
                       for i, (f, g, j) in enumerate(zip(fvus["fp32"], fvus[other], jaccard, strict=True)))
    verdict = [
        f"- largest |dFVU| {worst_fvu:.4f} (target <= {TARGETS['fvu']}): "
        + ("meets it" if worst_fvu <= TARGETS["fvu"] else "misses it"),
        f"- largest |dCE-loss score| {worst_ce:.4f} (target <= {TARGETS['ce_loss_score']}): "
        + ("meets it" if worst_ce <= TARGETS["ce_loss_score"] else "misses it"),
        f"- core overlap (Jaccard of lineage ids) per cycle: {', '.join(f'{j:.2f}' for j in jaccard)} (target >= "
        f"{TARGETS['jaccard']}): " + ("meets it" if min(jaccard) >= TARGETS["jaccard"] else "misses it"),
        f"- {cycles}",
    ]
    if with_speed and not emulated:  # emulated bf16 runs at float32's speed plus the roundings: no bf16 speed
        verdict.append(speed(seconds["fp32"], seconds[other]))
    if activations_too:
        verdict.append(activation_errors(harvests["fp32"], harvests["bf16"]))
        verdict.append(evaluation_only(arms))
    return md_table(rows, floatfmt="{:.4f}"), "\n".join(verdict), {
        "fvu": worst_fvu, "ce": worst_ce, "ce_sae": str(rows.sae[rows.dCE.abs().idxmax()]), "jaccard": jaccard}


def noise_floor(arms: dict[str, list[str]], bf16: dict[str, Any], runs: int) -> str:
    """The noise floor's section: each nudged fp32 run against fp32 beside bf16 against fp32, then the first nudged
    run's table."""
    import pandas as pd

    from dmsae.reports.tables import md_table

    found = {"bf16": bf16}
    first = ""
    for n in range(1, runs + 1):
        table, _, found[f"fp32, lr x (1 + {n} 2^-20)"] = compare(arms, other=f"nudged {n}", with_speed=False)
        first = first or table
    summary = pd.DataFrame([{
        "against fp32": name, "largest \\|dFVU\\|": w["fvu"], "largest \\|dCE\\|": w["ce"], "its SAE": w["ce_sae"],
        "core Jaccard per cycle": ", ".join(f"{j:.2f}" for j in w["jaccard"]),
    } for name, w in found.items()])
    return "\n".join([
        "", "", "## The noise floor: fp32 against fp32 with its learning rate moved in the last bits", "",
        f"{runs} more fp32 runs, each with `train.lr` x (1 + n 2^-20): every Adam step differs from the fp32 arm's in "
        "its last bits, a change far smaller than bf16's. How far they move the same measures is the scale for "
        "bf16's moves (targets: |dFVU| <= 0.005, |dCE| <= 0.002, Jaccard >= 0.9).", "",
        md_table(summary, floatfmt="{:.4f}"), "", "The first of them, SAE by SAE:", "", first])


def evaluation_only(arms: dict[str, list[str]]) -> str:
    """The fp32 arm's SAEs evaluated again with the language model in bf16 (the fp32 arm with precision.eval=bf16:
    new baseline and evaluate nodes, computed here into the store, once): how far bf16 moves the metrics themselves,
    apart from the other SAEs that its harvest trains."""
    from dmsae.config import load_config
    from dmsae.runtime import Runtime
    from dmsae.stores import store_for
    from flows.pipeline import materialize, plan

    cfg32, cfg_eval = (load_config(CONFIG, arms["fp32"] + extra) for extra in ([], ["precision.eval=bf16"]))
    store, rt = store_for(cfg32), Runtime(device=cfg32.device, show_progress=False)
    again = {n.label: n for n in plan(cfg_eval).nodes if n.stage in ("baseline", "evaluate")}
    materialize(store, again["baseline"], rt)
    moves = []
    for node in plan(cfg32).of_stage("evaluate"):
        after = materialize(store, again[node.label], rt)[0].metrics
        before = store.load(node.stage, node.key).metrics
        moves.append((node.label, before["explained_variance"] - after["explained_variance"],
                      after["ce_loss_score"] - before["ce_loss_score"]))
    fvu = max(moves, key=lambda m: abs(m[1]))
    ce = max(moves, key=lambda m: abs(m[2]))
    return (f"- the fp32 arm's {len(moves)} SAEs evaluated again with the language model in bf16 "
            f"(`precision.eval=bf16`, the baseline too): largest |dFVU| {abs(fvu[1]):.4f} (`{fvu[0]}`), "
            f"largest |dCE-loss score| {abs(ce[2]):.4f} (`{ce[0]}`): what bf16 moves the metrics by, apart from "
            "the other SAEs trained on its harvest")


def activation_errors(fp32: list[Path], bf16: list[Path]) -> str:
    """How far the bf16 forward's harvested rows are from float32's, per harvest of the plan."""
    from bench.harvest import row_errors
    from dmsae.activations import ARRAY

    parts = []
    for a, b in zip(fp32, bf16, strict=True):
        if not (a / ARRAY).exists() or not (b / ARRAY).exists():
            parts.append("a harvest in parts (`harvest.parts`): rows not compared")
            continue
        err = row_errors(a, b)
        parts.append("rows that could not be paired" if err is None else
                     f"median {err[0]:.4f}, 99th percentile {err[1]:.4f} over the {err[2]} rows both kept ({err[3]} "
                     "kept by one only: the outlier filter)")
    return "- harvested activations, per row ||bf16 - fp32|| / ||fp32||: " + "; ".join(parts)


def speed(fp32: dict[str, tuple[str, str, float]], bf16: dict[str, tuple[str, str, float]]) -> str:
    """The compute seconds (from the manifests) of the stages the precision changes, the same stages on each side:
    those whose keys differ between the arms (a stage both share was computed once, by whichever arm ran first).
    Each side maps a stage's label to (stage, key, seconds)."""
    changed = [label for label, (_, key, _) in bf16.items() if fp32[label][1] != key]
    parts = []
    for what, stages in (("all", None), ("SAE training (train, reuse)", {"train", "reuse"})):
        labels = [label for label in changed if stages is None or bf16[label][0] in stages]
        a, b = (sum(side[label][2] for label in labels) for side in (fp32, bf16))
        parts.append(f"{what}: fp32 {a:.0f} s, bf16 {b:.0f} s ({a / max(b, 1e-9):.2f}x)")
    return (f"- compute time of the {len(changed)} stages whose keys the precision changes (seconds from their "
            f"manifests; the shared stages excluded): " + "; ".join(parts))


if __name__ == "__main__":
    sys.exit(main())

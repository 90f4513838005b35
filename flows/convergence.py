"""The convergence study: how a no-core SAE's quality moves with its training tokens (issue 26, item 1).

    python -m flows.convergence configs/quickstart.yaml --budgets 1,4,16,64 --seeds 0,1

One base preset, cycle 0 only (a no-core Matryoshka SAE, the arm every comparison is made against), trained
for a geometric series of token budgets and evaluated on the held-out split. A budget is a number of epochs
over the preset's harvest: the embedded corpus holds about 1.4M English tokens, so past one epoch the SAE sees
the same activations again (the study says so; held-out FVU shows whether repetition overfits). Each point is
the ordinary `train[0]` and `evaluate[cycle=0]` stages of the preset with `train.epochs` set, so everything
is cached and keyed in the preset's store, the harvest is shared by every point, and a stopped study resumes
where it stopped (a killed training resumes from its checkpoint). `--report-only` renders what the store has.

The report (dmsae.reports.convergence) plots FVU, CE-loss score, dead fraction and the cross-seed overlap of
the first two seeds against tokens, and says where each flattens.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from dmsae.config import Config, load_config
from dmsae.errors import UserError
from dmsae.plan import ancestors
from dmsae.reports.convergence import study_nodes, write_convergence_report
from dmsae.stores import store_for
from flows.distill import execute
from flows.pipeline import plan

DEFAULT_BUDGETS = (1, 4, 16, 64)  # epochs over the harvest: a geometric series of training tokens


def point_config(base: Config, epochs: int, seed: int) -> Config:
    """The preset as one point of the study: cycle 0 trained for `epochs` with `seed`, and nothing reused."""
    data = base.model_dump(mode="json")
    data["cycles"] = 1
    data["seed"] = seed
    data["train"]["epochs"] = epochs
    return Config.model_validate(data)


@flow(name="dmsae-convergence", task_runner=ThreadPoolTaskRunner(max_workers=1), log_prints=True)
def convergence_flow(config: dict, show_progress: bool = False) -> dict:
    """Compute one point (its evaluation and everything it needs, each Cached when the store has it)."""
    cfg = Config.model_validate(config)
    store = store_for(cfg)
    _, evaluate = study_nodes(plan(cfg))
    todo = {(a.stage, a.key): a for a in [*ancestors(evaluate), evaluate]}
    computed, failure = execute(list(todo.values()), cfg, store, show_progress)
    if failure is not None:
        return failure  # type: ignore[return-value]
    return {"computed": computed}


def parse_ints(flag: str, text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag}: {text!r} is not a comma-separated list of integers") from None
    lowest = 1 if flag == "--budgets" else 0  # at least one epoch; seeds from 0
    if not values or min(values) < lowest:
        raise UserError(f"{flag}: give one or more integers >= {lowest} (got {text!r})")
    return values


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.convergence", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="base preset, e.g. configs/quickstart.yaml")
    ap.add_argument("--budgets", default=",".join(map(str, DEFAULT_BUDGETS)), help="epochs over the harvest")
    ap.add_argument("--seeds", default="0,1", help="seeds; the first two give the cross-seed overlap")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every point")
    ap.add_argument("--out", default="docs/results/convergence", help="report folder")
    ap.add_argument("--report-only", action="store_true", help="render what the store has; compute nothing")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        base = load_config(args.config, args.set)
        budgets, seeds = parse_ints("--budgets", args.budgets), parse_ints("--seeds", args.seeds)
        configs = [point_config(base, e, s) for e in sorted(budgets) for s in seeds]  # small budgets first
        points = [(cfg, plan(cfg)) for cfg in configs]
    except UserError as e:
        print(f"dmsae: error: {e}", file=sys.stderr)
        return 2
    command = "python -m flows.convergence " + " ".join(argv if argv is not None else sys.argv[1:])
    if not args.report_only:
        for i, (cfg, _) in enumerate(points):
            print(f"convergence: point {i + 1}/{len(points)}: epochs {cfg.train.epochs}, seed {cfg.seed}",
                  file=sys.stderr, flush=True)
            start = time.perf_counter()
            state = convergence_flow(cfg.model_dump(mode="json"), not args.no_progress, return_state=True)
            if state.is_failed():
                print(f"dmsae: error: {state.message}", file=sys.stderr)
                return 1
            print(f"convergence: done in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
            write_convergence_report(points, Path(args.out), command)
    print(write_convergence_report(points, Path(args.out), command))
    return 0


if __name__ == "__main__":
    sys.exit(main())

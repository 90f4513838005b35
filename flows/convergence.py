"""The convergence study: how a no-core SAE's quality moves with its training tokens (issue 26, item 1).

    dmsae converge configs/quickstart.yaml --budgets 1,4,16,64 --seeds 0,1

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

import sys
import time
from pathlib import Path

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from dmsae.config import Config
from dmsae.errors import UserError
from dmsae.plan import ancestors
from dmsae.reports.convergence import Point, study_nodes, write_convergence_report
from dmsae.reports.tables import interim_report
from dmsae.stores import store_for
from flows.distill import execute
from flows.pipeline import plan


def point_config(base: Config, epochs: int, seed: int) -> Config:
    """The preset as one point of the study: cycle 0 trained for `epochs` with `seed`, and nothing reused."""
    data = base.model_dump(mode="json")
    data["cycles"] = 1
    data["seed"] = seed
    data["train"]["epochs"] = epochs
    if not data["reuse"]["k"]:  # the plan evaluates cycle SAEs only beside reuse arms (never run here, no key)
        data["reuse"]["k"] = [data["sae"]["k"]]
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


def study_points(base: Config, budgets: list[int], seeds: list[int]) -> list[Point]:
    """Every (epochs, seed) point with its plan, small budgets first (they finish first and share the harvest)."""
    configs = [point_config(base, e, s) for e in sorted(set(budgets)) for s in seeds]
    return [(cfg, plan(cfg)) for cfg in configs]


def run_convergence(points: list[Point], out: Path, command: str, report_only: bool = False,
                    show_progress: bool = False) -> Path:
    """Compute every point (unless `report_only`), rewriting the report after each; returns the report's path.
    A failed point stops the study with its one-line message (the next run resumes where it stopped)."""
    if not report_only:
        for i, (cfg, _) in enumerate(points):
            print(f"convergence: point {i + 1}/{len(points)}: {cfg.train.epochs:g} epoch(s), seed {cfg.seed}",
                  file=sys.stderr, flush=True)
            start = time.perf_counter()
            state = convergence_flow(cfg.model_dump(mode="json"), show_progress, return_state=True)
            if state.is_failed():
                raise UserError(f"convergence point ({cfg.train.epochs:g} epochs, seed {cfg.seed}): {state.message}")
            print(f"convergence: point {i + 1} done in {time.perf_counter() - start:.0f} s", file=sys.stderr,
                  flush=True)
            interim_report(lambda: write_convergence_report(points, out, command), "convergence")
    return write_convergence_report(points, out, command)


def main(argv: list[str] | None = None) -> int:
    """`python -m flows.convergence ...` is `dmsae converge ...` (the CLI turns telemetry off and sets threads)."""
    from flows.cli import main as cli_main

    return cli_main(["converge", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())

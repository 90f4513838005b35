"""The core-gate ablation (`dmsae ablate`): one whole distillation per (gate, cap, seed) from a base preset, its
reuse arms evaluated, and every arm compared with no core (and distilled with random) at equal total L0.

    dmsae ablate configs/quickstart.yaml --gates relu,relu_bias,topk --caps none,0.6 --seeds 0,1,2

Each point is an ordinary run (`<base name>-<gate>-cap<cap>-s<seed>`) of the `dmsae-distill` flow in one
store, so everything two points share is computed once: cycle 0, its attribution and the no-core arm are
the same for every gate at a seed, and a cap shares its cycle-0 selection. Points run one after the other
(the runs' stages use every core); the report (dmsae.reports.ablation) is rewritten after each point, so a
stopped ablation keeps what it finished, and a re-run computes only what is missing. `--report-only` renders
what the store has. `--noise-floor-seed S` also trains the no-core arm with seed S (only its own stages, in
the `dmsae-noise-floor` flow) and reads it against the first seed's no-core curve.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from dmsae.config import Config, load_config
from dmsae.errors import UserError
from dmsae.plan import ancestors
from dmsae.reports.ablation import write_ablation_report
from dmsae.reports.noise_floor import NoiseFloor, no_core_nodes, noise_floor, noise_floor_text
from dmsae.reports.tables import interim_report
from dmsae.stores import AnyStore, store_for
from flows.distill import execute
from flows.pipeline import plan


def point_name(base: str, gate: str, cap: str, seed: int) -> str:
    return f"{base}-{gate}-cap{cap}-s{seed}"


def point_config(base_path: str, overrides: list[str], gate: str, cap: str, seed: int) -> Config:
    """The base preset as the point (gate, cap, seed) of the ablation."""
    base = load_config(base_path, overrides)
    return load_config(base_path, [*overrides, f"name={point_name(base.name, gate, cap, seed)}", f"seed={seed}",
                                   f"sae.core_gate={gate}", f"selection.max_core={'null' if cap == 'none' else cap}",
                                   # one seed per point: the seeds are separate points, so no second one inside
                                   f"reuse.consistency_seeds=[{seed}, {seed}]"])


def parse_points(text: str) -> list[tuple[str, str]]:
    """'topk:0.6,relu:none' -> [('topk', '0.6'), ('relu', 'none')]."""
    variants = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        gate, sep, cap = item.partition(":")
        if not sep or not gate.strip() or not cap.strip():
            raise UserError(f"--points: {item!r} is not GATE:CAP (e.g. topk:0.6 or relu:none)")
        variants.append((gate.strip(), cap.strip()))
    return variants


def parse_ints(flag: str, text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]; anything else is refused in one line naming the flag."""
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"{flag} {text}: expected comma-separated integers, e.g. {flag} 0,1,2") from None


@dataclass
class Ablation:
    """What `dmsae ablate` was asked for, its points validated."""

    config: str
    sets: list[str]
    base: Config  # the preset with --set applied: its store, report folder and threads
    points: list[Config]
    grid: list[str]  # the flags that chose the points, as typed (for the reproduce line)
    seeds: str
    out: Path
    probe_without_core: bool = False
    noise_seed: int | None = None
    noise_ks: list[int] = field(default_factory=list)
    noise_config: Config | None = None

    @property
    def command(self) -> str:
        """The command line that reproduces the report."""
        flags = [self.config, *self.grid, f"--seeds {self.seeds}", *(f"--set {s}" for s in self.sets)]
        if self.probe_without_core:
            flags.append("--probe-without-core")
        if self.noise_seed is not None:
            flags += [f"--noise-floor-seed {self.noise_seed}", f"--noise-floor-k {','.join(map(str, self.noise_ks))}"]
        return "dmsae ablate " + " ".join(flags)


def ablation_from_args(config: str, sets: list[str], gates: str, caps: str, seeds: str, points: str | None,
                       out: str | None, probe_without_core: bool = False, noise_seed: int | None = None,
                       noise_k: str | None = None) -> Ablation:
    """Validate the grid and build every point's config; a mistake is a UserError naming the flag."""
    seed_list = parse_ints("--seeds", seeds)
    variants = parse_points(points) if points is not None else [
        (g.strip(), c.strip()) for g in gates.split(",") if g.strip() for c in caps.split(",") if c.strip()]
    if not seed_list or not variants:
        raise UserError("--gates, --caps (or --points) and --seeds each need at least one value")
    point_cfgs = [point_config(config, sets, g, c, s) for s in seed_list for g, c in variants]
    base = load_config(config, sets)
    grid = [f"--points {points}"] if points is not None else [f"--gates {gates}", f"--caps {caps}"]
    ablation = Ablation(config, sets, base, point_cfgs, grid, seeds,
                        Path(out) if out else Path(base.report_dir) / f"{base.name}-ablation", probe_without_core)
    if noise_k is not None and noise_seed is None:
        raise UserError("--noise-floor-k needs --noise-floor-seed, e.g. --noise-floor-seed 1 --noise-floor-k 20,40")
    if noise_seed is not None:
        if noise_seed == seed_list[0]:
            raise UserError(f"--noise-floor-seed {noise_seed}: that is the reference seed (the first of --seeds); "
                            "choose another seed")
        reuse_k = point_cfgs[0].reuse.k
        ks = parse_ints("--noise-floor-k", noise_k) if noise_k is not None else list(reuse_k)
        unknown = [k for k in ks if k not in reuse_k]
        if not ks or unknown:
            raise UserError(f"--noise-floor-k {noise_k}: give values among reuse.k ({', '.join(map(str, reuse_k))})")
        gate, cap = variants[0]
        ablation.noise_seed, ablation.noise_ks = noise_seed, ks
        ablation.noise_config = point_config(config, sets, gate, cap, noise_seed)
    return ablation


def run_point(cfg: Config) -> tuple[bool, float, list[str]]:
    """(ok, seconds, stages computed) of one point through the Prefect flow."""
    from flows.distill import distill

    start = time.perf_counter()
    state = distill(cfg.model_dump(mode="json"), show_progress=False, return_state=True)
    if state.is_failed():
        print(f"ablation: {cfg.name} failed: {state.message}", file=sys.stderr, flush=True)
        return False, time.perf_counter() - start, []
    return True, time.perf_counter() - start, state.result()["computed"]


@flow(name="dmsae-noise-floor", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=1))
def noise_floor_flow(config: dict[str, Any], ks: list[int], show_progress: bool = False) -> dict[str, Any]:
    """Compute the no-core arm of `config` at `ks` (its evaluate and interpret stages and what they need, each
    Cached when the store has it); returns {"computed": [labels]}."""
    cfg = Config.model_validate(config)
    store = store_for(cfg)
    todo = {(a.stage, a.key): a for n in no_core_nodes(plan(cfg), ks) for a in [*ancestors(n), n]}  # inputs first
    computed, failure = execute(list(todo.values()), cfg, store, show_progress)
    if failure is not None:
        return failure  # type: ignore[return-value]
    return {"computed": computed}


def current_noise_floor(ablation: Ablation, store: AnyStore) -> NoiseFloor | None:
    """The noise floor as far as the store holds it (None when not asked for)."""
    if ablation.noise_config is None or ablation.noise_seed is None:
        return None
    reference = ablation.points[0]
    return noise_floor(store, plan(reference), reference.seed, plan(ablation.noise_config), ablation.noise_seed,
                       ablation.noise_ks)


def run_ablation(ablation: Ablation, report_only: bool = False) -> Path:
    """Run every point (unless `report_only`), rewriting the report after each, then the noise floor; returns
    the report's path. A failed point is reported on stderr and the rest still run."""
    store = store_for(ablation.base)
    planned = [(cfg, plan(cfg)) for cfg in ablation.points]
    timings: dict[str, float] = {}
    if not report_only:
        for i, cfg in enumerate(ablation.points):
            print(f"ablation: point {i + 1}/{len(ablation.points)}: {cfg.name}", file=sys.stderr, flush=True)
            ok, seconds, computed = run_point(cfg)
            timings[cfg.name] = seconds
            print(f"ablation: {cfg.name}: {'done' if ok else 'FAILED'} in {seconds:.0f} s, computed {len(computed)}",
                  file=sys.stderr, flush=True)
            interim_report(lambda: write_ablation_report(planned, store, ablation.out, ablation.command, timings),
                           "ablation")
        if ablation.noise_config is not None:
            print(f"ablation: noise floor: the no-core arm with seed {ablation.noise_seed} at k = "
                  f"{','.join(map(str, ablation.noise_ks))}", file=sys.stderr, flush=True)
            state = noise_floor_flow(ablation.noise_config.model_dump(mode="json"), ablation.noise_ks,
                                     return_state=True)
            if state.is_failed():
                print(f"ablation: noise floor failed: {state.message}", file=sys.stderr, flush=True)
    noise = current_noise_floor(ablation, store)
    path = write_ablation_report(planned, store, ablation.out, ablation.command, timings,
                                 probe_diagnostic=ablation.probe_without_core, noise=noise)
    (ablation.out / "points.json").write_text(json.dumps([c.name for c in ablation.points], indent=1))
    if noise is not None and not noise.table.empty:
        print(noise_floor_text(noise))
    return path


"""The `dmsae` command line: run a config through the Prefect flow, show what the store holds."""

from __future__ import annotations

import argparse
import faulthandler
import io
import os
import signal
import sys
import time
from pathlib import Path

from dmsae.config import Config, config_warnings
from dmsae.errors import UserError
from dmsae.plan import Plan
from dmsae.runs import abbreviate, branch_config, garbage, remove, resolve_config, run_tree, status_rows
from dmsae.runtime import Runtime
from dmsae.stores import AnyStore, open_store, store_for
from flows.pipeline import plan, preflight, run_record
from flows.runner import setup_torch

# where --store looks by default: the store a machine is set up for (cluster workers and the compose services
# get DMSAE_STORE), else the default config's folder
DEFAULT_STORE = os.environ.get("DMSAE_STORE") or "artifacts"

EXIT_USER_ERROR = 2


def _quiet_prefect() -> None:
    # No network here: telemetry would only log failures.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")


def _config_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("config", nargs=None if required else "?",
                   help="YAML preset (e.g. configs/quickstart.yaml) or the name of a run recorded in --store")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set selection.tau=0.8 (repeatable)")
    p.add_argument("--store", default=DEFAULT_STORE, help="store (folder or s3:// URL) where a run name is looked up; "
                   "default $DMSAE_STORE or artifacts")


def _checked(args: argparse.Namespace) -> tuple[Config, AnyStore, Plan]:
    """The config, its store and plan after every check that needs no write: what `dmsae run` and
    `dmsae check` both do first."""
    cfg = resolve_config(args.config, args.set, args.store)
    setup_torch(cfg)
    for note in config_warnings(cfg):
        print(f"dmsae: warning: {note}", file=sys.stderr)
    store = store_for(cfg)
    p = plan(cfg)
    preflight(cfg, p, store)
    from dmsae.precision import resolve

    sae_precision = resolve(cfg.precision.sae, cfg.device, "precision.sae")
    lm_precision = resolve(cfg.precision.lm, cfg.device, "precision.lm")
    eval_note = ""
    if cfg.precision.eval != "lm":
        eval_precision = resolve(cfg.precision.eval, cfg.device, "precision.eval")
        eval_note = f"; evaluation {eval_precision.precision} ({eval_precision.reason})"
    print(f"precision: SAE step {sae_precision.precision} ({sae_precision.reason}); language model "
          f"{lm_precision.precision} ({lm_precision.reason}){eval_note}", flush=True)
    _check_runner(cfg)
    return cfg, store, p


def _check_runner(cfg: Config) -> None:
    """An existing Dask scheduler must answer before anything is written."""
    from flows.runner import check_cluster, check_dask_address

    if cfg.runner == "dask" and cfg.dask.address:
        check_dask_address(cfg.dask.address)
    check_cluster(cfg)


def cmd_check(args: argparse.Namespace) -> int:
    """Every check `dmsae run` makes before it writes anything, and the plan; writes nothing."""
    cfg, store, p = _checked(args)
    store.check_writable()
    cached = {n.label for n in p.nodes if store.has(n.stage, n.key)}
    print(f"config '{cfg.name}' is valid; store {store.location}; device {cfg.device}")
    print(f"{len(p.nodes)} stages: {len(cached)} cached, {len(p.nodes) - len(cached)} to compute")
    width = max([36, *(len(n.label) for n in p.nodes)])
    for n in p.nodes:
        print(f"  {'cached ' if n.label in cached else 'compute'}  {n.label:<{width}} {n.key}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    cfg, store, p = _checked(args)
    store.ensure_writable()
    _quiet_prefect()
    from dmsae.reports.run import cycle_text
    from flows.distill import INVALID_INPUT, distill
    from flows.runner import shared_prefect_api, task_runner

    start = time.perf_counter()
    if cfg.runner == "dask":  # the scheduler's address was checked with the rest, in _checked
        with shared_prefect_api():
            state = distill.with_options(task_runner=task_runner(cfg.runner, cfg.dask, cfg.device, cfg=cfg))(
                cfg.model_dump(mode="json"), show_progress=not args.no_progress, return_state=True)
    else:
        state = distill(cfg.model_dump(mode="json"), show_progress=not args.no_progress, return_state=True)
    wall = time.perf_counter() - start
    if state.is_failed():
        print(f"dmsae: error: {state.message}", file=sys.stderr)
        return EXIT_USER_ERROR if state.name == INVALID_INPUT else 1
    computed = state.result()["computed"]
    print(f"\ndmsae run '{cfg.name}' finished in {wall:.1f} s; computed {len(computed)} of {len(p.nodes)} stages"
          + (f" ({', '.join(computed)})" if computed else " (everything was cached)"))
    print(cycle_text(cfg, store, p))
    final = p.last_core()
    print(f"final core: {store.where(final.stage, final.key)}")
    print(f"report: {Path(cfg.report_dir) / cfg.name / 'summary.md'}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    if args.config is not None:
        from flows.pipeline import stage_detail

        cfg = resolve_config(args.config, args.set, args.store)
        rows = status_rows(store_for(cfg), plan(cfg), stage_detail)
        done = sum(r["state"] == "done" for r in rows)
        print(f"run '{cfg.name}' (store {cfg.store}): {done}/{len(rows)} stages done")
        width = max([32, *(len(r["stage"]) for r in rows)])  # labels of the control arms run longer
        for r in rows:
            print(f"  {r['stage']:<{width}} {r['state']:<8} {r['key']}  {r['detail']}")
        return 0
    store = open_store(args.store)
    records = store.read_runs()
    if not records and not store.read_sweeps():
        print(f"no runs recorded in {args.store}; run one (dmsae run configs/quickstart.yaml) "
              "or pass a config: dmsae status configs/quickstart.yaml")
        return 0
    print(f"store {args.store}: {len(records)} runs")
    print("\n".join(run_tree(store, records)))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """Record one run per grid point (branches of the base run), plan them together, and run every stage
    they need once, in parallel on Dask unless --runner local."""
    from flows.sweep import parse_grid, prepare_sweep, run_sweep, unique_nodes

    grid = parse_grid(args.grid, args.grid_file)
    sets = [*args.set, f"runner={args.runner}"]
    if args.dask_address:
        sets.append(f"dask.address={args.dask_address}")
    if args.workers:
        sets.append(f"dask.workers={args.workers}")
    sweep = prepare_sweep(args.config, sets, grid, args.name)
    for note in sweep.warnings:
        print(f"dmsae: warning: {note}", file=sys.stderr)
    _quiet_prefect()
    _check_runner(sweep.base)
    store = store_for(sweep.base)
    store.ensure_writable()
    nodes = unique_nodes(sweep.plans)
    cached = sum(store.has(n.stage, n.key) for n in nodes)
    print(f"sweep '{sweep.name}': {len(sweep.points)} points, {sum(len(p.nodes) for p in sweep.plans)} stages in "
          f"their plans, {len(nodes)} distinct ({cached} cached); runner {sweep.base.runner}", flush=True)
    start = time.perf_counter()
    state = run_sweep(sweep, grid, show_progress=not args.no_progress)
    wall = time.perf_counter() - start
    from flows.distill import INVALID_INPUT

    if state.is_failed():
        print(f"dmsae: error: {state.message}", file=sys.stderr)
        return EXIT_USER_ERROR if state.name == INVALID_INPUT else 1
    result = state.result()
    print(f"sweep '{sweep.name}' finished in {wall:.1f} s; computed {len(result['computed'])} of {len(nodes)} "
          "distinct stages")
    for run, values, _ in sweep.points:
        print(f"  {run:<48} {result['points'][run]:<9} " + ", ".join(f"{k}={v}" for k, v in values.items()))
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    """The core-gate ablation: every (gate, cap, seed) point through the distill flow, then its report."""
    from flows.ablate import ablation_from_args, parse_ints, run_ablation

    noise_seed = None
    if args.noise_floor_seed is not None:
        seeds = parse_ints("--noise-floor-seed", args.noise_floor_seed)
        if len(seeds) != 1:
            raise UserError(f"--noise-floor-seed {args.noise_floor_seed}: give one seed, e.g. --noise-floor-seed 1")
        noise_seed = seeds[0]
    ablation = ablation_from_args(args.config, args.set, args.gates, args.caps, args.seeds, args.points, args.out,
                                  args.probe_without_core, noise_seed, args.noise_floor_k)
    setup_torch(ablation.base)
    _quiet_prefect()
    path = run_ablation(ablation, report_only=args.report_only)
    print(f"ablation report: {path}")
    return 0


def cmd_converge(args: argparse.Namespace) -> int:
    """The convergence study: the no-core SAE at a series of token budgets and seeds, then its report."""
    from dmsae.config import load_config
    from flows.convergence import parse_ints, run_convergence, study_points

    budgets, seeds = parse_ints("--budgets", args.budgets), parse_ints("--seeds", args.seeds)
    base = load_config(args.config, args.set)
    points = study_points(base, budgets, seeds)
    setup_torch(base)
    _quiet_prefect()
    command = " ".join(["dmsae converge", args.config, "--budgets", args.budgets, "--seeds", args.seeds,
                        *(f"--set {kv}" for kv in args.set)])
    path = run_convergence(points, Path(args.out), command, args.report_only, not args.no_progress)
    print(f"convergence report: {path}")
    return 0


def cmd_branch(args: argparse.Namespace) -> int:
    """Record a new run from a recorded one with some keys changed; it shares every upstream key."""
    store = open_store(args.store)
    parent = store.read_run(args.run)
    cfg = branch_config(store, parent, args.set, args.name)
    name = cfg.name
    p = plan(cfg)
    store.write_run(run_record(cfg, p, "planned", parent=parent.name))
    parent_keys = set(parent.keys.values())
    shared = [n.label for n in p.nodes if n.key in parent_keys]
    todo = [n.label for n in p.nodes if not store.has(n.stage, n.key)]
    print(f"branch '{name}' of '{parent.name}' recorded: shares {len(shared)} of {len(p.nodes)} stages "
          f"({abbreviate(shared)}); {len(todo)} to compute ({abbreviate(todo)})")
    if args.run_now:
        return cmd_run(argparse.Namespace(config=name, set=[], store=args.store, no_progress=args.no_progress))
    print(f"run it with: dmsae run {name}" + (f" --store {args.store}" if args.store != DEFAULT_STORE else ""))
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    """Remove artifacts no recorded run references (and leftovers of killed or damaged work)."""
    store = open_store(args.store)
    if not store.remote and not Path(store.location).is_dir():
        raise UserError(f"--store {args.store}: no such store folder")
    from flows.pipeline import referenced

    items = garbage(store, referenced(store))
    if not items:
        print(f"nothing to remove in {args.store}: every artifact belongs to a recorded run")
        return 0
    for item in items:
        if args.yes and not remove(store, item):
            print(f"  kept {item.label} (being written by a running process)")
            continue
        print(f"  {'removed' if args.yes else 'would remove'} {item.label}  {item.size / 1e6:.1f} MB")
    verb = "removed" if args.yes else "would free"
    print(f"{verb} {sum(i.size for i in items) / 1e6:.1f} MB in {len(items)} entries"
          + ("" if args.yes else "; run with --yes to delete"))
    return 0


def _load(args: argparse.Namespace) -> tuple[Config, AnyStore, Plan]:
    cfg = resolve_config(args.config, args.set, args.store)
    return cfg, store_for(cfg), plan(cfg)


def cmd_report(args: argparse.Namespace) -> int:
    from dmsae.reports.run import write_report

    if args.sweep:
        from dmsae.reports.sweep import write_sweep_report
        from flows.sweep import sweep_plans

        store = open_store(args.store)
        record = store.read_sweep(args.sweep)
        runs = [store.read_run(pt["run"]) for pt in record.points if store.has_run(pt["run"])]
        if not runs:
            raise UserError(f"sweep {args.sweep}: none of its points is recorded in {args.store}; run the sweep first")
        out = Path(args.out) if args.out else Path(runs[0].config.get("report_dir", "reports")) / record.name
        path = write_sweep_report(store, record, sweep_plans(store, record), out)
        print(f"sweep report written to {path}")
        return 0
    if args.config is None:
        raise UserError("report: give a CONFIG (or a run name), or --sweep NAME")
    cfg, store, p = _load(args)
    missing = [n.label for n in p.nodes if not store.has(n.stage, n.key)]
    if len(missing) == len(p.nodes):
        raise UserError(
            f"nothing of run '{cfg.name}' is in the store {cfg.store}; run it first: dmsae run {args.config}"
        )
    if any(n.stage in ("train", "attribute", "select") for n in p.nodes if n.label in missing):
        raise UserError(f"run '{cfg.name}' is incomplete ({len(missing)} stages missing, e.g. {missing[0]}); "
                        f"finish it with: dmsae run {args.config}")
    out = Path(args.out) if args.out else Path(cfg.report_dir) / cfg.name
    summary = write_report(cfg, store, p, out)
    print(f"report written to {summary.parent}/ (summary.md and plots)")
    return 0


def write_latent_cards(cfg: Config, store: AnyStore, p: Plan, out: Path, show_progress: bool) -> Path:
    """Compute the cards' data if it is missing (the distillation must be finished) and write the site."""
    from dmsae.reports.run import render_cards
    from flows.pipeline import cards_node, materialize

    node = cards_node(cfg, p.nodes)
    missing = [n.label for n in node.inputs.values() if not store.has(n.stage, n.key)]
    if missing:
        raise UserError(f"the latent cards need the finished distillation of run '{cfg.name}' ({missing[0]} is "
                        f"missing); run it first: dmsae run CONFIG")
    art, _ = materialize(store, node, Runtime(device=cfg.device, show_progress=show_progress))
    return render_cards(cfg, node, art, out, store, p)


def cmd_cards(args: argparse.Namespace) -> int:
    cfg, store, p = _load(args)
    setup_torch(cfg)
    out = Path(args.out) if args.out else Path(cfg.report_dir) / cfg.name / "latents"
    index = write_latent_cards(cfg, store, p, out, show_progress=not args.no_progress)
    print(f"latent cards written to {index} (open it in a browser)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from dmsae.export import choose_sae, export_saelens

    cfg, store, p = _load(args)
    node = choose_sae(p, cfg.name, args.sae, cfg.sae.k, cfg.seed)
    if not store.has(node.stage, node.key):
        raise UserError(f"{node.label} is not in the store yet; run it first: dmsae run {args.config}")
    out = Path(args.out) if args.out else Path(cfg.report_dir) / cfg.name / "saelens" / node.label
    export_saelens(store.load(node.stage, node.key), out, model_name=cfg.model.path, layer=cfg.harvest.layer,
                   context=cfg.data.context, dataset=cfg.data.path, label=node.label)
    print(f"exported {node.label} to {out}/ (cfg.json, sae_weights.safetensors; load with SAE.load_from_disk)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the config's flow as a Prefect deployment on a cron schedule; runs until interrupted."""
    cfg = resolve_config(args.config, args.set, args.store)
    setup_torch(cfg)
    store_for(cfg).ensure_writable()
    _quiet_prefect()
    from flows.serve import serve_config

    # a long-lived server process: `kill -USR1 <pid>` prints every thread's stack to stderr, the first
    # thing to look at if it ever stops responding (to Ctrl-C included)
    try:
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    except (io.UnsupportedOperation, AttributeError, ValueError):  # stderr without a file descriptor (captured)
        pass
    serve_config(cfg, args.cron, args.name)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dmsae", description="Distilled Matryoshka SAEs as a cached pipeline")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run (or resume) the distillation pipeline of a config")
    _config_args(run, required=True)
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")
    run.set_defaults(func=cmd_run)
    check = sub.add_parser("check", help="validate a config, run every check `dmsae run` makes first, and print "
                           "the plan (what is cached, what would be computed); writes nothing")
    _config_args(check, required=True)
    check.set_defaults(func=cmd_check)
    status = sub.add_parser("status", help="show which stages of a config (or of every recorded run) are done")
    _config_args(status, required=False)
    status.set_defaults(func=cmd_status)
    sweep = sub.add_parser("sweep", help="run a grid of branches of a config, each shared stage once, in parallel "
                           "on Dask")
    _config_args(sweep, required=True)
    sweep.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                       help="a config key and its values, e.g. --grid selection.tau=0.7,0.8 (repeatable; crossed)")
    sweep.add_argument("--grid-file", default=None, help="a YAML mapping of dotted keys to lists of values")
    sweep.add_argument("--name", default=None, help="the sweep's name; default <config name>-sweep")
    sweep.add_argument("--runner", choices=["dask", "local"], default="dask",
                       help="dask (default): independent stages at once on Dask workers; local: one at a time")
    sweep.add_argument("--dask-address", default=None, help="an existing Dask scheduler, e.g. tcp://HOST:8786")
    sweep.add_argument("--workers", type=int, default=None, help="worker processes of the local Dask cluster")
    sweep.add_argument("--no-progress", action="store_true", help="no progress bars")
    sweep.set_defaults(func=cmd_sweep)
    ablate = sub.add_parser("ablate", help="the core-gate ablation: a whole distillation per (gate, cap, seed) "
                            "from a base preset, every arm compared with no core at equal L0 (replaces "
                            "`python -m flows.ablation`)")
    ablate.add_argument("config", help="base preset, e.g. configs/quickstart.yaml")
    ablate.add_argument("--gates", default="relu,relu_bias,topk", help="comma-separated sae.core_gate values")
    ablate.add_argument("--caps", default="none", help="comma-separated max_core values; 'none' for no cap")
    ablate.add_argument("--seeds", default="0,1,2", help="comma-separated seeds; each is a whole distillation")
    ablate.add_argument("--points", default=None, metavar="GATE:CAP,...",
                        help="run these (gate, cap) pairs instead of every gate with every cap, "
                             "e.g. topk:0.6,relu:none")
    ablate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every point")
    ablate.add_argument("--out", default=None, help="report folder; default <report_dir>/<base name>-ablation")
    ablate.add_argument("--report-only", action="store_true", help="render what the store holds; run nothing")
    ablate.add_argument("--probe-without-core", action="store_true",
                        help="add the probing diagnostic: each cored reuse SAE's sparse probes with the core left out "
                             "(re-encodes the probing texts: about 30 s per SAE at width 16,384 on a CPU)")
    ablate.add_argument("--noise-floor-seed", default=None, metavar="SEED",
                        help="also train the no-core arm with this seed and read it against the first seed's no-core "
                             "curve at equal L0: the seed noise of the differences (computes only those stages)")
    ablate.add_argument("--noise-floor-k", default=None, metavar="K,...",
                        help="the reuse k of the noise floor (default: every reuse.k), e.g. 20,40,80")
    ablate.set_defaults(func=cmd_ablate)
    converge = sub.add_parser("converge", help="the convergence study: the no-core SAE trained for a series of "
                              "token budgets (epochs over one harvest) and seeds: FVU, CE-loss score, dead fraction "
                              "and cross-seed overlap against tokens")
    converge.add_argument("config", help="base preset, e.g. configs/quickstart.yaml")
    converge.add_argument("--budgets", default="1,4,16,64", help="comma-separated epochs over the harvest")
    converge.add_argument("--seeds", default="0,1", help="comma-separated seeds; the first two give the overlap")
    converge.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every point")
    converge.add_argument("--out", default="docs/results/convergence", help="report folder")
    converge.add_argument("--report-only", action="store_true", help="render what the store holds; run nothing")
    converge.add_argument("--no-progress", action="store_true", help="no progress bars")
    converge.set_defaults(func=cmd_converge)
    branch = sub.add_parser("branch", help="record a new run from a recorded one with changed keys; "
                            "it shares every stage upstream of the change")
    branch.add_argument("run", help="name of the recorded run to branch from (see dmsae status)")
    branch.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="what changes (repeatable)")
    branch.add_argument("--name", help="name of the new run (default: <run>-branch)")
    branch.add_argument("--store", default=DEFAULT_STORE, help="store root holding the run")
    branch.add_argument("--run", dest="run_now", action="store_true", help="run the branch right away")
    branch.add_argument("--no-progress", action="store_true", help="hide progress bars (with --run)")
    branch.set_defaults(func=cmd_branch)
    gc = sub.add_parser("gc", help="remove artifacts that no recorded run references (dry run unless --yes)")
    gc.add_argument("--store", default=DEFAULT_STORE, help="store root")
    gc.add_argument("--yes", action="store_true", help="really delete")
    gc.set_defaults(func=cmd_gc)
    report = sub.add_parser("report", help="write the markdown summary, metrics table and plots of a finished run")
    _config_args(report, required=False)
    report.add_argument("--out", help="output folder (default: <report_dir>/<name>)")
    report.add_argument("--sweep", default=None, metavar="NAME",
                        help="report a recorded sweep instead: tables and plots across its grid points")
    report.set_defaults(func=cmd_report)
    cards = sub.add_parser("cards", help="write the latent cards of a finished run: a static HTML site with one card "
                           "per core latent and a sample of the others")
    _config_args(cards, required=True)
    cards.add_argument("--out", help="output folder (default: <report_dir>/<name>/latents)")
    cards.add_argument("--no-progress", action="store_true", help="hide progress bars")
    cards.set_defaults(func=cmd_cards)
    export = sub.add_parser("export", help="write an SAE in the SAELens layout (cfg.json + sae_weights.safetensors)")
    _config_args(export, required=True)
    export.add_argument("--sae", help="which SAE, e.g. 'train[2]' or 'reuse[distilled,k=32,seed=0]' "
                        "(default: the distilled-core reuse SAE at sae.k, else the last cycle's)")
    export.add_argument("--out", help="output folder (default: <report_dir>/<name>/saelens/<sae>)")
    export.set_defaults(func=cmd_export)
    serve = sub.add_parser("serve", help="serve the pipeline as a Prefect deployment on a cron schedule "
                           "(needs a Prefect server, PREFECT_API_URL)")
    _config_args(serve, required=True)
    serve.add_argument("--cron", default="0 3 * * *", help="cron schedule (default: '0 3 * * *', daily at 03:00)")
    serve.add_argument("--name", help="deployment name (default: the config's name)")
    serve.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except UserError as e:
        print(f"dmsae: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("dmsae: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - stays open until exit, so Python's flush cannot fail
        return 0


if __name__ == "__main__":
    sys.exit(main())

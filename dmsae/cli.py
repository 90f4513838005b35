"""The `dmsae` command line: run a config through the Prefect flow, show what the store holds."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from dmsae.config import Config, load_config
from dmsae.errors import UserError
from dmsae.pipeline import Plan, plan
from dmsae.store import Store

EXIT_USER_ERROR = 2


def _quiet_prefect() -> None:
    # No network here: telemetry would only log failures.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")


def _setup_torch(cfg: Config) -> None:
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={cfg.device}: no CUDA device is available here; use device=cpu")


def _config_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("config", nargs=None if required else "?", help="YAML preset, e.g. configs/quickstart.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set selection.tau=0.8 (repeatable)")


def cmd_run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    _setup_torch(cfg)
    store = Store(cfg.store)
    store.ensure_writable()
    p = plan(cfg)
    before = {n.label for n in p.nodes if store.has(n.stage, n.key)}
    _quiet_prefect()
    from flows.distill import INVALID_INPUT, distill

    start = time.perf_counter()
    state = distill(cfg.model_dump(mode="json"), show_progress=not args.no_progress, return_state=True)
    wall = time.perf_counter() - start
    if state.is_failed():
        print(f"dmsae: error: {state.message}", file=sys.stderr)
        return EXIT_USER_ERROR if state.name == INVALID_INPUT else 1
    computed = [n.label for n in p.nodes if n.label not in before]
    print(f"\ndmsae run '{cfg.name}' finished in {wall:.1f} s; computed {len(computed)} of {len(p.nodes)} stages"
          + (f" ({', '.join(computed)})" if computed else " (everything was cached)"))
    print(_cycle_table(cfg, store, p))
    final = p.last_core()
    print(f"final core: {store.artifact_dir(final.stage, final.key)}")
    print(f"report: {Path(cfg.report_dir) / cfg.name / 'summary.md'}")
    return 0


def _cycle_table(cfg: Config, store: Store, p: Plan) -> str:
    rows = ["cycle  core in  train FVU  attr. FVU  L0      core out"]
    for c in range(cfg.cycles):
        tr = store.manifest("train", p.find("train", c).key).metrics
        at = store.manifest("attribute", p.find("attribute", c).key).metrics
        se = store.manifest("select", p.find("select", c).key).metrics
        rows.append(f"{c:<6} {tr['core_size']:<8} {tr['train_fvu']:<10.3f} {at['fvu']:<10.3f} "
                    f"{at['l0']:<7.1f} {se['core_size']}")
    return "\n".join(rows)


def _status_rows(cfg: Config) -> list[dict[str, str]]:
    store = Store(cfg.store)
    rows = []
    for node in plan(cfg).nodes:
        done = store.has(node.stage, node.key)
        detail = ""
        if done:
            m = store.manifest(node.stage, node.key).metrics
            if node.stage == "select":
                detail = f"core size {m['core_size']}"
            elif node.stage == "train":
                detail = f"core in {m['core_size']}, train FVU {m['train_fvu']:.3f}"
            elif node.stage == "harvest":
                detail = f"{m['n_tokens']} tokens, d={m['d']}"
            elif node.stage == "attribute":
                detail = f"FVU {m['fvu']:.3f}, L0 {m['l0']:.1f}"
        rows.append({"stage": node.label, "key": node.key, "state": "done" if done else "missing", "detail": detail})
    return rows


def cmd_status(args: argparse.Namespace) -> int:
    if args.config is None:
        root = Path(args.store)
        records = sorted((root / "runs").glob("*.json")) if (root / "runs").is_dir() else []
        if not records:
            print(f"no runs recorded in {root}; pass a config: dmsae status configs/quickstart.yaml")
            return 0
        configs = []
        for r in records:
            try:
                configs.append(Config.model_validate(json.loads(r.read_text())["config"]))
            except (ValueError, KeyError):
                print(f"skipping unreadable run record {r}", file=sys.stderr)
    else:
        configs = [load_config(args.config, args.set)]
    for cfg in configs:
        rows = _status_rows(cfg)
        done = sum(r["state"] == "done" for r in rows)
        print(f"run '{cfg.name}' (store {cfg.store}): {done}/{len(rows)} stages done")
        for r in rows:
            print(f"  {r['stage']:<14} {r['state']:<8} {r['key']}  {r['detail']}")
    return 0


def _load(args: argparse.Namespace) -> tuple[Config, Store, Plan]:
    cfg = load_config(args.config, args.set)
    return cfg, Store(cfg.store), plan(cfg)


def cmd_report(args: argparse.Namespace) -> int:
    from dmsae.report import write_report

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


def cmd_export(args: argparse.Namespace) -> int:
    from dmsae.export import export_saelens

    cfg, store, p = _load(args)
    saes = [n for n in p.nodes if n.stage in ("train", "reuse")]
    if args.sae:
        chosen = [n for n in saes if n.label == args.sae]
        if not chosen:
            raise UserError(f"--sae {args.sae}: no such SAE in run '{cfg.name}'; one of: "
                            + ", ".join(n.label for n in saes))
        node = chosen[0]
    else:  # the distilled-core reuse SAE at the config's k, else the last cycle's SAE
        preferred = [n for n in saes if n.label == f"reuse[distilled,k={cfg.sae.k},seed={cfg.seed}]"]
        node = preferred[0] if preferred else [n for n in saes if n.stage == "train"][-1]
    if not store.has(node.stage, node.key):
        raise UserError(f"{node.label} is not in the store yet; run it first: dmsae run {args.config}")
    out = Path(args.out) if args.out else Path(cfg.report_dir) / cfg.name / "saelens" / node.label
    export_saelens(store.load(node.stage, node.key), out, model_name=cfg.model.path, layer=cfg.harvest.layer,
                   context=cfg.data.context, dataset=cfg.data.path, label=node.label)
    print(f"exported {node.label} to {out}/ (cfg.json, sae_weights.safetensors; load with SAE.load_from_disk)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dmsae", description="Distilled Matryoshka SAEs as a cached pipeline")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run (or resume) the distillation pipeline of a config")
    _config_args(run, required=True)
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")
    run.set_defaults(func=cmd_run)
    status = sub.add_parser("status", help="show which stages of a config (or of every recorded run) are done")
    _config_args(status, required=False)
    status.add_argument("--store", default="artifacts", help="store root to list runs from (without CONFIG)")
    status.set_defaults(func=cmd_status)
    report = sub.add_parser("report", help="write the markdown summary, metrics table and plots of a finished run")
    _config_args(report, required=True)
    report.add_argument("--out", help="output folder (default: <report_dir>/<name>)")
    report.set_defaults(func=cmd_report)
    export = sub.add_parser("export", help="write an SAE in the SAELens layout (cfg.json + sae_weights.safetensors)")
    _config_args(export, required=True)
    export.add_argument("--sae", help="which SAE, e.g. 'train[2]' or 'reuse[distilled,k=32,seed=0]' "
                        "(default: the distilled-core reuse SAE at sae.k, else the last cycle's)")
    export.add_argument("--out", help="output folder (default: <report_dir>/<name>/saelens/<sae>)")
    export.set_defaults(func=cmd_export)
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

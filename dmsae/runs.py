"""Runs as the command line shows them: a config given as a preset or a recorded run's name, the stages of a
plan with their state, the runs of a store as a tree, and what no recorded run references."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from dmsae.config import Config, apply_overrides, load_config
from dmsae.errors import UserError
from dmsae.plan import Plan
from dmsae.store import Garbage, RunRecord, SweepRecord
from dmsae.stores import AnyStore, open_store, same_location


def resolve_config(config: str, overrides: list[str], store_root: str) -> Config:
    """A YAML preset, or a run recorded in the store (e.g. one made by `dmsae branch`)."""
    if Path(config).is_file() or config.endswith((".yaml", ".yml")) or "/" in config:
        return load_config(config, overrides)
    store = open_store(store_root)
    if not store.has_run(config):
        raise UserError(f"{config}: neither a config file nor a run recorded in the store {store_root}; "
                        "pass a YAML preset such as configs/quickstart.yaml (or --store for another store)")
    data = apply_overrides(store.read_run(config).config, overrides)
    try:
        return Config.model_validate(data)
    except ValueError as e:
        raise UserError(f"run {config}: {str(e).splitlines()[0]}") from None


def branch_config(store: AnyStore, parent: RunRecord, sets: list[str], name: str | None) -> Config:
    """The config of a new branch of `parent` with `sets` changed (default name: <parent>-branch), refused in one
    line when it has nothing to change, its name is taken, or it would live in another store."""
    if not sets:
        raise UserError("branch: give at least one --set KEY=VALUE, e.g. --set selection.tau=0.8")
    name = name or f"{parent.name}-branch"
    if store.has_run(name):
        raise UserError(f"--name {name}: a run with this name is already recorded; choose another name")
    data = apply_overrides(dict(parent.config), [*sets, f"name={name}"])
    try:
        cfg = Config.model_validate(data)
    except ValueError as e:
        raise UserError(f"branch {name}: {str(e).splitlines()[0]}") from None
    if not same_location(cfg.store, store.location):
        raise UserError("branch: a branch lives in its parent's store; drop the --set store=... override")
    return cfg


def status_rows(store: AnyStore, p: Plan, detail: Callable[[str, dict[str, Any]], str]) -> list[dict[str, str]]:
    """Per node of the plan: its label, key, whether it is done and, when done, `detail(stage, metrics)`."""
    rows = []
    for node in p.nodes:
        done = store.has(node.stage, node.key)
        text = detail(node.stage, store.manifest(node.stage, node.key).metrics) if done else ""
        rows.append({"stage": node.label, "key": node.key, "state": "done" if done else "missing", "detail": text})
    return rows


def abbreviate(labels: list[str], n: int = 5) -> str:
    """The first `n` labels and how many more."""
    return ", ".join(labels[:n]) + (f", ... {len(labels) - n} more" if len(labels) > n else "") if labels else "none"


def run_tree(store: AnyStore, records: list[RunRecord]) -> list[str]:
    """Runs as a tree (branches under the run they came from), each with its stages done and, for a
    branch, the stages it shares with its parent. A sweep is one node (under its base run when that is
    recorded) with its points beneath it."""
    by_name = {r.name: r for r in records}
    sweeps = store.read_sweeps()
    in_sweep = {pt["run"] for sw in sweeps for pt in sw.points}
    children: dict[str | None, list[RunRecord]] = {}
    for r in records:
        if r.name not in in_sweep:
            children.setdefault(r.parent if r.parent in by_name else None, []).append(r)
    lines: list[str] = []

    def visit_sweep(sw: SweepRecord, prefix: str, last: bool, root: bool) -> None:
        grid = ", ".join(f"{k}={','.join(map(str, v))}" for k, v in sw.grid.items())
        lines.append(("" if root else prefix + ("`-- " if last else "|-- "))
                     + f"sweep {sw.name}  [{sw.status}]  {len(sw.points)} points over {grid}")
        inner = "" if root else prefix + ("    " if last else "|   ")
        points = [by_name[pt["run"]] for pt in sw.points if pt["run"] in by_name]
        for i, r in enumerate(points):
            lines.append(inner + ("`-- " if i == len(points) - 1 else "|-- ") + describe(r))

    def describe(r: RunRecord) -> str:
        done = sum(store.has(r.stages.get(label, label.split("[")[0]), key) for label, key in r.keys.items())
        text = f"{r.name}  [{r.status}]  {done}/{len(r.keys)} stages done"
        if r.parent in by_name:
            parent_keys = set(by_name[r.parent].keys.values())
            shared = [label for label, key in r.keys.items() if key in parent_keys]
            text += f"; shares {len(shared)} with {r.parent} ({abbreviate(shared)}), {len(r.keys) - len(shared)} own"
        return text

    def visit(r: RunRecord, prefix: str, last: bool, root: bool) -> None:
        lines.append(("" if root else prefix + ("`-- " if last else "|-- ")) + describe(r))
        kids: list[RunRecord | SweepRecord] = [*children.get(r.name, []), *(sw for sw in sweeps if sw.base == r.name)]
        for i, kid in enumerate(kids):
            inner, kid_last = "" if root else prefix + ("    " if last else "|   "), i == len(kids) - 1
            if isinstance(kid, SweepRecord):
                visit_sweep(kid, inner, kid_last, False)
            else:
                visit(kid, inner, kid_last, False)

    for r in children.get(None, []):
        visit(r, "", True, True)
    for sw in sweeps:
        if sw.base not in by_name:
            visit_sweep(sw, "", True, True)
    return lines


def garbage(store: AnyStore, referenced: set[tuple[str, str]]) -> list[Garbage]:
    """Artifacts outside `referenced`, then leftovers of killed or damaged work."""
    return store.garbage(referenced)


def remove(store: AnyStore, item: Garbage) -> bool:
    """Delete it unless a running process holds its key's lock; whether it was deleted."""
    return store.remove(item)

"""The distillation plan: which stage runs with which parameters and inputs, and its content key.

`plan(cfg)` derives every stage's key from the config alone, without running anything, so status,
branching and the flow all agree on what exists. `materialize` runs one node into the store unless
its artifact is already there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cached_property
from types import ModuleType
from typing import Any

from dmsae.config import Config
from dmsae.runtime import Runtime
from dmsae.sources import resolve_corpus, resolve_model
from dmsae.store import Artifact, Store, compute_key
from stages import attribute, harvest, model, select, tokens, train

STAGES: dict[str, ModuleType] = {m.NAME: m for m in (model, tokens, harvest, train, attribute, select)}


@dataclass(frozen=True)
class Node:
    stage: str
    params: dict[str, Any]
    inputs: dict[str, Node]
    cycle: int | None = None
    args: dict[str, Any] = field(default_factory=dict, compare=False)  # runtime-only, not in the key

    @property
    def version(self) -> str:
        return STAGES[self.stage].VERSION

    @cached_property
    def key(self) -> str:
        return compute_key(self.stage, self.version, self.params, {k: n.key for k, n in self.inputs.items()})

    @property
    def label(self) -> str:
        return self.stage if self.cycle is None else f"{self.stage}[{self.cycle}]"


@dataclass
class Plan:
    nodes: list[Node]  # in dependency order

    def find(self, stage: str, cycle: int | None = None) -> Node:
        for n in self.nodes:
            if n.stage == stage and n.cycle == cycle:
                return n
        raise KeyError(f"{stage}[{cycle}]")

    def last_core(self) -> Node:
        return [n for n in self.nodes if n.stage == "select"][-1]


def plan(cfg: Config) -> Plan:
    msrc = resolve_model(cfg.model.path)
    csrc = resolve_corpus(cfg.data.path)
    d = cfg.data
    model_node = Node("model", {"kind": msrc.kind, "fingerprint": msrc.fingerprint, "dtype": cfg.model.dtype},
                      {}, args={"location": msrc.location})
    tokens_node = Node("tokens", {
        "kind": csrc.kind, "fingerprint": csrc.fingerprint,
        "field": d.field if csrc.kind in ("jsonl", "hub") else None,
        "split": d.split if csrc.kind == "hub" else None,
        "context": d.context, "train_tokens": d.train_tokens, "attribution_tokens": d.attribution_tokens,
        "eval_tokens": d.eval_tokens, "split_seed": d.split_seed,
    }, {"model": model_node}, args={"location": csrc.location})
    harvest_node = Node("harvest", {"layer": cfg.harvest.layer, "chunk_rows": cfg.harvest.chunk_rows,
                                    "store_dtype": cfg.harvest.store_dtype, "dtype": cfg.model.dtype},
                        {"model": model_node, "tokens": tokens_node}, args={"batch_size": d.batch_size})
    train_params = cfg.train.model_dump(exclude={"checkpoint_every"})
    nodes = [model_node, tokens_node, harvest_node]
    core: Node | None = None
    for cycle in range(cfg.cycles):
        train_inputs: dict[str, Node] = {"harvest": harvest_node}
        if core is not None:
            train_inputs["core"] = core
        train_node = Node("train", {"cycle": cycle, "seed": cfg.seed, "sae": cfg.sae.model_dump(),
                                    "train": train_params}, train_inputs, cycle,
                          args={"checkpoint_every": cfg.train.checkpoint_every})
        attr_node = Node("attribute", {"layer": cfg.harvest.layer, "score": cfg.attribution.score,
                                       "q": cfg.attribution.q, "dtype": cfg.model.dtype},
                         {"model": model_node, "tokens": tokens_node, "train": train_node}, cycle,
                         args={"batch_size": cfg.attribution.batch_size})
        core = Node("select", {"cycle": cycle, "tau": cfg.selection.tau},
                    {"attribute": attr_node, "train": train_node}, cycle)
        nodes += [train_node, attr_node, core]
    return Plan(nodes)


def materialize(store: Store, node: Node, rt: Runtime) -> tuple[Artifact, bool]:
    """Ensure `node`'s artifact exists; returns it and whether it was computed now."""
    if store.has(node.stage, node.key):
        return store.load(node.stage, node.key), False
    inputs = {name: store.load(n.stage, n.key) for name, n in node.inputs.items()}
    stage_rt = Runtime(device=rt.device, show_progress=rt.show_progress, on_progress=rt.on_progress,
                       checkpoint_dir=store.partial_dir(node.stage, node.key), args=dict(node.args))
    start = time.perf_counter()
    with store.writer(node.stage, node.key) as tmp:
        metrics = STAGES[node.stage].run(tmp, node.params, inputs, stage_rt)
        store.finalize(tmp, key=node.key, stage=node.stage, version=node.version, params=node.params,
                       inputs={k: n.key for k, n in node.inputs.items()},
                       timings={"seconds": time.perf_counter() - start}, metrics=metrics)
    return store.load(node.stage, node.key), True

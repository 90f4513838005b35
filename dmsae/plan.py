"""The shape of a distillation plan: nodes (a stage, its parameters and its input nodes) and their content keys.

`flows.pipeline.plan(cfg)` builds a `Plan` from a config; everything that only reads a plan (reports,
status, the run tree) uses these types without importing the flows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from dmsae.store import compute_key


@dataclass(frozen=True)
class Node:
    stage: str
    version: str  # the stage's VERSION: part of the key, so a changed stage recomputes
    params: dict[str, Any]
    inputs: dict[str, Node]
    cycle: int | None = None
    args: dict[str, Any] = field(default_factory=dict, compare=False)  # runtime-only, not in the key
    tag: str | None = None  # label suffix for nodes that are not per cycle

    @cached_property
    def key(self) -> str:
        return compute_key(self.stage, self.version, self.params, {k: n.key for k, n in self.inputs.items()})

    @property
    def label(self) -> str:
        suffix = self.tag if self.tag is not None else self.cycle
        return self.stage if suffix is None else f"{self.stage}[{suffix}]"


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

    def of_stage(self, stage: str) -> list[Node]:
        return [n for n in self.nodes if n.stage == stage]


def ancestors(node: Node) -> list[Node]:
    """Every upstream node, each once, in dependency order."""
    seen: dict[str, Node] = {}

    def visit(n: Node) -> None:
        for parent in n.inputs.values():
            if parent.key not in seen:
                visit(parent)
                seen[parent.key] = parent

    visit(node)
    return list(seen.values())

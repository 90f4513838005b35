"""Execution settings that do not change a stage's result and so stay out of its key."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Runtime:
    device: str = "cpu"
    show_progress: bool = True
    checkpoint_dir: Path | None = None
    label: str = ""  # the plan node being computed, e.g. "train[1]"
    args: dict[str, Any] = field(default_factory=dict)  # stage-specific, e.g. source locations, batch sizes
    on_progress: Callable[[float, str], None] | None = None  # fraction done, short message
    # set by a stage that picked up a killed computation's checkpoint (e.g. {"step": 16}): the manifest
    # records it, so whoever reads an artifact can tell it was finished from a checkpoint
    resumed: dict[str, int] = field(default_factory=dict)
    # called after a stage wrote a checkpoint into `checkpoint_dir`: a remote store uploads it, so another
    # machine can resume the computation
    on_checkpoint: Callable[[], None] | None = None

    def checkpoint_saved(self) -> None:
        if self.on_checkpoint is not None:
            self.on_checkpoint()

    def report(self, fraction: float, message: str = "") -> None:
        if self.on_progress is not None:
            self.on_progress(fraction, message)

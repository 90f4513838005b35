"""Crash points for the resume tests: `DMSAE_KILL_AT=<point>` SIGKILLs the process group there.

A real SIGKILL (no cleanup, no finally blocks), at a named place, so the tests can crash a run
mid-harvest, mid-training, mid-attribution or between writing an artifact and publishing it, and
check that the next run resumes to the same bytes. Unset, a point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "DMSAE_KILL_AT"


def point(name: str) -> None:
    if os.environ.get(ENV) == name:
        os.killpg(os.getpgid(0), signal.SIGKILL)

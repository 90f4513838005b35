"""The content-addressed artifact store. This module alone owns the store's disk layout.

Layout under the store root:

    <root>/<stage>/<key>/manifest.json   the artifact is complete iff its manifest exists
    <root>/<stage>/<key>/...             files listed in the manifest with their sha256
    <root>/.tmp/<stage>-<key>-<rand>/    an artifact being written; renamed into place when whole
    <root>/.partial/<stage>/<key>/       checkpoints of an unfinished stage, for resuming
    <root>/runs/<name>.json              run records: a run's config and stage keys

A key is the hash of the stage name, its code version, the parameters it reads and its input keys,
so equal work gets equal keys and anything that changes the result changes the key.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from dmsae.errors import IntegrityError, UserError

MANIFEST = "manifest.json"
KEY_CHARS = 20


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def compute_key(stage: str, version: str, params: dict[str, Any], inputs: dict[str, str]) -> str:
    payload = canonical_json({"stage": stage, "version": version, "params": params, "inputs": inputs})
    return hashlib.sha256(payload.encode()).hexdigest()[:KEY_CHARS]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Manifest(BaseModel):
    key: str
    stage: str
    version: str
    params: dict[str, Any]
    inputs: dict[str, str]
    files: dict[str, str] = Field(description="relative path -> sha256 of every file of the artifact")
    timings: dict[str, float] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    created: str = ""


@dataclass(frozen=True)
class Artifact:
    path: Path
    manifest: Manifest

    @property
    def metrics(self) -> dict[str, Any]:
        return self.manifest.metrics

    def file(self, name: str) -> Path:
        return self.path / name


class Store:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._verified: set[Path] = set()

    # -- layout -------------------------------------------------------------------------------
    def artifact_dir(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def partial_dir(self, stage: str, key: str) -> Path:
        return self.root / ".partial" / stage / key

    def runs_dir(self) -> Path:
        return self.root / "runs"

    def ensure_writable(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-test-{uuid.uuid4().hex}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise UserError(
                f"store root {self.root} is not writable ({e.strerror}); set `store` to a writable folder"
            ) from None

    # -- reading ------------------------------------------------------------------------------
    def has(self, stage: str, key: str) -> bool:
        return (self.artifact_dir(stage, key) / MANIFEST).is_file()

    def manifest(self, stage: str, key: str) -> Manifest:
        return Manifest.model_validate_json((self.artifact_dir(stage, key) / MANIFEST).read_text())

    def load(self, stage: str, key: str, verify: bool = True) -> Artifact:
        """Open a complete artifact, checking every file against its manifest checksum."""
        path = self.artifact_dir(stage, key)
        if not (path / MANIFEST).is_file():
            raise KeyError(f"{stage}/{key} is not in the store {self.root}")
        manifest = self.manifest(stage, key)
        if verify and path not in self._verified:
            for rel, digest in manifest.files.items():
                f = path / rel
                if not f.is_file() or sha256_file(f) != digest:
                    raise IntegrityError(f"{stage}/{key}: file {rel} is missing or corrupted (checksum mismatch)")
            self._verified.add(path)
        return Artifact(path, manifest)

    # -- writing ------------------------------------------------------------------------------
    @contextmanager
    def writer(self, stage: str, key: str) -> Iterator[Path]:
        """Yield a temporary directory; on success it becomes the artifact `<stage>/<key>` atomically.

        The manifest is written by `finalize`, which the caller invokes inside the block."""
        tmp = self.root / ".tmp" / f"{stage}-{key}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            yield tmp
            if not (tmp / MANIFEST).is_file():
                raise RuntimeError(f"{stage}/{key}: writer closed without a manifest")
            final = self.artifact_dir(stage, key)
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists():  # another writer won the race; its artifact has the same key and content
                shutil.rmtree(tmp)
            else:
                os.rename(tmp, final)
                _fsync_dir(final.parent)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    @staticmethod
    def finalize(
        tmp: Path,
        *,
        key: str,
        stage: str,
        version: str,
        params: dict[str, Any],
        inputs: dict[str, str],
        timings: dict[str, float] | None = None,
        metrics: dict[str, Any] | None = None,
    ) -> Manifest:
        files = {
            str(p.relative_to(tmp)): sha256_file(p)
            for p in sorted(tmp.rglob("*"))
            if p.is_file() and p.name != MANIFEST
        }
        manifest = Manifest(
            key=key, stage=stage, version=version, params=params, inputs=inputs, files=files,
            timings=timings or {}, metrics=metrics or {},
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )
        (tmp / MANIFEST).write_text(manifest.model_dump_json(indent=2))
        return manifest

    # -- runs ---------------------------------------------------------------------------------
    def write_run(self, name: str, record: dict[str, Any]) -> Path:
        self.runs_dir().mkdir(parents=True, exist_ok=True)
        path = self.runs_dir() / f"{name}.json"
        tmp = path.with_suffix(f".json.{uuid.uuid4().hex[:8]}")
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True))
        os.replace(tmp, path)
        return path


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

"""The content-addressed artifact store. This module alone owns the store's disk layout.

Layout under the store root:

    <root>/<stage>/<key>/manifest.json   the artifact is complete iff its manifest exists
    <root>/<stage>/<key>/...             files listed in the manifest with their sha256
    <root>/.tmp/<stage>-<key>-<rand>/    an artifact being written; renamed into place when whole
    <root>/.partial/<stage>/<key>/       checkpoints of an unfinished stage, for resuming
    <root>/.locks/<stage>/<key>.lock     held (flock) by the one process computing that artifact
    <root>/.corrupt/<stage>/<key>-<time>/ damaged artifacts, moved aside before recomputing
    <root>/runs/<name>.json              run records: a run's config, stage keys and parent run
    <root>/sweeps/<name>.json            sweep records: the grid and the run name of each of its points
    <root>/dmsae-store.json              the layout format of this store

A key is the hash of the stage name, its code version, the parameters it reads and its input keys,
so equal work gets equal keys and anything that changes the result changes the key.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, Field

from dmsae import faults
from dmsae.errors import IntegrityError, UserError

MANIFEST = "manifest.json"
RecordT = TypeVar("RecordT", bound=BaseModel)
KEY_CHARS = 20
FORMAT_FILE = "dmsae-store.json"
STORE_FORMAT = 1  # bump when the layout or the manifest schema changes incompatibly
TMP, PARTIAL, LOCKS, CORRUPT, RUNS, SWEEPS = ".tmp", ".partial", ".locks", ".corrupt", "runs", "sweeps"

# artifacts whose checksums this process has verified, by path and the size and mtime of every file:
# a long-lived process (a served deployment) rehashes an artifact only when a file of it changed
_verified: set[tuple[str, tuple[tuple[int, int], ...]]] = set()


def _file_stamp(path: Path, manifest: Manifest) -> tuple[str, tuple[tuple[int, int], ...]]:
    stats = []
    for rel in [MANIFEST, *manifest.files]:
        try:
            st = (path / rel).stat()
            stats.append((st.st_size, st.st_mtime_ns))
        except OSError:
            stats.append((-1, -1))
    return str(path), tuple(stats)


def verify_files(path: Path, manifest: Manifest, what: str) -> None:
    """Check every file of an artifact folder against its manifest's sha256 (once per process and file state)."""
    stamp = _file_stamp(path, manifest)
    if stamp in _verified:
        return
    for rel, digest in manifest.files.items():
        f = path / rel
        if not f.is_file() or sha256_file(f) != digest:
            raise IntegrityError(f"{what}: file {rel} is missing or corrupted (checksum mismatch)")
    _verified.add(stamp)


def warn(message: str) -> None:
    print(f"dmsae: warning: {message}", file=sys.stderr, flush=True)


def probe_writable(folder: Path) -> None:
    """Raise OSError unless files can be created in `folder` (or, when it does not exist yet, in the nearest
    folder above it, where it would be made). The probe is a uniquely named file that is removed again, so a
    check writes nothing and any number of processes can probe one new folder at once."""
    nearest = next(p for p in [folder, *folder.parents] if p.exists())
    if not nearest.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(nearest))
    probe = nearest / f".dmsae-write-test-{uuid.uuid4().hex}"
    probe.write_text("ok")
    probe.unlink()


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
    resumed: dict[str, int] = Field(default_factory=dict,
                                    description="where a killed computation was picked up, e.g. {'step': 16}")
    created: str = ""


@dataclass(frozen=True)
class Artifact:
    path: Path
    manifest: Manifest
    # artifacts that hold this one's data: the parts of a harvest in parts, in order (see dmsae.readers)
    parts: tuple[Artifact, ...] = ()

    @property
    def metrics(self) -> dict[str, Any]:
        return self.manifest.metrics

    def file(self, name: str) -> Path:
        return self.path / name


@dataclass(frozen=True)
class Garbage:
    """Something `dmsae gc` may remove: an unreferenced artifact or a leftover of killed or damaged work."""

    label: str  # as `dmsae gc` lists it: stage/key, or a leftover's place in the store
    path: Path | str  # a local path, or an object prefix of a remote store
    stage_key: tuple[str, str] | None  # None for a leftover of killed or damaged work
    size: int  # bytes


class Store:
    remote = False

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def location(self) -> str:
        return str(self.root)

    def where(self, stage: str, key: str) -> str:
        """The artifact's folder, for messages."""
        return str(self.artifact_dir(stage, key))

    # -- layout -------------------------------------------------------------------------------
    def artifact_dir(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def partial_dir(self, stage: str, key: str) -> Path:
        return self.root / PARTIAL / stage / key

    def runs_dir(self) -> Path:
        return self.root / RUNS

    def stages(self) -> list[str]:
        """Stage folders present in the store."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")
                      and p.name != RUNS)

    def keys(self, stage: str) -> list[str]:
        d = self.root / stage
        return sorted(p.name for p in d.iterdir() if p.is_dir()) if d.is_dir() else []

    def ensure_writable(self) -> None:
        """Create the root if needed, check it is writable and of this dmsae's format."""
        self.check_format()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-test-{uuid.uuid4().hex}"
            probe.write_text("ok")
            probe.unlink()
            marker = self.root / FORMAT_FILE
            if not marker.exists():
                tmp = marker.with_suffix(f".{uuid.uuid4().hex[:8]}")
                tmp.write_text(json.dumps({"format": STORE_FORMAT}))
                os.replace(tmp, marker)
        except OSError as e:
            raise UserError(
                f"store root {self.root} is not writable ({e.strerror}); set `store` to a writable folder"
            ) from None

    def check_writable(self) -> None:
        """`ensure_writable` without creating anything: the check `dmsae check` runs."""
        self.check_format()
        try:
            probe_writable(self.root)
        except OSError as e:
            raise UserError(
                f"store root {self.root} is not writable ({e.strerror}); set `store` to a writable folder"
            ) from None

    def check_format(self) -> None:
        marker = self.root / FORMAT_FILE
        if not marker.is_file():
            return
        try:
            found = json.loads(marker.read_text()).get("format")
        except (ValueError, AttributeError, OSError):
            found = None
        if found != STORE_FORMAT:
            raise UserError(
                f"store {self.root} has layout format {found!r} ({marker}), this dmsae reads format {STORE_FORMAT}; "
                "point `store` at a new folder (--set store=...) and rerun: artifacts are recomputed there"
            )

    # -- reading ------------------------------------------------------------------------------
    def has(self, stage: str, key: str) -> bool:
        return (self.artifact_dir(stage, key) / MANIFEST).is_file()

    def manifest(self, stage: str, key: str) -> Manifest:
        path = self.artifact_dir(stage, key) / MANIFEST
        try:
            return Manifest.model_validate_json(path.read_text())
        except ValueError:
            raise IntegrityError(f"{stage}/{key}: {MANIFEST} is unreadable (truncated or corrupted)") from None

    def load(self, stage: str, key: str, verify: bool = True) -> Artifact:
        """Open a complete artifact, checking every file against its manifest checksum."""
        path = self.artifact_dir(stage, key)
        if not (path / MANIFEST).is_file():
            raise KeyError(f"{stage}/{key} is not in the store {self.root}")
        manifest = self.manifest(stage, key)
        if manifest.key != key or manifest.stage != stage:
            raise IntegrityError(f"{stage}/{key}: its manifest describes {manifest.stage}/{manifest.key}")
        if verify:
            verify_files(path, manifest, f"{stage}/{key}")
        return Artifact(path, manifest)

    def load_intact(self, stage: str, key: str) -> Artifact | None:
        """The artifact if it is complete and intact, else None; a damaged one is moved aside with a
        one-line warning so that it gets recomputed. Call it holding the key's lock."""
        if not self.has(stage, key):
            return None
        try:
            return self.load(stage, key)
        except IntegrityError as e:
            dest = self.move_aside(stage, key)
            warn(f"{e}; moved it to {dest} and recomputing it")
            return None

    def move_aside(self, stage: str, key: str) -> Path:
        dest = self.root / CORRUPT / stage / f"{key}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:4]}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.rename(self.artifact_dir(stage, key), dest)
        return dest

    # -- locking ------------------------------------------------------------------------------
    @contextmanager
    def lock(self, stage: str, key: str, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
        """Hold the key's lock: one process computes an artifact, the others wait and then reuse it.
        An flock dies with its process, so a killed run never leaves a stale lock."""
        path = self.root / LOCKS / stage / f"{key}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait is not None:
                    on_wait()
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def is_locked(self, stage: str, key: str) -> bool:
        path = self.root / LOCKS / stage / f"{key}.lock"
        if not path.exists():
            return False
        fd = os.open(path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def leftovers(self, referenced: set[tuple[str, str]]) -> list[Path]:
        """What `gc` may remove besides unreferenced artifacts: damaged artifacts moved aside,
        checkpoints of unreferenced keys, and temporary folders no running process holds."""
        found: list[Path] = []
        corrupt = self.root / CORRUPT
        if corrupt.is_dir():
            found += sorted(p for stage in corrupt.iterdir() if stage.is_dir() for p in stage.iterdir())
        partial = self.root / PARTIAL
        if partial.is_dir():
            found += sorted(p for stage in partial.iterdir() if stage.is_dir() for p in stage.iterdir()
                            if (stage.name, p.name) not in referenced)
        tmp = self.root / TMP
        if tmp.is_dir():
            for p in sorted(tmp.iterdir()):
                stage, _, rest = p.name.partition("-")
                if not self.is_locked(stage, rest.rsplit("-", 1)[0]):
                    found.append(p)
        return found

    def open_partial(self, stage: str, key: str) -> Path:
        """The folder a computation keeps its checkpoints in (on disk they are in the store already)."""
        return self.partial_dir(stage, key)

    def sync_partial(self, stage: str, key: str) -> None:
        """Nothing to do: a local store's checkpoints are written in place."""

    def garbage(self, referenced: set[tuple[str, str]]) -> list[Garbage]:
        """Artifacts outside `referenced`, then leftovers of killed or damaged work."""
        found = [(f"{stage}/{key}", self.artifact_dir(stage, key), (stage, key))
                 for stage in self.stages() for key in self.keys(stage) if (stage, key) not in referenced]
        found += [(f"{p.relative_to(self.root)}", p, None) for p in self.leftovers(referenced)]
        return [Garbage(label, path, stage_key, _size_of(path)) for label, path, stage_key in found]

    def remove(self, item: Garbage) -> bool:
        """Delete it unless a running process holds its key's lock; whether it was deleted."""
        if item.stage_key is not None and self.is_locked(*item.stage_key):
            return False
        path = Path(item.path)
        shutil.rmtree(path) if path.is_dir() else path.unlink()
        return True

    def clear_partial(self, stage: str, key: str) -> None:
        shutil.rmtree(self.partial_dir(stage, key), ignore_errors=True)

    # -- writing ------------------------------------------------------------------------------
    @contextmanager
    def writer(self, stage: str, key: str) -> Iterator[Path]:
        """Yield a temporary directory; on success it becomes the artifact `<stage>/<key>` atomically.

        The manifest is written by `finalize`, which the caller invokes inside the block. Call it
        holding the key's lock: leftovers of killed writers of this key are removed first."""
        tmp_root = self.root / TMP
        if tmp_root.is_dir():
            for stale in tmp_root.glob(f"{stage}-{key}-*"):
                shutil.rmtree(stale, ignore_errors=True)
        tmp = tmp_root / f"{stage}-{key}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            yield tmp
            if not (tmp / MANIFEST).is_file():
                raise RuntimeError(f"{stage}/{key}: writer closed without a manifest")
            final = self.artifact_dir(stage, key)
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists():  # a folder without a manifest is never complete: keep it aside, don't trust it
                warn(f"{stage}/{key}: found an incomplete folder; moved it to {self.move_aside(stage, key)}")
            _fsync_tree(tmp)
            faults.point(f"write:{stage}")  # complete in .tmp, not yet published
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
        resumed: dict[str, int] | None = None,
    ) -> Manifest:
        files = {
            str(p.relative_to(tmp)): sha256_file(p)
            for p in sorted(tmp.rglob("*"))
            if p.is_file() and p.name != MANIFEST
        }
        manifest = Manifest(
            key=key, stage=stage, version=version, params=params, inputs=inputs, files=files,
            timings=timings or {}, metrics=metrics or {}, resumed=resumed or {},
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )
        (tmp / MANIFEST).write_text(manifest.model_dump_json(indent=2))
        return manifest

    # -- runs ---------------------------------------------------------------------------------
    def run_path(self, name: str) -> Path:
        return self.runs_dir() / f"{name}.json"

    def write_run(self, record: RunRecord) -> Path:
        return _write_record(self.run_path(record.name), record)

    def has_run(self, name: str) -> bool:
        return self.run_path(name).is_file()

    def read_run(self, name: str) -> RunRecord:
        path = self.run_path(name)
        if not path.is_file():
            known = ", ".join(r.name for r in self.read_runs()) or "none"
            raise UserError(f"no run named {name!r} in the store {self.root} (recorded runs: {known})")
        return _read_record(path, RunRecord, "run", "delete it or rerun that config")

    def read_runs(self) -> list[RunRecord]:
        return _read_records(self.runs_dir(), RunRecord, "run")

    # -- sweeps -------------------------------------------------------------------------------
    def sweep_path(self, name: str) -> Path:
        return self.root / SWEEPS / f"{name}.json"

    def has_sweep(self, name: str) -> bool:
        return self.sweep_path(name).is_file()

    def write_sweep(self, record: SweepRecord) -> Path:
        return _write_record(self.sweep_path(record.name), record)

    def read_sweep(self, name: str) -> SweepRecord:
        path = self.sweep_path(name)
        if not path.is_file():
            known = ", ".join(r.name for r in self.read_sweeps()) or "none"
            raise UserError(f"no sweep named {name!r} in the store {self.root} (recorded sweeps: {known})")
        return _read_record(path, SweepRecord, "sweep", "delete it or rerun the sweep")

    def read_sweeps(self) -> list[SweepRecord]:
        return _read_records(self.root / SWEEPS, SweepRecord, "sweep")


def _write_record(path: Path, record: BaseModel) -> Path:
    """A run or sweep record, replaced whole (a reader never sees half of one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".json.{uuid.uuid4().hex[:8]}")
    tmp.write_text(record.model_dump_json(indent=2))
    os.replace(tmp, path)
    return path


def _read_record(path: Path, model: type[RecordT], kind: str, what_to_do: str) -> RecordT:
    try:
        return model.model_validate_json(path.read_text())
    except ValueError:
        raise UserError(f"{kind} record {path} is unreadable; {what_to_do}") from None


def _read_records(folder: Path, model: type[RecordT], kind: str) -> list[RecordT]:
    records = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            records.append(model.model_validate_json(path.read_text()))
        except ValueError:
            warn(f"skipping unreadable {kind} record {path}")
    return records


class RunRecord(BaseModel):
    """A named run: its config, the key of every stage, and the run it was branched from."""

    name: str
    config: dict[str, Any]
    keys: dict[str, str] = Field(description="stage label -> key, in plan order")
    stages: dict[str, str] = Field(default_factory=dict, description="stage label -> stage name")
    parent: str | None = None
    status: str = "planned"  # planned | running | complete | failed
    created: str = ""
    updated: str = ""


class SweepRecord(BaseModel):
    """A grid of runs branched from one base config: the grid, and each point's overrides and run name."""

    name: str
    base: str = Field(description="the base config's run name; every point is recorded as its branch")
    grid: dict[str, list[Any]] = Field(description="dotted key -> values, crossed into the points")
    points: list[dict[str, Any]] = Field(description="per point: its run name and the grid values it takes")
    status: str = "planned"  # planned | running | complete | failed
    created: str = ""
    updated: str = ""


def _size_of(path: Path) -> int:
    """Bytes of a file, or of every file under a folder."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _fsync_tree(path: Path) -> None:
    """Flush the artifact's files to disk before the rename publishes it."""
    for p in path.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

"""The store on object storage (`store: s3://bucket/prefix`): the same layout as a local store (dmsae/store.py
owns it and names every part), published and locked the way object storage allows.

- **Publishing.** A stage writes into a local scratch folder; its files are uploaded to `<stage>/<key>/`, then
  its manifest with a create-only write. Complete means the manifest exists, as on disk; files without a
  manifest are an unfinished upload, garbage for `gc`. A lost race (a second publisher finds the manifest
  there) changes nothing: equal keys mean equal work.
- **Leases, not flocks.** `.leases/<stage>/<key>.json` is created only if absent and holds its holder and an
  expiry, renewed while the stage computes. An expired lease is taken over with a write that succeeds only if
  the lease did not change since it was read (If-Match), so of two waiters one takes it.
- **A read-through cache per machine** (`DMSAE_CACHE`, default ~/.cache/dmsae; bounded by `DMSAE_CACHE_GB`,
  default 50): files are downloaded once, checked against the manifest's sha256, kept by content hash and
  linked into a local copy of each artifact that the stages read as they read a local one. Safe to delete.
- **Checkpoints on the store.** A stage's partial folder is local; after every checkpoint it is uploaded to
  `.partial/<stage>/<key>/` (nested files first, top-level state files last, so a state file never refers
  to data that is not there), and a computation that starts anywhere first downloads it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dmsae import faults
from dmsae.errors import IntegrityError, UserError
from dmsae.objects import Changed, Exists, Missing, ObjectClient, ObjectError
from dmsae.store import (
    CORRUPT,
    FORMAT_FILE,
    MANIFEST,
    PARTIAL,
    RUNS,
    STORE_FORMAT,
    SWEEPS,
    Artifact,
    Garbage,
    Manifest,
    RunRecord,
    Store,
    SweepRecord,
    sha256_file,
    verify_files,
    warn,
)

LEASES = ".leases"
UPLOAD_THREADS = 8
USED = ".used"  # touched on every load: the cache's recency, apart from the manifest verify_files stamps
GiB = 1 << 30


def lease_seconds() -> float:
    """How long a lease holds without renewal (a killed holder's work is taken over after this)."""
    return float(os.environ.get("DMSAE_LEASE_SECONDS", "60"))


def default_cache_dir() -> Path:
    return Path(os.environ.get("DMSAE_CACHE") or Path.home() / ".cache" / "dmsae")


class Traffic:
    """Bytes this process moved to and from the store (the benchmark and the run log read it); counted under a
    lock, since the upload and download threads add to it at once."""

    up = 0
    down = 0
    _lock = threading.Lock()

    @classmethod
    def add(cls, up: int = 0, down: int = 0) -> None:
        with cls._lock:
            cls.up += up
            cls.down += down


class RemoteStore:
    """The store interface of `Store` on an object store; see the module docstring."""

    remote = True

    def __init__(self, url: str, options: dict[str, Any] | None = None, cache_dir: Path | None = None,
                 cache_gb: float | None = None):
        self.client = ObjectClient(url, options or {})
        self.url = url.rstrip("/")
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.cache_bytes = int(GiB * (cache_gb if cache_gb is not None else float(os.environ.get("DMSAE_CACHE_GB",
                                                                                                     "50"))))
        # artifacts of this store in the cache, apart from other stores' (a bucket and prefix per folder)
        self.local = self.cache_dir / "stores" / self.client.bucket / (self.client.prefix or "_")
        self._manifests: dict[tuple[str, str], Manifest] = {}
        self._reachable = False  # checked once per instance, by check_format
        self._synced: dict[tuple[str, str], dict[str, tuple[int, int]]] = {}  # partial files as last uploaded

    @property
    def location(self) -> str:
        return self.url

    def where(self, stage: str, key: str) -> str:
        """The artifact's URL, for messages."""
        return f"{self.url}/{stage}/{key}"

    # -- checks ---------------------------------------------------------------------------------
    def check_format(self) -> None:
        """Endpoint, credentials and bucket first (one line each, at once), then the store's layout format."""
        if not self._reachable:
            self.client.check()
            self._reachable = True
        try:
            raw = self.client.quick().get(FORMAT_FILE)
        except Missing:
            return
        except ObjectError as e:
            raise UserError(f"store={self.url}: {e}") from None
        try:
            found = json.loads(raw).get("format")
        except (ValueError, AttributeError):
            found = None
        if found != STORE_FORMAT:
            raise UserError(f"store {self.url} has layout format {found!r}, this dmsae reads format {STORE_FORMAT}; "
                            "point `store` at a new prefix and rerun: artifacts are recomputed there")

    def check_writable(self) -> None:
        """Endpoint, credentials and bucket, in one line each, before any work; writes nothing that stays."""
        self.check_format()

    def ensure_writable(self) -> None:
        self.check_writable()
        try:
            self.client.create(FORMAT_FILE, json.dumps({"format": STORE_FORMAT}).encode())
        except Exists:
            pass
        try:
            self.local.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cache folder {self.cache_dir} is not writable ({e.strerror}); set DMSAE_CACHE to a "
                            "writable folder") from None

    # -- reading ------------------------------------------------------------------------------
    def has(self, stage: str, key: str) -> bool:
        return (stage, key) in self._manifests or self.client.exists(f"{stage}/{key}/{MANIFEST}")

    def manifest(self, stage: str, key: str) -> Manifest:
        if (stage, key) not in self._manifests:  # a published manifest never changes: read it once
            try:
                raw = self.client.get(f"{stage}/{key}/{MANIFEST}")
            except Missing:
                raise KeyError(f"{stage}/{key} is not in the store {self.url}") from None
            try:
                self._manifests[(stage, key)] = Manifest.model_validate_json(raw)
            except ValueError:
                raise IntegrityError(f"{stage}/{key}: {MANIFEST} is unreadable (truncated or corrupted)") from None
        return self._manifests[(stage, key)]

    def load(self, stage: str, key: str, verify: bool = True) -> Artifact:
        """The artifact as a local folder in the cache: files downloaded once per machine, checked against
        the manifest's sha256 when downloaded (and, with `verify`, once per process after that)."""
        manifest = self.manifest(stage, key)
        if manifest.key != key or manifest.stage != stage:
            raise IntegrityError(f"{stage}/{key}: its manifest describes {manifest.stage}/{manifest.key}")
        folder = self.local / stage / key
        if not (folder / MANIFEST).is_file():
            self._materialize(stage, key, manifest, folder)
        if verify:
            verify_files(folder, manifest, f"{stage}/{key}")
        # recency for the cache's eviction, kept apart from the manifest: touching the manifest would change the
        # stamp verify_files keys on and make every later load in this process rehash every file
        (folder / USED).touch()
        return Artifact(folder, manifest)

    def load_intact(self, stage: str, key: str) -> Artifact | None:
        if not self.has(stage, key):
            return None
        try:
            return self.load(stage, key)
        except IntegrityError as e:
            self.move_aside(stage, key)
            warn(f"{e}; withdrew it from {self.url} and recomputing it")
            return None

    def move_aside(self, stage: str, key: str) -> str:
        """Withdraw a damaged artifact: its manifest is deleted (a note of it kept under .corrupt/) so the
        key counts as missing and is recomputed; its files stay as an unfinished upload until `gc`."""
        note = f"{CORRUPT}/{stage}/{key}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:4]}.json"
        try:
            self.client.put(note, self.client.get(f"{stage}/{key}/{MANIFEST}"))
        except Missing:
            pass
        self.client.delete(f"{stage}/{key}/{MANIFEST}")
        self._manifests.pop((stage, key), None)
        shutil.rmtree(self.local / stage / key, ignore_errors=True)
        return note

    def _materialize(self, stage: str, key: str, manifest: Manifest, folder: Path) -> None:
        tmp = self.cache_dir / "scratch" / f"{stage}-{key}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            def fetch(item: tuple[str, str]) -> None:
                rel, digest = item
                blob = self._blob(f"{stage}/{key}/{rel}", digest, f"{stage}/{key}")
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                os.link(blob, tmp / rel)

            with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
                list(pool.map(fetch, manifest.files.items()))
            (tmp / MANIFEST).write_text(manifest.model_dump_json(indent=2))
            folder.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(tmp, folder)
            except OSError:  # another process of this machine materialized it first: theirs is as good
                if not (folder / MANIFEST).is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self._evict()

    def _blob(self, path: str, digest: str, what: str) -> Path:
        """The cached file of content `digest`, downloaded from `path` if this machine has not got it."""
        blob = self.cache_dir / "blobs" / digest[:2] / digest
        if blob.is_file():
            return blob
        blob.parent.mkdir(parents=True, exist_ok=True)
        part = blob.with_name(f"{digest}.{uuid.uuid4().hex[:8]}.part")
        try:
            try:
                self.client.get_file(path, part)
            except Missing:
                raise IntegrityError(f"{what}: file {path.rsplit('/', 1)[-1]} is missing from the store") from None
            Traffic.add(down=part.stat().st_size)
            if sha256_file(part) != digest:
                raise IntegrityError(f"{what}: file {path.split('/', 2)[-1]} is corrupted (checksum mismatch)")
            os.replace(part, blob)
        finally:
            part.unlink(missing_ok=True)
        return blob

    def _keep_blob(self, file: Path, digest: str) -> None:
        """Put a file this process wrote into the cache, so reading it back downloads nothing."""
        blob = self.cache_dir / "blobs" / digest[:2] / digest
        if not blob.exists():
            blob.parent.mkdir(parents=True, exist_ok=True)
            os.link(file, blob)

    def _evict(self) -> None:
        """Keep the cache under its bound: drop the least recently used artifact copies (not one used in the
        last ten minutes), then every file no copy links to."""
        blobs = self.cache_dir / "blobs"
        files = [p for p in blobs.rglob("*") if p.is_file()] if blobs.is_dir() else []
        total = sum(p.stat().st_size for p in files)
        if total <= self.cache_bytes:
            return
        copies = sorted((_last_used(m.parent), m.parent) for m in (self.cache_dir / "stores").rglob(MANIFEST))
        for used, folder in copies:
            if total <= self.cache_bytes or time.time() - used < 600:
                break
            shutil.rmtree(folder, ignore_errors=True)
            for p in files:
                if p.exists() and p.stat().st_nlink == 1:
                    total -= p.stat().st_size
                    p.unlink()

    # -- writing ------------------------------------------------------------------------------
    @contextmanager
    def writer(self, stage: str, key: str) -> Iterator[Path]:
        """A local scratch folder; on success its files are uploaded and then the manifest, create-only."""
        tmp = self.cache_dir / "scratch" / f"{stage}-{key}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            yield tmp
            if not (tmp / MANIFEST).is_file():
                raise RuntimeError(f"{stage}/{key}: writer closed without a manifest")
            manifest = Manifest.model_validate_json((tmp / MANIFEST).read_text())

            def upload(rel: str) -> None:
                self.client.put_file(f"{stage}/{key}/{rel}", tmp / rel)
                Traffic.add(up=(tmp / rel).stat().st_size)

            with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
                list(pool.map(upload, manifest.files))
            faults.point(f"write:{stage}")  # every file uploaded, not yet published
            try:
                self.client.create(f"{stage}/{key}/{MANIFEST}", (tmp / MANIFEST).read_bytes())
            except Exists:  # published by another process meanwhile: equal key, equal work
                pass
            for rel, digest in manifest.files.items():
                self._keep_blob(tmp / rel, digest)
            folder = self.local / stage / key
            if not (folder / MANIFEST).is_file():
                shutil.rmtree(folder, ignore_errors=True)
                folder.parent.mkdir(parents=True, exist_ok=True)
                os.rename(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    finalize = staticmethod(Store.finalize)

    # -- checkpoints --------------------------------------------------------------------------
    def partial_dir(self, stage: str, key: str) -> Path:
        return self.local / PARTIAL / stage / key

    def open_partial(self, stage: str, key: str) -> Path:
        """The partial folder as the store holds it: a checkpoint written on any machine is resumed here."""
        folder = self.partial_dir(stage, key)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        prefix = f"{PARTIAL}/{stage}/{key}"
        for obj in self.client.list(prefix):
            rel = obj["path"][len(prefix) + 1:]
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            self.client.get_file(obj["path"], folder / rel)
            Traffic.add(down=int(obj["size"]))
        self._synced[(stage, key)] = _stamps(folder)
        return folder

    def sync_partial(self, stage: str, key: str) -> None:
        """Upload what changed in the partial folder since the last sync: nested files, then the top-level ones
        (the state files that describe them), then remove what the folder no longer has."""
        folder = self.partial_dir(stage, key)
        before = self._synced.get((stage, key), {})
        now = _stamps(folder)
        changed = [rel for rel, stamp in now.items() if before.get(rel) != stamp]
        nested, top = [r for r in changed if "/" in r], [r for r in changed if "/" not in r]
        prefix = f"{PARTIAL}/{stage}/{key}"

        def upload(rel: str) -> None:
            self.client.put_file(f"{prefix}/{rel}", folder / rel)
            Traffic.add(up=now[rel][0])

        with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
            list(pool.map(upload, nested))
        for rel in top:
            upload(rel)
        for rel in set(before) - set(now):
            try:
                self.client.delete(f"{prefix}/{rel}")
            except Missing:
                pass
        self._synced[(stage, key)] = now

    def clear_partial(self, stage: str, key: str) -> None:
        prefix = f"{PARTIAL}/{stage}/{key}"
        for obj in list(self.client.list(prefix)):
            try:
                self.client.delete(obj["path"])
            except Missing:
                pass
        shutil.rmtree(self.partial_dir(stage, key), ignore_errors=True)
        self._synced.pop((stage, key), None)

    # -- leases -------------------------------------------------------------------------------
    @contextmanager
    def lock(self, stage: str, key: str, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
        """Hold the key's lease while inside; wait (polling) while another live holder has it."""
        path = f"{LEASES}/{stage}/{key}.json"
        ttl = lease_seconds()
        holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        waited = False
        while True:
            body = json.dumps({"holder": holder, "expires": time.time() + ttl}).encode()
            try:
                tag = self.client.create(path, body)
                break
            except Exists:
                pass
            try:
                raw, seen = self.client.get_with_tag(path)
            except Missing:
                continue  # released meanwhile: try again at once
            if _expired(raw):
                try:
                    tag = self.client.put_if_unchanged(path, body, seen)
                    warn(f"{stage}/{key}: took over an expired lease ({_holder(raw)})")
                    break
                except (Changed, Missing):
                    continue
            if not waited and on_wait is not None:
                on_wait()
            waited = True
            time.sleep(min(2.0, ttl / 10))
        renewer = _Renewer(self.client, path, holder, tag, ttl)
        renewer.start()
        try:
            yield
        finally:
            renewer.stop()
            try:
                raw = self.client.get(path)
                if json.loads(raw).get("holder") == holder:
                    self.client.delete(path)
            except (Missing, ValueError):
                pass

    def is_locked(self, stage: str, key: str) -> bool:
        try:
            return not _expired(self.client.get(f"{LEASES}/{stage}/{key}.json"))
        except Missing:
            return False

    # -- listing and gc -----------------------------------------------------------------------
    def stages(self) -> list[str]:
        return [s for s in self.client.folders("") if not s.startswith(".") and s not in (RUNS, SWEEPS)]

    def keys(self, stage: str) -> list[str]:
        """Keys of complete artifacts of `stage` (an upload without its manifest is a leftover)."""
        return sorted(o["path"].split("/")[1] for o in self.client.list(stage)
                      if o["path"].endswith(f"/{MANIFEST}") and o["path"].count("/") == 2)

    def garbage(self, referenced: set[tuple[str, str]]) -> list[Garbage]:
        """Unreferenced artifacts, then uploads without a manifest, checkpoints of unreferenced keys, expired
        leases and notes of withdrawn artifacts."""
        found: list[Garbage] = []
        for stage in self.stages():
            sizes: dict[str, int] = {}
            complete: set[str] = set()
            for o in self.client.list(stage):
                key = o["path"].split("/")[1]
                sizes[key] = sizes.get(key, 0) + int(o["size"])
                if o["path"] == f"{stage}/{key}/{MANIFEST}":
                    complete.add(key)
            for key, size in sorted(sizes.items()):
                if key in complete and (stage, key) in referenced:
                    continue
                if key not in complete and self.is_locked(stage, key):
                    continue  # an upload in progress
                label = f"{stage}/{key}" if key in complete else f"{stage}/{key} (unfinished upload)"
                found.append(Garbage(label, f"{stage}/{key}", (stage, key) if key in complete else None, size))
        partial: dict[str, int] = {}
        for o in self.client.list(PARTIAL):
            stage, key = o["path"].split("/")[1:3]
            if (stage, key) not in referenced:
                partial[f"{PARTIAL}/{stage}/{key}"] = partial.get(f"{PARTIAL}/{stage}/{key}", 0) + int(o["size"])
        found += [Garbage(p, p, None, size) for p, size in sorted(partial.items())]
        for o in self.client.list(LEASES):
            try:
                if _expired(self.client.get(o["path"])):
                    found.append(Garbage(f"{o['path']} (expired lease)", o["path"], None, int(o["size"])))
            except Missing:
                pass
        found += [Garbage(o["path"], o["path"], None, int(o["size"])) for o in self.client.list(CORRUPT)]
        return found

    def remove(self, item: Garbage) -> bool:
        if item.stage_key is not None and self.is_locked(*item.stage_key):
            return False
        target = str(item.path)
        if item.stage_key is not None:  # the manifest first: from then on the key counts as missing
            self.client.delete(f"{target}/{MANIFEST}")
            self._manifests.pop(item.stage_key, None)
        objects = [o["path"] for o in self.client.list(target)] or [target]
        for path in objects:
            try:
                self.client.delete(path)
            except Missing:
                pass
        return True

    # -- records ------------------------------------------------------------------------------
    def has_run(self, name: str) -> bool:
        return self.client.exists(f"{RUNS}/{name}.json")

    def write_run(self, record: RunRecord) -> str:
        self.client.put(f"{RUNS}/{record.name}.json", record.model_dump_json(indent=2).encode())
        return f"{self.url}/{RUNS}/{record.name}.json"

    def read_run(self, name: str) -> RunRecord:
        try:
            raw = self.client.get(f"{RUNS}/{name}.json")
        except Missing:
            known = ", ".join(r.name for r in self.read_runs()) or "none"
            raise UserError(f"no run named {name!r} in the store {self.url} (recorded runs: {known})") from None
        return _parse(raw, RunRecord, f"run record {self.url}/{RUNS}/{name}.json", "delete it or rerun that config")

    def read_runs(self) -> list[RunRecord]:
        return self._records(RUNS, RunRecord)

    def has_sweep(self, name: str) -> bool:
        return self.client.exists(f"{SWEEPS}/{name}.json")

    def write_sweep(self, record: SweepRecord) -> str:
        self.client.put(f"{SWEEPS}/{record.name}.json", record.model_dump_json(indent=2).encode())
        return f"{self.url}/{SWEEPS}/{record.name}.json"

    def read_sweep(self, name: str) -> SweepRecord:
        try:
            raw = self.client.get(f"{SWEEPS}/{name}.json")
        except Missing:
            known = ", ".join(r.name for r in self.read_sweeps()) or "none"
            raise UserError(f"no sweep named {name!r} in the store {self.url} (recorded sweeps: {known})") from None
        return _parse(raw, SweepRecord, f"sweep record {self.url}/{SWEEPS}/{name}.json", "delete it or rerun it")

    def read_sweeps(self) -> list[SweepRecord]:
        return self._records(SWEEPS, SweepRecord)

    def _records(self, folder: str, model: Any) -> list[Any]:
        records = []
        for o in sorted(self.client.list(folder), key=lambda o: o["path"]):
            if o["path"].endswith(".json") and o["path"].count("/") == 1:
                try:
                    records.append(model.model_validate_json(self.client.get(o["path"])))
                except ValueError:
                    warn(f"skipping unreadable record {self.url}/{o['path']}")
                except Missing:
                    pass
        return records


def _parse(raw: bytes, model: Any, what: str, todo: str) -> Any:
    try:
        return model.model_validate_json(raw)
    except ValueError:
        raise UserError(f"{what} is unreadable; {todo}") from None


def _stamps(folder: Path) -> dict[str, tuple[int, int]]:
    if not folder.is_dir():
        return {}
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file() and not p.name.endswith(".tmp")}


def _expired(raw: bytes) -> bool:
    try:
        return float(json.loads(raw)["expires"]) < time.time()
    except (ValueError, KeyError, TypeError):
        return True  # an unreadable lease holds nothing


def _holder(raw: bytes) -> str:
    try:
        return str(json.loads(raw)["holder"])
    except (ValueError, KeyError, TypeError):
        return "unknown holder"


def _last_used(folder: Path) -> float:
    """When a cached artifact copy was last loaded (its manifest's mtime for copies made before `.used`)."""
    for name in (USED, MANIFEST):
        try:
            return (folder / name).stat().st_mtime
        except OSError:
            continue
    return 0.0


class _Renewer(threading.Thread):
    """Renews a lease every third of its lifetime while the stage computes."""

    def __init__(self, client: ObjectClient, path: str, holder: str, tag: str, ttl: float):
        super().__init__(daemon=True)
        self.client, self.path, self.holder, self.tag, self.ttl = client, path, holder, tag, ttl
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.ttl / 3):
            body = json.dumps({"holder": self.holder, "expires": time.time() + self.ttl}).encode()
            try:
                self.tag = self.client.put_if_unchanged(self.path, body, self.tag)
            except (Changed, Missing):
                print(f"dmsae: warning: lost the lease {self.path} (this process stalled past its expiry); "
                      "finishing anyway: only one publisher wins and both compute the same bytes",
                      file=sys.stderr, flush=True)
                return
            except ObjectError:
                continue  # the server is away: try again at the next renewal

    def stop(self) -> None:
        self.done.set()

"""Which store a location names: a folder on this machine's disk (dmsae/store.py) or an object store
(dmsae/remote_store.py); both have one interface, and the layout in the store is the same."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeAlias

from dmsae.objects import is_remote, local_path
from dmsae.remote_store import RemoteStore
from dmsae.store import Store

AnyStore: TypeAlias = Store | RemoteStore


def open_store(location: str | Path, options: dict[str, Any] | None = None) -> Store | RemoteStore:
    """The store at `location`: a local folder (a path or file://PATH) or an object store URL (s3://...)."""
    if isinstance(location, str) and is_remote(location):
        return RemoteStore(location, options)
    return Store(local_path(str(location)))


def store_for(cfg: Any) -> AnyStore:
    """The store a config names (`store` and `store_options`)."""
    return open_store(cfg.store, cfg.store_options.client_options())


def same_location(a: str | Path, b: str | Path) -> bool:
    """Whether two store locations name the same store."""
    a, b = str(a), str(b)
    if is_remote(a) or is_remote(b):
        return a.rstrip("/") == b.rstrip("/")
    return Path(local_path(a)).resolve() == Path(local_path(b)).resolve()

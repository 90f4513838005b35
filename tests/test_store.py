"""The content-addressed store (DESIGN.md section 3): keys, branching at the plan level, integrity,
and atomic writes."""

from __future__ import annotations

import copy
import hashlib
import json

import pytest

from dmsae.errors import IntegrityError, UserError
from dmsae.runtime import Runtime
from dmsae.store import MANIFEST, Store, compute_key
from flows.pipeline import materialize, plan

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

ALL_LABELS = ["model", "tokens", "harvest", "train[0]", "attribute[0]", "select[0]",
              "train[1]", "attribute[1]", "select[1]"]


def plan_keys(cfg) -> dict[str, str]:
    return {n.label: n.key for n in plan(cfg).nodes}


def changed(a: dict[str, str], b: dict[str, str]) -> set[str]:
    return {label for label in a if a[label] != b.get(label)}


@pytest.fixture(scope="module")
def base_keys(make_config, tmp_path_factory):
    keys = plan_keys(make_config(tmp_path_factory.mktemp("plan")))
    assert list(keys) == ALL_LABELS
    assert len(set(keys.values())) == len(keys)
    return keys


@pytest.mark.parametrize("override,expected", [
    ("selection.tau=0.5", {"select[0]", "train[1]", "attribute[1]", "select[1]"}),
    ("harvest.layer=2", set(ALL_LABELS) - {"model", "tokens"}),
    ("harvest.chunk_rows=128", set(ALL_LABELS) - {"model", "tokens"}),
    ("sae.k=5", {"train[0]", "attribute[0]", "select[0]", "train[1]", "attribute[1]", "select[1]"}),
    ("seed=3", {"train[0]", "attribute[0]", "select[0]", "train[1]", "attribute[1]", "select[1]"}),
    ("attribution.score=quantile", {"attribute[0]", "select[0]", "train[1]", "attribute[1]", "select[1]"}),
    ("data.split_seed=1", set(ALL_LABELS) - {"model"}),
    ("model.dtype=bfloat16", set(ALL_LABELS)),
    # on CUDA a float32 LM runs under bf16 autocast: the LM stages' numbers change, so their keys do
    ("device=cuda", set(ALL_LABELS) - {"model", "tokens"}),
    # execution settings stay out of every key
    ("train.checkpoint_every=7", set()),
    ("threads=1", set()),
    ("name=another", set()),
])
def test_plan_changes_only_what_depends_on_the_change(make_config, tmp_path_factory, base_keys, override, expected):
    keys = plan_keys(make_config(tmp_path_factory.mktemp("plan"), override))
    assert list(keys) == ALL_LABELS
    assert changed(base_keys, keys) == expected


def test_store_root_is_not_part_of_any_key(make_config, tmp_path_factory, base_keys):
    assert plan_keys(make_config(tmp_path_factory.mktemp("elsewhere"))) == base_keys


def test_more_cycles_extend_the_plan_without_changing_earlier_keys(make_config, tmp_path_factory, base_keys):
    keys = plan_keys(make_config(tmp_path_factory.mktemp("plan"), "cycles=3"))
    assert {label: keys[label] for label in ALL_LABELS} == base_keys
    assert set(keys) - set(ALL_LABELS) == {"train[2]", "attribute[2]", "select[2]"}


def test_editing_the_corpus_changes_tokens_and_everything_after(make_config, tmp_path, corpus_path, base_keys):
    edited = tmp_path / "corpus.jsonl"
    edited.write_text(corpus_path.read_text() + json.dumps({"text": "w01 w02 w03"}) + "\n")
    keys = plan_keys(make_config(tmp_path / "store", f"data.path={edited}"))
    assert changed(base_keys, keys) == set(ALL_LABELS) - {"model"}


# -- integrity and atomic writes ----------------------------------------------------------------------


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


def test_load_detects_a_corrupted_real_artifact(pipeline_run, tmp_path):
    """Flip bytes in a real artifact (the trained SAE weights) copied into a fresh store."""
    import shutil

    node = pipeline_run.plan.find("train", 0)
    src = pipeline_run.store.artifact_dir("train", node.key)
    shutil.copytree(src, tmp_path / "train" / node.key)
    Store(tmp_path).load("train", node.key)  # intact copy loads
    f = tmp_path / "train" / node.key / "sae.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        Store(tmp_path).load("train", node.key)


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


def test_failing_stage_leaves_no_artifact(make_config, tmp_path):
    """A real stage failing half-way (the corpus is too small for the splits) leaves no artifact."""
    cfg = make_config(tmp_path / "store", "data.train_tokens=10000000")
    p = plan(cfg)
    store = Store(cfg.store)
    rt = Runtime(show_progress=False)
    materialize(store, p.find("model"), rt)
    tokens = p.find("tokens")
    with pytest.raises(UserError, match="too few tokens"):
        materialize(store, tokens, rt)
    assert not store.has("tokens", tokens.key)
    assert not store.artifact_dir("tokens", tokens.key).exists()
    assert not any((store.root / ".tmp").iterdir())


def test_manifest_records_the_node(pipeline_run):
    for node in pipeline_run.plan.nodes:
        m = pipeline_run.store.manifest(node.stage, node.key)
        assert (m.key, m.stage, m.version) == (node.key, node.stage, node.version)
        assert m.params == json.loads(json.dumps(node.params))
        assert m.inputs == {name: n.key for name, n in node.inputs.items()}
        art_dir = pipeline_run.store.artifact_dir(node.stage, node.key)
        on_disk = {str(f.relative_to(art_dir)) for f in art_dir.rglob("*") if f.is_file() and f.name != MANIFEST}
        assert set(m.files) == on_disk
        assert compute_key(node.stage, node.version, m.params, m.inputs) == node.key

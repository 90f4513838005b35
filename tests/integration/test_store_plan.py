"""The store through the planner and real artifacts (docs/design.md section 3): branching at the plan level,
a corrupted real artifact, a failing stage, the manifest of a node."""

from __future__ import annotations

import json

import pytest

from dmsae.errors import IntegrityError, UserError
from dmsae.runtime import Runtime
from dmsae.store import MANIFEST, Store, compute_key
from flows.pipeline import materialize, plan

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

"""Bad input: every case gives exit code 2 and one line naming the problem and what to do, no
traceback, and leaves the store as it was: no new artifact, no temporary or partial files, every
existing file byte-identical.

Each case runs the real CLI in this process against a private copy of the tiny run's store; the
output is captured at the file-descriptor level, so Prefect's own logging is checked too."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml

from dmsae.precision import native_bf16
from flows.cli import main


@dataclass
class Case:
    args: Callable[[Path, Path], list[str]]  # (config file, work dir) -> CLI arguments
    expect: str  # a fragment of the one-line message
    setup: Callable[[Path, Path], None] = lambda config, work: None
    may_add: set[str] = field(default_factory=set)  # stages a valid upstream part may add (new inputs)


def write_yaml(path: Path, **changes: object) -> None:
    data = yaml.safe_load(path.read_text())
    for dotted, value in changes.items():
        node = data
        *parents, last = dotted.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    path.write_text(yaml.safe_dump(data))


def nan_model(config: Path, work: Path) -> None:
    """A copy of the tiny model whose layer-0 MLP weights are NaN."""
    from safetensors.torch import load_file, save_file

    src = Path(yaml.safe_load(config.read_text())["model"]["path"])
    dst = work / "nan-model"
    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    tensors = load_file(str(weights))
    name = next(k for k in tensors if "layers.0.mlp.down_proj" in k)
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(weights), metadata={"format": "pt"})
    write_yaml(config, **{"model.path": str(dst)})


def run_args(*sets: str) -> Callable[[Path, Path], list[str]]:
    return lambda config, work: ["run", str(config), "--no-progress", *[x for s in sets for x in ("--set", s)]]


CASES: dict[str, Case] = {
    "unknown config key": Case(run_args("sae.widht=64"), "sae.widht: unknown key"),
    "wrong type": Case(run_args("sae.k=many"), "sae.k:"),
    "tau above 1": Case(run_args("selection.tau=1.5"), "selection.tau:"),
    "tau zero": Case(run_args("selection.tau=0"), "selection.tau:"),
    "unknown core gate": Case(run_args("sae.core_gate=sigmoid"), "sae.core_gate:"),
    "negative core cap": Case(run_args("selection.max_core=-3"), "selection.max_core:"),
    "core cap given as a boolean": Case(run_args("selection.max_core=true"), "selection.max_core:"),
    "layer out of range (model in the store)": Case(run_args("harvest.layer=9"), "harvest.layer=9 is out of range"),
    "layer out of range (new model, read from config.json)": Case(
        run_args("harvest.layer=4"), "the model has layers 0..3",
        setup=lambda c, w: write_yaml(c, **{"model.path": str(shutil.copytree(
            yaml.safe_load(c.read_text())["model"]["path"], w / "model-copy"))})),
    "k not below width": Case(run_args("sae.k=128"), "k (128) must be smaller than width (128)"),
    "reuse k not below reuse width": Case(run_args("reuse.k=[8]", "reuse.width=8"), "reuse width"),
    "cap larger than a reuse SAE can hold": Case(run_args("reuse.k=[6]", "reuse.width=7"),
                                                 "SAE of width 7 at k=6 can hold beside its k (1)"),
    "group fractions sum to 1": Case(run_args("sae.group_fractions=[0.5, 0.5]"), "sae.group_fractions"),
    "empty corpus file": Case(run_args(), "is empty", setup=lambda c, w: (
        (w / "empty.txt").write_text(""), write_yaml(c, **{"data.path": str(w / "empty.txt")}))),
    "corpus of blank documents": Case(run_args(), "no non-empty documents", setup=lambda c, w: (
        (w / "blank.jsonl").write_text('{"text": "  "}\n{"text": ""}\n' * 1000),  # bytes enough to pass the size bound
        write_yaml(c, **{"data.path": str(w / "blank.jsonl")}))),
    "corpus field missing": Case(run_args("data.field=body"), "has no field 'body'"),
    "missing corpus file": Case(run_args("data.path=/nonexistent/corpus.jsonl"), "data.path: file not found"),
    "missing model path": Case(run_args("model.path=/nonexistent/model"), "model.path: /nonexistent/model not found"),
    "file that claims to be GGUF": Case(run_args(), "is not a GGUF file", setup=lambda c, w: (
        (w / "fake.gguf").write_bytes(b"PK\x03\x04 this is a zip, not a model"),
        write_yaml(c, **{"model.path": str(w / "fake.gguf")}))),
    "unwritable store root": Case(lambda c, w: ["run", str(c), "--set", f"store={w / 'a-file' / 'store'}"],
                                  "is not writable", setup=lambda c, w: (w / "a-file").write_text("x")),
    "NaN in the activations": Case(run_args(), "NaN or inf activations", setup=nan_model,
                                   may_add={"model", "tokens"}),
    "too few tokens for the splits": Case(run_args("data.train_tokens=10000000"), "data.train_tokens"),
    "store of an older format": Case(run_args(), "layout format 0", setup=lambda c, w: (
        Path(yaml.safe_load(c.read_text())["store"], "dmsae-store.json").write_text('{"format": 0}'))),
    "config file not found": Case(lambda c, w: ["run", str(w / "nope.yaml")], "config file not found"),
    "config not valid YAML": Case(lambda c, w: ["run", str(w / "bad.yaml")], "not valid YAML",
                                  setup=lambda c, w: (w / "bad.yaml").write_text("sae: [unclosed\n")),
    "override without =": Case(run_args("selection.tau"), "expected dotted.key=value"),
    "unknown run name": Case(lambda c, w: ["run", "nosuchrun", "--store", str(w)], "nosuchrun: neither"),
    "cuda without a GPU": Case(run_args("device=cuda"), "no CUDA device",
                               setup=lambda c, w: None if not torch.cuda.is_available() else pytest.skip("GPU")),
    "run name with a path separator": Case(run_args("name=a/b"), "name: 'a/b' is not a usable run name"),
    "empty run name": Case(run_args("name="), "is not a usable run name"),
    "run name of dots": Case(run_args("name=.."), "is not a usable run name"),
    "device torch does not know": Case(run_args("device=tpu"), "device: 'tpu' is not a device"),
    "device mps": Case(run_args("device=mps"), "'mps' is not a device dmsae runs on"),
    # the refusal on real hardware (tests/unit/test_precision.py checks the rule on given flags)
    "bf16 on a CPU without bfloat16 units": Case(
        run_args("precision.sae=bf16"), "precision.sae=bf16: the CPU has no native bfloat16",
        setup=lambda c, w: pytest.skip("this CPU runs bfloat16 natively") if native_bf16("cpu")[0] else None),
    "evaluation in bf16 on a CPU without bfloat16 units": Case(
        run_args("precision.eval=bf16"), "precision.eval=bf16: the CPU has no native bfloat16",
        setup=lambda c, w: pytest.skip("this CPU runs bfloat16 natively") if native_bf16("cpu")[0] else None),
    "evaluation precision that is not one": Case(run_args("precision.eval=fp16"), "precision.eval"),
    "cuda index past the devices": Case(run_args("device=cuda:7"), "device=cuda:7",
                                        setup=lambda c, w: None if torch.cuda.device_count() < 8 else pytest.skip()),
    "report folder under /proc": Case(run_args("report_dir=/proc/nope"), "report_dir=/proc/nope is not writable"),
    "report folder is a file": Case(lambda c, w: ["run", str(c), "--set", f"report_dir={w / 'a-file'}"],
                                    "is not writable", setup=lambda c, w: (w / "a-file").write_text("x")),
    "batch larger than the training tokens": Case(run_args("train.batch_size=100000000"),
                                                  "train.batch_size (100000000) exceeds data.train_tokens"),
    "learning rate of 1e9": Case(run_args("train.lr=1e9"), "train.lr: Input should be less than or equal to 1"),
    "infinite float": Case(run_args("sae.aux_alpha=1e400"), "sae.aux_alpha: Input should be a finite number"),
    "threads past a C int": Case(run_args("threads=2147483648"), "threads: Input should be less than or equal to 1024"),
    "SAE wider than memory": Case(run_args("sae.width=1000000000000"), "sae.width=1000000000000: training an SAE"),
    "negative seed": Case(run_args("seed=-1"), "seed: Input should be greater than or equal to 0"),
    "negative split seed": Case(run_args("data.split_seed=-1"), "data.split_seed: Input should be greater"),
    "negative consistency seed": Case(run_args("reuse.consistency_seeds=[0, -3]"), "seeds must be between 0"),
    "cap larger than the SAE can hold": Case(run_args("selection.max_core=1000"),
                                             "selection.max_core allows a core of 1000 latents"),
    "override with an empty key": Case(run_args("sae.=3"), "is not a dotted config key"),
    "context longer than the model's": Case(run_args("data.context=256"), "longer than the model's context of 128"),
    "model id the hub cannot give": Case(run_args("model.path=nobody/no-such-model"),
                                         "'nobody/no-such-model' is not a local model"),
    "dataset id the hub cannot give": Case(run_args("data.path=nobody/no-such-data"),
                                           "'nobody/no-such-data' is not a local corpus"),
    "Dask scheduler that does not answer": Case(run_args("runner=dask", "dask.address=tcp://127.0.0.1:9"),
                                                "no Dask scheduler answers there"),
    "export of an unknown SAE": Case(lambda c, w: ["export", str(c), "--sae", "train[9]"],
                                     "--sae train[9]: no such SAE"),
    "probing task file that is missing": Case(
        lambda c, w: run_args("interpret.enabled=true", f"interpret.probe_data={w / 'none.jsonl'}")(c, w),
        "interpret.probe_data:"),
    "probing task file without labels": Case(
        lambda c, w: run_args("interpret.enabled=true", f"interpret.probe_data={w / 'task.jsonl'}")(c, w),
        "no field 'label'",
        setup=lambda c, w: (w / "task.jsonl").write_text('{"text": "w01 w02"}\n{"text": "w03"}\n')),
    "latent cards of a run not yet run": Case(lambda c, w: ["cards", str(c), "--set", "seed=7"], "run it first"),
}


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.rglob("*") if p.is_file() and ".locks" not in p.parts}


def published(root: Path) -> set[tuple[str, str]]:
    return {(p.parent.parent.name, p.parent.name) for p in root.glob("*/*/manifest.json")
            if not p.parent.parent.name.startswith(".")}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_exits_2_with_one_line_and_changes_nothing(name, pipeline_run, make_config, tmp_path, capfd):
    case = CASES[name]
    store = tmp_path / "store"
    shutil.copytree(pipeline_run.store.root, store, ignore=shutil.ignore_patterns(".locks"))
    cfg = make_config(store, f"report_dir={tmp_path / 'reports'}")
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    case.setup(config, tmp_path)
    before, artifacts_before = snapshot(store), published(store)
    capfd.readouterr()

    code = main(case.args(config, tmp_path))

    out, err = capfd.readouterr()
    assert code == 2, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("dmsae: error:")]
    assert len(errors) == 1, err[-3000:]
    assert case.expect in errors[0], errors[0]
    assert "Traceback" not in out + err, err[-3000:]
    after = snapshot(store)
    for rel, digest in before.items():  # nothing existing lost or changed (run records may gain a status)
        if not rel.startswith("runs/"):
            assert after.get(rel) == digest, f"{rel} changed"
    added = {stage for stage, _ in published(store) - artifacts_before}
    assert added <= case.may_add, added
    assert not [p for p in (store / ".tmp").rglob("*") if p.is_file()] if (store / ".tmp").exists() else True
    partial = store / ".partial"
    assert not partial.exists() or not [p for p in partial.rglob("*") if p.is_file()]


def test_there_are_at_least_15_cases():
    assert len(CASES) >= 15


def test_pointless_values_warn_in_one_line_each_through_the_cli(make_config, tmp_path, capsys):
    from dmsae.config import config_warnings

    assert config_warnings(make_config(tmp_path)) == []  # the tiny test config is small but not pointless
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(make_config(tmp_path / "store", f"report_dir={tmp_path / 'r'}")
                                     .model_dump(mode="json")))
    assert main(["check", str(config), "--set", "data.train_tokens=64", "--set", "train.batch_size=64",
                 "--set", "data.attribution_tokens=1", "--set", "data.eval_tokens=1", "--set", "train.lr=0.5",
                 "--set", "selection.max_core=null"]) == 0  # legal: it would run, so it is not refused
    notes = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert all(ln.startswith("dmsae: warning: ") for ln in notes) and len(notes) == 5, notes
    assert "data.train_tokens=64 gives about 1 training steps" in notes[0]
    assert "train.lr=0.5 is far above" in notes[1]
    assert "selection.max_core=null" in notes[2]
    assert "data.attribution_tokens=1 is less than one window" in notes[3]
    assert "data.eval_tokens=1 is less than one window" in notes[4]
    assert not (tmp_path / "store").exists()


def test_run_record_of_a_failed_run_says_failed(pipeline_run, make_config, tmp_path, capfd):
    """A stage stopped by bad input marks the run failed, so `dmsae status` tells the truth."""
    # 40k tokens: within the corpus's byte bound (so preflight lets it through), beyond its ~7k tokens
    store = tmp_path / "store"
    shutil.copytree(pipeline_run.store.root, store, ignore=shutil.ignore_patterns(".locks"))
    cfg = make_config(store, "data.train_tokens=40000", f"report_dir={tmp_path / 'reports'}")
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert main(["run", str(config), "--no-progress"]) == 2
    assert json.loads((store / "runs" / "tiny.json").read_text())["status"] == "failed"

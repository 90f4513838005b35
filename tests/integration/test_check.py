"""`dmsae check`: the checks of `dmsae run` and the plan, through the real CLI, writing nothing."""

from __future__ import annotations

import shutil

import yaml

from flows.cli import main


def write_config(cfg, path):
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


def test_check_on_a_new_store_plans_everything_and_creates_nothing(make_config, tmp_path, capsys):
    store, reports = tmp_path / "new" / "store", tmp_path / "new" / "reports"
    config = write_config(make_config(store, f"report_dir={reports}"), tmp_path / "tiny.yaml")
    assert main(["check", str(config)]) == 0
    out = capsys.readouterr().out
    assert "stages: 0 cached" in out and "compute  train[1]" in out
    assert not (tmp_path / "new").exists()  # the probes left nothing, not even the folders


def test_check_on_a_finished_store_finds_it_cached(pipeline_run, make_config, tmp_path, capsys):
    store = tmp_path / "store"
    shutil.copytree(pipeline_run.store.root, store)
    before = sorted(p.relative_to(store) for p in store.rglob("*"))
    config = write_config(make_config(store, f"report_dir={tmp_path / 'r'}"), tmp_path / "tiny.yaml")
    assert main(["check", str(config)]) == 0
    out = capsys.readouterr().out
    n = len(pipeline_run.plan.nodes)
    assert f"{n} stages: {n} cached, 0 to compute" in out
    assert sorted(p.relative_to(store) for p in store.rglob("*")) == before


def test_check_refuses_what_run_refuses(make_config, tmp_path, capsys):
    config = write_config(make_config(tmp_path / "s"), tmp_path / "tiny.yaml")
    assert main(["check", str(config), "--set", "report_dir=/proc/nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "report_dir=/proc/nope is not writable" in err[0]
    assert not (tmp_path / "s").exists()

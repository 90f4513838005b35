"""The Prefect flow (ephemeral server, real task runs) and the `dmsae` CLI on the tiny config.

Prefect flow runs are slow to start, so one module fixture makes the three flow runs the tests
inspect: a first run that computes everything, an identical second run that must compute nothing,
and a run with another selection.tau that must compute only select[0] and what follows it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from flows.cli import main
from flows.distill import distill

ALL_LABELS = ["model", "tokens", "harvest", "train[0]", "attribute[0]", "select[0]",
              "train[1]", "attribute[1]", "select[1]"]
AFTER_SELECT0 = {"select[0]", "train[1]", "attribute[1]", "select[1]"}


def task_states(flow_run_id) -> dict[str, tuple[str, str]]:
    """{task run name: (state name, state type)} for every task run of one flow run, from the API."""
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    states = {r.name: (r.state.name, r.state.type.value) for r in runs}
    assert len(states) == len(runs), "task run names are unique per flow run"
    return states


def manifests(root: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes()) for p in root.rglob("manifest.json")}


def keys_on_disk(root: Path) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for p in root.glob("*/*/manifest.json"):
        out.setdefault(p.parent.parent.name, set()).add(p.parent.name)
    return out


@pytest.fixture(scope="module")
def flow_runs(make_config, tmp_path_factory):
    store = tmp_path_factory.mktemp("flow-store")
    cfg = make_config(store)
    cfg_tau = make_config(store, "selection.tau=0.5")
    first = distill(cfg.model_dump(mode="json"), show_progress=False, return_state=True)
    after_first = manifests(store)
    second = distill(cfg.model_dump(mode="json"), show_progress=False, return_state=True)
    after_second = manifests(store)
    third = distill(cfg_tau.model_dump(mode="json"), show_progress=False, return_state=True)
    record = json.loads((store / "runs" / "tiny.json").read_text())
    return {"record_after_third": record, "store": store, "cfg": cfg, "cfg_tau": cfg_tau,
            "first": first, "second": second, "third": third,
            "after_first": after_first, "after_second": after_second}


def plan_keys(cfg) -> dict[str, str]:
    from flows.pipeline import plan

    return {n.label: n.key for n in plan(cfg).nodes}


def test_first_run_computes_every_stage(flow_runs, pipeline_run):
    state = flow_runs["first"]
    assert state.is_completed(), state.message
    keys = state.result()["keys"]
    assert state.result()["computed"] == ALL_LABELS
    assert keys == plan_keys(flow_runs["cfg"])
    # the same keys as the run without Prefect into another store
    assert keys == {n.label: n.key for n in pipeline_run.plan.nodes}
    states = task_states(state.state_details.flow_run_id)
    assert set(states) == set(ALL_LABELS)
    assert all(s == ("Completed", "COMPLETED") for s in states.values()), states
    on_disk = keys_on_disk(flow_runs["store"])
    for label, key in keys.items():
        assert key in on_disk[label.split("[")[0]]


def test_second_run_executes_no_stage(flow_runs):
    state = flow_runs["second"]
    assert state.is_completed(), state.message
    assert state.result() == {"keys": flow_runs["first"].result()["keys"], "computed": []}
    states = task_states(state.state_details.flow_run_id)
    assert set(states) == set(ALL_LABELS)
    assert all(s == ("Cached", "COMPLETED") for s in states.values()), states
    # nothing was rewritten: same manifests, same bytes, same modification times
    assert flow_runs["after_second"] == flow_runs["after_first"]


def test_changed_tau_recomputes_only_select0_and_downstream(flow_runs):
    state = flow_runs["third"]
    assert state.is_completed(), state.message
    assert state.result()["keys"] == plan_keys(flow_runs["cfg_tau"])
    assert set(state.result()["computed"]) == AFTER_SELECT0
    states = task_states(state.state_details.flow_run_id)
    assert set(states) == set(ALL_LABELS)
    computed = {label for label, (name, _) in states.items() if name == "Completed"}
    cached = {label for label, (name, _) in states.items() if name == "Cached"}
    assert computed == AFTER_SELECT0
    assert cached == set(ALL_LABELS) - AFTER_SELECT0
    # the earlier artifacts were left alone
    after = manifests(flow_runs["store"])
    for rel, value in flow_runs["after_second"].items():
        assert after[rel] == value


def test_flow_writes_a_run_record(flow_runs):
    record = flow_runs["record_after_third"]
    assert record["keys"] == plan_keys(flow_runs["cfg_tau"])  # the latest run of that name
    assert record["config"]["selection"]["tau"] == 0.5


# -- CLI -------------------------------------------------------------------------------------------


def write_yaml(path: Path, cfg, **changes) -> Path:
    data = cfg.model_dump(mode="json")
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        data[section][key] = value
    path.write_text(yaml.safe_dump(data))
    return path


def status_rows(out: str) -> dict[str, tuple[str, str]]:
    rows = {}
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0] in ALL_LABELS:
            rows[parts[0]] = (parts[1], parts[2])
    return rows


def test_cli_run_and_status(flow_runs, tmp_path, capsys):
    """`dmsae run` on a new tau branch of the flow store computes 4 stages and exits 0; `status` agrees."""
    path = write_yaml(tmp_path / "tiny.yaml", flow_runs["cfg"], selection__tau=0.3)
    capsys.readouterr()
    assert main(["run", str(path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "computed 4 of 9 stages" in out

    assert main(["status", str(path)]) == 0
    out = capsys.readouterr().out
    assert "9/9 stages done" in out
    rows = status_rows(out)
    assert set(rows) == set(ALL_LABELS)
    on_disk = keys_on_disk(flow_runs["store"])
    for label, (state, key) in rows.items():
        assert state == "done"
        assert key in on_disk[label.split("[")[0]]

    # --set on the command line selects another branch: one that was never run
    assert main(["status", str(path), "--set", "selection.tau=0.25"]) == 0
    rows = status_rows(capsys.readouterr().out)
    assert {label for label, (state, _) in rows.items() if state == "missing"} == AFTER_SELECT0
    assert {label for label, (state, _) in rows.items() if state == "done"} == set(ALL_LABELS) - AFTER_SELECT0


def test_cli_bad_config_exits_2_with_one_line(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "bad", "sae": {"width": 64, "widht": 32}}))
    assert main(["run", str(path)]) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("dmsae: error:")
    assert "sae.widht" in lines[0]
    assert "Traceback" not in captured.err


def test_cli_missing_config_exits_2(tmp_path, capsys):
    assert main(["status", str(tmp_path / "nope.yaml")]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "not found" in lines[0]


def test_cli_status_lists_recorded_runs(flow_runs, capsys):
    """Without a config, `status --store` lists the runs the flow recorded; with a run name, its stages."""
    capsys.readouterr()
    assert main(["status", "--store", str(flow_runs["store"])]) == 0
    out = capsys.readouterr().out
    assert f"tiny  [complete]  {len(ALL_LABELS)}/{len(ALL_LABELS)} stages done" in out
    assert main(["status", "tiny", "--store", str(flow_runs["store"])]) == 0
    out = capsys.readouterr().out
    assert "run 'tiny'" in out
    rows = status_rows(out)
    assert set(rows) == set(ALL_LABELS)
    assert all(state == "done" for state, _ in rows.values())
    record = json.loads((flow_runs["store"] / "runs" / "tiny.json").read_text())  # the latest run named tiny
    assert {label: key for label, (_, key) in rows.items()} == record["keys"]


def test_cli_user_error_inside_a_stage_exits_2(make_config, tmp_path, capsys):
    """A stage stopped by a user mistake (corpus too small) fails the flow as InvalidInput: exit 2, one line."""
    cfg = make_config(tmp_path / "store", "data.train_tokens=40000")  # past the ~7k tokens, within the byte bound
    path = write_yaml(tmp_path / "too-big.yaml", cfg)
    capsys.readouterr()
    assert main(["run", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("dmsae:")]
    assert len(ours) == 1, err
    assert "too few tokens" in ours[0]
    assert "Traceback" not in err
    assert not list((tmp_path / "store").glob("tokens/*/manifest.json"))

"""dmsae.config: strict validation with errors that name the field, and --set overrides."""

from __future__ import annotations

import pytest
import yaml

from dmsae.config import Config, load_config, parse_override
from dmsae.errors import UserError


def error_of(overrides: list[str], path=None) -> str:
    with pytest.raises(UserError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message  # one line, never a traceback
    return message


def test_defaults_are_valid():
    cfg = load_config(None, [])
    assert isinstance(cfg, Config)
    assert cfg.selection.tau == 0.9
    assert cfg.sae.l0_mode == "dynamic"


@pytest.mark.parametrize("override,field", [
    ("sae.widht=10", "sae.widht"),
    ("selection.tua=0.5", "selection.tua"),
    ("colour=red", "colour"),
])
def test_unknown_key_is_rejected_naming_the_field(override, field):
    message = error_of([override])
    assert field in message
    assert "unknown key" in message


def test_unknown_key_in_yaml_names_file_and_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "train": {"batch_size": 8, "learning_rate": 0.1}}))
    message = error_of([], path)
    assert "train.learning_rate" in message
    assert str(path) in message


@pytest.mark.parametrize("override,field", [
    ("sae.k=abc", "sae.k"),
    ("train.lr=fast", "train.lr"),
    ("sae.group_fractions=oops", "sae.group_fractions"),
    ("model.dtype=float64", "model.dtype"),
    ("cycles=[1, 2]", "cycles"),
])
def test_wrong_type_names_the_field(override, field):
    assert field in error_of([override])


@pytest.mark.parametrize("tau", ["0", "-0.1", "1.0001", "2"])
def test_tau_outside_unit_interval_is_rejected(tau):
    assert "selection.tau" in error_of([f"selection.tau={tau}"])


@pytest.mark.parametrize("tau", [1e-9, 0.5, 1.0])
def test_tau_inside_unit_interval_is_accepted(tau):
    assert load_config(None, [f"selection.tau={tau}"]).selection.tau == tau


@pytest.mark.parametrize("k,width", [(64, 64), (65, 64), (4096, 128)])
def test_k_not_below_width_is_rejected(k, width):
    message = error_of([f"sae.k={k}", f"sae.width={width}"])
    assert message.split(":")[1].strip().startswith("sae") and "width" in message


def test_k_just_below_width_is_accepted():
    cfg = load_config(None, ["sae.k=63", "sae.width=64", "selection.max_core=1"])
    assert (cfg.sae.k, cfg.sae.width) == (63, 64)


def test_a_cap_the_sae_cannot_hold_is_refused_only_where_a_core_is_loaded():
    # width 64 at k=63 holds one core latent beside its k: the default cap (0.6 k = 38) cannot fit ...
    with pytest.raises(UserError, match="core of 38 latents, more than an SAE of width 64 at k=63 can hold"):
        load_config(None, ["sae.k=63", "sae.width=64"])
    # ... unless no later cycle loads the core (one cycle, no reuse)
    assert load_config(None, ["sae.k=63", "sae.width=64", "cycles=1"]).cycles == 1
    with pytest.raises(UserError, match="raise reuse.width"):
        load_config(None, ["sae.k=63", "sae.width=64", "cycles=1", "reuse.k=[8]", "reuse.width=20"])


def test_set_overrides_parse_numbers_lists_and_strings():
    cfg = load_config(None, [
        "selection.tau=0.8", "sae.width=256", "sae.k=16", "sae.group_fractions=[0.25, 0.5]",
        "name=my-run", "data.path=/some/where/corpus.jsonl", "seed=7", "sae.freeze_core_encoder=false",
        "train.lr=1e-3",
    ])
    assert cfg.selection.tau == 0.8 and isinstance(cfg.selection.tau, float)
    assert cfg.sae.width == 256 and isinstance(cfg.sae.width, int)
    assert cfg.sae.group_fractions == [0.25, 0.5]
    assert cfg.name == "my-run"
    assert cfg.data.path == "/some/where/corpus.jsonl"
    assert cfg.seed == 7
    assert cfg.sae.freeze_core_encoder is False
    assert cfg.train.lr == pytest.approx(1e-3)


def test_parse_override_splits_dotted_keys():
    assert parse_override("a.b.c=[1, 2]") == (["a", "b", "c"], [1, 2])
    assert parse_override("x=3") == (["x"], 3)
    assert parse_override("x=2.5") == (["x"], 2.5)
    assert parse_override("x=a=b") == (["x"], "a=b")


def test_override_without_equals_is_a_user_error():
    assert "selection.tau" in error_of(["selection.tau"])


def test_overrides_apply_on_top_of_yaml(tmp_path):
    path = tmp_path / "preset.yaml"
    path.write_text(yaml.safe_dump({"name": "preset", "cycles": 4, "selection": {"tau": 0.7}, "sae": {"k": 8}}))
    cfg = load_config(path, ["selection.tau=0.6"])
    assert cfg.name == "preset" and cfg.cycles == 4 and cfg.sae.k == 8
    assert cfg.selection.tau == 0.6


def test_missing_or_malformed_yaml_is_a_user_error(tmp_path):
    assert "not found" in error_of([], tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    assert str(bad) in error_of([], bad)


def test_group_fractions_must_leave_a_last_group():
    assert "sae.group_fractions" in error_of(["sae.group_fractions=[0.5, 0.5]"])
    assert "sae.group_fractions" in error_of(["sae.group_fractions=[0.0, 0.1]"])

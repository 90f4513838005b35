"""Property test of the config space through the real CLI: overrides drawn from the Config schema (each
field's type, its boundaries, wrong types and special strings) either pass `dmsae check` or are refused in
one line with exit 2, never a traceback; and a sample of the passing draws runs the tiny pipeline to the
end. `pytest --fuzz` draws many more examples (a local run, not CI)."""

from __future__ import annotations

import contextlib
import io
import types
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from dmsae.config import Config
from flows.cli import main

WRONG_TYPES = ["abc", "[1, 2]", "{a: 1}", "null", "true", "''", "-", "1e400", ".nan", "-.inf"]
SPECIAL_STRINGS = ["''", "a/b", "..", ".", "-x", " ", "a b", "x" * 101, "/proc/nope", "/dev/null", "/etc/hostname",
                   "ünïcode", "run.v2", "tpu", "mps", "cuda:7", "cuda:-1", "cpu:0", "gpt2/../../x"]
INTS = ["0", "-1", "1", "2", "3", "7", "63", "64", "65", "255", "256", "257", "4096", "10000", "2147483648",
        "1000000000000", "1.5", "2.0"]
FLOATS = ["0", "-1", "1e-12", "0.001", "0.5", "0.9", "0.99", "1", "1.0", "1.5", "2", "1e9", "-0.0", ".nan", ".inf",
          "1e-300"]
LISTS_OF_INTS = ["[]", "[0]", "[1]", "[3, 1]", "[2, 2]", "[6, 12]", "[12, 6, 3]", "[-1]", "[1000000]", "[a]", "5"]
LISTS_OF_FLOATS = ["[]", "[0.5]", "[0.25, 0.125]", "[0.125, 0.25]", "[0.5, 0.5]", "[0]", "[-0.1]", "[1e-9]",
                   "[0.1, 0.1, 0.1, 0.1, 0.1]", "0.25"]
UNKNOWN_KEYS = ["sae.widht", "nonsense", "sae.width.x", "train", "data.context.more", "reuse.k.0", ".", "sae."]


def schema_leaves(model: type[BaseModel], prefix: str = "") -> dict[str, typing.Any]:
    """Every settable key of the config (dotted) with its annotation."""
    leaves: dict[str, typing.Any] = {}
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            leaves.update(schema_leaves(ann, f"{prefix}{name}."))
        else:
            leaves[f"{prefix}{name}"] = ann
    return leaves


def values_for(ann: typing.Any) -> list[str]:
    """Raw `--set` values for a field of this annotation: its edge values, then every wrong type."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin in (typing.Union, types.UnionType):
        out = ["null"]
        for a in args:
            if a is not type(None):
                out += values_for(a)
        return out
    if origin is typing.Literal:
        return [str(a) for a in args] + ["nope", "''"]
    if origin is list and args and typing.get_origin(args[0]) is typing.Literal:
        # a list of choices (reuse.arms): subsets of them, a repeat, an unknown choice, the empty list
        choices = [str(a) for a in typing.get_args(args[0])]
        return ["[]", f"[{choices[0]}]", f"[{', '.join(choices)}]", f"[{', '.join(choices[:2])}]",
                f"[{choices[-1]}]", f"[{choices[0]}, {choices[0]}]", "[nope]", choices[0]]
    if origin is list:
        return LISTS_OF_FLOATS if args and args[0] is float else LISTS_OF_INTS
    if ann is bool:
        return ["true", "false", "0", "1", "yes"]
    if ann is int:
        return INTS
    if ann is float:
        return FLOATS
    return SPECIAL_STRINGS


LEAVES = schema_leaves(Config)
# the profile conftest loaded: a few hundred draws in CI, many more under `pytest --fuzz`
CHECK_EXAMPLES = settings.default.max_examples
RUN_EXAMPLES = max(4, CHECK_EXAMPLES // 50)
pytestmark = pytest.mark.fuzz


@st.composite
def overrides(draw: st.DrawFn) -> list[str]:
    """One to three `--set` items: mostly schema keys with edge values, sometimes a wrong type or key."""
    items = []
    for _ in range(draw(st.integers(1, 3))):
        # one in ten keys is unknown and one in five values of the wrong type: most draws test edge values
        unknown, wrong = draw(st.integers(0, 9)) == 0, draw(st.integers(0, 4)) == 0
        key = draw(st.sampled_from(UNKNOWN_KEYS if unknown else sorted(LEAVES)))
        value = draw(st.sampled_from(WRONG_TYPES if wrong else values_for(LEAVES.get(key, str))))
        items.append(f"{key}={value}")
    return items


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def error_lines(stderr: str) -> list[str]:
    """stderr without the one-line warnings a legal but pointless value gets."""
    return [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith("dmsae: warning:")]


@pytest.fixture(scope="module")
def base_yaml(make_config, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    cfg = make_config(root / "store", f"report_dir={root / 'reports'}", "reuse.k=[3, 6]", "cycles=2")
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return path


def check_draw(base: Path, sets: list[str]) -> int:
    """`dmsae check` on one draw: exit 0, or exit 2 with exactly one error line; anything else fails."""
    argv = ["check", str(base)] + [a for s in sets for a in ("--set", s)]
    code, _, err = run_cli(argv)  # an unexpected exception propagates: that is the failure we look for
    lines = error_lines(err)
    assert code in (0, 2), f"{sets}: exit {code}: {err}"
    if code == 2:
        assert len(lines) == 1 and lines[0].startswith("dmsae: error: "), f"{sets}: {err}"
    else:
        assert not lines, f"{sets}: passed with stray output: {err}"
    return code


@settings(max_examples=CHECK_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(sets=overrides())
def test_every_draw_passes_check_or_is_refused_in_one_line(base_yaml, sets):
    check_draw(base_yaml, sets)


# -- end to end: draws that keep the run small, so a sample of them can run the whole tiny pipeline -----------
CHEAP = {
    "seed": ["0", "1", "-1", "2147483648"],
    "name": ["a", "run.v2", "A-b_c"],
    "cycles": ["1", "2"],
    "data.context": ["8", "9", "32", "33"],
    "data.train_tokens": ["64", "100", "256", "1000", "4096"],
    "data.attribution_tokens": ["1", "31", "32", "300"],
    "data.eval_tokens": ["1", "31", "33", "300"],
    "data.batch_size": ["1", "2", "64"],
    "data.split_seed": ["0", "7"],
    "harvest.chunk_rows": ["1", "7", "64", "5000"],
    "harvest.outlier_factor": ["null", "1.01", "1000"],
    "harvest.store_dtype": ["float16"],
    "harvest.compression": ["none", "zstd"],
    "sae.width": ["16", "64", "130"],
    "sae.k": ["1", "2", "15"],
    "sae.group_fractions": ["[0.5]", "[0.125, 0.25]", "[0.25, 0.125]", "[0.01]", "[]"],
    "sae.l0_mode": ["fixed", "dynamic"],
    "sae.aux_alpha": ["0", "10"],
    "sae.dead_after_tokens": ["1", "1000000000"],
    "sae.freeze_core_encoder": ["false"],
    "sae.core_gate": ["relu", "relu_bias", "topk"],
    "sae.freeze_core_bias": ["true", "false"],
    "train.batch_size": ["1", "7", "64", "4096"],
    "train.lr": ["1e-9", "0.1", "1", "1e9"],
    "train.epochs": ["0.01", "0.5", "3"],
    "train.warmup_fraction": ["0", "0.99"],
    "train.decay_fraction": ["0", "1"],
    "train.threshold_ema": ["0", "0.5"],
    "train.shuffle_chunks": ["1", "1000"],
    "train.log_every": ["1", "100000"],
    "train.checkpoint_every": ["1", "100000"],
    "attribution.score": ["quantile"],
    "attribution.q": ["0.01", "0.999"],
    "attribution.batch_size": ["1", "100"],
    "selection.tau": ["0.01", "1"],
    "selection.max_core": ["null", "1", "0.01", "2.5", "1000"],
    "reuse.k": ["[]", "[1]", "[6, 3]", "[3, 3]", "[15]"],
    "reuse.width": ["null", "16", "300"],
    "reuse.consistency_seeds": ["[0, 0]", "[5, 1, 2]"],
    "evaluation.batch_size": ["1", "100"],
    "evaluation.dense_threshold": ["0.001", "1"],
}


@st.composite
def cheap_overrides(draw: st.DrawFn) -> list[str]:
    keys = draw(st.lists(st.sampled_from(sorted(CHEAP)), min_size=1, max_size=4, unique=True))
    return [f"{k}={draw(st.sampled_from(CHEAP[k]))}" for k in keys]


@settings(max_examples=RUN_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.filter_too_much])
@given(sets=cheap_overrides())
def test_a_draw_that_passes_check_runs_to_the_end(base_yaml, tmp_path_factory, sets, single_thread):
    from hypothesis import assume

    store = tmp_path_factory.mktemp("e2e")
    sets = [*sets, f"store={store / 'store'}", f"report_dir={store / 'reports'}"]
    assume(check_draw(base_yaml, sets) == 0)
    with single_thread():
        code, _, err = run_cli(["run", str(base_yaml), "--no-progress"] + [a for s in sets for a in ("--set", s)])
    lines = error_lines(err)
    if code == 2 and "selection.max_core=null" in sets:
        # the one refusal left to the run: an uncapped core's size is known only after selection (check warns)
        assert len(lines) == 1 and "too many for an SAE" in lines[0], f"{sets}: {lines[-3:]}"
    else:
        assert code == 0, f"{sets} passed dmsae check but the run failed (exit {code}): {lines[-3:]}"

"""bench/precision_quality.py's failures in one line: a CPU without bf16 units is refused before anything runs,
and a run that fails (the real CLI in a subprocess) ends the script with one line naming the run."""

from __future__ import annotations

import os

import pytest

from bench import precision_quality
from dmsae.precision import native_bf16


@pytest.mark.skipif(native_bf16("cpu")[0], reason="this CPU has bf16 units: the script would run")
def test_refused_in_one_line_without_bf16_units(tmp_path, capsys):
    assert precision_quality.main(["--field", "lm", "--store", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no native bfloat16" in err and "--set device=cuda" in err
    assert not (tmp_path / "s").exists()


def test_a_failing_run_is_named_in_one_line():
    with pytest.raises(precision_quality.RunFailed, match="the precision-lm-bf16 run exited 2"):
        precision_quality.run(["name=precision-lm-bf16", "sae.no_such_key=1"], dict(os.environ))

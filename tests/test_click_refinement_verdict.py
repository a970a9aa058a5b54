"""The click-refinement verdict script applies the thresholds a rule names."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROWS = ROOT / "docs/results/click-refinement/validation-shown-reach/default.csv.gz"


def _verdict():
    spec = importlib.util.spec_from_file_location("click_refinement_verdict",
                                                  ROOT / "benchmarks/click_refinement_verdict.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_setting_against_itself_has_no_gain_and_no_extra_falls(capsys):
    _verdict().main([f"a={ROWS}", f"b={ROWS}", "--min-mean-gain", "0.01", "--falls-over-baseline", "0.005"])
    out = capsys.readouterr().out
    assert "| a, clicks honoured | 1.000 | 1.000 | 1.000 | 1.000 |" in out
    assert "mean +0.000 >= +0.010: False" in out and "<= 0.024 + 0.005: True" in out


def test_a_zero_gain_threshold_passes_and_the_default_falls_bound_is_the_first_rules(capsys):
    _verdict().main([f"a={ROWS}", f"b={ROWS}", "--min-mean-gain", "0"])
    out = capsys.readouterr().out
    assert "+0.000 >= +0.000: True" in out and "<= max(0.05, 0.024): True" in out


def test_a_setting_without_a_name_is_refused():
    with pytest.raises(SystemExit):
        _verdict().main([str(ROWS)])

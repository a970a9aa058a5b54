"""benchmarks/leave_out_verdict.py: the leave-out protocol's verdict from user-loop rows of two starts."""

from __future__ import annotations

import pandas as pd
import pytest
from benchmark_loading import load_benchmark  # tests/ is on sys.path under pytest

verdict = load_benchmark("leave_out_verdict")

LEAVE_OUT = ["acdc_cardiac_mri", "dc1000_dental_caries_xray", "drive_fundus_vessels", "ph2_dermoscopy"]
SEEN = ["dsb2018_nuclei", "hc18_fetal_head_us"]  # what the shipped permissive head was trained on


def rows(start, dataset, box, clicks, noc, n=10, model="kept"):
    return [{"start": start, "dataset": dataset, "n_labelled": n, "budget_min": 10.0, "model": model,
             "condition": cond, "box_dice": box, "dice_5": clicks, "noc_85": noc} for cond in ("clean", "LQ-3")]


def baseline_rows():
    out = []
    for ds in LEAVE_OUT + SEEN:
        out += rows("litemedsam", ds, 0.70, 0.80, 5.0)
        out += rows("litemedsam", ds, 0.10, 0.10, 20.0, model="before")  # not the kept model: must be ignored
    return out


def run(tmp_path, start_rows, extra=()):
    base = tmp_path / "base.csv.gz"
    pd.DataFrame(baseline_rows()).to_csv(base, index=False)
    mine = tmp_path / "start.csv"
    pd.DataFrame(start_rows).to_csv(mine, index=False)
    return verdict.main([str(base), str(mine), *map(str, extra), "--out", str(tmp_path / "v.md")])


def test_the_leave_out_datasets_are_those_the_start_never_learned_from(tmp_path):
    text = run(tmp_path, rows("robust-lite-permissive", "ph2_dermoscopy", 0.70, 0.80, 5.0))
    assert "Leave-out datasets: " + ", ".join(LEAVE_OUT) + "." in text
    assert "not compared: robust-lite-permissive was trained on dsb2018_nuclei, hc18_fetal_head_us" in text
    assert (tmp_path / "v.md").read_text() == text


def test_fewer_datasets_than_all_and_none_worse_decides_nothing(tmp_path):
    text = run(tmp_path, rows("robust-lite-permissive", "ph2_dermoscopy", 0.75, 0.85, 4.0))
    assert "**Undecided:** 1 of 4 datasets measured" in text


def test_one_dataset_worse_settles_the_verdict_before_the_others_are_measured(tmp_path):
    text = run(tmp_path, rows("robust-lite-permissive", "ph2_dermoscopy", 0.68, 0.80, 5.0))
    assert "**Keep litemedsam as the recommended start (settled; 3 dataset(s) not measured cannot change it)" in text
    assert "ph2_dermoscopy clean box_dice -0.020" in text and "ph2_dermoscopy LQ-3 box_dice -0.020" in text


def test_clicks_worse_by_a_share_count_as_worse(tmp_path):
    text = run(tmp_path, rows("robust-lite-permissive", "ph2_dermoscopy", 0.70, 0.80, 5.2))
    assert "NoC@85 +4.0%" in text and "settled" in text


def test_all_datasets_better_by_the_margin_recommend_the_leave_out_start(tmp_path):
    better = [r for ds in LEAVE_OUT for r in rows("robust-lite-permissive", ds, 0.72, 0.82, 4.9)]
    text = run(tmp_path, better)
    assert "**Recommend robust-lite-permissive as the start for images of a new kind:** mean LQ-3 box Dice +0.020" in text


def test_all_datasets_level_keep_the_baseline(tmp_path):
    level = [r for ds in LEAVE_OUT for r in rows("robust-lite-permissive", ds, 0.71, 0.85, 5.0)]
    text = run(tmp_path, level)
    assert "**Keep litemedsam as the recommended start:** mean LQ-3 box Dice +0.010, after 5 clicks +0.050" in text


def test_a_cell_given_twice_is_refused(tmp_path):
    mine = rows("robust-lite-permissive", "ph2_dermoscopy", 0.70, 0.80, 5.0)
    again = tmp_path / "again.csv"
    pd.DataFrame(mine).to_csv(again, index=False)
    with pytest.raises(SystemExit, match="ph2_dermoscopy .* is in two of the given files"):
        run(tmp_path, mine, extra=[again])


def test_a_missing_start_is_named(tmp_path):
    with pytest.raises(SystemExit, match="no N = 10, 10-minute cell of the start 'robust-lite-permissive'"):
        run(tmp_path, rows("robust-lite", "ph2_dermoscopy", 0.70, 0.80, 5.0))

"""benchmarks/user_loop.py: the plan (which N a dataset affords), the target verdicts, and one tiny end-to-end run on
phantom images with a seconds-long fine-tune (the fast settings of the training tests), its table and its resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from napari_robustmedsam.sample_data import mri_phantom
from benchmark_loading import load_benchmark  # tests/ is on sys.path under pytest


user_loop = load_benchmark("user_loop")

CSV_COLUMNS = {"start", "dataset", "kind", "n_labelled", "budget_min", "eval_images", "model", "condition", "box_dice",
               "dice_5", "noc_85", "never_85", "objects", "decision_mode", "swapped", "judge_current",
               "judge_candidate", "judge_delta", "judge_bound", "judge_objects", "mean_rule_swapped", "judge_clean_gain",
               "judge_degraded_gain", "stopped",
               "iterations", "finetune_s", "eval_s"}


def test_the_preset_is_the_fine_tune_tabs_default():
    from napari_robustmedsam.widgets.finetune_form import DEFAULT_PRESET

    assert user_loop.PRESET == DEFAULT_PRESET


def test_an_n_that_leaves_too_few_images_to_measure_is_skipped_and_said():
    from types import SimpleNamespace

    big = SimpleNamespace(name="big", kind="2d", samples=list(range(30)))
    vol = SimpleNamespace(name="vol", kind="3d", samples=list(range(13)))
    cells, skipped = user_loop.plan_cells([big, vol], [5, 10, 20], [5.0, 10.0], ["litemedsam"], 10)
    assert [(c.dataset, c.n, c.budget_min) for c in cells] == [
        ("big", 5, 5.0), ("big", 5, 10.0), ("big", 10, 5.0), ("big", 10, 10.0), ("big", 20, 5.0), ("big", 20, 10.0)]
    assert skipped[0] == ("vol: N=5 skipped: its 13 labelled slices leave 8 to measure on, fewer than "
                          "--min-remaining 10")
    assert len(skipped) == 3 and "leave 0 to measure on" in skipped[-1]


def _rows(dataset, before, kept, candidate, swapped=True):
    """Rows of one cell at N=10, 10 min: (box, dice5, noc) per model, the same at both conditions."""
    out = []
    for model, (box, d5, noc) in (("before", before), ("kept", kept), ("candidate", candidate)):
        for cond in ("clean", "LQ-3"):
            out.append(dict(start="litemedsam", dataset=dataset, n_labelled=10, budget_min=10.0, model=model,
                            condition=cond, box_dice=box, dice_5=d5, noc_85=noc, never_85=0.1, eval_images=20,
                            swapped=swapped, judge_delta=0.01, finetune_s=600.0, iterations=50,
                            decision_mode="hold-out", stopped="time budget"))
    return out


def test_verdicts_compare_the_kept_model_with_the_start_as_the_issue_sets_them():
    met = pd.DataFrame(_rows("a", (0.70, 0.80, 10.0), (0.76, 0.86, 6.0), (0.76, 0.86, 6.0))
                       + _rows("b", (0.60, 0.70, 8.0), (0.66, 0.76, 5.0), (0.66, 0.76, 5.0)))
    lines = user_loop.verdicts(met, ["a", "b", "c"])
    assert len(lines) == 4 and all("**MET**" in line for line in lines)
    assert "0.650 -> 0.710 (+0.060" in lines[0] and "not measured: c" in lines[0]
    assert "9.00 -> 5.50 (+39% drop" in lines[2]

    # dataset b got worse: the kept model is the candidate there (a wrong swap), and the mean gain is too small
    worse = pd.DataFrame(_rows("a", (0.70, 0.80, 10.0), (0.76, 0.86, 8.0), (0.76, 0.86, 8.0))
                         + _rows("b", (0.60, 0.70, 8.0), (0.58, 0.70, 8.0), (0.58, 0.70, 8.0)))
    lines = user_loop.verdicts(worse, ["a", "b"])
    assert lines[0].endswith("**NOT MET**") and "+0.020" in lines[0]
    assert lines[2].endswith("**NOT MET**")
    assert "**NOT MET** (b LQ-3 box_dice -0.020; b clean box_dice -0.020)" in lines[3]
    table = user_loop.markdown_tables(worse)
    assert "| **mean of 2** | LQ-3 | 40 | 0.650 -> 0.670 (0.670) |" in table
    assert user_loop.verdicts(worse.assign(n_labelled=5), ["a"])[0].endswith("not measured (no finished cell).")


def test_a_start_head_knows_what_it_learned_from_and_the_table_marks_those_datasets():
    """The permissive head is a leave-out start only for datasets it never saw; its training datasets come from the
    heads' manifest, and a cell on one of them is marked as not leave-out."""
    from napari_robustmedsam.heads import entry

    permissive = user_loop.STARTS["robust-lite-permissive"]
    recorded = {d["dataset"] for d in entry("robust-lite-permissive")["training_data"]}
    assert permissive.trained_on == recorded == {"dsb2018_nuclei", "hc18_fetal_head_us"}
    assert permissive.train_from == permissive.current == "robust-lite-permissive"
    assert "acdc_cardiac_mri" in user_loop.STARTS["robust-lite"].trained_on
    assert user_loop.STARTS["litemedsam"].trained_on == frozenset()

    rows = [dict(r, start="robust-lite-permissive") for r in
            _rows("acdc_cardiac_mri", (0.6, 0.7, 9.0), (0.7, 0.8, 7.0), (0.7, 0.8, 7.0))
            + _rows("dsb2018_nuclei", (0.8, 0.8, 2.0), (0.8, 0.8, 2.0), (0.7, 0.7, 3.0), swapped=False)]
    table = user_loop.markdown_tables(pd.DataFrame(rows))
    assert "| dsb2018_nuclei † | LQ-3 |" in table and "| acdc_cardiac_mri | LQ-3 |" in table
    assert "† the start model was trained on this dataset's training split" in table
    plain = user_loop.markdown_tables(pd.DataFrame(_rows("dsb2018_nuclei", (0.8, 0.8, 2.0), (0.8, 0.8, 2.0),
                                                         (0.7, 0.7, 3.0), swapped=False)))
    assert "†" not in plain


def test_runs_made_one_dataset_at_a_time_merge_into_one_report(tmp_path):
    """``--merge`` reports separately made runs together (verdicts over all datasets); a cell in two files is
    refused rather than one of them picked."""
    first, second = tmp_path / "a.csv", tmp_path / "b.csv"
    pd.DataFrame(_rows("a", (0.70, 0.80, 10.0), (0.76, 0.86, 6.0), (0.76, 0.86, 6.0))).to_csv(first, index=False)
    pd.DataFrame(_rows("b", (0.60, 0.70, 8.0), (0.66, 0.76, 5.0), (0.66, 0.76, 5.0))).to_csv(second, index=False)
    out = tmp_path / "merged"
    res = user_loop.main(["--merge", str(first), str(second), "--out", str(out), "--data", str(tmp_path / "none")])
    report = res["report"].read_text()
    assert "0.650 -> 0.710 (+0.060" in report and "[mean of 2 dataset(s)]" in report
    assert f"- `{first}`" in report and len(pd.read_csv(res["csv"])) == 12
    with pytest.raises(ValueError, match="cells measured in more than one file: a N=10 10 min"):
        user_loop.main(["--merge", str(first), str(first), "--out", str(out)])

    # a dataset measured at another N: each N's table holds only the cells that ran
    pd.DataFrame([dict(r, n_labelled=5) for r in _rows("b", (0.6, 0.7, 8.0), (0.6, 0.7, 8.0), (0.6, 0.7, 8.0))]
                 ).to_csv(second, index=False)
    report = user_loop.main(["--merge", str(first), str(second), "--out", str(out), "--data", "none"])["report"]
    text = report.read_text()
    n5, n10 = text.split("N = 5 labelled")[1].split("N = 10 labelled")
    assert "| b | clean |" in n5 and "| a |" not in n5 and "| a | clean |" in n10 and "| b |" not in n10


def test_merged_cells_can_be_redecided_by_each_never_worse_rule_on_the_same_candidates(tmp_path):
    """``--judge-rule mean``: a cell the lower bound kept, where the mean judge score was higher, is swapped, and
    its kept rows become the candidate's; a cell without the column (decided by the mean rule) stays as recorded."""
    bound_kept = pd.DataFrame(_rows("a", (0.90, 0.95, 1.0), (0.90, 0.95, 1.0), (0.87, 0.93, 2.0), swapped=False))
    bound_kept["mean_rule_swapped"] = True
    bound_kept["judge_bound"] = -0.05
    older = pd.DataFrame(_rows("b", (0.60, 0.70, 8.0), (0.66, 0.76, 5.0), (0.66, 0.76, 5.0)))
    first, second = tmp_path / "a.csv", tmp_path / "b.csv"
    bound_kept.to_csv(first, index=False)
    older.to_csv(second, index=False)
    recorded = user_loop.main(["--merge", str(first), str(second), "--out", str(tmp_path / "r"), "--data", "none"])
    assert "no dataset worse by more than 0.01 after the never-worse check" in recorded["report"].read_text()
    assert "| a | clean | 20 | 0.900 -> 0.900 (0.870) |" in recorded["report"].read_text()
    assert "no (0.010, -0.050)" in recorded["report"].read_text()  # the judge's gain and its lower bound

    mean = user_loop.main(["--merge", str(first), str(second), "--out", str(tmp_path / "m"), "--data", "none",
                           "--judge-rule", "mean"])
    df = pd.read_csv(mean["csv"])
    kept_a = df[(df["dataset"] == "a") & (df["model"] == "kept")]
    assert kept_a["swapped"].all() and (kept_a["box_dice"] == 0.87).all() and (kept_a["noc_85"] == 2.0).all()
    kept_b = df[(df["dataset"] == "b") & (df["model"] == "kept")]
    assert (kept_b["box_dice"] == 0.66).all()
    assert "a clean box_dice -0.030" in mean["report"].read_text()

    # the recorded judge delta of cell a is 0.01 (the rows' default): the minimum gain swaps it too; the bound keeps
    margin = user_loop.main(["--merge", str(first), "--out", str(tmp_path / "g"), "--data", "none",
                             "--judge-rule", "margin"])
    assert pd.read_csv(margin["csv"]).query("model == 'kept'")["box_dice"].eq(0.87).all()
    small = bound_kept.assign(judge_delta=0.007)
    small.to_csv(first, index=False)
    for rule in ("margin", "bound"):
        res = user_loop.main(["--merge", str(first), "--out", str(tmp_path / rule), "--data", "none",
                              "--judge-rule", rule])
        assert pd.read_csv(res["csv"]).query("model == 'kept'")["box_dice"].eq(0.90).all(), rule
    with pytest.raises(ValueError, match="no recorded lower bound for \\['b'\\]"):
        user_loop.main(["--merge", str(second), "--out", str(tmp_path / "x"), "--data", "none", "--judge-rule", "bound"])


def test_cells_judged_clean_and_degraded_are_redecided_by_the_degraded_rule(tmp_path):
    """``--judge-rule degraded``: a gain only on the degraded copies swaps (mean of the two gains 0.03), a loss of more
    than 0.01 as labelled keeps; ``margin`` reads the clean gain of such cells; clean-only cells are refused."""
    only_degraded = pd.DataFrame(_rows("a", (0.90, 0.95, 1.0), (0.90, 0.95, 1.0), (0.93, 0.96, 0.5), swapped=False))
    only_degraded = only_degraded.assign(judge_delta=0.03, judge_clean_gain=0.0, judge_degraded_gain=0.06,
                                         mean_rule_swapped=True)
    clean_loss = pd.DataFrame(_rows("b", (0.60, 0.70, 8.0), (0.60, 0.70, 8.0), (0.66, 0.76, 5.0), swapped=False))
    clean_loss = clean_loss.assign(judge_delta=0.02, judge_clean_gain=-0.02, judge_degraded_gain=0.06,
                                   mean_rule_swapped=True)
    path = tmp_path / "c.csv"
    pd.concat([only_degraded, clean_loss]).to_csv(path, index=False)
    res = user_loop.main(["--merge", str(path), "--out", str(tmp_path / "d"), "--data", "none",
                          "--judge-rule", "degraded"])
    kept = pd.read_csv(res["csv"]).query("model == 'kept'").groupby("dataset")["box_dice"].first()
    assert kept["a"] == 0.93 and kept["b"] == 0.60
    res = user_loop.main(["--merge", str(path), "--out", str(tmp_path / "g"), "--data", "none",
                          "--judge-rule", "margin"])
    assert pd.read_csv(res["csv"]).query("model == 'kept'")["box_dice"].isin([0.90, 0.60]).all()
    clean_only = tmp_path / "old.csv"
    pd.DataFrame(_rows("c", (0.6, 0.7, 8.0), (0.6, 0.7, 8.0), (0.6, 0.7, 8.0))).to_csv(clean_only, index=False)
    with pytest.raises(ValueError, match="no recorded degraded-copy gain for \\['c'\\]"):
        user_loop.main(["--merge", str(clean_only), "--out", str(tmp_path / "x"), "--data", "none",
                        "--judge-rule", "degraded"])


def _phantom_data(root: Path) -> Path:
    for name, count in (("phantom", 8), ("too_small", 3)):
        for sub in ("images", "masks"):
            (root / name / sub).mkdir(parents=True)
        for i in range(count):
            image, labels = mri_phantom(96, seed=i)
            np.save(root / name / "images" / f"img{i:02d}.npy", image)
            np.save(root / name / "masks" / f"img{i:02d}.npy", labels)
    return root


@pytest.mark.slow
def test_a_tiny_run_writes_the_table_and_a_rerun_resumes_without_recomputing(tmp_path, monkeypatch, capsys):
    from training.finetune import PromptConfig
    from training.finetune.user_run import UserFinetune

    monkeypatch.setenv("ROBUSTMEDSAM_CACHE_DIR", str(tmp_path / "user-cache"))
    data = _phantom_data(tmp_path / "data")
    out = tmp_path / "out"
    argv = ["--data", str(data), "--n", "5", "--budgets", "0.05", "--epochs", "2", "--min-remaining", "2",
            "--max-eval-images", "1", "--threads", "1", "--out", str(out)]
    fast = dict(steps_per_epoch=1, objects_per_image=1, variants=1, prompts=PromptConfig(n_steps=1),
                val_max_objects=1)  # the training tests' fast settings
    first = user_loop.main(argv, extra_config=fast)
    printed = capsys.readouterr().out
    assert "too_small: N=5 skipped: its 3 images leave 0 to measure on" in printed

    df = pd.read_csv(out / user_loop.CSV_NAME)
    assert set(df.columns) == CSV_COLUMNS and len(df) == 6  # before / candidate / kept x clean / LQ-3
    assert set(df["model"]) == {"before", "candidate", "kept"} and set(df["condition"]) == {"clean", "LQ-3"}
    assert (df["dataset"] == "phantom").all() and (df["eval_images"] == 1).all() and (df["n_labelled"] == 5).all()
    assert (df["decision_mode"] == "hold-out").all() and df["iterations"].iloc[0] >= 1
    for metric in ("box_dice", "dice_5", "never_85"):
        assert df[metric].between(0, 1).all(), metric
    assert df["noc_85"].between(0, 20).all() and (df["objects"] > 0).all()
    kept = df[df.model == "kept"].set_index("condition")
    source = df[df.model == ("candidate" if df["swapped"].iloc[0] else "before")].set_index("condition")
    assert kept[["box_dice", "dice_5", "noc_85"]].equals(source[["box_dice", "dice_5", "noc_85"]])
    cell = out / "cells" / "litemedsam" / "phantom" / "n5-0.05min"
    decision = json.loads((cell / "run" / "decision.json").read_text())
    assert math.isclose(df["judge_delta"].iloc[0], decision["delta"])
    kept_files = sorted(p.name for p in (cell / "run").iterdir() if p.suffix in (".pt", ".pth"))
    assert kept_files == ["last.pth"]  # the candidate only: the other checkpoints are pruned
    assert not (tmp_path / "user-cache" / "finetune-costs.json").exists()  # the user's estimate stays theirs

    report = (out / user_loop.REPORT_NAME).read_text()
    assert "| dataset | condition | images | box Dice | Dice after 5 clicks | NoC@85 (never) |" in report
    assert "| phantom | LQ-3 | 1 |" in report and "| **mean of 1** | LQ-3 | 1 |" in report
    assert "Targets, start litemedsam, N = 10, 10-minute fine-tune: not measured" in report
    assert "too_small: N=5 skipped" in report

    # rerun: the finished cell is read back; then with its record gone, the fine-tune and the measurements are
    def refuse(*args, **kwargs):
        raise AssertionError("a finished fine-tune or measurement was computed again")

    monkeypatch.setattr(UserFinetune, "run", refuse)
    monkeypatch.setattr("training.evaluation.runner.Embedder.embed", refuse)
    again = user_loop.main(argv, extra_config=fast)
    assert again["rows"] == first["rows"]
    (cell / "rows.json").unlink()
    resumed = user_loop.main(argv, extra_config=fast)
    strip = [{k: v for k, v in r.items() if k != "eval_s"} for r in resumed["rows"]]
    assert strip == [{k: v for k, v in r.items() if k != "eval_s"} for r in first["rows"]]
    with pytest.raises(ValueError, match="other settings"):  # another recipe into the same --out is refused
        (cell / "rows.json").unlink()
        user_loop.main(argv, extra_config={**fast, "variants": 2})


def test_the_noc_interval_pairs_objects_and_refuses_a_relative_change_from_zero():
    ci = load_benchmark("user_loop_noc_ci")
    b = np.array([20.0, 0.0, 1.0, 3.0] * 10)
    same = ci.relative_change_interval(b, b.copy(), boot=500)
    assert same == (0.0, 0.0, 0.0)  # paired: resampling identical pairs never moves the ratio
    worse = ci.relative_change_interval(b, b + 1.0, boot=500)
    assert worse[0] == pytest.approx(1.0 / b.mean()) and 0 < worse[1] <= worse[0] <= worse[2]
    assert all(math.isnan(x) for x in ci.relative_change_interval(np.zeros(5), np.ones(5), boot=50))


def _rejudged(dataset: str, clean: tuple, degraded: tuple, margin: bool, swapped: bool, candidate_box: float) -> dict:
    """A row of user_loop_rejudge: judge scores, both rules' decisions, and the cell's measured outcomes."""
    row = {"dataset": dataset, "n_labelled": 10, "held_back": 2, "objects": 2,
           "recorded_current": clean[0], "recorded_candidate": clean[1], "clean_current": clean[0],
           "clean_candidate": clean[1], "degraded_current": degraded[0], "degraded_candidate": degraded[1],
           "margin_swaps": margin, "degraded_swaps": swapped, "judge_clean_s": 5.0, "judge_s": 10.0}
    for cond in ("clean", "LQ-3"):
        row.update({f"before_{cond}_box_dice": 0.80, f"before_{cond}_dice_5": 0.90, f"before_{cond}_noc_85": 2.0,
                    f"candidate_{cond}_box_dice": candidate_box, f"candidate_{cond}_dice_5": 0.90,
                    f"candidate_{cond}_noc_85": 2.0})
    return row


def test_the_rejudge_report_applies_the_rules_adoption_test():
    """A cell only the degraded rule swaps (a real LQ-3 gain) and one only margin swaps (a real loss): the degraded
    rule harms fewer cells and gains more, so it is adopted; with the outcomes reversed it is not."""
    rejudge = load_benchmark("user_loop_rejudge")
    rows = [_rejudged("gains", (0.95, 0.95), (0.87, 0.94), margin=False, swapped=True, candidate_box=0.88),
            _rejudged("loses", (0.87, 0.89), (0.80, 0.79), margin=True, swapped=False, candidate_box=0.75)]
    text = rejudge.report(rows, "LQ-3")
    assert "- margin: 1: loses N = 10 (clean box_dice -0.050; LQ-3 box_dice -0.050)" in text
    assert "- degraded: 0" in text and "Verdict: **adopt degraded**" in text
    assert "| gains | 10 | 2 (2) | 0.950 -> 0.950 | 0.950 -> 0.950 | 0.870 -> 0.940 | +0.000 | +0.070 | keep | swap |" \
        in text
    reversed_ = [dict(r, candidate_box=1.6 - r["candidate_LQ-3_box_dice"]) for r in rows]
    for r in reversed_:
        for cond in ("clean", "LQ-3"):
            r[f"candidate_{cond}_box_dice"] = r["candidate_box"]
    assert "Verdict: **keep margin**" in rejudge.report(reversed_, "LQ-3")
    unreproduced = [dict(rows[0], recorded_current=0.90), rows[1]]
    assert "Left out of the test (clean judge not reproduced within 0.002): gains N = 10" in \
        rejudge.report(unreproduced, "LQ-3")


"""NoC@T, click-honoured share, object-step falls and DSC-AUC on small hand-computed cases."""

from __future__ import annotations

import pandas as pd
import pytest

from training.evaluation.interaction import (
    clicks_to_reach,
    dsc_auc,
    interaction_summary,
    interaction_table,
    object_metrics,
)


def rows(dataset, sample, obj, prompt, dices, honoured, condition="clean", model="m"):
    return [dict(model=model, prompt=prompt, condition=condition, dataset=dataset, sample=sample, object_id=obj,
                 step=k, dice=d, click_honoured="" if k == 0 else honoured[k - 1]) for k, d in enumerate(dices)]


def test_clicks_to_reach_counts_a_points_first_click_and_caps_at_20():
    assert clicks_to_reach([0.5, 0.82, 0.95], 0.80, first_step_clicks=0) == (1, True)
    assert clicks_to_reach([0.5, 0.82, 0.95], 0.90, first_step_clicks=1) == (3, True)
    assert clicks_to_reach([0.91], 0.90, first_step_clicks=0) == (0, True)  # the box alone reaches it
    assert clicks_to_reach([0.5, 0.6], 0.80, first_step_clicks=1) == (20, False)


def test_dsc_auc_is_the_trapezoid_over_the_clicks_only():
    # steps 1..3: 0.6, 0.8, 0.9 -> (0.6 + 0.8) / 2 + (0.8 + 0.9) / 2 = 0.7 + 0.85 = 1.55; the step-0 value is left out
    assert dsc_auc([0.1, 0.6, 0.8, 0.9]) == pytest.approx(1.55)
    assert dsc_auc([0.3, 0.5]) == 0.0


def test_summary_by_hand():
    df = pd.DataFrame(
        # dataset A, two objects from a box: object 1 reaches 0.8 at click 1 and 0.9 at click 2; object 2 never
        rows("A", "a1", "o1", "iter_box", [0.70, 0.82, 0.91], [1.0, 1.0])
        + rows("A", "a1", "o2", "iter_box", [0.50, 0.48, 0.30], [0.0, 1.0])  # falls of 0.02 and 0.18
        # dataset B, one object
        + rows("B", "b1", "o1", "iter_box", [0.86, 0.86, 0.855], [0.0, 0.0])  # a fall of 0.005: not counted
    )
    obj = object_metrics(df).set_index(["dataset", "object_id"])
    assert obj.loc[("A", "o1"), "noc@80"] == 1 and obj.loc[("A", "o1"), "noc@90"] == 2
    assert obj.loc[("A", "o2"), "noc@80"] == 20 and not obj.loc[("A", "o2"), "reached@80"]
    assert obj.loc[("B", "o1"), "noc@85"] == 0 and obj.loc[("B", "o1"), "noc@90"] == 20
    assert obj.loc[("A", "o2"), "falls"] == 2 and obj.loc[("B", "o1"), "falls"] == 0
    s = interaction_summary(df).loc[("m", "iter_box", "clean")]
    # NoC@80: A mean(1, 20) = 10.5, B 0 -> mean of datasets 5.25; never: A 0.5, B 0 -> 0.25
    assert s["noc@80"] == pytest.approx(5.25) and s["never@80"] == pytest.approx(0.25)
    # honoured: A 3 of 4 clicks, B 0 of 2 -> (0.75 + 0) / 2
    assert s["honoured_share"] == pytest.approx(0.375)
    # falls: A 2 of 4 object-steps, B 0 of 2 -> 0.25
    assert s["fall_share"] == pytest.approx(0.25)
    # DSC-AUC: A o1 (0.82 + 0.91) / 2 = 0.865, o2 (0.48 + 0.30) / 2 = 0.39 -> 0.6275; B 0.8575 -> mean 0.7425
    assert s["dsc_auc"] == pytest.approx(0.7425)
    assert s["objects"] == 3
    per_ds = interaction_summary(df, by="dataset")
    assert per_ds.loc[("m", "iter_box", "clean", "B"), "honoured_share"] == 0.0
    table = interaction_table(df)
    assert "NoC@80 (never)" in table and "5.25 (25%)" in table


def test_point_start_counts_its_point_and_levels_stay_apart():
    df = pd.DataFrame(rows("A", "a1", "o1", "iter_point", [0.85, 0.9], [1.0])
                      + rows("A", "a1", "o1", "iter_point", [0.2, 0.85], [1.0], condition="LQ-3"))
    s = interaction_summary(df)
    assert s.loc[("m", "iter_point", "clean"), "noc@85"] == 1  # the point alone reaches it: one click
    assert s.loc[("m", "iter_point", "LQ-3"), "noc@85"] == 2
    assert interaction_summary(df[df["prompt"] == "box"]).empty
    with pytest.raises(ValueError, match="by="):
        interaction_summary(df, by="image")

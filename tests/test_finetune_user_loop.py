"""The fine-tune tab's logic without Qt: the never-worse split and decision, the decision in the checkpoint,
the time estimate, the setting help, "which image next", and the folds run order (training.finetune)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import t

from training.finetune import TrainItem, items_from_arrays
from training.finetune.never_worse import (
    CONFIDENCE,
    FOLDS_BELOW,
    MIN_GAIN,
    MIN_HELD_BACK,
    PlaneScore,
    decide,
    judge_level,
    judge_level_of,
    lower_bound,
    plan_holdout,
    record_decision,
)
from training.finetune.presets import PRESETS, preset_config, setting_help


def _items(n: int) -> list[TrainItem]:
    lab = np.zeros((32, 32), np.int32)
    lab[8:20, 10:24] = 1
    return [TrainItem(f"img{i}", np.zeros((32, 32), np.uint8), lab, object_ids=[1]) for i in range(n)]


def test_enough_planes_hold_some_back_and_few_use_folds():
    many = plan_holdout(_items(10), 0.2, seed=0)
    assert many.mode == "hold-out" and len(many.held_back) == MIN_HELD_BACK == 2
    held = {it.key for it in many.held_back}
    assert held.isdisjoint(it.key for it in many.final_train) and len(many.final_train) == 8
    assert {it.key for it in plan_holdout(_items(10), 0.2, seed=0).held_back} == held  # seeded
    assert len(plan_holdout(_items(30), 0.2).held_back) == 6

    few = plan_holdout(_items(FOLDS_BELOW - 1), 0.2)
    assert few.mode == "folds" and len(few.folds) == FOLDS_BELOW - 1 and few.runs == FOLDS_BELOW
    assert sorted(it.key for it in few.held_back) == sorted(it.key for it in few.all_items)  # each held back once
    for fold in few.folds:
        assert len(fold.held) == 1 and fold.held[0] not in fold.train and len(fold.train) == FOLDS_BELOW - 2
    assert few.final_train == few.all_items

    one = plan_holdout(_items(1), 0.2)
    assert one.mode == "none" and one.held_back == [] and "cannot be checked" in one.describe()


def _scores(values: dict[str, tuple[float, float]]) -> dict[str, PlaneScore]:
    return {k: PlaneScore(k, box, clicks, 1) for k, (box, clicks) in values.items()}


def test_a_worse_candidate_is_not_swapped_in_and_the_loss_is_said():
    current = _scores({"a": (0.90, 0.94), "b": (0.80, 0.90)})
    worse = _scores({"a": (0.84, 0.90), "b": (0.80, 0.88)})
    d = decide(current, worse, mode="hold-out", current_model="litemedsam", candidate_path="x.pth")
    assert not d.swapped
    assert d.current_score == pytest.approx((0.92 + 0.85) / 2) and d.delta == pytest.approx(-0.03)
    assert d.summary() == ("Kept the current model (litemedsam): the fine-tuned model scored 0.855 vs 0.885 on 2 "
                           "held-back plane(s), 0.030 lower.")
    assert [r["plane"] for r in d.rows] == ["a", "b"] and d.rows[0]["box_after"] == 0.84

    better = _scores({"a": (0.95, 0.96), "b": (0.85, 0.92)})
    d = decide(current, better, mode="hold-out", current_model="litemedsam", candidate_path="x.pth")
    assert d.swapped and d.delta > 0 and d.summary().startswith("The fine-tuned model is better: 0.920 vs 0.885")

    tie = decide(current, current, mode="folds", current_model="m", candidate_path="x.pth")
    assert not tie.swapped  # a tie keeps what the user has
    none = decide({}, {}, mode="none", current_model="m", candidate_path="x.pth")
    assert not none.swapped and none.delta is None and "no held-back labels" in none.summary()


def _objects(key: str, pairs: list[tuple[float, float]]) -> PlaneScore:
    return PlaneScore(key, float(np.mean([b for b, _ in pairs])), float(np.mean([c for _, c in pairs])), len(pairs),
                      list(pairs))


def test_a_gain_below_the_minimum_keeps_the_current_model_and_says_why():
    """The dermoscopy case: +0.007 on two held-back images, alike on both, was a loss of 0.023 on the user's other
    images. A gain below MIN_GAIN keeps the current model (a higher mean alone would have swapped, and the decision
    records that and the lower bound, which could not tell)."""
    current = {"a": _objects("a", [(0.92, 0.94)]), "b": _objects("b", [(0.90, 0.94)])}
    candidate = {"a": _objects("a", [(0.93, 0.946)]), "b": _objects("b", [(0.905, 0.947)])}
    d = decide(current, candidate, mode="hold-out", current_model="litemedsam", candidate_path="x.pth")
    gains = [0.008, 0.006]
    assert d.delta == pytest.approx(np.mean(gains)) and 0 < d.delta < MIN_GAIN == 0.01 and d.objects == 2
    assert d.mean_rule_swapped and not d.swapped
    assert d.lower_bound == pytest.approx(np.mean(gains) - t.ppf(CONFIDENCE, 1) * np.std(gains, ddof=1) / np.sqrt(2))
    assert d.lower_bound > 0  # the bound would have swapped it: it is recorded, it does not decide
    assert d.summary() == ("Kept the current model (litemedsam): the fine-tuned model scored 0.932 vs 0.925 on 2 "
                           "held-back plane(s), only +0.007: a swap needs at least +0.010, since a smaller gain on 2 "
                           "image(s) may be a loss on the others. Label more images and run it again.")
    assert [r["gains"] for r in d.rows] == [[pytest.approx(0.008)], [pytest.approx(0.006)]]

    from napari_robustmedsam.widgets.finetune import load_button_text

    assert load_button_text(d) == "Load anyway (its gain is too small)"
    lost = decide(candidate, current, mode="hold-out", current_model="m", candidate_path="x.pth")
    assert load_button_text(lost) == "Load anyway (it scored lower)"


def test_a_large_gain_is_swapped_in_even_when_two_objects_disagree_and_objects_weigh_alike():
    """The dental caries case: +0.177 from one object that gained a lot and one that gained little is swapped in,
    although a lower bound over two objects would have been far below zero."""
    current = {"a": _objects("a", [(0.60, 0.70), (0.50, 0.60), (0.70, 0.72)]), "b": _objects("b", [(0.80, 0.82)])}
    candidate = {"a": _objects("a", [(0.68, 0.76), (0.55, 0.70), (0.74, 0.80)]), "b": _objects("b", [(0.80, 0.83)])}
    d = decide(current, candidate, mode="hold-out", current_model="litemedsam", candidate_path="x.pth")
    assert d.objects == 4 and d.swapped and d.delta >= MIN_GAIN
    assert d.current_score == pytest.approx(np.mean([0.65, 0.55, 0.71, 0.81]))  # per object, not per plane
    assert d.summary() == ("The fine-tuned model is better: 0.733 vs 0.680 for litemedsam on 2 held-back plane(s) "
                           "(+0.053).")
    assert lower_bound([0.1]) is None and lower_bound([0.02, 0.02]) == pytest.approx(0.02)

    caries = decide({"a": _objects("a", [(0.0, 0.0)]), "b": _objects("b", [(0.02, 0.04)])},
                    {"a": _objects("a", [(0.30, 0.36)]), "b": _objects("b", [(0.02, 0.08)])}, mode="hold-out",
                    current_model="m", candidate_path="x.pth")
    assert caries.swapped and caries.lower_bound < 0


def _conditioned(clean: dict, degraded: dict, level: str = "LQ-3") -> dict[str, PlaneScore]:
    """Scores of planes judged as labelled and as degraded copies, keyed as score_items keys them."""
    out = {k: _objects(k, pairs) for k, pairs in clean.items()}
    for k, pairs in degraded.items():
        score = _objects(k, pairs)
        out[f"{k} @ {level}"] = dataclasses.replace(score, condition=level)
    return out


def test_the_judge_level_follows_what_the_fine_tune_is_robust_to():
    assert judge_level(("LQ-1", "LQ-2", "LQ-3", "LQ-3+")) == "LQ-3"
    assert judge_level(("LQ-3+",)) == "LQ-3"  # not the modality artefacts a user's images may never show
    assert judge_level(("LQ-1", "LQ-2")) == "LQ-2"
    assert judge_level(()) is None and judge_level(None) is None
    cfg = preset_config("quick")
    assert judge_level_of(cfg) == "LQ-3"
    # the Fine-tune tab's "none (clean images only)": no variants, every branch clean
    assert judge_level_of(dataclasses.replace(cfg, variants=0)) is None
    assert judge_level_of(dataclasses.replace(cfg, p_identity=1.0, levels=("LQ-1",))) is None


def test_a_gain_only_under_degradation_swaps_and_a_clean_loss_does_not():
    """The fetal head N = 20 case: level as labelled, +0.064 on the degraded copies, is swapped in (the clean-only
    judge kept LiteMedSAM); a candidate that gains on average but loses more than MIN_GAIN as labelled is not."""
    current = _conditioned({"a": [(0.95, 0.96)], "b": [(0.94, 0.96)]}, {"a": [(0.86, 0.90)], "b": [(0.84, 0.90)]})
    robust = _conditioned({"a": [(0.95, 0.96)], "b": [(0.94, 0.96)]}, {"a": [(0.93, 0.95)], "b": [(0.92, 0.94)]})
    d = decide(current, robust, mode="hold-out", current_model="litemedsam", candidate_path="x.pth")
    assert d.swapped and d.held_back == ["a", "b"] and d.objects == 4
    assert d.condition_scores["clean"] == [pytest.approx(0.9525), pytest.approx(0.9525)]
    assert d.condition_scores["LQ-3"] == [pytest.approx(0.875), pytest.approx(0.935)]
    assert d.delta == pytest.approx((0.0 + 0.06) / 2)  # each condition counts the same
    assert d.summary() == ("The fine-tuned model is better: 0.944 vs 0.914 for litemedsam on 2 held-back plane(s), "
                           "as labelled and at LQ-3 (+0.030).")
    assert [(r["plane"], r["condition"]) for r in d.rows] == [("a", "clean"), ("b", "clean"), ("a", "LQ-3"),
                                                              ("b", "LQ-3")]
    assert "clean" in d.reason and "LQ-3" in d.reason

    clean_loss = _conditioned({"a": [(0.91, 0.935)], "b": [(0.90, 0.945)]}, {"a": [(0.94, 0.95)], "b": [(0.94, 0.95)]})
    d = decide(current, clean_loss, mode="hold-out", current_model="litemedsam", candidate_path="x.pth")
    assert d.delta >= MIN_GAIN and not d.swapped and "clean" in d.reason
    assert d.summary().endswith("+0.020 on average but 0.030 lower as labelled.")

    # the nuclei case: +0.019 as labelled, -0.006 degraded: +0.0065 on average is below the minimum gain
    nuclei = _conditioned({"a": [(0.895, 0.895)]}, {"a": [(0.799, 0.799)]})
    before = _conditioned({"a": [(0.876, 0.876)]}, {"a": [(0.805, 0.805)]})
    d = decide(before, nuclei, mode="hold-out", current_model="m", candidate_path="x.pth")
    assert d.delta == pytest.approx(0.0065, abs=1e-9) and not d.swapped and "only +0.006" in d.summary()


def test_the_decision_is_saved_in_the_checkpoint_metadata(tmp_path):
    from napari_robustmedsam.checkpoints import make_metadata, save_checkpoint
    from napari_robustmedsam.checkpoints.project_format import unpack_project_checkpoint
    from napari_robustmedsam.checkpoints.safe_load import load_untrusted

    path = tmp_path / "last.pth"
    weights = {"mask_decoder.w": torch.arange(4.0)}
    save_checkpoint(path, weights, make_metadata(architecture="litemedsam", decoder="robust",
                                                 preprocessing="litemedsam", extra={"training": {"epoch": 1}}))
    d = decide(_scores({"a": (0.9, 0.9)}), _scores({"a": (np.float32(0.8), 0.8)}), mode="hold-out",
               current_model="litemedsam", candidate_path=str(path))
    record_decision(path, d)
    state, meta = unpack_project_checkpoint(load_untrusted(path))
    saved = meta["extra"]["never_worse"]
    assert saved["swapped"] is False and saved["delta"] == pytest.approx(-0.1)
    assert saved["rows"][0]["plane"] == "a" and saved["held_back"] == ["a"]
    assert meta["extra"]["training"] == {"epoch": 1}  # the rest of the metadata is kept
    assert torch.equal(state["mask_decoder.w"], weights["mask_decoder.w"])


def test_the_estimate_counts_folds_and_respects_the_budget(tmp_path, monkeypatch):
    from training.finetune import time_estimate as te

    monkeypatch.setenv("ROBUSTMEDSAM_CACHE_DIR", str(tmp_path))
    costs = te.known_costs("quick")
    assert "development CPU" in costs.source and costs.iteration_s == te.FALLBACK_COSTS["iteration_s"]["quick"]
    cfg = preset_config("quick", epochs=2, steps_per_epoch=None, variants=1)
    holdout = te.estimate(plan_holdout(_items(10), 0.2), cfg, costs)
    assert holdout.iterations == 2 * 8 and holdout.loads == 1 + 2  # one run; current + candidate judged
    folds = te.estimate(plan_holdout(_items(3), 0.2), cfg, costs)
    assert folds.iterations == 3 * (2 * 2) + 2 * 3 and folds.loads == 4 + 4  # 3 folds + final; current + 3 folds
    assert "iterations x" in holdout.text() and "development CPU" in holdout.text()
    capped = te.estimate(plan_holdout(_items(10), 0.2), dataclasses.replace(cfg, time_budget_s=3.0), costs)
    assert capped.capped_by_budget and capped.iterations < holdout.iterations
    assert capped.seconds < holdout.seconds

    # a small object is judged in its zoomed crop: one more encoding per model and held-back object
    def small(n):
        lab = np.zeros((256, 256), np.int32)
        lab[100:110, 120:132] = 1
        return [TrainItem(f"s{i}", np.zeros((256, 256), np.uint8), lab, object_ids=[1]) for i in range(n)]

    assert te.zoomed_objects(_items(3)) == 0 and te.zoomed_objects(small(3)) == 3
    zoomed = te.estimate(plan_holdout(small(10), 0.2), cfg, costs)
    # (twice: the plane is judged as labelled and as a degraded copy)
    assert zoomed.encodings == holdout.encodings + 2 * 2 * len(plan_holdout(small(10), 0.2).held_back)

    # judged as labelled and at the judge level: twice the judging encodings and decodes of a clean-only fine-tune
    clean_only = te.estimate(plan_holdout(_items(10), 0.2), dataclasses.replace(cfg, p_identity=1.0), costs)
    n_held = len(plan_holdout(_items(10), 0.2).held_back)
    assert holdout.encodings - clean_only.encodings == 2 * n_held
    assert holdout.decodes - clean_only.decodes == 2 * n_held * (1 + 3)

    te.remember_costs("quick", {"iteration_s": 0.5, "encode_s": 0.7, "load_s": 1.0, "decode_s": 0.02})
    mine = te.known_costs("quick")
    assert mine.iteration_s == 0.5 and "this machine" in mine.source
    assert "development CPU" in te.known_costs("robust-lite").source


def test_every_form_field_has_its_help_from_the_settings_declaration():
    from training.finetune.config import TrainConfig

    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for name in ("model", "epochs", "steps_per_epoch", "variants", "levels", "time_budget_s"):
        text = setting_help(name, "quick")
        assert text.lower().startswith(fields[name].metadata["help"].lower())
    assert "preset quick: 3" in setting_help("epochs", "quick")
    with pytest.raises(KeyError):
        setting_help("no_such_setting")
    for name, p in PRESETS.items():  # each preset says when to use it, in one sentence
        assert p.use and p.use.strip().endswith(".") and len(p.use) < 300


def test_unlabelled_slices_are_ranked_with_the_nearest_labelled_slice_boxes(litemedsam):
    from napari_robustmedsam.engine.predictor import Predictor
    from napari_robustmedsam.sample_data import mri_phantom_volume
    from training.finetune.next_image import rank_planes, spread, volume_planes

    image, truth = mri_phantom_volume(8, 96, seed=2)
    labels = truth.copy()
    labels[[4, 6, 7]] = 0
    planes = volume_planes(image, labels, "vol")
    assert [p.z for p in planes] == [4, 6, 7] and [p.key for p in planes][0] == "vol/z004"
    near = {4: 3, 6: 5, 7: 5}  # ties go to the lower slice
    for p in planes:
        ids = [i for i in np.unique(labels[near[p.z]]) if i]
        assert len(p.boxes) == len(ids)
    assert len(spread(planes * 10, limit=5)) == 5
    ranked = rank_planes(Predictor.from_loaded(litemedsam), planes[:2], seed=0)
    assert len(ranked) == 2 and [r.uncertainty for r in ranked] == sorted((r.uncertainty for r in ranked), reverse=True)
    for r in ranked:
        assert 0.0 <= r.uncertainty <= 1.0 and r.uncertainty == pytest.approx((r.disagreement + r.doubt) / 2)


def test_folds_train_each_fold_then_all_and_judge_each_fold_model_on_its_plane(tmp_path, monkeypatch):
    from training.finetune import user_run
    from training.finetune.trainer import TrainResult

    runs, judged = [], []

    class FakeTrainer:
        def __init__(self, cfg, out, train, val, **kw):
            self.cfg, self.out, self.train, self.val = cfg, Path(out), train, val
            self.notices, self.step_log, self.global_step, self.feature_seconds = [], [], 0, 0.0
            self.bank = self.val_bank = type("B", (), {"stats": {"encoded": 0}})()

        def run(self):
            runs.append(([it.key for it in self.train], [it.key for it in self.val], self.cfg.time_budget_s))
            self.out.mkdir(parents=True, exist_ok=True)
            last = self.out / "last.pth"
            last.write_text("x")
            return TrainResult(self.out, last, None, [], "completed")

    def fake_load(self, source):
        return source

    def fake_score(predictor, items, **kw):
        judged.append((str(predictor), [it.key for it in items]))
        good = predictor != "litemedsam"
        return {it.key: PlaneScore(it.key, 0.9 if good else 0.8, 0.9, 1) for it in items}

    monkeypatch.setattr(user_run, "Trainer", FakeTrainer)
    monkeypatch.setattr(user_run.UserFinetune, "_load", fake_load)
    monkeypatch.setattr(user_run, "score_items", fake_score)
    monkeypatch.setattr(user_run, "record_decision", lambda path, d: path)
    monkeypatch.setenv("ROBUSTMEDSAM_CACHE_DIR", str(tmp_path / "cache"))
    cfg = preset_config("quick", time_budget_s=120.0)
    res = user_run.UserFinetune(cfg, _items(3), tmp_path / "out", preset_name="quick", current_model="litemedsam",
                                hold_back_fraction=0.2).run()
    assert [r[1] for r in runs] == [["img0"], ["img1"], ["img2"], []]  # 3 folds, then all planes
    assert runs[-1][0] == ["img0", "img1", "img2"] and all(r[2] == pytest.approx(30.0) for r in runs)
    assert judged[0] == ("litemedsam", ["img0", "img1", "img2"])
    assert [j[1] for j in judged[1:]] == [["img0"], ["img1"], ["img2"]]
    assert [Path(j[0]).parent.name for j in judged[1:]] == ["fold-1", "fold-2", "fold-3"]
    assert res.checkpoint == tmp_path / "out" / "last.pth" and res.decision.swapped and res.decision.mode == "folds"
    assert (tmp_path / "out" / "decision.json").is_file()


def test_labelled_slices_of_a_volume_are_each_a_sample():
    from napari_robustmedsam.sample_data import mri_phantom_volume

    image, truth = mri_phantom_volume(12, 64, seed=0)
    labels = truth.copy()
    labels[10:] = 0
    items = items_from_arrays([image], [labels], names=["vol"])
    assert [it.key for it in items] == [f"vol/z{z:03d}" for z in range(10)]
    plan = plan_holdout(items, PRESETS["quick"].val_fraction)
    assert plan.mode == "hold-out" and len(plan.final_train) == 8


def test_the_judge_clicks_through_the_annotators_click_path(litemedsam, shared_data):
    """The never-worse judge scores what a user sees when they click: a model that wipes its mask at every click
    (the model's whole mask, the papers' protocol, would score 0 after the clicks) keeps its box mask and gains
    the clicked pixels in the annotator's click path (click refinement, guard and reach), as in the annotator."""
    from napari_robustmedsam.engine.predictor import Predictor
    from napari_robustmedsam.io import read_image
    from training.finetune.never_worse import score_items

    path = sorted((shared_data / "medseg" / "ph2_dermoscopy" / "images").glob("*.png"))[0]
    image = read_image(path)
    labels = (read_image(shared_data / "medseg" / "ph2_dermoscopy" / "masks" / path.name) > 0).astype(np.int32)
    item = TrainItem("ph2/0", image, labels, object_ids=[1])

    class WipesOnClicks(Predictor):
        def predict(self, points=None, **kw):
            out = super().predict(points=points, **kw)
            if points is not None:
                out.masks[:] = False
                out.low_res_logits[:] = -20.0
            return out

    wiping = WipesOnClicks.from_loaded(litemedsam)
    score = score_items(wiping, [item], clicks=2, zoom=False)["ph2/0"]
    honest = score_items(Predictor.from_loaded(litemedsam), [item], clicks=2, zoom=False)["ph2/0"]
    assert score.box == pytest.approx(honest.box) and score.box > 0.5
    assert score.clicks >= score.box - 0.02  # the box mask is kept: the model's wipe lies beyond the clicks' reach
    assert score.per_object == [(score.box, score.clicks)] and score.objects == 1  # one object, paired by the rule


def test_the_judge_scores_the_same_degraded_copy_for_every_model(litemedsam, shared_data):
    """With a level, each plane is judged again as a seeded degraded copy: the same pixels for both models (the
    same scores twice here), and not the clean plane."""
    from napari_robustmedsam.engine.predictor import Predictor
    from napari_robustmedsam.io import read_image
    from training.finetune.never_worse import score_items

    path = sorted((shared_data / "medseg" / "hc18_fetal_head_us" / "images").glob("*.png"))[0]
    image = read_image(path)
    labels = (read_image(shared_data / "medseg" / "hc18_fetal_head_us" / "masks" / path.name) > 0).astype(np.int32)
    item = TrainItem("hc18/0", image, labels, modality="ultrasound", object_ids=[1])
    predictor = Predictor.from_loaded(litemedsam)
    first = score_items(predictor, [item], clicks=1, zoom=False, level="LQ-3", seed=0)
    again = score_items(predictor, [item], clicks=1, zoom=False, level="LQ-3", seed=0)
    assert sorted(first) == ["hc18/0", "hc18/0 @ LQ-3"]
    assert first["hc18/0 @ LQ-3"].condition == "LQ-3" and first["hc18/0"].condition == "clean"
    assert first == again
    assert first["hc18/0 @ LQ-3"].box != first["hc18/0"].box  # the copy is degraded
    other_seed = score_items(predictor, [item], clicks=1, zoom=False, level="LQ-3", seed=1)
    assert other_seed["hc18/0"] == first["hc18/0"]

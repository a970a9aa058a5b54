"""One click policy: named instances, overrides, and the evaluation CLI's --policy."""

from __future__ import annotations

import dataclasses

import pytest

from napari_robustmedsam.annotation import prompt_decoding as decoding
from napari_robustmedsam.annotation.click_policy import CLICK_POLICIES, ClickPolicy, annotator_click_policy, click_policy
from napari_robustmedsam.annotation.prompt_decoding import DEFAULT_ZOOM_SMALL_OBJECTS
from napari_robustmedsam.engine.click_guard import EdgeReach


def config(*flags):
    from training.evaluate import _config, build_parser

    return _config(build_parser().parse_args(["--data", "x", *flags]))


def test_named_policies_hold_the_annotators_defaults_and_the_papers_protocol():
    annotator = click_policy("annotator")
    assert annotator.segment_kwargs() == dict(
        local_corrections=decoding.DEFAULT_LOCAL_CORRECTIONS, click_guard=decoding.DEFAULT_CLICK_GUARD,
        click_guard_reach=decoding.REFINED_CLICK_GUARD_REACH,  # the default refinement is on: every click bounded
        click_refinement=decoding.DEFAULT_CLICK_REFINEMENT)
    assert CLICK_POLICIES["papers"] == ClickPolicy()
    assert annotator.key != CLICK_POLICIES["papers"].key
    assert annotator.with_overrides(click_refinement="graph-cut").click_refinement == "graph-cut"
    assert annotator.with_overrides(click_guard=None) == annotator
    with pytest.raises(ValueError, match="unknown click policy 'lab'"):
        click_policy("lab")
    with pytest.raises(ValueError, match="click refinement"):
        ClickPolicy(click_refinement="magic")


def test_evaluate_policy_flag_equals_the_same_single_flags():
    by_policy = config("--policy", "annotator")
    annotator = click_policy("annotator")
    reach = annotator.guard_reach
    by_flags = config("--local-corrections", annotator.local_corrections.replace(" ", "-"),
                      "--click-guard", annotator.click_guard.replace(" ", "-"),
                      "--click-guard-reach", str(reach.factor), "--click-guard-reach-scope", reach.scope,
                      "--click-refinement", annotator.click_refinement,
                      "--focus-crop", "on" if DEFAULT_ZOOM_SMALL_OBJECTS else "off",  # the annotator's zoom too
                      "--box-from-mask", "on")  # and its box for a box-trained model's point start
    # the policy's crop follows each model's own default (the annotator's behaviour); an explicit flag does not
    assert by_policy.focus_crop_per_model and not by_flags.focus_crop_per_model
    assert by_policy == dataclasses.replace(by_flags, focus_crop_per_model=True)
    assert by_policy.click_policy.segment_kwargs() == annotator.segment_kwargs()
    assert by_policy.click_policy.key == annotator.key
    assert by_policy.protocol("iter_box") == by_flags.protocol("iter_box")
    assert by_policy.protocol("iter_box") != config().protocol("iter_box")  # papers, the default
    assert config().click_policy == CLICK_POLICIES["papers"]
    # single flags override single settings of the policy
    over = config("--policy", "annotator", "--click-guard", "off", "--click-refinement", "graph-cut")
    assert over.click_guard == "off" and over.click_refinement == "graph-cut"
    assert over.local_corrections == annotator.local_corrections
    assert config("--policy", "annotator", "--click-guard-reach-scope", "all").edge_reach == EdgeReach(reach.factor)
    scoped = config("--policy", "annotator", "--click-refinement", "learned", "--click-guard-reach-scope",
                    "negatives-before-positive")
    assert scoped.edge_reach == EdgeReach(reach.factor, "negatives-before-positive")  # a flag beats the coupling
    with pytest.raises(ValueError, match="needs --click-guard-reach"):
        config("--click-guard-reach-scope", "negatives-before-positive")
    assert config("--click-refinement", "random-walker").protocol("iter_box") != config().protocol("iter_box")
    assert config("--click-refinement", "random-walker").protocol("box") == config().protocol("box")


def test_under_the_policy_default_each_model_follows_its_own_zoom_default(monkeypatch):
    """A model whose registry entry turns Zoom on small objects off (a head that measured lower with it) is
    measured without the crop under ``--policy annotator``, as the annotator runs it; ``--focus-crop on`` still
    forces it, and other models keep the policy's crop."""
    from types import SimpleNamespace

    from napari_robustmedsam.annotation.prompt_decoding import zoom_default
    from napari_robustmedsam.models import registry

    monkeypatch.setitem(registry.MODELS, "no-zoom-head",
                        dataclasses.replace(registry.MODELS["litemedsam"], name="no-zoom-head", zoom_small_objects=False))
    head = SimpleNamespace(loaded=SimpleNamespace(name="no-zoom-head"))
    base = SimpleNamespace(loaded=SimpleNamespace(name="litemedsam"))
    assert not zoom_default("no-zoom-head") and zoom_default("litemedsam") == DEFAULT_ZOOM_SMALL_OBJECTS
    by_policy = config("--policy", "annotator")
    assert by_policy.for_model(head).focus_crop is False
    assert by_policy.for_model(base) is by_policy
    assert by_policy.for_model(head).protocol("iter_box") != by_policy.protocol("iter_box")
    forced = config("--policy", "annotator", "--focus-crop", "on")
    assert forced.for_model(head).focus_crop is True


def test_the_annotators_reach_bounds_every_click_while_a_refinement_is_on():
    """With a click refinement the annotator bounds every click's model change (rule-reach.md); turning the
    refinement off gives the click path without it back, in the annotator and in ``--policy annotator``."""
    annotator = click_policy("annotator")
    on = annotator.with_overrides(click_refinement="learned-directed")
    off = annotator.with_overrides(click_refinement="off")
    assert on.guard_reach == decoding.REFINED_CLICK_GUARD_REACH == EdgeReach(2.0, "all")
    assert off.guard_reach == decoding.DEFAULT_CLICK_GUARD_REACH == EdgeReach(2.0, "negatives-before-positive")
    panel = annotator_click_policy(decoding.DEFAULT_LOCAL_CORRECTIONS, decoding.DEFAULT_CLICK_GUARD, "off")
    assert panel == off and annotator_click_policy(panel.local_corrections, panel.click_guard, "learned-directed") == on
    assert on.key != off.key and "reach=2/all" in on.key
    # the evaluation measures what the annotator does: the same protocol as the explicit flags
    implied = config("--policy", "annotator", "--click-refinement", "learned-directed")
    explicit = config("--policy", "annotator", "--click-refinement", "learned-directed",
                      "--click-guard-reach", "2", "--click-guard-reach-scope", "all")
    assert implied.edge_reach == EdgeReach(2.0, "all")
    assert implied.protocol("iter_point") == explicit.protocol("iter_point")
    assert config("--policy", "annotator", "--click-refinement", "off").edge_reach == off.guard_reach
    # a policy without a refined reach keeps its one reach whatever the refinement
    plain = ClickPolicy("always", "always", EdgeReach(3.0), "learned")
    assert plain.guard_reach == EdgeReach(3.0)

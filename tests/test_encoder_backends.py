"""benchmarks/encoder_backends.py: a backend that is not installed is skipped with a notice naming the package,
the reference is always built, and the accuracy summary applies the rule's tolerance (docs/results/encoder-speed)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from test_cache import tiny_segmenter  # noqa: E402  (tests/ is on sys.path under pytest)
from benchmark_loading import load_benchmark  # tests/ is on sys.path under pytest



@pytest.fixture(scope="module")
def bench():
    return load_benchmark("encoder_backends")


@pytest.mark.parametrize("module, package", [("onnxruntime", "onnxruntime"), ("openvino", "openvino")])
def test_missing_backend_is_skipped_with_a_notice_naming_the_package(bench, monkeypatch, tmp_path, module, package):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(bench.BackendUnavailable, match=f"pip install {package}"):
        bench._require(module, package)
    name = "ort" if module == "onnxruntime" else "ov_f32"
    built, notices = bench.build_candidates(["fp32", name], tiny_segmenter(), 256, 1, tmp_path)
    assert list(built) == ["fp32"]
    assert len(notices) == 1 and notices[0].startswith(f"{name}: skipped") and f"pip install {package}" in notices[0]
    out = built["fp32"](torch.zeros(1, 3, 256, 256))
    assert out.shape == (1, 256, 64, 64)


def test_unknown_candidate_is_reported_not_fatal(bench, tmp_path):
    built, notices = bench.build_candidates(["fp32", "tensorrt"], tiny_segmenter(), 256, 1, tmp_path)
    assert list(built) == ["fp32"] and "unknown candidate 'tensorrt'" in notices[0]


def test_summary_applies_the_tolerance_overall_and_per_condition(bench):
    # 20 objects per condition; "a" misses 0.98 on 1 of 20 LQ-3 objects (95 %: meets), "b" on 2 (90 %: misses)
    records = []
    for cand, misses in (("a", 1), ("b", 2)):
        for cond in ("clean", "LQ-3"):
            for k in range(20):
                bad = cond == "LQ-3" and k < misses
                records.append({"candidate": cand, "condition": cond, "iou": 0.9 if bad else 0.999})
    times = {"fp32": [1.0, 2.0], "a": [0.5, 1.0], "b": [1.0, 2.0]}
    summary = bench.summarise(records, times, ["a", "b"])
    assert summary["a"]["meets_tolerance"] and summary["a"]["share_ok_LQ-3"] == pytest.approx(0.95)
    assert not summary["b"]["meets_tolerance"] and summary["b"]["share_ok"] == pytest.approx(0.95)
    assert summary["a"]["speedup"] == pytest.approx(2.0) and summary["b"]["speedup"] == pytest.approx(1.0)
    assert bench.iou(np.zeros((4, 4), bool), np.zeros((4, 4), bool)) == 1.0

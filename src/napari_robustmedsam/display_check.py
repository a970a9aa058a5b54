"""Check, before Qt is imported, that napari can open a window on this machine.

Qt's xcb platform plugin aborts the whole process (no Python exception) when one of its system libraries is
missing, after printing a message that names a library but not the command that installs it. The launcher
calls :func:`display_problem` first and prints its answer instead: which libraries are missing, the Debian /
Ubuntu packages that provide them and the one command that installs them all (``scripts/install-system-deps.sh``
installs the same packages).
"""

from __future__ import annotations

import ctypes
import os
import sys

# shared library loaded by Qt's xcb plugin -> the Debian/Ubuntu package that ships it
XCB_LIBRARIES = {
    "libxcb-cursor.so.0": "libxcb-cursor0",
    "libxkbcommon-x11.so.0": "libxkbcommon-x11-0",
    "libxcb-icccm.so.4": "libxcb-icccm4",
    "libxcb-image.so.0": "libxcb-image0",
    "libxcb-keysyms.so.1": "libxcb-keysyms1",
    "libxcb-randr.so.0": "libxcb-randr0",
    "libxcb-render-util.so.0": "libxcb-render-util0",
    "libxcb-xinerama.so.0": "libxcb-xinerama0",
    "libxcb-xfixes.so.0": "libxcb-xfixes0",
    "libxcb-shape.so.0": "libxcb-shape0",
    "libEGL.so.1": "libegl1",
    "libGL.so.1": "libgl1",
    "libfontconfig.so.1": "libfontconfig1",
    "libdbus-1.so.3": "libdbus-1-3",
}

INSTALL_SCRIPT = "scripts/install-system-deps.sh"


def _loadable(soname: str) -> bool:
    try:
        ctypes.CDLL(soname)
    except OSError:
        return False
    return True


def missing_libraries(loadable=_loadable) -> list[str]:
    """Debian package names of the xcb/GL libraries that cannot be loaded (empty when all are there)."""
    return [package for soname, package in XCB_LIBRARIES.items() if not loadable(soname)]


def install_command(packages: list[str]) -> str:
    sudo = "" if hasattr(os, "geteuid") and os.geteuid() == 0 else "sudo "
    return f"{sudo}apt-get install -y {' '.join(packages)}"


def display_problem(environ=None, platform: str | None = None, loadable=_loadable) -> str | None:
    """A one-paragraph message saying why napari cannot open a window here and what to run, or None.

    Only Linux with Qt's xcb platform is checked: other systems bundle what Qt needs, and an explicit
    ``QT_QPA_PLATFORM`` other than xcb (offscreen, wayland...) or a Wayland session is the user's choice.
    """
    environ = os.environ if environ is None else environ
    platform = sys.platform if platform is None else platform
    if not platform.startswith("linux") or environ.get("QT_QPA_PLATFORM", "xcb") != "xcb":
        return None
    if environ.get("WAYLAND_DISPLAY") and "QT_QPA_PLATFORM" not in environ:
        return None  # a Wayland session: Qt may use its wayland plugin, which needs none of the xcb libraries
    missing = missing_libraries(loadable)
    if missing:
        return (
            f"napari cannot open a window: Qt needs system libraries that are missing ({', '.join(missing)}). "
            f"Install them with:\n  {install_command(missing)}\n"
            f"or run `bash {INSTALL_SCRIPT}` from the project's source, then start napari-robustmedsam again."
        )
    if not environ.get("DISPLAY") and not environ.get("WAYLAND_DISPLAY"):
        return (
            "napari cannot open a window: there is no display (DISPLAY is not set). Run it on a desktop, over "
            "`ssh -X`, or under a virtual screen: xvfb-run -a napari-robustmedsam. Without a window, "
            "`robustmedsam segment` and `robustmedsam demo` do the same work."
        )
    return None

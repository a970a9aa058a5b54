"""Options shared by the commands that read a medical volume: ``--series``, ``--timepoint``, ``--window``."""

from __future__ import annotations

import argparse
import sys
import warnings

from ..engine.windows import PRESETS

WINDOW_HELP = (
    f"CT intensity window the model sees: {', '.join(PRESETS)}, LEVEL,WIDTH in HU (e.g. 40,400; a negative level as --window=-600,1500), none, or auto "
    "(default: soft-tissue for CT, none otherwise; the image itself stays in HU)"
)


def add_volume_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--series", default=None, metavar="UID",
                   help="DICOM folder with several series: the SeriesInstanceUID (or number in the listing) to read "
                        "(default: the largest, the others listed)")
    p.add_argument("--timepoint", type=int, default=None, metavar="T", help="4D NIfTI/NRRD: the volume to read (0-based)")
    p.add_argument("--window", default="auto", metavar="NAME|L,W", help=WINDOW_HELP)


def read_with_notes(path, series=None, timepoint=None):
    """``(array, geometry or None)`` of an image, volume or DICOM folder; the reader's warnings (which series of
    several was read, ...) printed as notes on stderr."""
    from ..io import read_image_geometry

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        array, geometry = read_image_geometry(path, series=series, timepoint=timepoint)
    for w in caught:
        print(f"note: {w.message}", file=sys.stderr)
    return array, geometry


def read_input(args: argparse.Namespace, path=None):
    """``(array, geometry or None, window or None)`` of the command's input; warnings printed as notes."""
    from ..engine.windows import default_window, parse_window

    array, geometry = read_with_notes(path if path is not None else args.image, getattr(args, "series", None),
                                      getattr(args, "timepoint", None))
    choice = getattr(args, "window", "auto")
    if choice is None or str(choice).strip().lower() == "auto":
        window = default_window(array, geometry.modality if geometry is not None else None)
    else:
        window = parse_window(choice)
    if window is not None:
        print(f"window: {window.spec} (level {window.level:g}, width {window.width:g} HU)", file=sys.stderr)
    return array, geometry, window

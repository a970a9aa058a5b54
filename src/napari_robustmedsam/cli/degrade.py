"""`robustmedsam degrade` and `robustmedsam degrade-folder`: synthetic degradations from the command line.

    robustmedsam degrade INPUT --type T [--level LQ-3 | --severity S | --target-ssim X] [--seed S] -o OUT
    robustmedsam degrade INPUT --type random --level LQ-3+ --modality M -o OUT   (PGE-SAM composition)
    robustmedsam degrade scan.nii.gz (or a DICOM folder) --type T -o scan_lq3.nii.gz   (geometry kept)
    robustmedsam degrade --gallery IMAGE [--modality M] -o sheet.png              (contact sheet)
    robustmedsam degrade --list [--modality M]                                    (available types)
    robustmedsam degrade-folder DIR --modality M [--levels LQ-1 LQ-2 LQ-3 LQ-3+] -o OUTDIR
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import shutil
import zlib
from pathlib import Path

from ..errors import DegradationError
from ..io.output_paths import add_overwrite_argument, check_output, check_output_folder, check_outputs
from .volume_input import read_with_notes


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "degrade",
        help="apply a synthetic degradation to an image or volume, or render a contact sheet",
        description="Apply one degradation type (or a PGE-SAM random composition) to an image / volume, "
        "render a contact sheet of every degradation and level (--gallery), or list the types (--list).",
    )
    p.add_argument("input", nargs="?", help="input image or volume: PNG, JPEG, BMP, TIFF, NPY, a DICOM file or series "
                   "folder, NIfTI, NRRD or MHA (the intensities are degraded as stored: CT stays in HU)")
    p.add_argument("--type", "-t", dest="type_name", help="degradation type (see --list), or 'random'")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--level", "-l", help="quality level: LQ-1, LQ-2, LQ-3 (default) or LQ-3+")
    group.add_argument("--severity", type=float, help="continuous severity in [0, 1] instead of a level")
    group.add_argument("--target-ssim", type=float, help="calibrate the severity to this SSIM to the input")
    p.add_argument("--modality", "-m", help="imaging modality (needed for LQ-3+ and --type random)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--output", "-o", help="output file (image, or the sheet PNG with --gallery); .nii.gz, .nrrd or .mha "
                   "keep a medical input's spacing, origin and direction")
    p.add_argument("--series", default=None, metavar="UID",
                   help="DICOM folder with several series: the SeriesInstanceUID (or number in the listing) to read")
    p.add_argument("--timepoint", type=int, default=None, metavar="T", help="4D NIfTI/NRRD: the volume to read (0-based)")
    p.add_argument("--record", help="also write the applied transforms and parameters to this JSON file")
    p.add_argument("--gallery", metavar="IMAGE", help="render every applicable degradation at every level")
    p.add_argument("--types", help="with --gallery: comma-separated types to show instead of all applicable")
    p.add_argument("--dpi", type=int, default=100, help="with --gallery: resolution (default 100, ~190 px per panel)")
    p.add_argument("--list", action="store_true", help="list the degradation types and exit")
    add_overwrite_argument(p)
    p.set_defaults(func=run_degrade)

    f = subparsers.add_parser(
        "degrade-folder",
        help="PGE-SAM style dataset: one clean + LQ-1..LQ-3+ versions of every image, with a manifest",
        description="Degrade every image of a folder (or of DIR/images, with DIR/masks copied along) at "
        "each level with a random composition of the modality's degradations; writes OUTDIR/clean, "
        "OUTDIR/<level>/ (same file names), OUTDIR/masks and OUTDIR/manifest.json.",
    )
    f.add_argument("folder", help="folder of images, or a dataset folder with images/ (and masks/)")
    f.add_argument("--modality", "-m", required=True, help="imaging modality (chooses the degradation sets)")
    f.add_argument("--levels", nargs="+", default=None, help="levels to write (default: LQ-1 LQ-2 LQ-3 LQ-3+)")
    f.add_argument("--seed", type=int, default=0, help="base random seed (default 0)")
    f.add_argument("--output", "-o", required=True, help="output folder")
    f.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    add_overwrite_argument(f)
    f.set_defaults(func=run_degrade_folder)


# ---------------------------------------------------------------------------------------------------------


def _list_types(modality: str | None) -> int:
    from ..degradations import describe, list_degradations

    for name in list_degradations(modality=modality):
        info = describe(name)
        print(f"{name:22s} {info['family']:8s} {info['simulates']}")
    return 0


def run_degrade(args: argparse.Namespace) -> int:
    from ..degradations import degrade, degrade_random
    from ..degradations._io import read_image, write_text

    if args.list:
        return _list_types(args.modality)
    if args.gallery:
        from ..degradations.gallery import render_gallery

        if not args.output:
            raise DegradationError("--gallery needs -o SHEET.png")
        if Path(args.output).suffix.lower() != ".png":
            raise DegradationError(f"the contact sheet is a PNG: use -o {Path(args.output).with_suffix('.png')}")
        check_output(args.output, inputs=[args.gallery], overwrite=args.overwrite)
        image = read_image(args.gallery)
        types = [t.strip() for t in args.types.split(",") if t.strip()] if args.types else None
        out = render_gallery(image, args.output, modality=args.modality, seed=args.seed, progress=True, types=types,
                             dpi=args.dpi,
                             title=f"{Path(args.gallery).name} - modality: {args.modality or 'all types'}",
                             overwrite=True)  # checked above, before the (slow) rendering
        print(f"wrote {out}")
        return 0
    if not args.input:
        raise DegradationError("give an INPUT image (or --gallery IMAGE, or --list)")
    if not args.type_name:
        raise DegradationError("give --type T (see `robustmedsam degrade --list`), or --type random")
    if not args.output:
        raise DegradationError("give the output file with -o OUT")
    _check_output_format(args.output)
    check_outputs([args.output, args.record], inputs=[args.input], overwrite=args.overwrite)
    image, geometry = read_with_notes(args.input, args.series, args.timepoint)
    modality = args.modality or _header_modality(geometry)
    if args.type_name.strip().lower() == "random":
        if args.severity is not None or args.target_ssim is not None:
            raise DegradationError("--type random works with --level only")
        result, record = degrade_random(image, args.level or "LQ-3", modality=modality, seed=args.seed)
    else:
        result, record = degrade(
            image, args.type_name, args.level, severity=args.severity, target_ssim=args.target_ssim,
            seed=args.seed, modality=modality, return_record=True,
        )
    _write_output(args.output, result, geometry)
    if args.record:
        write_text(args.record, json.dumps(record, indent=2) + "\n", overwrite=True)
    applied = ", ".join(f"{r['name']} (severity {r['severity']:.3f})" for r in record)
    print(f"wrote {args.output}: {applied}")
    first = record[0]
    if "target_ssim" in first:
        note = "" if first["reached"] else " - target not reachable with this type, closest severity used"
        print(f"SSIM to the input: {first['ssim']:.3f} (target {first['target_ssim']}){note}")
    return 0


def _check_output_format(output: str) -> None:
    from ..degradations._io import IMAGE_SUFFIXES
    from ..io.medical import ITK_SUFFIXES, suffix_of

    suffix = suffix_of(output)
    if suffix not in IMAGE_SUFFIXES + ITK_SUFFIXES:
        raise DegradationError(f"unsupported output format {suffix!r} for {output}; use one of "
                               f"{', '.join(IMAGE_SUFFIXES + ITK_SUFFIXES)} (a medical volume: .nii.gz)")


def _header_modality(geometry) -> str | None:
    """The modality a DICOM header names (MR, CT, US...), when the degradation library knows it."""
    from ..degradations.modality import modality_from_dicom

    modality = modality_from_dicom(geometry.modality if geometry is not None else None)
    if modality is None:
        return None
    print(f"modality: {modality} (from the DICOM header; --modality sets another)")
    return modality


def _write_output(output: str, result, geometry) -> None:
    """NIfTI / NRRD / MHA on the input's grid; the plain formats as arrays (a note says the geometry is not kept)."""
    from ..degradations._io import write_image
    from ..io.medical import ITK_SUFFIXES, suffix_of
    from ..io.medical_labels import write_on_grid

    if suffix_of(output) in ITK_SUFFIXES:
        write_on_grid(output, result, geometry)
        return
    write_image(output, result, overwrite=True)  # checked before any work
    if geometry is not None:
        print(f"note: {Path(output).name} holds the pixels only; write .nii.gz, .nrrd or .mha to keep the spacing, "
              "origin and direction")


# ---------------------------------------------------------------------------------------------------------


def _find_images(folder: Path) -> tuple[list[Path], Path | None, str]:
    from ..degradations._io import IMAGE_SUFFIXES

    if not folder.is_dir():
        raise DegradationError(f"input folder not found: {folder}")
    if (folder / "images").is_dir():
        image_dir, mask_dir, layout = folder / "images", folder / "masks", "medseg"
        mask_dir = mask_dir if mask_dir.is_dir() else None
    else:
        image_dir, mask_dir, layout = folder, None, "flat"
    images = sorted(p for p in image_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                    and not p.name.startswith("."))
    if not images:
        raise DegradationError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {image_dir}")
    return images, mask_dir, layout


def _mask_for(image: Path, mask_dir: Path | None) -> Path | None:
    """The mask file of ``image`` in ``mask_dir`` (same stem), if any."""
    if mask_dir is None:
        return None
    candidates = sorted(mask_dir.glob(image.stem + ".*"))
    return candidates[0] if candidates else None


def image_seed(base_seed: int, name: str) -> int:
    """Per-image seed from the base seed and the file name (independent of the processing order)."""
    import numpy as np

    state = np.random.SeedSequence([int(base_seed), zlib.crc32(name.encode("utf-8"))]).generate_state(2, np.uint64)
    return int(state[0] >> np.uint64(1))


def _copy_atomic(src: Path, dst: Path) -> None:
    from ..io.atomic import atomic_write_path as atomic_path

    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def run_degrade_folder(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .. import __version__
    from ..degradations import LEVEL_SEVERITY, LEVELS, degrade_levels, modality_degradations
    from ..degradations._io import read_image, write_image, write_text
    from ..degradations.compose import general_pool
    from ..degradations.levels import normalize_level
    from ..degradations.modality import normalize_modality

    modality = normalize_modality(args.modality)
    levels = [normalize_level(lv) for lv in (args.levels or LEVELS)]
    folder, out = Path(args.folder), Path(args.output)
    images, mask_dir, layout = _find_images(folder)
    if out.resolve() == folder.resolve():
        raise DegradationError("the output folder must differ from the input folder")
    masks = {path.name: _mask_for(path, mask_dir) for path in images}
    planned = [f"{sub}/{path.name}" for path in images for sub in ("clean", *levels)]
    planned += [f"masks/{m.name}" for m in masks.values() if m is not None] + ["manifest.json"]
    inputs = [folder, *images, *(m for m in masks.values() if m is not None)]
    check_output_folder(out, planned, inputs=inputs, overwrite=args.overwrite)  # before any image is degraded
    entries = {}
    masks_copied = 0
    for path in tqdm(images, desc="degrade-folder", unit="image", disable=args.quiet):
        image = read_image(path)
        seed = image_seed(args.seed, path.name)
        try:
            results = degrade_levels(image, modality=modality, seed=seed, levels=levels)
        except DegradationError as err:
            raise DegradationError(f"{path.name}: {err}") from None
        _copy_atomic(path, out / "clean" / path.name)
        for level, (degraded, _record) in results.items():
            write_image(out / level / path.name, degraded, overwrite=True)
        mask_name = None
        if masks[path.name] is not None:
            _copy_atomic(masks[path.name], out / "masks" / masks[path.name].name)
            mask_name = masks[path.name].name
            masks_copied += 1
        entries[path.name] = {
            "seed": seed,
            "shape": list(image.shape),
            "dtype": str(image.dtype),
            "mask": mask_name,
            "levels": {level: record for level, (_img, record) in results.items()},
        }
    manifest = {
        "tool": "robustmedsam degrade-folder",
        "version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "input": str(folder),
        "input_layout": layout,
        "modality": modality,
        "levels": levels,
        "base_seed": args.seed,
        "level_severity": {lv: list(LEVEL_SEVERITY[lv]) for lv in levels},
        "degradation_sets": {k: list(v) for k, v in modality_degradations(modality).items()},
        "general_pool": general_pool(modality),
        "images": entries,
    }
    write_text(out / "manifest.json", json.dumps(manifest, indent=1) + "\n", overwrite=True)
    print(f"wrote {len(images)} images x (clean + {len(levels)} levels) to {out}"
          + (f", {masks_copied} masks" if mask_dir is not None else "") + f"; manifest: {out / 'manifest.json'}")
    return 0

"""benchmarks/mask_resolution_ceiling.py: what the 256 x 256 decoder output allows, on masks with known answers."""

from __future__ import annotations


import numpy as np
from skimage.io import imsave
from benchmark_loading import load_benchmark  # tests/ is on sys.path under pytest


def _load_script():
    return load_benchmark("mask_resolution_ceiling")


def test_a_large_disc_survives_the_low_resolution_grid_and_a_one_pixel_line_does_not(tmp_path, capsys):
    yy, xx = np.mgrid[:512, :512]
    labels = np.zeros((512, 512), np.uint8)
    labels[(yy - 200) ** 2 + (xx - 200) ** 2 < 80 ** 2] = 1  # a disc of radius 80 px: 40 px on the grid
    labels[400, 50:450] = 2  # a 1 px line: a quarter of a grid cell wide
    for sub, arr in (("images", (labels * 100).astype(np.uint8)), ("masks", labels)):
        (tmp_path / "toy" / sub).mkdir(parents=True)
        imsave(tmp_path / "toy" / sub / "disc_and_line.png", arr, check_contrast=False)
    assert _load_script().main(["--data", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "toy" in out and "(2 objects)" in out
    _, count, mean, worst = next(line.split() for line in out.splitlines() if line.startswith("toy"))
    # the line's area-averaged cells stay below one half: it vanishes (Dice 0); the disc keeps Dice ~1
    assert int(count) == 2 and float(worst) < 0.05 and float(mean) > 0.48

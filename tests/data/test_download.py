"""download: local HTTP server on 127.0.0.1 (Range support), checksum refusal, resume."""

from __future__ import annotations

import hashlib
import http.server
import threading

import pytest

from pipeline.config import SourceConfig
from pipeline.data.download import DownloadError, download
from tests.conftest import free_port

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB
SHA = hashlib.sha256(PAYLOAD).hexdigest()


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves PAYLOAD at /archive.zip, honouring ``Range: bytes=N-``; counts requests."""

    requests: list[str | None] = []

    def do_GET(self):  # noqa: N802
        if self.path != "/archive.zip":
            self.send_error(404)
            return
        rng = self.headers.get("Range")
        type(self).requests.append(rng)
        start = int(rng.split("=")[1].rstrip("-")) if rng else 0
        body = PAYLOAD[start:]
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture()
def server():
    RangeHandler.requests = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_http_download_verifies_checksum(server, tmp_path):
    out = tmp_path / "raw" / "malaria.zip"
    result = download(SourceConfig(f"{server}/archive.zip", SHA), out)
    assert out.read_bytes() == PAYLOAD and result.sha256 == SHA
    assert not out.with_name("malaria.zip.part").exists()


def test_checksum_mismatch_is_refused_and_not_left_in_place(server, tmp_path):
    out = tmp_path / "malaria.zip"
    with pytest.raises(DownloadError, match="checksum mismatch"):
        download(SourceConfig(f"{server}/archive.zip", "0" * 64), out)
    assert not out.exists()
    assert (tmp_path / "malaria.zip.rejected").read_bytes() == PAYLOAD


def test_partial_download_resumes_with_range(server, tmp_path):
    out = tmp_path / "malaria.zip"
    half = len(PAYLOAD) // 2
    out.with_name("malaria.zip.part").write_bytes(PAYLOAD[:half])
    download(SourceConfig(f"{server}/archive.zip", SHA), out)
    assert RangeHandler.requests == [f"bytes={half}-"]
    assert out.read_bytes() == PAYLOAD


def test_unreachable_source_fails_fast_and_says_what_to_do(tmp_path, monkeypatch):
    """Fast by the work it does: one connection attempt, bounded by the stage's timeout, no
    retry, and nothing written."""
    import urllib.request

    port = free_port()  # a loopback port with nothing listening
    attempts, connect = [], urllib.request.urlopen

    def counted(req, *args, **kwargs):  # urlopen(url, data=None, timeout=<no limit>, ...)
        timeout = kwargs.get("timeout", args[1] if len(args) > 1 else None)
        attempts.append((getattr(req, "full_url", req), timeout))
        return connect(req, *args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", counted)
    url = f"http://127.0.0.1:{port}/cell_images.zip"
    with pytest.raises(DownloadError, match="download.sources") as err:
        download(SourceConfig(url, SHA), tmp_path / "malaria.zip", timeout_s=5)
    assert attempts == [(url, 5)]  # one try, with the timeout it was given
    assert "local copy" in str(err.value) and f"cannot reach {url}" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no archive, no .part


def test_http_error_is_reported(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(SourceConfig(f"{server}/missing.zip", SHA), tmp_path / "malaria.zip")


@pytest.mark.parametrize("as_uri", [False, True])
def test_local_path_and_file_uri(tmp_path, as_uri):
    src = tmp_path / "mirror" / "cell_images.zip"
    src.parent.mkdir()
    src.write_bytes(PAYLOAD)
    url = src.as_uri() if as_uri else str(src)
    download(SourceConfig(url, SHA), tmp_path / "malaria.zip")
    assert (tmp_path / "malaria.zip").read_bytes() == PAYLOAD


def test_missing_local_copy_message(tmp_path):
    with pytest.raises(DownloadError, match="does not exist"):
        download(SourceConfig(str(tmp_path / "nope.zip"), SHA), tmp_path / "malaria.zip")


def test_md5_is_checked_when_that_is_what_the_source_publishes(server, tmp_path):
    md5 = hashlib.md5(PAYLOAD).hexdigest()
    download(SourceConfig(f"{server}/archive.zip", md5=md5), tmp_path / "bloodmnist.zip")
    with pytest.raises(DownloadError, match="expected md5"):
        download(SourceConfig(f"{server}/archive.zip", md5="0" * 32), tmp_path / "other.zip")


def test_a_local_folder_is_zipped_reproducibly(tmp_path):
    import zipfile

    root = tmp_path / "cells"
    for name in ("a/1.png", "b/2.png"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(name.encode())
    first = download(SourceConfig(str(root)), tmp_path / "x.zip")
    second = download(SourceConfig(str(root)), tmp_path / "y.zip")
    assert first.sha256 == second.sha256
    assert zipfile.ZipFile(tmp_path / "x.zip").namelist() == ["a/1.png", "b/2.png"]


class FileHandler(RangeHandler):
    """Serves whatever bytes the test put in ``files`` under their names."""

    files: dict[str, bytes] = {}

    def do_GET(self):  # noqa: N802
        body = self.files.get(self.path.split("?")[0])
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_every_dataset_source_in_params_downloads_and_verifies(tmp_path):
    """Each dataset's source as params.yaml declares it, re-pointed at 127.0.0.1."""
    import yaml

    from pipeline.config import from_dict
    from pipeline.data.synthetic import make_medmnist_npz
    from pipeline.params import Params
    from tests.conftest import REPO

    params = from_dict(Params, yaml.safe_load((REPO / "params.yaml").read_text()))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FileHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        for name, source in params.download.sources.items():
            if name == "imagefolder":
                continue  # a local folder by design
            body = make_medmnist_npz(tmp_path / f"{name}.npz", counts=(8, 2, 2)).read_bytes()
            FileHandler.files = {f"/{name}": body}
            algo = "sha256" if source.sha256 else "md5"
            digest = getattr(hashlib, algo)(body).hexdigest()
            local = SourceConfig(f"{base}/{name}?download=1", **{algo: digest})
            result = download(local, tmp_path / "raw" / f"{name}.zip")
            assert result.path.read_bytes() == body, name
            assert source.url.startswith("https://") and (source.sha256 or source.md5), name
    finally:
        httpd.shutdown()

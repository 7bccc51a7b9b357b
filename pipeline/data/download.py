"""Fetch a dataset archive: HTTP(S) with resume, ``file://`` URLs or local paths.

The archive is written to ``<output>.part`` and renamed into place only after its
SHA-256 matches, so the next stage never reads a partial or corrupt file.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import SourceConfig, UserError
from pipeline.console import progress

log = logging.getLogger(__name__)


class DownloadError(UserError, RuntimeError):
    """The archive could not be fetched or failed verification."""


@dataclass(frozen=True)
class DownloadResult:
    path: Path
    sha256: str
    size: int
    source: str


def download(source: SourceConfig, output: str | Path, timeout_s: float = 20.0,
             chunk_bytes: int = 1 << 20) -> DownloadResult:
    """Fetch ``source.url`` to ``output`` and verify its SHA-256 (or MD5).

    Raises:
        DownloadError: when the source is unreachable or the checksum differs;
            the message says how to point the stage at a local copy.
    """
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(out.name + ".part")
    scheme = urllib.parse.urlparse(source.url).scheme
    if scheme in ("http", "https"):
        _fetch_http(source.url, part, timeout_s, chunk_bytes)
    else:
        src = _local_path(source.url)
        (_zip_folder if src.is_dir() else _copy_local)(src, part, chunk_bytes)
    algo, expected = ("sha256", source.sha256) if source.sha256 or not source.md5 else ("md5", source.md5)
    digest = _digest(part, algo, chunk_bytes)
    if expected and digest != expected.lower():
        bad = out.with_name(out.name + ".rejected")
        part.replace(bad)
        raise DownloadError(
            f"checksum mismatch for {source.url}: expected {algo} {expected}, got "
            f"{digest}. The file was moved to {bad} and not used. Check the URL, or set "
            f"download.sources.<dataset>.{algo} if you deliberately use another archive."
        )
    if not expected:
        log.warning("no checksum set for %s: the archive is used unverified", source.url)
    part.replace(out)
    size = out.stat().st_size
    log.info("downloaded %s (%d bytes, %s %s)", out, size, algo, digest)
    return DownloadResult(out, digest, size, source.url)


def _local_path(url: str) -> Path:
    parsed = urllib.parse.urlparse(url)
    path = Path(urllib.parse.unquote(parsed.path)) if parsed.scheme == "file" else Path(url)
    if parsed.scheme not in ("", "file"):
        raise DownloadError(f"unsupported URL scheme '{parsed.scheme}' in {url}")
    if not path.exists():
        raise DownloadError(
            f"local archive {path} does not exist. Set download.sources.<dataset>.url to "
            f"the path of the archive (e.g. dvc exp run -S "
            f"download.sources.malaria.url=/data/cell_images.zip)."
        )
    return path


def _copy_local(src: Path, dst: Path, chunk: int) -> None:
    total = src.stat().st_size
    with open(src, "rb") as fin, open(dst, "wb") as fout, _bar(total, src.name) as bar:
        while block := fin.read(chunk):
            fout.write(block)
            bar.update(len(block))


def _fetch_http(url: str, part: Path, timeout: float, chunk: int) -> None:
    """Download ``url`` into ``part``, resuming from its current size."""
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # already complete
            return
        raise DownloadError(f"HTTP {exc.code} fetching {url}: {exc.reason}") from None
    except (urllib.error.URLError, socket.timeout, OSError) as exc:
        raise DownloadError(
            f"cannot reach {url} ({getattr(exc, 'reason', exc)}). If this machine is "
            f"offline, point the stage at a local copy or mirror: set download.sources.<dataset>.url in "
            f"params.yaml to a path or file:// URL, e.g. "
            f"dvc exp run -S download.sources.malaria.url=<path to cell_images_sample.zip> "
            f"-S download.sources.malaria.sha256=<its sha256>."
        ) from None
    with resp:
        resuming = have and resp.status == 206
        if have and not resuming:
            log.info("server ignored the Range request; starting over")
            have = 0
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length else None
        with open(part, "ab" if resuming else "wb") as f, _bar(total, part.name) as bar:
            bar.update(have)
            try:
                while block := resp.read(chunk):
                    f.write(block)
                    bar.update(len(block))
            except (socket.timeout, OSError) as exc:
                raise DownloadError(
                    f"download of {url} broke off ({exc}); run the stage again to resume "
                    f"from {part.stat().st_size} bytes"
                ) from None


def _zip_folder(src: Path, dst: Path, chunk: int) -> None:
    """Pack a local ``<class>/<image>`` folder into one zip (sorted, so reproducible)."""
    import zipfile

    files = sorted(p for p in src.rglob("*") if p.is_file())
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zf:
        for p in progress(files, desc=f"zip {src.name}", unit="file"):
            info = zipfile.ZipInfo(p.relative_to(src).as_posix(), date_time=(1980, 1, 1, 0, 0, 0))
            zf.writestr(info, p.read_bytes())


def _digest(path: Path, algo: str, chunk: int) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f, _bar(path.stat().st_size, algo) as bar:
        while block := f.read(chunk):
            h.update(block)
            bar.update(len(block))
    return h.hexdigest()


def _bar(total: int | None, desc: str):
    return progress(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024)



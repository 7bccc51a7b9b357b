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

from tqdm.auto import tqdm

from pipeline.config import DownloadConfig

log = logging.getLogger(__name__)


class DownloadError(RuntimeError):
    """The archive could not be fetched or failed verification."""


@dataclass(frozen=True)
class DownloadResult:
    path: Path
    sha256: str
    size: int
    source: str


def download(cfg: DownloadConfig, output: str | Path) -> DownloadResult:
    """Fetch ``cfg.url`` to ``output`` and verify its SHA-256.

    Raises:
        DownloadError: when the source is unreachable or the checksum differs;
            the message says how to point the stage at a local copy.
    """
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(out.name + ".part")
    scheme = urllib.parse.urlparse(cfg.url).scheme
    if scheme in ("http", "https"):
        _fetch_http(cfg.url, part, cfg.timeout_s, cfg.chunk_bytes)
    else:
        _copy_local(_local_path(cfg.url), part, cfg.chunk_bytes)
    digest = _sha256(part, cfg.chunk_bytes)
    if cfg.sha256 and digest != cfg.sha256.lower():
        bad = out.with_name(out.name + ".rejected")
        part.replace(bad)
        raise DownloadError(
            f"checksum mismatch for {cfg.url}: expected sha256 {cfg.sha256}, got "
            f"{digest}. The file was moved to {bad} and not used. Check the URL, or "
            f"set download.sha256 if you deliberately use another archive."
        )
    part.replace(out)
    size = out.stat().st_size
    log.info("downloaded %s (%d bytes, sha256 %s)", out, size, digest)
    return DownloadResult(out, digest, size, cfg.url)


def _local_path(url: str) -> Path:
    parsed = urllib.parse.urlparse(url)
    path = Path(urllib.parse.unquote(parsed.path)) if parsed.scheme == "file" else Path(url)
    if parsed.scheme not in ("", "file"):
        raise DownloadError(f"unsupported URL scheme '{parsed.scheme}' in {url}")
    if not path.is_file():
        raise DownloadError(
            f"local archive {path} does not exist. Set download.url to the path of "
            f"the archive (e.g. dvc exp run -S download.url=/data/cell_images.zip)."
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
            f"offline, point the stage at a local copy or mirror: set download.url in "
            f"params.yaml to a path or file:// URL, e.g. "
            f"dvc exp run -S download.url=../shared/data/cell_images_sample.zip "
            f"-S download.sha256=<its sha256>."
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


def _sha256(path: Path, chunk: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f, _bar(path.stat().st_size, "sha256") as bar:
        while block := f.read(chunk):
            h.update(block)
            bar.update(len(block))
    return h.hexdigest()


def _bar(total: int | None, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024)



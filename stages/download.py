"""DVC stage `download`: fetch and verify the dataset archive."""

import sys

from common import load_params

from pipeline.download import DownloadError, download


def main(output: str) -> None:
    params = load_params()
    try:
        result = download(params.download.sources[params.dataset], output,
                          params.download.timeout_s, params.download.chunk_bytes)
    except DownloadError as exc:
        raise SystemExit(f"download failed: {exc}") from None
    print(f"{result.path}: {result.size:,} bytes, sha256 {result.sha256}")


if __name__ == "__main__":
    main(*sys.argv[1:])

"""DVC stage `download`: fetch and verify the dataset archive."""

from common import load_params, run_stage


def main(output: str) -> None:
    params = load_params()
    # the library is imported once the params are read (common.py)
    from pipeline.data.download import download

    result = download(params.download.sources[params.dataset], output,
                      params.download.timeout_s, params.download.chunk_bytes)
    print(f"{result.path}: {result.size:,} bytes, sha256 {result.sha256}")


if __name__ == "__main__":
    run_stage(main, __doc__)

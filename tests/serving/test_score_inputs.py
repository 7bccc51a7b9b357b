"""score_inputs: every kind of input listed, nothing an image dropped silently, decode errors as rows."""

from __future__ import annotations

import zipfile

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.serving.score_inputs import decode_batch, list_inputs
from pipeline.serving.screening import appearance


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "cells"
    (root / "a").mkdir(parents=True)
    for i, name in enumerate(["a/x.png", "b.png"]):
        Image.fromarray(np.full((12, 10, 3), 40 * i, np.uint8)).save(root / name)
    (root / "notes.txt").write_text("not an image")
    return root


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="score.input"):
        list_inputs(tmp_path / "nowhere")


def test_a_folder_and_its_zip_list_the_same_files(folder, tmp_path):
    listed, skipped = list_inputs(folder)
    assert listed["path"].tolist() == ["a/x.png", "b.png", "notes.txt"] and skipped == []
    with zipfile.ZipFile(tmp_path / "cells.zip", "w") as zf:
        for p in sorted(folder.rglob("*")):
            zf.write(p, p.relative_to(folder).as_posix())
    zipped, zskipped = list_inputs(tmp_path / "cells.zip")
    assert zipped["path"].tolist() == listed["path"].tolist() and zskipped == skipped


def test_a_list_keeps_missing_files_and_reads_paths_relative_to_itself(folder):
    pd.DataFrame({"path": ["a/x.png", "gone.png"]}).to_csv(folder / "list.csv", index=False)
    listed, _ = list_inputs(folder / "list.csv")
    assert listed["path"].tolist() == [str(folder / "a/x.png"), str(folder / "gone.png")]
    batch = decode_batch(listed, 8)
    assert batch["pixels"].shape == (2, 8, 8, 3)
    assert batch["error"][0] == "" and batch["error"][1].startswith("cannot read file")
    # the OOD score's appearance statistics come with the pixels, unless not asked for
    np.testing.assert_array_equal(batch["appearance"], appearance(batch["pixels"]))
    assert "appearance" not in decode_batch(listed, 8, stats=False)


def test_a_glob_lists_only_the_images_it_matches(folder):
    listed, skipped = list_inputs(str(folder / "**" / "*.png"))
    assert sorted(listed["path"]) == sorted(str(p) for p in folder.rglob("*.png")) and skipped == []


def test_nothing_pillow_reads_is_skipped_and_only_system_files_are(tmp_path):
    """WebP and a multi-frame GIF are scored (the GIF on its first frame); a text file gets an
    error row; only the operating system's files are skipped, by name."""
    import io

    from PIL import Image

    from pipeline.data.synthetic import synthetic_cell
    from pipeline.serving.score_inputs import decode_batch, list_inputs

    rng = np.random.default_rng(0)
    cells = [Image.fromarray(synthetic_cell(rng, True, 60)) for _ in range(2)]
    cells[0].save(tmp_path / "cell.webp", format="WEBP", lossless=True)
    cells[0].save(tmp_path / "frames.gif", save_all=True, append_images=[cells[1]])
    (tmp_path / "notes.txt").write_text("not an image")
    for name in (".DS_Store", "Thumbs.db", "__MACOSX/._cell.webp"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"system")
    inputs, skipped = list_inputs(tmp_path)
    assert sorted(inputs["path"]) == ["cell.webp", "frames.gif", "notes.txt"]
    assert sorted(skipped) == [".DS_Store", "Thumbs.db", "__MACOSX/._cell.webp"]
    decoded = decode_batch(inputs.sort_values("path").reset_index(drop=True), 32)
    assert list(decoded["error"][:2]) == ["", ""] and "not a readable image" in decoded["error"][2]
    first = np.asarray(Image.open(io.BytesIO((tmp_path / "frames.gif").read_bytes())).convert("RGB").resize((32, 32)))
    assert np.abs(decoded["pixels"][1].astype(int) - first).mean() < 3  # the first frame, not the second


def test_decoded_batches_keep_order_stay_in_one_container_and_decode_at_most_ahead(folder):
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.serving.score_inputs import decoded_batches

    listed, _ = list_inputs(folder)  # a/x.png, b.png, notes.txt in the folder
    other = pd.DataFrame({"path": [str(folder / "b.png"), str(folder / "a" / "x.png")], "container": ""})
    inputs = pd.concat([listed, other], ignore_index=True)  # 5 rows, two containers

    class Counting(ThreadPoolExecutor):
        submitted = 0

        def submit(self, *args, **kwargs):
            Counting.submitted += 1
            return super().submit(*args, **kwargs)

    with Counting(2) as pool:
        seen = []
        for k, batch in enumerate(decoded_batches(inputs, 8, None, 2, pool, ahead=2)):
            # batch k is in hand: at most k + 1 + ahead submitted, never the whole input at once
            assert Counting.submitted <= k + 3
            seen.append(list(batch["path"]))
    # slices of 2 rows, the second cut in two where the container changes (row 3 begins the other)
    assert seen == [["a/x.png", "b.png"], ["notes.txt"], [str(folder / "b.png")], [str(folder / "a" / "x.png")]]
    assert Counting.submitted == 4

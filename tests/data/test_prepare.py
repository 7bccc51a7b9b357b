"""prepare: safe extraction, skipping non-images, quarantine, manifest and arrays."""

from __future__ import annotations

import zipfile

import numpy as np
import pandas as pd
import pytest

from pipeline.config import PrepareConfig
from pipeline.data.archive import UnsafeArchiveError, safe_member_path
from pipeline.data.prepare import prepare
from pipeline.data.prepared import PreparedData
from pipeline.data.synthetic import png_bytes, synthetic_cell


@pytest.mark.parametrize("name", ["../evil.png", "cell_images/../../evil.png", "/etc/evil.png",
                                  "C:/evil.png", "..\\evil.png"])
def test_member_paths_that_escape_are_refused(tmp_path, name):
    with pytest.raises(UnsafeArchiveError):
        safe_member_path(name, tmp_path / "images")


def test_archive_with_escaping_member_writes_nothing(tmp_path):
    archive = tmp_path / "evil.zip"
    img = png_bytes(synthetic_cell(np.random.default_rng(0), True, 40))
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("cell_images/Parasitized/C1P1ThinF_a.png", img)
        zf.writestr("cell_images/../../escaped.png", img)
    with pytest.raises(UnsafeArchiveError, match="escaped.png"):
        prepare(archive, tmp_path / "work" / "prepared", PrepareConfig(image_size=16), "malaria")
    assert not (tmp_path / "escaped.png").exists()
    assert not (tmp_path / "work" / "escaped.png").exists()
    assert not (tmp_path / "work" / "prepared").exists()


def test_thumbs_db_skipped_and_corrupt_images_quarantined(prepared_synthetic):
    report = pd.read_json(prepared_synthetic / "report.json", typ="series")
    assert report["n_skipped_non_images"] == 3  # two Thumbs.db and the README
    assert any(s.endswith("Thumbs.db") for s in report["skipped"])
    assert report["n_quarantined"] == 2
    quarantine = pd.read_csv(prepared_synthetic / "quarantine" / "quarantine.csv")
    assert quarantine["path"].str.contains("bad_cell").all()
    assert (prepared_synthetic / "quarantine" / quarantine["path"][0]).exists()
    manifest = pd.read_parquet(prepared_synthetic / "manifest.parquet")
    assert not manifest["path"].str.contains("bad_cell|Thumbs").any()
    assert len(manifest) == 160  # every readable image kept: no silent loss


def test_manifest_columns_and_arrays_agree(prepared_synthetic):
    manifest = pd.read_parquet(prepared_synthetic / "manifest.parquet")
    assert {"path", "label", "patient_id", "split", "width", "height", "sha256"} <= set(manifest)
    assert (prepared_synthetic / "images" / manifest["path"][0]).is_file()
    total = 0
    for split in ("train", "val", "test"):
        data = PreparedData(prepared_synthetic)
        images, labels, classes = data.split(split).images, data.split(split).labels, data.class_names
        assert images.shape[1:] == (32, 32, 3) and images.dtype == np.uint8
        assert len(images) == len(labels) == (manifest["split"] == split).sum()
        assert classes == ["Parasitized", "Uninfected"]
        total += len(images)
    assert total == len(manifest)


def test_max_images_takes_a_seeded_subset(synthetic_zip, tmp_path):
    a = prepare(synthetic_zip, tmp_path / "a", PrepareConfig(image_size=16, max_images=50), "malaria")
    b = prepare(synthetic_zip, tmp_path / "b", PrepareConfig(image_size=16, max_images=50), "malaria")
    assert len(a.manifest) == 50
    assert a.manifest["path"].tolist() == b.manifest["path"].tolist()


def test_empty_archive_is_a_clear_error(tmp_path):
    archive = tmp_path / "empty.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("cell_images/Parasitized/Thumbs.db", b"x")
    with pytest.raises(ValueError, match="no readable images"):
        prepare(archive, tmp_path / "out", PrepareConfig(), "malaria")


def _bad_archive(kind: str, folder, synthetic_zip):
    """An archive with one fault, and the words its error must contain."""
    path = folder / f"{kind}.zip"
    if kind == "bomb-ratio":  # 64 MB of zeros deflate to ~64 KB: ~1000x
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("cell_images/Parasitized/C1P1_bomb.png", bytes(64 << 20))
        return path, "likely zip bomb"
    if kind == "bomb-size":  # declares more than the limit the test sets (1 MB)
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
            zf.writestr("cell_images/Parasitized/C1P1_big.png", np.random.default_rng(0).bytes(2 << 20))
        return path, "prepare.max_archive_bytes"
    if kind == "truncated":
        data = synthetic_zip.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return path, "truncated zip"
    if kind == "corrupt-member":
        data = bytearray(synthetic_zip.read_bytes())
        with zipfile.ZipFile(synthetic_zip) as zf:
            m = next(m for m in zf.infolist() if m.filename.endswith(".png") and m.compress_size > 200)
        start = m.header_offset + 30 + len(m.filename.encode()) + len(m.extra) + 50
        data[start:start + 64] = bytes(64)
        path.write_bytes(bytes(data))
        return path, "truncated or corrupt"
    if kind == "not-a-zip":
        path.write_text("<html>404 not found</html>")
        return path, "is not a zip archive"
    with zipfile.ZipFile(path, "w"):
        pass
    return path, "empty zip"


@pytest.mark.parametrize("kind", ["bomb-ratio", "bomb-size", "truncated", "corrupt-member", "not-a-zip",
                                  "empty"])
def test_a_bad_archive_is_refused_clearly_and_leaves_nothing(kind, tmp_path, synthetic_zip):
    from pipeline.data.archive import ArchiveError

    archive, words = _bad_archive(kind, tmp_path, synthetic_zip)
    work = tmp_path / "work"
    work.mkdir()
    cfg = PrepareConfig(image_size=16, max_archive_bytes=1 << 20 if kind == "bomb-size" else 8 << 30)
    with pytest.raises(ArchiveError, match=words):
        prepare(archive, work / "prepared", cfg, "malaria")
    assert list(work.iterdir()) == []  # no prepared folder, no prepared.tmp
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([archive.name, "work"])


def test_a_failure_midway_removes_the_temporary_folder(tmp_path, synthetic_zip, monkeypatch):
    from pipeline.data import prepare as prepare_module

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(prepare_module, "_write_arrays", fail)
    with pytest.raises(OSError, match="No space left"):
        prepare(synthetic_zip, tmp_path / "prepared", PrepareConfig(image_size=16), "malaria")
    assert list(tmp_path.iterdir()) == []


def test_parallel_prepare_writes_the_same_bytes_as_one_process(tmp_path):
    import hashlib

    from pipeline.config import PrepareConfig
    from pipeline.data.synthetic import make_archive

    archive = make_archive(tmp_path / "cells.zip", n_patients=20, cells_per_patient=55, seed=3,
                           corrupt=2)  # over 1,000 images: two workers of PER_WORKER or more

    def prepared(workers: int) -> dict[str, str]:
        out = tmp_path / f"w{workers}"
        prepare(archive, out, PrepareConfig(image_size=32, workers=workers), "malaria")
        return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(out.rglob("*")) if p.is_file()}

    one, two = prepared(1), prepared(2)
    assert len(one) > 1000 and any(k.startswith("quarantine/") for k in one)
    assert one == two


def _cells_zip(path, members: list[tuple[str, bytes]]):
    import warnings

    with warnings.catch_warnings():  # a duplicate name is what one of these tests is about
        warnings.simplefilter("ignore", UserWarning)
        with zipfile.ZipFile(path, "w") as zf:
            for name, data in members:
                zf.writestr(name, data)
    return path


def _cell(i: int, infected: bool = True) -> bytes:
    return png_bytes(synthetic_cell(np.random.default_rng(i), infected, 40))


@pytest.mark.parametrize("case, message", [
    ("one-class", "holds one class ('Parasitized', 6 images): a classifier needs at least two class "
                  "folders"),
    ("few-patients", "class 'Uninfected' (2) has fewer than 3 patients, so the train, validation and "
                     "test splits cannot each hold one patient of every class"),
    ("duplicate", "holds 1 member name(s) more than once (e.g. "
                  "'cell_images/Parasitized/C1P1ThinF_a.png'): one would silently replace the other"),
    ("nested", "holds the archive 'cell_images.zip': archives inside the archive are not read; "
               "extract it and point download.sources at it"),
])
def test_archives_that_would_mislead_training_are_refused_with_the_reason(tmp_path, case, message):
    from pipeline.data.archive import ArchiveError

    p = "cell_images/Parasitized/C{0}P{0}ThinF_{1}.png"
    u = "cell_images/Uninfected/C{0}P{0}ThinF_{1}.png"
    members = {
        "one-class": [(p.format(i, "a"), _cell(i)) for i in range(6)],
        "few-patients": [(p.format(i, "a"), _cell(i)) for i in range(6)]
                        + [(u.format(i, "b"), _cell(i, False)) for i in range(2)],
        "duplicate": [(p.format(1, "a"), _cell(1)), (p.format(1, "a"), _cell(2))],
        "nested": [("cell_images.zip", b"PK\x05\x06" + bytes(18))],
    }[case]
    archive = _cells_zip(tmp_path / f"{case}.zip", members)
    with pytest.raises(ArchiveError) as err:
        prepare(archive, tmp_path / "work" / "prepared", PrepareConfig(image_size=16), "malaria")
    assert message in str(err.value)
    assert not (tmp_path / "work").exists() or list((tmp_path / "work").iterdir()) == []


def test_a_nested_archive_beside_images_is_named_in_the_data_card(tmp_path, synthetic_zip):
    import shutil

    archive = shutil.copyfile(synthetic_zip, tmp_path / "with-nested.zip")
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr("cell_images/more_cells.zip", b"PK\x05\x06" + bytes(18))
    prepare(archive, tmp_path / "prepared", PrepareConfig(image_size=16), "malaria")
    report = pd.read_json(tmp_path / "prepared" / "report.json", typ="series")
    assert report["nested_archives_skipped"] == ["cell_images/more_cells.zip"]
    assert "`cell_images/more_cells.zip`" in (tmp_path / "prepared" / "data_card.md").read_text()

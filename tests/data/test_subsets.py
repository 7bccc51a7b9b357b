"""subsets: `pipeline sample` rebuilds each committed subset byte for byte (the shared zips stand
in for the official archive, which holds every patient of each)."""

from __future__ import annotations

import hashlib
import json
import zipfile

import pytest

from pipeline.config import UserError
from pipeline.data.datasets import get_dataset
from pipeline.data.subsets import DIGESTS, subset, write_subset
from tests.conftest import CELLS_SMALL_SHA256, POOL_ENV, SAMPLE_ENV, SAMPLE_SHA256

POOL_SHA256 = "a6e0e58fbe2272be01ec33c5c3966c667c76c24ef120d72dec5d4a05b61c76e6"


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_fixture_is_its_subset_rebuilt(cells_small, tmp_path):
    assert sha256(cells_small) == CELLS_SMALL_SHA256
    out = write_subset(cells_small, tmp_path / "again.zip", "fixture")
    assert out == {**json.loads(DIGESTS.read_text())["fixture"], "matches": True}
    assert sha256(tmp_path / "again.zip") == CELLS_SMALL_SHA256  # same bytes, run after run
    spec = get_dataset("malaria")
    names = zipfile.ZipFile(cells_small).namelist()
    assert {spec.group_of(n) for n in names} == set(subset("fixture").patients)
    assert set(subset("fixture").patients) <= set(subset("sample").patients)
    assert not set(subset("sample").patients) & set(subset("pool").patients)


def test_pool_halves_are_disjoint_stratified_and_cover_the_pool():
    selection, report = set(subset("pool-selection").patients), set(subset("pool-report").patients)
    assert len(selection) == len(report) == 42 and not selection & report
    assert selection | report == set(subset("pool").patients)


@pytest.mark.sample(POOL_ENV)
def test_pool_halves_are_stratified_by_infected_and_healthy(pool_zip):
    spec = get_dataset("malaria")
    infected = {spec.group_of(n) for n in zipfile.ZipFile(pool_zip).namelist()
                if spec.label_of(n) == "Parasitized"}
    selection, report = set(subset("pool-selection").patients), set(subset("pool-report").patients)
    assert len(infected) == 63 and (len(infected & selection), len(infected & report)) == (32, 31)


def test_an_archive_without_the_patients_is_refused(cells_small, tmp_path):
    with pytest.raises(UserError, match="patients of subset 'sample' are not in the archive"):
        write_subset(cells_small, tmp_path / "s.zip", "sample")
    assert not (tmp_path / "s.zip").exists()


@pytest.mark.sample(SAMPLE_ENV)
def test_the_sample_is_rebuilt_byte_for_byte_twice(sample_zip, tmp_path):
    a = write_subset(sample_zip, tmp_path / "a.zip", "sample")
    b = write_subset(sample_zip, tmp_path / "b.zip", "sample")
    assert a["matches"] and a == b and a["members"] == 5469
    # the published sample itself, byte for byte: the README's checksum holds for a rebuilt copy
    assert sha256(tmp_path / "a.zip") == sha256(tmp_path / "b.zip") == SAMPLE_SHA256


@pytest.mark.sample(POOL_ENV)
@pytest.mark.parametrize("name, members", [("pool", 10512), ("pool-report", 5065)])
def test_the_pool_and_its_report_half_are_rebuilt(pool_zip, tmp_path, name, members):
    result = write_subset(pool_zip, tmp_path / f"{name}.zip", name)
    assert result["matches"] and result["members"] == members
    if name == "pool":  # the published pool, byte for byte
        assert sha256(tmp_path / "pool.zip") == POOL_SHA256

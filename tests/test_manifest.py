"""Manifest validation: every problem names the file, the row and the column, and says what to do."""

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from prognosis_cache.data.manifest import check_files, encode_label, load_manifest, missing_files
from prognosis_cache.errors import ManifestError


def write_csv(folder: Path, text: str, name: str = "m.csv") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def touch(folder: Path, *names: str) -> None:
    for n in names:
        (folder / n).write_bytes(b"x")


def test_valid_manifest_reads_labels_and_defaults(tmp_path):
    touch(tmp_path, "a.png", "b.png", "c.png")
    m = load_manifest(write_csv(tmp_path, "image_id,path,patient_id,outcome,grade\n"
                                          "a,a.png,p1,1,mild\nb,b.png,p1,0,\nc,c.png,p2,,severe\n"))
    assert len(m) == 3
    assert m.label_columns == ("outcome", "grade")
    assert m.frame["center"].to_list() == ["all"] * 3
    labels, classes = m.labels()
    np.testing.assert_array_equal(labels["outcome"], [1, 0, np.nan])
    assert classes["outcome"] == ["0", "1"]
    assert classes["grade"] == ["mild", "severe"]
    np.testing.assert_array_equal(labels["grade"], [0, np.nan, 1])
    assert m.image_paths()[0] == tmp_path.resolve() / "a.png"
    assert len(m.sha256) == 64


def test_parquet_manifest_and_absolute_paths(tmp_path):
    touch(tmp_path, "a.png")
    path = tmp_path / "m.parquet"
    pl.DataFrame({"image_id": ["a"], "path": [str(tmp_path / "a.png")], "patient_id": ["p"], "center": ["x"],
                  "y": [1]}).write_parquet(path)
    m = load_manifest(path, root=tmp_path / ".")
    assert m.image_paths()[0] == tmp_path / "a.png"
    assert missing_files(m) == []


@pytest.mark.parametrize(("text", "expected"), [
    ("image_id,path\na,a.png\n", "lacks required column(s) patient_id"),
    ("image_id,path,patient_id\n", "has no rows"),
    ("image_id,path,patient_id\na,a.png,p\na,b.png,q\n", "image_id 'a' appears in rows [2, 3]"),
    ("image_id,path,patient_id\na,a.png,p\nb,b.png,\n", "column 'patient_id' is empty in row(s) [3]"),
])
def test_errors_name_file_row_and_column(tmp_path, text, expected):
    path = write_csv(tmp_path, text)
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert expected in info.value.message
    assert str(path) in info.value.message
    assert info.value.hint


def test_missing_manifest_file(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        load_manifest(tmp_path / "nope.csv")


def test_missing_images_listed_and_all_missing_refused(tmp_path):
    touch(tmp_path, "a.png")
    m = load_manifest(write_csv(tmp_path, "image_id,path,patient_id\na,a.png,p\nb,gone.png,p\n"))
    assert missing_files(m) == [(3, str(tmp_path.resolve() / "gone.png"))]
    check_files(m)  # one missing file is a failure record later, not a stop
    m2 = load_manifest(write_csv(tmp_path, "image_id,path,patient_id\nb,gone.png,p\n", "m2.csv"))
    with pytest.raises(ManifestError, match="none of the 1 image files exist"):
        check_files(m2)


def test_high_cardinality_columns_are_not_labels(tmp_path):
    rows = "\n".join(f"i{i},i{i}.png,p{i},{i},{i % 2}" for i in range(30))
    m = load_manifest(write_csv(tmp_path, "image_id,path,patient_id,age,outcome\n" + rows + "\n"))
    assert m.label_columns == ("outcome",)
    assert m.skipped_columns == ("age",)


def test_encode_label_text_binary_positive_is_later_name():
    codes, names = encode_label(pl.Series(["dead", "alive", "", None, "dead"]))
    assert names == ["alive", "dead"]
    np.testing.assert_array_equal(codes, [1, 0, np.nan, np.nan, 1])

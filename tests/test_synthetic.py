"""The synthetic cohort: deterministic, well-formed, multi-centre, decodable, and carrying exactly the signal asked."""

from __future__ import annotations

import numpy as np
import polars as pl
import pydicom
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from prognosis_cache.cli import synth as _register_synth  # noqa: F401  (registers `synth` on the app)
from prognosis_cache.cli._app import app
from prognosis_cache.data.decode import decode_image
from prognosis_cache.data.synthetic import CohortSpec, make_cohort
from prognosis_cache.errors import PcacheError

SMALL = CohortSpec(n_patients=24, seed=5, size=48)
COLUMNS = ["image_id", "path", "patient_id", "center", "outcome", "severity"]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    manifest = make_cohort(tmp_path_factory.mktemp("small"), SMALL)
    return manifest, pl.read_csv(manifest)


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    """80 patients at 64 px with signal 1 and the same cohort with signal 0 (same seed: same labels and poses)."""
    spec = CohortSpec(n_patients=80, seed=11, size=64)
    on = make_cohort(tmp_path_factory.mktemp("signal1"), spec)
    off = make_cohort(tmp_path_factory.mktemp("signal0"), CohortSpec(**{**spec.__dict__, "signal": 0.0}))
    return on, off


def decoded(manifest) -> list[np.ndarray]:
    return [decode_image(manifest.parent / p) for p in pl.read_csv(manifest)["path"]]


def test_same_seed_same_bytes_and_pixels(small, tmp_path):
    manifest, _ = small
    again = make_cohort(tmp_path / "again", SMALL)
    assert again.read_bytes() == manifest.read_bytes()
    for p in pl.read_csv(manifest)["path"]:
        assert (again.parent / p).read_bytes() == (manifest.parent / p).read_bytes(), p
    for a, b in zip(decoded(manifest), decoded(again), strict=True):
        np.testing.assert_array_equal(a, b)


def test_other_seed_differs(small, tmp_path):
    manifest, df = small
    other = make_cohort(tmp_path / "other", CohortSpec(**{**SMALL.__dict__, "seed": 6}))
    assert other.read_bytes() != manifest.read_bytes()
    # Every patient has an image 0, so p0000_i0 exists in both cohorts: its pixels must differ.
    row_a = df.filter(pl.col("image_id") == "p0000_i0")["path"][0]
    row_b = pl.read_csv(other).filter(pl.col("image_id") == "p0000_i0")["path"][0]
    assert not np.array_equal(decode_image(manifest.parent / row_a), decode_image(other.parent / row_b))


def test_manifest_schema_and_patient_level_labels(small):
    manifest, df = small
    assert df.columns == COLUMNS
    assert df["image_id"].n_unique() == df.height
    assert all((manifest.parent / p).is_file() for p in df["path"])
    assert not any(p.startswith("/") for p in df["path"])  # relative to the manifest's folder
    per_patient = df.group_by("patient_id").agg(
        pl.col("outcome").n_unique().alias("n_outcome"),
        pl.col("severity").n_unique().alias("n_severity"),
        pl.col("center").n_unique().alias("n_center"),
        pl.len().alias("n_images"),
    )
    assert per_patient["n_outcome"].max() == 1
    assert per_patient["n_severity"].max() == 1
    assert per_patient["n_center"].max() == 1
    assert per_patient.height == SMALL.n_patients
    assert per_patient["n_images"].min() >= 1 and per_patient["n_images"].max() <= 3
    assert (per_patient["n_images"] > 1).any()  # several images per patient exist
    assert set(df["outcome"].unique()) == {0, 1}
    assert set(df["severity"].drop_nulls().unique()) <= {"mild", "moderate", "severe"}


def test_severity_tracks_outcome_and_has_unknowns(large):
    df = pl.read_csv(large[0]).unique("patient_id")
    severe = df.filter(pl.col("severity") == "severe")
    pos_rate = severe["outcome"].mean()
    assert pos_rate > df["outcome"].mean()  # severe patients are positive more often than average
    mild = df.filter(pl.col("severity") == "mild")
    assert mild["outcome"].mean() < df["outcome"].mean()
    blanks = df["severity"].null_count()
    assert 0 < blanks <= 0.15 * df.height


def test_prevalence_respected(large):
    patients = pl.read_csv(large[0]).unique("patient_id")
    assert abs(patients["outcome"].mean() - 0.25) <= 0.05


def test_centres_differ_in_acquisition(small):
    manifest, df = small
    png_modes, photometric, syntaxes, rescaled, windowed = {}, set(), set(), False, False
    for row in df.iter_rows(named=True):
        path = manifest.parent / row["path"]
        if path.suffix == ".png":
            with Image.open(path) as im:
                png_modes.setdefault(row["center"], set()).add(im.mode)
        else:
            ds = pydicom.dcmread(path)
            assert ds.PatientID == row["patient_id"]
            assert ds.Rows == ds.Columns == SMALL.size
            photometric.add(ds.PhotometricInterpretation)
            syntaxes.add(ds.file_meta.TransferSyntaxUID)
            rescaled |= "RescaleSlope" in ds
            windowed |= "WindowCenter" in ds
    assert png_modes["center_A"] == {"L"}  # 8-bit
    assert all(m.startswith("I;16") for m in png_modes["center_B"])  # 16-bit
    assert photometric == {"MONOCHROME1", "MONOCHROME2"}
    assert pydicom.uid.RLELossless in syntaxes and pydicom.uid.ExplicitVRLittleEndian in syntaxes
    assert rescaled and windowed


def test_every_image_decodes(small):
    manifest, _ = small
    for img in decoded(manifest):
        assert img.shape == (SMALL.size, SMALL.size) and img.dtype == np.float32
        assert img.min() == 0.0 and img.max() == 1.0


def lung_mean(img: np.ndarray) -> float:
    """Mean intensity in two boxes where the phantom's lungs are (a statistic a first-year student would try)."""
    h, w = img.shape
    rows = slice(int(0.3 * h), int(0.7 * h))
    return float((img[rows, int(0.15 * w):int(0.35 * w)].mean() + img[rows, int(0.65 * w):int(0.85 * w)].mean()) / 2)


def test_positives_separable_only_with_signal(large):
    on, off = large
    labels = pl.read_csv(on)["outcome"].to_numpy()
    assert np.array_equal(labels, pl.read_csv(off)["outcome"].to_numpy())
    auc_on = roc_auc_score(labels, [lung_mean(i) for i in decoded(on)])
    auc_off = roc_auc_score(labels, [lung_mean(i) for i in decoded(off)])
    assert auc_on > 0.7
    assert abs(auc_off - 0.5) < 0.15


def test_centres_beyond_the_base_profiles(tmp_path):
    manifest = make_cohort(tmp_path, CohortSpec(n_patients=10, n_centers=5, size=32, dicom_share=1.0))
    df = pl.read_csv(manifest)
    assert df["center"].n_unique() == 5
    assert all(decode_image(tmp_path / p).shape == (32, 32) for p in df["path"])


@pytest.mark.parametrize("bad", [
    {"n_patients": 0}, {"prevalence": 1.5}, {"images_per_patient": (3, 2)}, {"n_centers": 0},
    {"size": 8}, {"dicom_share": -0.1}, {"signal": -1.0},
])
def test_bad_spec_refused(bad):
    with pytest.raises(PcacheError):
        CohortSpec(**bad)


def test_cli_writes_cohort_and_summary(tmp_path):
    # With only this sub-command registered typer runs it without its name; with others, the name is needed.
    prefix = ["synth"] if len(app.registered_commands) > 1 else []
    args = [*prefix, "--out", str(tmp_path / "c"), "--n-patients", "12", "--size", "32", "--seed", "3",
            "--prevalence", "0.5", "--centers", "3", "--dicom-share", "0.3", "--signal", "0.5"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    manifest = tmp_path / "c" / "manifest.csv"
    df = pl.read_csv(manifest)
    assert str(manifest) in result.output
    assert f"{df.height}" in result.output and "center_C" in result.output
    assert df.unique("patient_id")["outcome"].sum() == 6
    help_text = CliRunner().invoke(app, [*prefix, "--help"], terminal_width=200).output
    assert "no real patient data" in help_text


def test_cli_reports_bad_spec_cleanly(tmp_path):
    prefix = ["synth"] if len(app.registered_commands) > 1 else []
    result = CliRunner().invoke(app, [*prefix, "--out", str(tmp_path), "--images-min", "3", "--images-max", "2"])
    assert result.exit_code == 2
    assert "images_per_patient" in result.output
    assert not (tmp_path / "manifest.csv").exists()

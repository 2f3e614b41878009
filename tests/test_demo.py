"""`pcache demo` end to end: synth → embed (default backbone, random weights) → probe → tables and results file."""

import polars as pl
from typer.testing import CliRunner

from prognosis_cache import results
from prognosis_cache.cache.h5 import read_cache
from prognosis_cache.cli import app


def test_demo_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--n-patients", "30"])
    assert result.exit_code == 0, result.output
    assert "RANDOM WEIGHTS" in result.output  # no real weights here: the banner must say so
    assert "MCC" in result.output and "PR-AUC" in result.output and "per fold" in result.output
    (cache_path,) = (out / "cache").glob("cohort__dinov2-small__*.h5")
    cache = read_cache(cache_path)
    manifest = pl.read_csv(out / "cohort" / "manifest.csv")
    assert len(cache) == manifest.height and cache.features.shape[1] == 384
    assert cache.fingerprint_json["weights"] == "random:0"
    rows = results.read(out / "results.parquet")
    assert rows.height == 5 and set(rows["fold"].to_list()) == set(range(5))
    assert rows["strategy"].unique().to_list() == ["lp"] and (rows["fingerprint"] == cache.fingerprint).all()
    assert rows["mcc"].is_not_nan().all() and rows["n_test"].sum() == len(cache)
    # a second run reuses the cache instead of recomputing it
    again = CliRunner().invoke(app, ["demo", "--out", str(out), "--n-patients", "30"])
    assert again.exit_code == 0 and "0 embedded now" in again.output

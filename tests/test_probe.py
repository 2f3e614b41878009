"""The probe engine end to end on small synthetic caches, and the `probe` / `plot` commands."""

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

import prognosis_cache.cli.probe  # noqa: F401  (registers the commands on the app)
from prognosis_cache.cache.h5 import read_cache, write_cache
from prognosis_cache.cli._app import app
from prognosis_cache.errors import CacheError, PcacheError
from prognosis_cache.evaluate.probe import run_probe
from prognosis_cache.results import read


def make_cache(path, seed=0, n_patients=80, d=24, shift=1.2, backbone="toy", classes=("no", "yes"), labels=None):
    rng = np.random.default_rng(0)  # cohort (ids, labels, centres) is the same for every backbone
    counts = rng.integers(1, 4, n_patients)
    patient = np.repeat(np.arange(n_patients), counts)
    y = np.repeat((rng.random(n_patients) < 0.3).astype(np.float32), counts) if labels is None else labels
    centre = np.where(patient % 2 == 0, "A", "B")
    frng = np.random.default_rng(seed)  # features differ per backbone
    x = frng.normal(size=(len(patient), d)) + shift * np.nan_to_num(y)[:, None] * (frng.random(d) < 0.3)
    return write_cache(path, features=x.astype(np.float32), image_id=[f"i{i}" for i in range(len(patient))],
                       patient_id=[f"p{p}" for p in patient], center=centre, labels={"outcome": y},
                       classes={"outcome": list(classes)},
                       fingerprint_json={"backbone": {"name": backbone}, "dtype": "float32"},
                       manifest_sha256="0" * 64, dataset="toy")


@pytest.fixture()
def cache(tmp_path):
    return make_cache(tmp_path / "a.h5")


def test_full_probe_rows_and_signal(cache):
    frame = run_probe([cache], "outcome", regime="full", solvers=("logreg", "ridge", "prototype", "knn"))
    assert frame.height == 4 * 5
    assert set(frame["status"]) == {"ok"}
    assert (frame["validation"] == "inner-cv").all()
    assert frame.filter(pl.col("solver") == "logreg")["mcc"].mean() > 0.3  # the features carry signal
    assert set(frame["strategy"]) == {"lp", "ridge", "prototype", "knn"}
    assert all('"C"' in p for p in frame.filter(pl.col("solver") == "logreg")["strategy_params"])


def test_same_inputs_same_seed_same_file_except_fit_seconds(cache, tmp_path):
    kw = {"regime": "few-shot", "shots": (1, 4), "seeds": 4, "solvers": ("logreg", "knn"), "validation": "k-shot"}
    a = run_probe([cache], "outcome", **kw).drop("fit_seconds")
    b = run_probe([read_cache(cache)], "outcome", **kw).drop("fit_seconds")
    a.write_parquet(tmp_path / "a.parquet")
    b.write_parquet(tmp_path / "b.parquet")
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    c = run_probe([cache], "outcome", **{**kw, "seeds": 5}).drop("fit_seconds")
    assert not c.filter(pl.col("seed") < 4).equals(a) or c.height != a.height


def test_several_backbones_share_folds_and_draws(tmp_path):
    a = make_cache(tmp_path / "a.h5", seed=1, backbone="alpha")
    b = make_cache(tmp_path / "b.h5", seed=2, backbone="beta")
    frame = run_probe([a, b], "outcome", regime="few-shot", shots=(2,), seeds=3)
    alpha = frame.filter(pl.col("backbone") == "alpha").select("seed", "fold", "n_train", "n_test")
    beta = frame.filter(pl.col("backbone") == "beta").select("seed", "fold", "n_train", "n_test")
    assert alpha.equals(beta) and alpha.height == 3
    assert not np.allclose(frame.filter(pl.col("backbone") == "alpha")["mcc"],
                           frame.filter(pl.col("backbone") == "beta")["mcc"])


def test_caches_that_disagree_are_refused(tmp_path):
    a = make_cache(tmp_path / "a.h5")
    other = read_cache(a)
    flipped = make_cache(tmp_path / "b.h5", labels=1 - other.labels["outcome"])
    with pytest.raises(CacheError, match="disagree on labels/outcome"):
        run_probe([a, flipped], "outcome")


def test_unknown_task_lists_the_cache_tasks(cache):
    with pytest.raises(PcacheError, match=r"has: \['outcome'\]"):
        run_probe([cache], "death")


def test_multiclass_task_is_refused_with_a_hint(tmp_path):
    base = read_cache(make_cache(tmp_path / "a.h5"))
    labels = np.arange(len(base.labels["outcome"])) % 3
    path = make_cache(tmp_path / "m.h5", labels=labels.astype(np.float32), classes=("a", "b", "c"))
    with pytest.raises(PcacheError, match="3 classes") as err:
        run_probe([path], "outcome")
    assert "one-vs-rest" in err.value.hint


def test_degenerate_draws_and_folds_give_nan_rows_with_reasons(tmp_path):
    frame = run_probe([make_cache(tmp_path / "a.h5")], "outcome", regime="few-shot", shots=(1, 500), seeds=2)
    big = frame.filter(pl.col("k_shot") == 500)
    assert (big["status"] == "degenerate").all() and big["mcc"].is_nan().all()
    assert all("needs 500 patients" in r for r in big["reason"])
    assert (frame.filter(pl.col("k_shot") == 1)["status"] == "ok").all()
    # leave-one-centre-out where centre A holds only negatives: its test fold is degenerate
    base = read_cache(make_cache(tmp_path / "b.h5"))
    y = base.labels["outcome"].copy()
    y[base.center == "A"] = 0
    loco = run_probe([make_cache(tmp_path / "c.h5", labels=y)], "outcome", cv="loco", validation="none")
    row_a = loco.filter(pl.col("test_center") == "A")
    assert row_a["status"][0] == "degenerate" and "only class 0" in row_a["reason"][0]
    row_b = loco.filter(pl.col("test_center") == "B")  # trained on centre A alone: one class
    assert row_b["status"][0] == "degenerate" and "training side holds one class" in row_b["reason"][0]
    assert row_b["mcc"].is_nan().all()


def test_cli_probe_writes_results_and_plot_writes_png(tmp_path):
    a = make_cache(tmp_path / "a.h5", seed=1, backbone="alpha")
    out = tmp_path / "res.parquet"
    runner = CliRunner()
    res = runner.invoke(app, ["probe", str(a), "--task", "outcome", "--regime", "few-shot", "--shots", "1,2",
                              "--seeds", "3", "--solver", "logreg,prototype", "--out", str(out), "--csv"])
    assert res.exit_code == 0, res.output
    assert read(out).height == 2 * 2 * 3 and out.with_suffix(".csv").exists()
    assert "MCC" in res.output
    res = runner.invoke(app, ["probe", str(a), "--task", "outcome", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert read(out).height == 12 + 5
    png = tmp_path / "curves.png"
    res = runner.invoke(app, ["plot", str(out), "--out", str(png)])
    assert res.exit_code == 0, res.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = runner.invoke(app, ["probe", str(a), "--task", "nope", "--out", str(out)])
    assert res.exit_code == 2 and "outcome" in res.output


def test_knn_default_k_stays_odd_so_one_shot_draws_do_not_tie(cache):
    frame = run_probe([cache], "outcome", regime="few-shot", shots=(1, 2), seeds=3, solvers=("knn",))
    ks = {(r["k_shot"], r["strategy_params"]) for r in frame.iter_rows(named=True)}
    assert all(('"k": 1' in p) if k == 1 else ('"k": 3' in p) for k, p in ks)
    assert (frame.filter(pl.col("k_shot") == 1)["mcc"] != 0).any()


def _full_rows_both_ways(cache_path, cv="5"):
    from prognosis_cache.evaluate import probe
    from prognosis_cache.evaluate.splits import leave_one_center_out, patient_kfold

    data = read_cache(cache_path)
    y = np.nan_to_num(data.labels["outcome"], nan=-1).astype(np.int64)
    groups = np.asarray(data.patient_id, dtype=str)
    x = probe.sv.l2_normalise(data.features.astype(np.float32))
    splits = (patient_kfold(y, groups, 5, 0) if cv == "5"
              else leave_one_center_out(y, groups, np.asarray(data.center, dtype=str)))
    batched = probe._full_rows("logreg", x, y, groups, splits, "inner-cv", "l2", 0, 5)
    generic = probe._full_rows_generic("logreg", x, y, groups, splits, "inner-cv", "l2", 0, 5)
    return batched, generic


def test_batched_full_logreg_equals_one_split_at_a_time(tmp_path):
    """The shared-matrix batch (all outer folds' inner folds and refits at once) must choose the same C and give
    the same test margins as the per-split path (exact Newton per problem), within the solvers' 1e-4 bound."""
    batched, generic = _full_rows_both_ways(make_cache(tmp_path / "a.h5", d=40, shift=0.8))
    for (sa, fa, ma), (sb, fb, mb) in zip(batched, generic, strict=True):
        assert sa.fold == sb.fold and fa["status"] == fb["status"] == "ok"
        assert fa["strategy_params"] == fb["strategy_params"]
        np.testing.assert_allclose(ma, mb, atol=1e-4 * (1 + np.abs(mb).max()))


def test_batched_full_logreg_keeps_degenerate_reasons(tmp_path):
    base = read_cache(make_cache(tmp_path / "b.h5"))
    y = base.labels["outcome"].copy()
    y[base.center == "A"] = 0  # centre A's test side has one class; training on A alone has one class
    batched, generic = _full_rows_both_ways(make_cache(tmp_path / "c.h5", labels=y), cv="loco")
    for (_, fa, ma), (_, fb, mb) in zip(batched, generic, strict=True):
        assert fa["status"] == fb["status"] == "degenerate" and fa["reason"] == fb["reason"]
        assert ma is None and mb is None

"""`pcache finetune` end to end on a tiny synthetic cohort: every strategy × one tiny backbone per family, full data
and few-shot; rows share the probe's results file and splits; refusals; resume; reloading a saved fold."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from typer.testing import CliRunner

import prognosis_cache.cli.finetune  # noqa: F401  (registers the command)
from prognosis_cache.backbones import REGISTRY, build_backbone
from prognosis_cache.cli._app import app
from prognosis_cache.data.manifest import load_manifest
from prognosis_cache.data.synthetic import CohortSpec, make_cohort
from prognosis_cache.evaluate.metrics import binary_metrics
from prognosis_cache.evaluate.splits import few_shot_draws, patient_kfold
from prognosis_cache.finetune.run import FinetuneRequest, binary_task, load_finetuned, plan_runs, run_finetune
from prognosis_cache.finetune.strategies import STRATEGIES, adapt, paper_preset
from prognosis_cache.finetune.trainer import Dist, TrainConfig, epoch_plan, predict_logits, train
from prognosis_cache.results import METRICS, SCHEMA, read

FAMILIES = ("tiny-resnet", "tiny-dinov2", "tiny-clip", "tiny-biomedclip")
LOOP = TrainConfig(epochs=1, batch_size=8, progress=False)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_cohort(tmp_path_factory.mktemp("cohort"), CohortSpec(n_patients=16, size=64, prevalence=0.5, seed=0))


def request(cohort: Path, tmp: Path, **kw: object) -> FinetuneRequest:
    base = dict(manifest=cohort, backbone="tiny-dinov2", weights="random:0", strategy="lora", task="outcome",
                cv="3", folds=(0,), shots=(1,), seeds=1, loop=LOOP, device="cpu", out=tmp / "results.parquet")
    return FinetuneRequest(**{**base, **kw})  # type: ignore[arg-type]


@pytest.mark.parametrize("backbone", FAMILIES)
def test_every_strategy_runs_full_and_few_shot(cohort: Path, tmp_path: Path, backbone: str) -> None:
    spec = REGISTRY[backbone]
    strategies = [s for s in STRATEGIES if s not in spec.peft or not spec.peft[s].refusal]
    for strategy in strategies:
        for regime in ("full", "few-shot"):
            rows = run_finetune(request(cohort, tmp_path, backbone=backbone, strategy=strategy, regime=regime))
            assert rows.height == 1
            row = rows.row(0, named=True)
            assert row["status"] == "ok", row["reason"]
            assert row["strategy"] == strategy and row["solver"] == "sgd" and row["backbone"] == backbone
            assert row["trainable_params"] > 0 and 0 < row["trainable_share"] <= 1
            assert (row["trainable_share"] == 1.0) == (strategy == "fft")
            assert all(np.isfinite(row[m]) for m in METRICS)
            assert row["k_shot"] == (1 if regime == "few-shot" else None)
    table = read(tmp_path / "results.parquet")
    assert table.height == 2 * len(strategies)
    assert set(table["strategy"]) == set(strategies)
    assert table.columns == list(SCHEMA)


def test_rows_share_the_probe_results_file_and_patients(cohort: Path, tmp_path: Path) -> None:
    """Fine-tuned rows append to a file `pcache probe` wrote; folds and few-shot draws match the probe's."""
    from prognosis_cache.cache.h5 import read_cache
    from prognosis_cache.embed import embed_manifest
    from prognosis_cache.evaluate.probe import Prediction, binary_labels, run_probe
    from prognosis_cache.results import write

    report = embed_manifest(cohort, "tiny-dinov2", weights="random:0", out=tmp_path / "c.h5", device="cpu")
    cache = read_cache(report.path)
    predictions: list[Prediction] = []
    probe_rows = run_probe([cache], "outcome", regime="few-shot", shots=(1, 2), seeds=2, cv="3",
                           predictions=predictions)
    out = tmp_path / "results.parquet"
    write(probe_rows, out)
    tuned = run_finetune(request(cohort, tmp_path, regime="few-shot", shots=(1, 2), seeds=2, strategy="bitfit"))
    table = read(out)
    assert table.height == probe_rows.height + tuned.height
    assert {"lp", "bitfit"} <= set(table["strategy"])
    # same draws: compare the patients the probe engine would train on (from the cache's arrays) with ours
    manifest = load_manifest(cohort)
    frame = manifest.frame
    plans = plan_runs(binary_task(manifest, "outcome"), frame["patient_id"].to_numpy(), frame["center"].to_numpy(),
                      "few-shot", "3", (1, 2), 2, 0)
    y_cache = binary_labels(cache, "outcome")
    split = patient_kfold(y_cache, np.asarray(cache.patient_id, str), 3, 0)[0]
    probe_draws = few_shot_draws(y_cache, np.asarray(cache.patient_id, str), split.train_idx, (1, 2), range(2),
                                 n_classes=2)
    ids = frame["image_id"].to_numpy()
    for plan in plans:
        (draw,) = [d for d in probe_draws if d.k == plan.k and d.seed == plan.seed]
        assert set(ids[plan.train_idx]) == set(np.asarray(cache.image_id, str)[draw.train_idx])
        assert not set(frame["patient_id"].to_numpy()[plan.val_idx]) & set(frame["patient_id"].to_numpy()[
            plan.train_idx])
        (pred,) = [p for p in predictions if p.k_shot == plan.k and p.seed == plan.seed]
        assert set(ids[plan.test_idx]) == set(np.asarray(cache.image_id, str)[pred.test_idx])
    # row-level agreement too: same n_train / n_test per (k, seed)
    joined = tuned.join(probe_rows, on=["k_shot", "seed"], suffix="_probe")
    assert (joined["n_train"] == joined["n_train_probe"]).all()
    assert (joined["n_test"] == joined["n_test_probe"]).all()


def test_refusal_exits_2_with_a_clear_message(cohort: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["finetune", "--manifest", str(cohort), "--task", "outcome", "--strategy",
                                      "vera", "--backbone", "tiny-resnet", "--weights", "random", "--out",
                                      str(tmp_path / "r.parquet"), "--quiet"])
    assert result.exit_code == 2
    assert "VeRA cannot adapt Conv2d" in " ".join(result.output.split())
    assert not (tmp_path / "r.parquet").exists()


def test_cli_writes_rows_and_reloadable_models(cohort: Path, tmp_path: Path) -> None:
    out, save = tmp_path / "r.parquet", tmp_path / "runs"
    args = ["finetune", "--manifest", str(cohort), "--task", "outcome", "--strategy", "lora", "--rank", "4",
            "--backbone", "tiny-clip", "--weights", "random:1", "--cv", "3", "--folds", "0,1", "--epochs", "1",
            "--batch-size", "8", "--device", "cpu", "--out", str(out), "--save-dir", str(save), "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    table = read(out)
    assert sorted(table["fold"].to_list()) == [0, 1]
    params = json.loads(table["strategy_params"][0])
    assert params["rank"] == 4 and params["alpha"] == 1.0 and params["dropout"] == 0.1
    assert params["backbone_lr"] == 1e-4 and params["head_lr"] == 1e-3
    # the saved fold reproduces its row's metrics when reloaded
    folder = save / "lora" / "full_seed0_fold0"
    assert (folder / "adapter" / "adapter_config.json").is_file()
    model = load_finetuned(folder)
    manifest = load_manifest(cohort)
    y = np.nan_to_num(binary_task(manifest, "outcome"), nan=-1).astype(int)
    plan = plan_runs(binary_task(manifest, "outcome"), manifest.frame["patient_id"].to_numpy(),
                     manifest.frame["center"].to_numpy(), "full", "3", folds=(0,))[0]
    rows, logits = predict_logits(model, manifest.image_paths(), plan.test_idx, REGISTRY["tiny-clip"].preprocess, 8,
                                  torch.device("cpu"), Dist())
    again = binary_metrics(y[rows], logits[:, 1] - logits[:, 0])
    row = table.filter(pl.col("fold") == 0).row(0, named=True)
    for m in METRICS:
        assert again[m] == pytest.approx(row[m], abs=1e-5)
    # a rerun skips finished folds (their rows come back from row.json) and appends them again
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rerun = read(out).tail(2)
    assert rerun["fit_seconds"].to_list() == table["fit_seconds"].to_list()


def test_vera_preset_maps_alpha_to_d_initial() -> None:
    configs = {r: paper_preset("vera", r) for r in (4, 8, 16)}
    assert [configs[r].d_initial for r in (4, 8, 16)] == pytest.approx([0.1, 0.05, 0.025])
    assert paper_preset("fft").backbone_lr == 1e-5 and paper_preset("ia3").backbone_lr == 1e-4


def test_resume_after_interruption_equals_uninterrupted(cohort: Path, tmp_path: Path) -> None:
    """Stopping after epoch 1 and resuming to epoch 2 gives the weights of a straight 2-epoch run."""
    manifest = load_manifest(cohort)
    y = np.nan_to_num(binary_task(manifest, "outcome"), nan=-1).astype(np.int64)
    plan = plan_runs(binary_task(manifest, "outcome"), manifest.frame["patient_id"].to_numpy(),
                     manifest.frame["center"].to_numpy(), "full", "3", folds=(0,))[0]
    pristine = build_backbone("tiny-dinov2", "random:0")

    def fit(epochs: int, checkpoint: Path) -> dict[str, torch.Tensor]:
        loaded = dataclasses.replace(pristine, model=build_backbone("tiny-dinov2", "random:0").model)
        torch.manual_seed(0)
        model, config = adapt(loaded, paper_preset("lora", 4))
        loop = TrainConfig(epochs=epochs, batch_size=8, patience=5, progress=False, warmup_epochs=0.5)
        train(model, config, manifest.image_paths(), y, plan.train_idx, plan.val_idx, pristine.spec.preprocess, loop,
              torch.device("cpu"), checkpoint=checkpoint)
        return {k: v.clone() for k, v in model.state_dict().items()}

    straight = fit(2, tmp_path / "straight")
    fit(1, tmp_path / "resumed")  # "interrupted" after epoch 1: its checkpoint is all that survives
    resumed = fit(2, tmp_path / "resumed")
    state = torch.load(tmp_path / "resumed" / "state.pt", weights_only=True)
    assert state["epoch"] == 1 and len(state["history"]) == 2
    for key, value in straight.items():
        torch.testing.assert_close(resumed[key], value, atol=1e-6, rtol=1e-6)
    # training did move the adapter (LoRA's B starts at zero), so the equality above is not two no-ops
    assert any("lora_B" in k and straight[k].abs().sum() > 0 for k in straight)


def test_epoch_plan_splits_global_steps_across_ranks() -> None:
    """Two ranks together cover exactly the single-process step rows, with the same loss denominators."""
    rows = np.arange(11)
    labels = np.array([0, 1] * 6)[:11]
    weight = np.array([1.0, 2.0])
    single = epoch_plan(rows, labels, weight, seed=3, epoch=0, batch_size=4, accumulation=1, dist=Dist())
    ranks = [epoch_plan(rows, labels, weight, 3, 0, 4, 1, Dist(rank=r, world=2)) for r in range(2)]
    assert len(ranks[0].sync) == len(ranks[1].sync) == len(single.sync) == 3
    for step in range(3):
        mine = single.rows[step * 4:(step + 1) * 4]
        theirs = [r.rows[step * r.micro:(step + 1) * r.micro][r.weights[step * r.micro:(step + 1) * r.micro] > 0]
                  for r in ranks]
        assert sorted(np.concatenate(theirs).tolist()) == sorted(mine.tolist())
        assert ranks[0].denominators[step] == ranks[1].denominators[step] == single.denominators[step]
    assert sorted(single.rows.tolist()) == list(range(11))

"""Data-parallel fine-tuning: two CPU processes on gloo (torchrun) reproduce a single-process run.

The trainer splits every global optimiser step across ranks and normalises the loss by the whole step's class
weight, so the summed gradient is the single-process one; the fitted head and the metrics must agree up to float
rounding. IA3 on the tiny DINOv2 (no dropout, no BatchNorm) keeps the comparison exact in principle.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import prognosis_cache.cli as cli_package
from prognosis_cache.data.synthetic import CohortSpec, make_cohort
from prognosis_cache.finetune.run import FinetuneRequest, run_finetune
from prognosis_cache.finetune.trainer import TrainConfig
from prognosis_cache.results import METRICS, read

pytestmark = pytest.mark.slow


def entry_module() -> str:
    """`-m prognosis_cache` once the lead wires the command into the CLI package, the command module until then."""
    wired = "finetune" in Path(cli_package.__file__).read_text()
    return "prognosis_cache" if wired else "prognosis_cache.cli.finetune"


def test_two_gloo_processes_match_one(tmp_path: Path) -> None:
    manifest = make_cohort(tmp_path / "cohort", CohortSpec(n_patients=12, size=48, prevalence=0.5, seed=1,
                                                           images_per_patient=(1, 2)))
    common = ["--manifest", str(manifest), "--task", "outcome", "--strategy", "ia3", "--backbone", "tiny-dinov2",
              "--weights", "random:0", "--cv", "3", "--folds", "0", "--epochs", "2", "--batch-size", "6",
              "--device", "cpu", "--quiet"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
               entry_module(), "finetune", *common, "--out", str(tmp_path / "ddp.parquet"),
               "--save-dir", str(tmp_path / "ddp")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    single = run_finetune(FinetuneRequest(
        manifest=manifest, backbone="tiny-dinov2", weights="random:0", strategy="ia3", task="outcome", cv="3",
        folds=(0,), loop=TrainConfig(epochs=2, batch_size=6, progress=False), device="cpu",
        out=tmp_path / "single.parquet", save_dir=tmp_path / "single"))
    ddp = read(tmp_path / "ddp.parquet")
    assert ddp.height == single.height == 1  # only rank 0 wrote its row
    assert '"world_size": 2' in ddp["strategy_params"][0]
    for m in METRICS:
        assert ddp[m][0] == pytest.approx(single[m][0], abs=1e-4), m
    fold = Path("ia3") / "full_seed0_fold0" / "model.safetensors"
    a, b = load_file(str(tmp_path / "ddp" / fold)), load_file(str(tmp_path / "single" / fold))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)
    assert (a["head.weight"] != 0).any()

"""`pcache finetune`: FFT, LP, LoRA, VeRA, BitFit and IA3 runs over images, writing the probe's results rows."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from prognosis_cache.cli._app import app, console, user_errors
from prognosis_cache.errors import PcacheError
from prognosis_cache.finetune.run import FinetuneRequest, run_finetune
from prognosis_cache.finetune.strategies import STRATEGIES
from prognosis_cache.finetune.trainer import TrainConfig
from prognosis_cache.results import summarise

EPILOG = """Exit codes: 0 done; 2 bad input, or a strategy the backbone's registry entry refuses (e.g. VeRA on a CNN).
Data-parallel: `torchrun --nproc-per-node N -m prognosis_cache finetune ...` (gloo on CPU, nccl on GPU; rank 0 writes).
With --save-dir every fold keeps its fitted head + adapter (reload: prognosis_cache.finetune.run.load_finetuned(DIR))
and a per-epoch checkpoint: re-running the same command after an interruption resumes where it stopped."""


def int_list(text: str, option: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise PcacheError(f"{option} must be comma-separated integers, got {text!r}", f"e.g. {option} 1,2,4") from None


@app.command(epilog=EPILOG)
@user_errors
def finetune(
    manifest: Annotated[Path, typer.Option(
        help="CSV/Parquet manifest: image_id, path, patient_id, optional center, labels.")],
    task: Annotated[str, typer.Option(help="Binary label column to predict.")],
    strategy: Annotated[str, typer.Option(help=f"One of {', '.join(STRATEGIES)}.")] = "lora",
    backbone: Annotated[str, typer.Option(help="Registry entry (see `pcache backbones`).")] = "dinov2-small",
    weights: Annotated[str | None, typer.Option(
        help="Default: published weights from the local cache. PATH, or random[:SEED] for smoke runs.")] = None,
    root: Annotated[Path | None, typer.Option(help="Folder the manifest's relative paths start from.")] = None,
    rank: Annotated[int, typer.Option(help="LoRA / VeRA rank (paper preset: 4, 8 or 16).")] = 8,
    cv: Annotated[str, typer.Option(help="Number of patient-grouped folds, or loco (leave one centre out).")] = "5",
    regime: Annotated[str, typer.Option(help="full | few-shot.")] = "full",
    shots: Annotated[str, typer.Option(help="Few-shot K values (patients per class), comma-separated.")]
    = "1,2,4,8,16",
    seeds: Annotated[int, typer.Option(min=1, help="Few-shot draws per K (seeds 0..N-1), as `pcache probe`.")] = 5,
    seed: Annotated[int, typer.Option(help="Seed of the fold split (the probe's --seed).")] = 0,
    folds: Annotated[str | None, typer.Option(help="Full data: run only these fold indices (e.g. 0,1).")] = None,
    few_shot_folds: Annotated[str, typer.Option(help="Folds whose training side few-shot draws come from.")] = "0",
    preset: Annotated[str, typer.Option(help="Hyperparameter preset (paper: Ruffini et al. 2025).")] = "paper",
    epochs: Annotated[int, typer.Option(min=1, help="Maximum epochs (early stopping, patience --patience).")] = 50,
    patience: Annotated[int, typer.Option(min=1)] = 5,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per optimiser step (over all GPUs).")] = 32,
    accumulation: Annotated[int, typer.Option(min=1, help="Micro-batches per optimiser step.")] = 1,
    workers: Annotated[int, typer.Option(min=0, help="Decoding worker processes.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    out: Annotated[Path, typer.Option(help="Results file (appended; the same file `pcache probe` writes).")]
    = Path("results.parquet"),
    save_dir: Annotated[Path | None, typer.Option(help="Keep fitted heads + adapters and checkpoints here.")] = None,
    dataset: Annotated[str | None, typer.Option(help="Dataset name [default: the manifest's folder name].")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Fine-tune a backbone with one strategy on patient-grouped folds or few-shot draws; append results rows.

    The folds and few-shot draws are the ones `pcache probe` uses for the same --cv and --seed, so fine-tuned and
    probed rows compare patient for patient.
    """
    request = FinetuneRequest(
        manifest=manifest, root=root, backbone=backbone, weights=weights, strategy=strategy, task=task, rank=rank,
        regime=regime, cv=cv, shots=int_list(shots, "--shots"), seeds=seeds, seed=seed,
        folds=int_list(folds, "--folds") if folds else None, few_shot_folds=int_list(few_shot_folds,
                                                                                      "--few-shot-folds"),
        preset=preset, device=device, out=out, save_dir=save_dir, dataset=dataset,
        loop=TrainConfig(epochs=epochs, batch_size=batch_size, accumulation=accumulation, patience=patience,
                         workers=workers, progress=not quiet),
    )
    frame = run_finetune(request, progress=None if quiet else lambda text: console.print(f"[bold]run[/] {text}"))
    if int(os.environ.get("RANK", "0")) == 0:
        console.print(f"[green]{frame.height} row(s)[/] appended to {out}")
        if frame.height:
            console.print(summarise(frame).select(["strategy", "regime", "k_shot", "n_rows", "mcc_mean",
                                                   "roc_auc_mean"]))


if __name__ == "__main__":  # `torchrun -m prognosis_cache.cli.finetune finetune ...` works before the CLI wiring
    app()

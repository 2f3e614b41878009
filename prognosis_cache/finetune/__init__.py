"""Fine-tuning over images (FFT, LP, LoRA, VeRA, BitFit, IA3): strategies (peft configs), trainer, run orchestration.

Entry points: `run.run_finetune(FinetuneRequest(...))` (what `pcache finetune` calls) and `run.load_finetuned(dir)`.
"""

"""The TRL and PEFT settings of the demo's runs (and of the study's mixtures, `benchmarks/dem_vs_mixing.py`), from a
[`~dem_hf.demo.pipeline.DemoConfig`]."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .pipeline import DemoConfig


def _sft_config(config: DemoConfig, output_dir: Path, max_steps: int | None = None, eval_steps: int = 0):
    """The runs' TRL settings (`max_steps`: a run's own number of steps, by default `config.max_steps`; `eval_steps`:
    evaluate that often and keep the best checkpoint, see [`evaluation_options`])."""
    import torch
    from trl import SFTConfig

    max_steps = max_steps or config.max_steps

    from ..training.trainers import bf16_available

    # Checkpoints at every evaluation when the best one is kept (at each half of the run otherwise, to resume).
    evaluation = {"save_steps": max(1, max_steps // 2)}
    if eval_steps:
        evaluation = {"eval_strategy": "steps", "eval_steps": eval_steps, "save_steps": eval_steps,
                      "load_best_model_at_end": True, "metric_for_best_model": "eval_loss",
                      "per_device_eval_batch_size": config.eval_batch_size}
    return SFTConfig(
        bf16=bf16_available(),
        use_cpu=not torch.cuda.is_available(),
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=config.warmup_ratio,
        max_length=config.max_length,
        logging_steps=max(1, max_steps // 5),
        save_total_limit=1,
        report_to=[],
        seed=config.seed,
        dataloader_num_workers=0,
        **evaluation,
    )


def evaluation_options(config: DemoConfig, validation: dict[str, Any]) -> dict[str, Any]:
    """`train_distributions` / `train_mixture` arguments that keep each run's best checkpoint on its validation split
    and stop it once it stops improving (`eval_steps`, `early_stopping_patience`); none without `eval_steps`."""
    from transformers import EarlyStoppingCallback

    if not config.eval_steps:
        return {}
    patience = config.early_stopping_patience
    return {"eval_datasets": validation, "callbacks": [EarlyStoppingCallback(patience)] if patience else []}


def _lora_config(config: DemoConfig):
    """The runs' LoRA settings, or None for full fine-tuning."""
    from peft import LoraConfig

    if config.finetuning == "full":
        return None
    return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, target_modules="all-linear", task_type="CAUSAL_LM")

"""The data-mixing run the demo compares DEM with: the uniform mixture of the datasets on DEM's training tokens.

With a warm start (itself the uniform mixture's first steps) the mixture run continues from it for as many steps
as DEM's runs take together, so both models have seen the same number of training examples from the same start;
without one it trains from the base for those steps. Its model is the start plus the run's adapter (weight 1), or
the run's full fine-tune.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .run_settings import _lora_config, _sft_config, evaluation_options

if TYPE_CHECKING:
    from ..training.trainers import TrainingRun
    from .pipeline import DemoConfig

MIXTURE_ROW = "uniform mixture"  # its row in the demo's results table


def train_uniform_mixture(config: DemoConfig, start: Path, train: dict[str, Any], validation: dict[str, Any],
                          steps: int, output_dir: Path) -> TrainingRun:
    """Train the uniform mixture of `train` from `start` for `steps` (cached like every run).

    With `config.eval_steps` it is evaluated on all the validation splits every `eval_steps` x the number of datasets
    steps (as often per example as DEM's runs together) and kept at its best checkpoint, stopped early likewise.
    """
    from ..training.mixture import train_mixture
    from .distributions import to_prompt_completion

    mixed = {name: to_prompt_completion(split) for name, split in train.items()}  # one format; the same tokens scored
    evaluation = evaluation_options(config, {name: to_prompt_completion(split) for name, split in validation.items()})
    sft_config = _sft_config(config, output_dir, steps, eval_steps=config.eval_steps * len(train))
    return train_mixture(start, mixed, {name: 1.0 for name in train}, sft_config, _lora_config(config), output_dir,
                         eval_datasets=evaluation.get("eval_datasets"), callbacks=evaluation.get("callbacks"))


def mixture_model(start: str | Path, model_dir: str | Path):
    """A mixture run's model: its full fine-tune, or `start` with the run's LoRA adapter merged in (weight 1)."""
    from transformers import AutoModelForCausalLM

    from ..merging.merger import DEMMerger
    from ..vectors.vector import DistributionVector

    if not (Path(model_dir) / "adapter_config.json").is_file():
        return AutoModelForCausalLM.from_pretrained(model_dir)
    vector = DistributionVector.from_peft(model_dir, name="mixture")
    return DEMMerger.from_pretrained(start, vectors=[vector]).merge({"mixture": 1.0})

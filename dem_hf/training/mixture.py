"""The data-mixing baseline DEM is measured against: one TRL `SFTTrainer` run on a weighted mixture of the datasets.

It plans, checks, reuses and resumes runs exactly as [`~dem_hf.training.trainers.train_distributions`] does (same
run-folder layout, see [`dem_hf.training.trainers`]); only the data (one sampled mixture) and the record (weights,
examples drawn per dataset) differ.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .. import logging
from ..vectors.config import check_vector_name
from .callbacks import training_compute
from .config import run_config
from .data import (
    DatasetSource,
    concatenate_eval_datasets,
    default_mixture_name,
    mixture_probabilities,
    sample_mixture,
)
from .processes import hold_run_folders
from .runs import (
    RunFolder,
    final_model_dir,
    finish_run,
    library_versions,
    record_start,
    train_or_resume,
)
from .trainers import TrainingRun, _build_trainer, _open_runs, _Plan, _plan, _release

__all__ = ["train_mixture"]

logger = logging.get_logger(__name__)


def train_mixture(
    base,
    datasets: Mapping[str, DatasetSource] | Sequence[tuple[str, DatasetSource]],
    weights: Mapping[str, float],
    sft_config=None,
    peft_config=None,
    output_dir: str | os.PathLike | None = None,
    *,
    name: str | None = None,
    num_examples: int | None = None,
    seed: int | None = None,
    processing_class=None,
    formatting_func: Callable | None = None,
    callbacks: Sequence | None = None,
    retrain: bool = False,
    eval_datasets: Mapping[str, DatasetSource] | Sequence[tuple[str, DatasetSource]] | None = None,
) -> TrainingRun:
    """The data-mixing baseline: train one model on a weighted mixture of the datasets, with measured compute.

    The mixture is sampled by the weights ([`mix_datasets`]: each example comes from dataset `i` with
    probability `w_i / Σ w`) and trained with one `SFTTrainer` run, with the same `sft_config` / `peft_config`
    conventions as [`train_distributions`]. The run folder `output_dir/<name>/` holds the checkpoints, the final
    `model/` (or `adapter/`) and `run_info.json` with the weights, the examples drawn per dataset and the
    compute (tokens seen, FLOPs), so a grid of mixtures can be compared with DEM at measured cost. A finished
    run is reused and an interrupted one resumes, as in [`train_distributions`].

    Args:
        base, datasets, sft_config, peft_config, output_dir, processing_class, formatting_func, callbacks:
            as in [`train_distributions`]. The datasets must share their format (e.g. all chat `messages`).
        weights (`dict[str, float]`):
            A weight `>= 0` for every dataset; they need not sum to 1 (zero leaves a dataset out).
        name (`str`, *optional*):
            The run's name; by default built from the weights (`mixture_math-0.7_chat-0.3`).
        num_examples (`int`, *optional*):
            Length of the mixture; by default the total length of all the datasets, so every mixture of a grid
            trains on as many examples (set `max_steps` in `sft_config` to fix the compute exactly).
        seed (`int`, *optional*):
            Seed of the sampling; defaults to `sft_config.seed`.
        eval_datasets (`dict[str, Dataset | DatasetDict | str]`, *optional*):
            One validation set per dataset, as in [`train_distributions`]; the mixture is evaluated on all of them
            together (every example once, whatever the weights), so with `load_best_model_at_end=True` it keeps
            its best checkpoint on the union of the validation sets.

    Returns:
        [`TrainingRun`]: the run's folder, its model (or adapter) folder and its `run_info.json` content.

    Example:
        ```python
        >>> from trl import SFTConfig
        >>> from dem_hf import train_mixture
        >>> for w in (0.25, 0.5, 0.75):
        ...     run = train_mixture(
        ...         "HuggingFaceTB/SmolLM2-135M", {"math": "data/math.jsonl", "chat": "data/chat.jsonl"},
        ...         weights={"math": w, "chat": 1 - w}, sft_config=SFTConfig(max_steps=600), output_dir="mixtures",
        ...     )
        ...     print(run.name, run.info["compute"]["flops_6nd"])
        ```
    """
    plan = _plan(base, datasets, sft_config, peft_config, output_dir, processing_class, formatting_func, callbacks, retrain,
                 eval_datasets)
    formats = {data.format for data in plan.datasets.values()}
    if len(formats) > 1:
        raise ValueError(
            "A mixture needs datasets in one format; got "
            f"{ {data.name: data.format for data in plan.datasets.values()} }. Convert them to one format first."
        )
    probabilities = mixture_probabilities(plan.datasets, weights)  # validated before sampling
    name = check_vector_name(name) if name is not None else default_mixture_name(dict(weights))
    seed = plan.sft_config.seed if seed is None else seed
    mixture, counts = sample_mixture({n: d.dataset for n, d in plan.datasets.items()}, weights, num_examples=num_examples, seed=seed)
    run_dir = plan.output_dir / name
    data = {"datasets": {n: d.summary() for n, d in plan.datasets.items()}, "weights": dict(weights),
            "num_examples": len(mixture), "seed": seed}
    if plan.eval_datasets is not None:
        data["eval"] = {n: d.summary() for n, d in plan.eval_datasets.items()}
    config = run_config(plan.sft_config, run_dir, name)
    setup = plan.setup(config, data)
    with hold_run_folders([run_dir], plan.is_main_process):
        folder = _open_runs(plan, {name: setup}, retrain, needs_vector=False)[name]
        if folder.reused:
            logger.info(f"Mixture run {name!r} finished earlier with this data and these settings; reusing {run_dir}.")
            return TrainingRun(name, run_dir, final_model_dir(run_dir, lora=peft_config is not None), folder.info, reused=True)
        logger.info(f"Mixture run {name!r}: {len(mixture)} examples drawn as {counts} -> {folder.work_dir}")
        info = {"name": name, "kind": "mixture", "base_model": plan.base_name, **setup, "probabilities": probabilities,
                "examples_per_dataset": counts}
        return _train_mixture(plan, folder, mixture, config, info)


def _train_mixture(plan: _Plan, folder: RunFolder, mixture, config, info: dict[str, Any]) -> TrainingRun:
    if folder.retraining:
        config = dataclasses.replace(config, output_dir=str(folder.work_dir))
    evaluated = concatenate_eval_datasets(plan.eval_datasets) if plan.eval_datasets is not None else None
    trainer = _build_trainer(plan.base, mixture, config, plan.peft_config, plan.tokenizer, plan.formatting_func,
                             plan.callbacks, evaluated)
    if trainer.is_world_process_zero():
        record_start(folder, info)
    train_or_resume(trainer, folder.work_dir, folder.name)
    trainer.save_model(str(final_model_dir(folder.work_dir, lora=plan.peft_config is not None)))
    model_dir = final_model_dir(folder.run_dir, lora=plan.peft_config is not None)
    info = {**info, "compute": training_compute(trainer.state, trainer.args, trainer.model), "model_dir": model_dir.name,
            "versions": library_versions()}
    if trainer.is_world_process_zero():
        finish_run(folder, info)
    trainer.accelerator.wait_for_everyone()
    _release(trainer)
    return TrainingRun(folder.name, folder.run_dir, model_dir, {**info, "finished": True})

"""Per-dataset training with TRL (the data-mixing baseline, built on the same plan, is in [`dem_hf.training.mixture`]).

[`train_distributions`] runs one `trl.SFTTrainer` per dataset, from the same base, with the user's own
`trl.SFTConfig` and (optionally) `peft.LoraConfig`, and returns one [`DistributionVector`] per dataset.
[`~dem_hf.training.mixture.train_mixture`] trains one model on a weighted mixture of the same datasets, so a grid
of mixtures can be compared with DEM at measured cost.

Each run lives in `output_dir/<name>/`:

```
<name>/
  checkpoint-<step>/    TRL checkpoints (resumed from when a run was interrupted)
  model/ or adapter/    the final full model, or the final LoRA adapter (with the tokenizer)
  vector/               the saved DistributionVector (train_distributions only)
  run_info.json         the dataset's content fingerprint, every setting that changes the result, the base's
                        fingerprint, measured compute; written atomically when the run starts ("finished": false)
                        and last when it ends ("finished": true)
```

A finished run trained with the same data (by content, not only row count), base and settings is reused, not
retrained: calling `train_distributions` again with one more dataset trains only the new one (add its vector
with `DEMMerger.add_vector`); an interrupted one resumes from its last complete checkpoint. A run recorded with
anything else is never silently reused or resumed: the call stops with a `ValueError` listing the differences,
before any run trains, unless `retrain=True` (`dem-hf train --retrain`) asks to train it again; the old run then
stays in place until the new one has finished (see [`dem_hf.training.runs`]).

Everything is checked before the first run starts: names, duplicates, every row of every dataset (JSON lines
with the file and line of an error, chat message structure, rows the loss can score), columns TRL understands,
chat templates, settings that would train nothing (`max_steps=0`), LoRA target modules and dtypes.

Distributed training is TRL's: launch the same script with `accelerate launch` (DDP, FSDP or DeepSpeed; on a
machine without a GPU, `use_cpu=True` for a CPU group); every run trains once, as one process group, and only the
main process writes vectors and `run_info.json`. Processes that share `output_dir` without forming one group (a
launch that fell back to independent processes, or two plain runs started at once) are refused before they train
(see [`dem_hf.training.processes`]).
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import logging
from ..io.outputs import check_output_directory
from ..vectors.vector import DistributionVector
from .callbacks import (
    VECTOR_FOLDER,
    DistributionVectorCallback,
    is_peft_model,
    training_compute,
)
from .config import (
    bf16_available,
    check_peft_config,
    check_training_length,
    default_sft_config,
    jsonable,
    load_processing_class,
    peft_config_summary,
    run_config,
    sft_config_summary,
)
from .data import (
    DatasetSource,
    PreparedDataset,
    check_chat_template,
    default_mixture_name,
    load_training_dataset,
    mix_datasets,
    prepare_datasets,
    prepare_eval_datasets,
)
from .processes import check_process_group, hold_run_folders
from .runs import (
    RUN_INFO_NAME,
    RunFolder,
    base_identity,
    final_model_dir,
    finish_run,
    library_versions,
    open_run,
    record_start,
    train_or_resume,
)

# The API of this module; its helpers live in data, config, runs and processes (mixtures: mixture).
__all__ = [
    "RUN_INFO_NAME", "TrainingRun", "bf16_available", "default_mixture_name", "load_training_dataset", "mix_datasets",
    "train_distributions",
]

logger = logging.get_logger(__name__)


@dataclass
class TrainingRun:
    """A finished training run (see [`~dem_hf.training.mixture.train_mixture`]).

    Attributes:
        name: the run's name (its folder under `output_dir`).
        run_dir: the run's folder.
        model_dir: the final model (full fine-tune) or adapter (LoRA) folder.
        info: the content of `run_info.json`: configs, data, measured compute.
        reused: True when the run had finished before and was not retrained.
    """

    name: str
    run_dir: Path
    model_dir: Path
    info: dict[str, Any]
    reused: bool = False


# ============================================================================================ training


def _build_trainer(base, dataset, config, peft_config, tokenizer, formatting_func, callbacks, eval_dataset=None):
    from trl import SFTTrainer

    model = copy.deepcopy(base) if isinstance(base, torch.nn.Module) else str(base)
    return SFTTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=copy.deepcopy(peft_config),
        formatting_func=formatting_func,
        callbacks=list(callbacks),
    )


def _release(trainer) -> None:
    """Drop the trainer's model and optimizer so the next run does not hold two models in memory."""
    trainer.accelerator.free_memory()
    trainer.model = trainer.model_wrapped = trainer.optimizer = trainer.lr_scheduler = None
    trainer.callback_handler.model = trainer.callback_handler.optimizer = trainer.callback_handler.lr_scheduler = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class _Plan:
    """What is shared by the runs of one call: validated data, tokenizer, configs."""

    base: Any
    datasets: dict[str, PreparedDataset]
    sft_config: Any
    peft_config: Any
    output_dir: Path
    tokenizer: Any
    formatting_func: Callable | None
    callbacks: list
    base_name: str | None
    base_fingerprint: dict[str, Any]
    eval_datasets: dict[str, PreparedDataset] | None = None

    @property
    def is_main_process(self) -> bool:
        """The group's main process writes run folders and holds their locks (`dem_hf.training.processes`)."""
        return self.sft_config.process_index == 0

    def setup(self, config, data: dict[str, Any]) -> dict[str, Any]:
        """The part of `run_info.json` a re-run compares to decide whether a reused run matches (early stopping
        included: it decides where a run ends)."""
        from transformers import EarlyStoppingCallback

        stopping = [c.state()["args"] for c in self.callbacks if isinstance(c, EarlyStoppingCallback)]
        return {
            "data": jsonable(data),
            "base_fingerprint": self.base_fingerprint,
            "sft_config": sft_config_summary(config),
            "peft_config": peft_config_summary(self.peft_config),
            "early_stopping": jsonable(stopping) or None,  # None: runs recorded before this key match
        }


def _plan(base, datasets, sft_config, peft_config, output_dir, processing_class, formatting_func, callbacks,
          retrain: bool, eval_datasets=None) -> _Plan:
    """Validate everything before any training: settings, output folder, datasets, tokenizer, LoRA targets, dtypes."""
    if not isinstance(retrain, bool):
        raise ValueError(f"retrain must be True or False, got {retrain!r}.")
    if sft_config is None:
        if output_dir is None:
            raise ValueError("Pass output_dir= (or an SFTConfig with an output_dir).")
        sft_config = default_sft_config(output_dir)
    check_training_length(sft_config)
    output_dir = check_output_directory(output_dir if output_dir is not None else sft_config.output_dir, overwrite=True)
    check_process_group(sft_config, output_dir)
    if isinstance(base, os.PathLike):
        base = str(base)
    if not isinstance(base, (str, torch.nn.Module)):
        raise ValueError(f"base must be a model folder, a Hub id or a PreTrainedModel, got {type(base).__name__}.")
    if isinstance(base, torch.nn.Module) and is_peft_model(base):
        raise ValueError("base is a PeftModel; pass the plain base model (merge and unload the adapter first).")
    prepared = prepare_datasets(datasets, sft_config, formatting_func)
    evaluated = prepare_eval_datasets(eval_datasets, prepared, sft_config, formatting_func)
    tokenizer = load_processing_class(base, processing_class)
    check_chat_template(prepared, tokenizer, sft_config)
    if peft_config is not None:
        check_peft_config(peft_config, base)
    return _Plan(base, prepared, sft_config, peft_config, output_dir, tokenizer, formatting_func,
                 list(callbacks or []), *base_identity(base), eval_datasets=evaluated)


def _open_runs(plan: _Plan, setups: dict[str, dict[str, Any]], retrain: bool, needs_vector: bool) -> dict[str, RunFolder]:
    """What happens to each run folder (reuse, resume, train, retrain), decided for all runs before any trains."""
    main = plan.is_main_process
    with plan.sft_config.main_process_first(desc="checking run folders"):
        return {
            name: open_run(name, plan.output_dir / name, setup, retrain=retrain, needs_vector=needs_vector, main_process=main)
            for name, setup in setups.items()
        }


def train_distributions(
    base,
    datasets: Mapping[str, DatasetSource] | Sequence[tuple[str, DatasetSource]],
    sft_config=None,
    peft_config=None,
    output_dir: str | os.PathLike | None = None,
    *,
    processing_class=None,
    formatting_func: Callable | None = None,
    callbacks: Sequence | None = None,
    checkpoint_vectors: bool = False,
    retrain: bool = False,
    eval_datasets: Mapping[str, DatasetSource] | Sequence[tuple[str, DatasetSource]] | None = None,
) -> list[DistributionVector]:
    """Fine-tune the base once per dataset with TRL's `SFTTrainer`; return one distribution vector per dataset.

    Every run starts from the same base, with the same `sft_config` (its `output_dir` replaced by
    `output_dir/<name>`), and is saved under `output_dir/<name>/` (see the module docs for the layout). The vector
    is θ_run − θ_base for a full fine-tune and the LoRA factors (kept low-rank) with a `LoraConfig`; its
    `metadata` records the dataset, the settings and the measured compute (tokens seen, `total_flos`,
    6·N·tokens). Finished runs found in `output_dir` are reused and interrupted ones resume from their last complete
    checkpoint, when `run_info.json` shows they were trained with the same data (content fingerprint), base and
    settings. A run recorded with anything else stops the call with a `ValueError` before any run trains, unless
    `retrain=True`. All datasets (every row) and settings are validated before the first run starts.

    On CPU, bf16 and gradient checkpointing are turned off; on GPUs the config is used as given (TRL's
    defaults: bf16 and gradient checkpointing on). Run the same script with `accelerate launch` to train
    each run on several GPUs.

    Args:
        base (`str`, `os.PathLike` or `PreTrainedModel`):
            The base model: a folder or Hub id (loaded by TRL, honouring `sft_config.model_init_kwargs`), or an
            in-memory model (copied for each run, never modified). Vectors are computed against its weights.
        datasets (`dict[str, Dataset | DatasetDict | str]` or list of `(name, dataset)` pairs):
            One entry per distribution. Values are `datasets` objects (a `DatasetDict` gives its `"train"` split),
            local files (`.json`, `.jsonl`, `.csv`, `.parquet`, `.arrow`, `.txt`), folders, or Hub ids. Plain text,
            prompt/completion, chat messages (the chat template is applied by TRL), ShareGPT and pre-tokenized
            datasets work as in TRL. Names become folder and vector names.
        sft_config (`trl.SFTConfig`, *optional*):
            Training settings for every run; TRL's defaults if omitted.
        peft_config (`peft.LoraConfig`, *optional*):
            Train LoRA adapters instead of full fine-tunes.
        output_dir (`str` or `os.PathLike`, *optional*):
            Where the runs go; defaults to `sft_config.output_dir`.
        processing_class (`PreTrainedTokenizerBase`, *optional*):
            The tokenizer; by default the one saved with the base.
        formatting_func (`Callable`, *optional*):
            Passed to `SFTTrainer` (turns an example into its text); column checks are then skipped.
        callbacks (`list[TrainerCallback]`, *optional*):
            Extra callbacks, added to every run's trainer.
        checkpoint_vectors (`bool`, *optional*, defaults to `False`):
            Also save a vector inside every checkpoint ([`DistributionVectorCallback`]).
        retrain (`bool`, *optional*, defaults to `False`):
            Train again, from the base, every run found recorded with other data or settings than asked now (logged
            as a warning), instead of refusing. It is trained in `output_dir/.<name>.retrain/`; the old run stays
            in place until the new one has finished, then is replaced. Matching runs are reused either way.
        eval_datasets (`dict[str, Dataset | DatasetDict | str]` or list of `(name, dataset)` pairs, *optional*):
            One validation set per dataset, by the same names and in the same format (a `DatasetDict` gives its
            `"validation"` split), each run evaluated on its own; required exactly when `sft_config.eval_strategy`
            is not `"no"`. With `load_best_model_at_end=True` the vector is the run's best checkpoint by
            `metric_for_best_model`; add `transformers.EarlyStoppingCallback` to `callbacks` to also stop a run
            once it stops improving (a per-dataset early stop a single mixture run cannot have). The sets are part
            of what a re-run compares.

    Returns:
        `list[DistributionVector]`: one per dataset, in the given order, read from `output_dir/<name>/vector`.

    Raises:
        ValueError: for bad input (before any run trains), for a run recorded with other data or settings
            when `retrain` is False (the message lists the differences), and in every process of a launch whose
            processes formed no process group.
        OutputInUseError: when another call, outside this process group, is training one of the runs now.

    Example:
        ```python
        >>> from peft import LoraConfig
        >>> from trl import SFTConfig
        >>> from dem_hf import DEMMerger, train_distributions
        >>> vectors = train_distributions(
        ...     "HuggingFaceTB/SmolLM2-135M",
        ...     datasets={"math": "data/math.jsonl", "chat": "data/chat.jsonl"},
        ...     sft_config=SFTConfig(max_steps=200, learning_rate=2e-4, save_steps=50),
        ...     peft_config=LoraConfig(r=16, target_modules="all-linear"),
        ...     output_dir="runs",
        ... )
        >>> merger = DEMMerger.from_pretrained("HuggingFaceTB/SmolLM2-135M", vectors=vectors)
        >>> # later, one more dataset: only "code" is trained
        >>> *_, code = train_distributions(..., datasets={"math": ..., "chat": ..., "code": "data/code.jsonl"}, ...)
        >>> merger.add_vector(code)
        ```

        Each run's best checkpoint on its own validation set, stopping a run after 3 evaluations without progress:
        ```python
        >>> from transformers import EarlyStoppingCallback
        >>> vectors = train_distributions(
        ...     "HuggingFaceTB/SmolLM2-135M", datasets={"math": "data/math.jsonl", "chat": "data/chat.jsonl"},
        ...     eval_datasets={"math": "data/math-val.jsonl", "chat": "data/chat-val.jsonl"},
        ...     sft_config=SFTConfig(max_steps=400, eval_strategy="steps", eval_steps=20, save_steps=20,
        ...                          load_best_model_at_end=True, metric_for_best_model="eval_loss"),
        ...     callbacks=[EarlyStoppingCallback(early_stopping_patience=3)], output_dir="runs",
        ... )
        ```
    """
    plan = _plan(base, datasets, sft_config, peft_config, output_dir, processing_class, formatting_func, callbacks, retrain,
                 eval_datasets)
    configs = {name: run_config(plan.sft_config, plan.output_dir / name, name) for name in plan.datasets}
    setups = {name: plan.setup(configs[name], _run_data(plan, name)) for name in plan.datasets}
    with hold_run_folders([plan.output_dir / name for name in setups], plan.is_main_process):
        folders = _open_runs(plan, setups, retrain, needs_vector=True)
        vectors = []
        for position, (name, data) in enumerate(plan.datasets.items(), start=1):
            folder = folders[name]
            if folder.reused:
                logger.info(f"Run {name!r} ({position}/{len(plan.datasets)}) finished earlier with this data and these "
                            f"settings; reusing {folder.run_dir}.")
                vectors.append(DistributionVector.from_pretrained(folder.run_dir / VECTOR_FOLDER))
                continue
            logger.info(f"Run {name!r} ({position}/{len(plan.datasets)}): {data.num_examples} examples -> {folder.work_dir}")
            vectors.append(_train_distribution(plan, name, data, folder, configs[name], setups[name], checkpoint_vectors))
        return vectors


def _run_data(plan: _Plan, name: str) -> dict[str, Any]:
    """What `run_info.json` records of one run's data: its training set, and its validation set when evaluated."""
    summary = plan.datasets[name].summary()
    return summary if plan.eval_datasets is None else {**summary, "eval": plan.eval_datasets[name].summary()}


def _train_distribution(
    plan: _Plan, name: str, data: PreparedDataset, folder: RunFolder, config, setup: dict[str, Any], checkpoint_vectors: bool
) -> DistributionVector:
    if folder.retraining:
        config = dataclasses.replace(config, output_dir=str(folder.work_dir))
    metadata = {"dataset": name, "num_examples": data.num_examples, "format": data.format,
                "sft_config": setup["sft_config"], "peft_config": setup["peft_config"],
                "base_model": plan.base_name}
    callback = DistributionVectorCallback(name, base=plan.base, save_on_checkpoint=checkpoint_vectors, metadata=metadata)
    evaluated = plan.eval_datasets[name].dataset if plan.eval_datasets is not None else None
    trainer = _build_trainer(plan.base, data.dataset, config, plan.peft_config, plan.tokenizer, plan.formatting_func,
                             [callback, *plan.callbacks], evaluated)
    info = {"name": name, "kind": "distribution", "base_model": plan.base_name, **setup,
            "vector_type": "lora" if plan.peft_config else "full"}
    if trainer.is_world_process_zero():
        record_start(folder, info)
    train_or_resume(trainer, folder.work_dir, name)
    model_dir = final_model_dir(folder.work_dir, lora=plan.peft_config is not None)
    trainer.save_model(str(model_dir))
    compute = training_compute(trainer.state, trainer.args, trainer.model)
    vector_dir = folder.work_dir / VECTOR_FOLDER
    if trainer.is_world_process_zero():
        if vector_dir not in callback.saved:  # sharded training (ZeRO-3, FSDP): from the gathered, saved model
            step = compute["best_step"] or compute["global_step"]  # the saved model is the best checkpoint, if kept
            _vector_from_saved(plan, name, model_dir, vector_dir, {**metadata, "step": step, "compute": compute})
        finish_run(folder, {**info, "compute": compute, "model_dir": model_dir.name, "vector_dir": VECTOR_FOLDER,
                            "versions": library_versions()})
    trainer.accelerator.wait_for_everyone()
    _release(trainer)
    return DistributionVector.from_pretrained(folder.run_dir / VECTOR_FOLDER)


def _vector_from_saved(plan: _Plan, name: str, model_dir: Path, vector_dir: Path, metadata: dict[str, Any]) -> None:
    if plan.peft_config is not None:
        vector = DistributionVector.from_peft(model_dir, name=name, base=plan.base, metadata=metadata)
        vector.save_pretrained(vector_dir, overwrite=True)
    else:
        DistributionVector.from_models(plan.base, model_dir, name=name, save_directory=vector_dir, overwrite=True, metadata=metadata)

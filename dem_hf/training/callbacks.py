"""Trainer callbacks: turn the model being trained into a distribution vector, and measure training compute.

[`DistributionVectorCallback`] works with any `transformers.Trainer` (so with TRL's `SFTTrainer`), with or
without PEFT. At the end of training, and optionally at every checkpoint, it extracts the vector of the model
being trained against its base (θ_trained − θ for full fine-tunes, the LoRA factors for PEFT models) and
saves it, together with the compute spent so far, so the cost of a DEM run is measured rather than estimated.

[`training_compute`] is the measurement itself: tokens seen, the trainer's own FLOP count (`total_flos`) and
the 6·N·D estimate, read from the `TrainerState` (which checkpoints carry, so a resumed run keeps counting).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from transformers import (
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .. import logging
from ..io.tensors import TensorDict, untied_state_dict
from ..vectors.config import check_vector_name
from ..vectors.vector import DistributionVector

logger = logging.get_logger(__name__)

VECTOR_FOLDER = "vector"


def is_peft_model(model: Any) -> bool:
    """Whether `model` is a `peft.PeftModel` (False when PEFT is not installed)."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def base_parameter_count(model: torch.nn.Module) -> int:
    """N in 6·N·D: the parameters of the base model, embeddings excluded (as `num_parameters(exclude_embeddings=True)`).

    For a PEFT model the adapter's own parameters (LoRA factors, `modules_to_save` copies) are not counted:
    compute is dominated by the frozen base the tokens flow through.
    """
    if is_peft_model(model):
        model = model.get_base_model()
    embeddings = {id(p) for module in model.modules() if isinstance(module, torch.nn.Embedding) for p in module.parameters()}
    seen: set[int] = set()
    total = 0
    for name, param in model.named_parameters():
        if id(param) in seen or id(param) in embeddings or ".lora_" in name or ".modules_to_save." in name:
            continue
        seen.add(id(param))
        total += getattr(param, "ds_numel", param.numel())  # DeepSpeed ZeRO-3 keeps the true size in ds_numel
    return total


def trainable_parameter_count(model: torch.nn.Module) -> int:
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)


def last_logged(state: TrainerState, key: str) -> float | None:
    """The most recent value of `key` in the trainer's log history (None if never logged)."""
    for entry in reversed(state.log_history):
        if key in entry:
            return entry[key]
    return None


def training_compute(state: TrainerState, args: TrainingArguments, model: torch.nn.Module | None = None) -> dict[str, Any]:
    """What a training run has cost so far, from the trainer's own state.

    Returns a JSON-able dict:

    - `tokens_seen`: non-padding input tokens processed, over all processes (`state.num_input_tokens_seen`;
      `None` if the trainer was not counting them, see `include_num_input_tokens_seen`);
    - `total_flos`: the trainer's FLOP count (`state.total_flos`: 6 × input tokens, padding included, ×
      non-embedding parameters, summed over processes);
    - `flops_6nd`: 6 · N · `tokens_seen` with N = [`base_parameter_count`] (the usual training-compute estimate;
      it ignores attention and the recomputation gradient checkpointing adds);
    - `num_parameters`, `trainable_parameters`, `global_step`, `epoch`, `train_loss` (mean loss of the run, or the
      last logged loss while training), `train_runtime` (seconds), `world_size`;
    - `evaluations` (validation passes run so far; each costs a forward pass over the eval set, not in
      `total_flos`), and with `load_best_model_at_end` the `best_step` and `best_metric` (`None` otherwise).
    """
    tokens = int(state.num_input_tokens_seen) if args.include_num_input_tokens_seen not in ("no", False) else None
    num_parameters = base_parameter_count(model) if model is not None else None
    train_loss = last_logged(state, "train_loss")
    kept = best_step(state, args)
    return {
        "tokens_seen": tokens,
        "total_flos": float(state.total_flos),
        "flops_6nd": 6.0 * num_parameters * tokens if tokens is not None and num_parameters is not None else None,
        "num_parameters": num_parameters,
        "trainable_parameters": trainable_parameter_count(model) if model is not None else None,
        "global_step": int(state.global_step),
        "epoch": float(state.epoch) if state.epoch is not None else None,
        "train_loss": train_loss if train_loss is not None else last_logged(state, "loss"),
        "train_runtime": last_logged(state, "train_runtime"),
        "world_size": int(args.world_size),
        "evaluations": sum("eval_runtime" in entry for entry in state.log_history),
        "best_step": kept,
        "best_metric": state.best_metric if kept is not None else None,
    }


def best_step(state: TrainerState, args: TrainingArguments) -> int | None:
    """The step of the checkpoint `load_best_model_at_end` keeps (`None` when the trainer keeps the last weights)."""
    if not args.load_best_model_at_end or state.best_model_checkpoint is None or state.best_global_step is None:
        return None
    return int(state.best_global_step)


def is_sharded(model: torch.nn.Module) -> bool:
    """True when parameters are sharded across processes (DeepSpeed ZeRO-3 or FSDP): no process holds the weights."""
    for param in model.parameters():
        if hasattr(param, "ds_id") or type(param).__name__ == "DTensor" or type(param.data).__name__ == "DTensor":
            return True
        if param.numel() == 0:
            return True
    return False


class DistributionVectorCallback(TrainerCallback):
    """Save the distribution vector of the model being trained, at train end and (optionally) at each checkpoint.

    The vector is θ_trained − θ_base for a full fine-tune ([`DistributionVector.from_models`]) and the LoRA
    factors for a PEFT model ([`DistributionVector.from_peft`], kept low-rank). Its `metadata` records the
    training compute so far ([`training_compute`]) and anything passed as `metadata`.

    Where vectors go: at a checkpoint, `<output_dir>/checkpoint-<step>/vector/` (so `save_total_limit` rotates
    them with their checkpoint); at train end, `save_directory`, by default `<output_dir>/vector/`. Only the main
    process writes. Writes are atomic; an existing vector at the same place is replaced.

    The base: pass `base` (a folder, Hub id or in-memory model) whenever you can; a vector computed against the
    base's checkpoint carries its fingerprint, so [`DEMMerger`] accepts it. For a PEFT model without `base`, the
    PeftModel's own (frozen) base weights are used. For a full fine-tune without `base`, the callback keeps a
    CPU copy of the weights as they are when the trainer is created (one extra copy of the model in RAM); a run
    resumed from a checkpoint then needs `base`, since its starting weights are no longer the base.

    The callback also switches on the trainer's token counting (`include_num_input_tokens_seen="non_padding"`)
    when it is off, so that compute is measured.

    Under DeepSpeed ZeRO-3 or FSDP no process holds the full weights; the callback then warns and saves nothing:
    compute the vector from the saved model with [`DistributionVector.from_models`] / `from_peft`
    ([`train_distributions`] does this for you).

    Args:
        name (`str`, *optional*):
            The vector's name (usually the dataset's); defaults to the name of `args.output_dir`.
        base (`str`, `os.PathLike` or `PreTrainedModel`, *optional*):
            The base model θ the training started from.
        save_on_checkpoint (`bool`, *optional*, defaults to `True`):
            Also save a vector inside every checkpoint the trainer writes.
        save_directory (`str` or `os.PathLike`, *optional*):
            Where the train-end vector goes; defaults to `<output_dir>/vector`.
        metadata (`dict`, *optional*):
            Extra JSON-able information stored in every saved vector's metadata (dataset, config, ...).

    Attributes:
        vector (`DistributionVector` or `None`): the last vector saved (read back from disk).
        saved (`list[Path]`): every folder a vector was saved to, in order.

    Example:
        ```python
        >>> from trl import SFTConfig, SFTTrainer
        >>> from dem_hf import DistributionVectorCallback
        >>> callback = DistributionVectorCallback(name="math", base="HuggingFaceTB/SmolLM2-135M")
        >>> trainer = SFTTrainer(
        ...     model="HuggingFaceTB/SmolLM2-135M",
        ...     args=SFTConfig(output_dir="runs/math", save_steps=100),
        ...     train_dataset=math_dataset,
        ...     callbacks=[callback],
        ... )
        >>> trainer.train()
        >>> callback.vector  # also saved in runs/math/vector and runs/math/checkpoint-*/vector
        DistributionVector(name='math', vector_type='full', tensors=...)
        ```
    """

    def __init__(
        self,
        name: str | None = None,
        base=None,
        *,
        save_on_checkpoint: bool = True,
        save_directory: str | os.PathLike | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self.name = check_vector_name(name) if name is not None else None
        self.base = base
        self.save_on_checkpoint = save_on_checkpoint
        self.save_directory = Path(save_directory) if save_directory is not None else None
        self.metadata = dict(metadata or {})
        self.vector: DistributionVector | None = None
        self.saved: list[Path] = []
        self._snapshot: TensorDict | None = None
        self._warned_sharded = False

    # ----------------------------------------------------------------------------------------- events

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs):
        self._prepare(args, model)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs):
        self._prepare(args, model, resumed=state.global_step > 0)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs):
        if not self.save_on_checkpoint or not state.is_world_process_zero:
            return
        checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if checkpoint.is_dir():
            self._save(checkpoint / VECTOR_FOLDER, args, state, model)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs):
        if state.is_world_process_zero:
            # With load_best_model_at_end the trainer has just loaded the best checkpoint's weights into the model.
            self._save(self.save_directory or Path(args.output_dir) / VECTOR_FOLDER, args, state, model,
                       step=best_step(state, args))

    # ----------------------------------------------------------------------------------------- internals

    def _prepare(self, args: TrainingArguments, model, resumed: bool = False) -> None:
        if args.include_num_input_tokens_seen in ("no", False):
            args.include_num_input_tokens_seen = "non_padding"
        if self.name is None:
            folder = Path(args.output_dir).resolve().name
            try:
                self.name = check_vector_name(folder)
            except ValueError as error:
                raise ValueError(f"{error} The name comes from output_dir {folder!r}; pass name=... instead.") from error
        if model is None or self.base is not None or is_peft_model(model) or self._snapshot is not None:
            return
        if resumed:
            raise ValueError(
                f"DistributionVectorCallback({self.name!r}) has no base for a full fine-tune resumed from a "
                "checkpoint: the weights it starts from are not the base. Pass base=... (the base model's folder, "
                "Hub id or an in-memory copy)."
            )
        if not is_sharded(model):
            logger.info(f"DistributionVectorCallback({self.name!r}): no base given, keeping a CPU copy of the starting weights.")
            self._snapshot = TensorDict({n: t.detach().to("cpu", copy=True) for n, t in untied_state_dict(model).items()})

    def _extract(self, model, metadata: dict[str, Any], save_directory: Path) -> DistributionVector:
        if is_peft_model(model):
            vector = DistributionVector.from_peft(model, name=self.name, base=self.base, metadata=metadata)
            vector.save_pretrained(save_directory, overwrite=True)
            return DistributionVector.from_pretrained(save_directory)
        base = self.base if self.base is not None else _SnapshotModel(self._snapshot, model)
        return DistributionVector.from_models(
            base, model, name=self.name, save_directory=save_directory, overwrite=True, metadata=metadata
        )

    def _save(self, save_directory: Path, args: TrainingArguments, state: TrainerState, model, step: int | None = None) -> None:
        if model is None:
            raise ValueError("DistributionVectorCallback needs the trainer's model; the trainer passed none.")
        if is_sharded(model):
            if not self._warned_sharded:
                logger.warning(
                    "DistributionVectorCallback: the model's parameters are sharded (DeepSpeed ZeRO-3 or FSDP), so "
                    "no process holds the weights; no vector is saved. Compute it from the saved model with "
                    "DistributionVector.from_models / from_peft."
                )
                self._warned_sharded = True
            return
        if self.base is None and self._snapshot is None and not is_peft_model(model):
            raise ValueError(
                f"DistributionVectorCallback({self.name!r}) has no base weights to subtract: it was added after the "
                "trainer was created and the run did not start at step 0. Pass base=..."
            )
        metadata = {**self.metadata, "step": int(state.global_step if step is None else step),
                    "compute": training_compute(state, args, model)}
        self.vector = self._extract(model, metadata, save_directory)
        self.saved.append(save_directory)
        logger.info(f"Saved {self.vector.vector_type} vector {self.name!r} (step {metadata['step']}) to {save_directory}")


class _SnapshotModel(torch.nn.Module):
    """A stand-in 'model' whose state dict is the CPU snapshot of the starting weights (used as `from_models`' base)."""

    def __init__(self, snapshot: TensorDict, like: torch.nn.Module) -> None:
        super().__init__()
        self._tensors = snapshot.tensors
        self.config = getattr(like, "config", None)

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        return dict(self._tensors)

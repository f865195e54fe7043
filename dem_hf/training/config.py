"""Training settings for [`dem_hf.training.trainers`]: the base, its tokenizer, the `SFTConfig` of each run, LoRA checks.

Each run gets the user's `trl.SFTConfig` with its own `output_dir` and run name, token counting turned on and
settings the hardware cannot run turned off ([`run_config`]). Settings that would train nothing are refused
([`check_training_length`]) and a `peft.LoraConfig` is checked against the base's module tree
([`check_peft_config`]), both before training. Every setting that can change what a run learns is recorded in
`run_info.json` and the vectors' metadata ([`sft_config_summary`], [`peft_config_summary`]): all fields of the
configs except the few that only decide where and how progress is logged, saved or reported.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from .. import logging

logger = logging.get_logger(__name__)

# SFTConfig fields that never change the trained weights: where and how progress is logged, saved, evaluated,
# reported or pushed, data-loading workers, memory/speed trade-offs with the same result, and secrets. Every other
# field is recorded (so a field a new TRL adds is recorded too).
SFT_IGNORED_KEYS = frozenset({
    "output_dir", "overwrite_output_dir", "run_name", "project", "report_to", "disable_tqdm", "log_level",
    "log_level_replica", "log_on_each_node", "logging_dir", "logging_strategy", "logging_steps", "logging_first_step",
    "logging_nan_inf_filter", "include_num_input_tokens_seen", "include_tokens_per_second", "skip_memory_metrics",
    "save_strategy", "save_steps", "save_total_limit", "save_on_each_node", "save_only_model", "save_safetensors",
    "enable_jit_checkpoint", "restore_callback_states_from_checkpoint", "resume_from_checkpoint",
    "eval_strategy", "eval_steps", "eval_delay", "eval_on_start", "eval_do_concat_batches", "eval_use_gather_object",
    "eval_accumulation_steps", "eval_packing", "per_device_eval_batch_size", "prediction_loss_only",
    "include_for_metrics", "batch_eval_metrics", "bf16_full_eval", "fp16_full_eval", "do_train", "do_eval", "do_predict",
    "push_to_hub", "hub_token", "hub_private_repo", "hub_model_id", "hub_strategy", "hub_always_push", "hub_revision",
    "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers", "dataloader_prefetch_factor",
    "dataloader_multiprocessing_context", "dataset_num_proc", "local_rank", "ddp_timeout", "debug", "use_cpu",
    "gradient_checkpointing", "gradient_checkpointing_kwargs", "activation_checkpointing",
    "activation_checkpointing_kwargs", "activation_offloading", "torch_empty_cache_steps", "use_cache",
    "torch_compile", "torch_compile_backend", "torch_compile_mode",
})
# With load_best_model_at_end, when the trainer evaluates and saves decides which checkpoint a run keeps.
SFT_BEST_CHECKPOINT_KEYS = frozenset({"eval_strategy", "eval_steps", "eval_delay", "eval_on_start", "save_strategy", "save_steps"})
SFT_SECRET_SUFFIX = "_token"  # to_dict() hides these as "<EOS_TOKEN>" etc.; the real eos/pad tokens are recorded
# LoraConfig fields that do not change the adapter: bookkeeping PEFT fills in.
PEFT_IGNORED_KEYS = frozenset({"peft_version", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping"})


# ============================================================================================ checks


def load_processing_class(base, processing_class=None):
    """The tokenizer to train with: `processing_class`, else the one saved with the base model."""
    if processing_class is not None:
        return processing_class
    from transformers import AutoTokenizer

    if isinstance(base, torch.nn.Module):
        source = getattr(getattr(base, "config", None), "_name_or_path", "") or ""
        if not source or not Path(source).is_dir():
            raise ValueError(
                "The base model is an in-memory model without a local folder to load its tokenizer from; "
                "pass processing_class=<tokenizer>."
            )
        return AutoTokenizer.from_pretrained(source)
    return AutoTokenizer.from_pretrained(str(base))


def _base_structure(base) -> tuple[torch.nn.Module, str | None]:
    """The base model's module tree (on the meta device for a folder or Hub id: no weights are read)."""
    if isinstance(base, torch.nn.Module):
        return base, getattr(getattr(base, "config", None), "model_type", None)
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(base))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return model, config.model_type


def _target_matches(target: str, module_name: str) -> bool:
    return module_name == target or module_name.endswith("." + target)


def check_peft_config(peft_config, base) -> None:
    """Refuse, before training, a PEFT config that cannot become a distribution vector or matches no module.

    Only LoRA is turned into vectors (DoRA, LoRA biases and the like are refused, see [`dem_hf.vectors.lora`]). Every
    listed target module (and `modules_to_save` entry) must exist in the base; a regex must match at least one
    module; adapters on the output layer are refused (TRL computes the loss from `lm_head.weight` directly).
    """
    from peft import LoraConfig
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    from ..vectors.lora import check_supported_adapter

    if not isinstance(peft_config, LoraConfig):
        raise ValueError(
            f"peft_config must be a peft.LoraConfig (distribution vectors are built from LoRA factors), got "
            f"{type(peft_config).__name__}."
        )
    check_supported_adapter(peft_config.to_dict())
    model, model_type = _base_structure(base)
    names = [name for name, _ in model.named_modules() if name]
    targets = peft_config.target_modules
    if targets is None:
        targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
        if targets is None:
            raise ValueError(f"LoraConfig has no target_modules and PEFT has no default for model type {model_type!r}; set target_modules.")
    _check_targets(targets, names, "target_modules")
    _check_targets(peft_config.modules_to_save or [], names, "modules_to_save")
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = next((n for n, m in model.named_modules() if output is not None and m is output), None)
    if head and isinstance(targets, (list, set, tuple)) and any(_target_matches(t, head) for t in targets):
        raise ValueError(f"LoRA on the output layer {head!r} is not supported by TRL's SFTTrainer; remove it from target_modules.")


def _check_targets(targets, names: list[str], what: str) -> None:
    if isinstance(targets, str):
        if targets.lower() == "all-linear" or any(re.fullmatch(targets, n) for n in names):
            return
        raise ValueError(f"LoraConfig {what} regex {targets!r} matches no module of the base model; {_module_hint(names)}")
    absent = sorted(t for t in targets if not any(_target_matches(t, n) for n in names))
    if absent:
        raise ValueError(f"LoraConfig {what} {absent} do not exist in the base model; {_module_hint(names)}")


def _module_hint(names: list[str]) -> str:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names if not any(m.startswith(n + ".") for m in names)} - {""})
    leaves = [leaf for leaf in leaves if not leaf.isdigit()]
    return f"its leaf modules are {leaves[:12]}{' ...' if len(leaves) > 12 else ''}."


def check_training_length(sft_config) -> None:
    """Refuse settings that would train nothing: `max_steps=0`, or `num_train_epochs <= 0` without `max_steps`."""
    if sft_config.max_steps == 0:
        raise ValueError(
            "SFTConfig(max_steps=0) would train nothing: expected max_steps > 0 (optimizer steps), or max_steps=-1 "
            f"to train num_train_epochs={sft_config.num_train_epochs:g} epochs; got max_steps=0."
        )
    if sft_config.max_steps < 0 and not sft_config.num_train_epochs > 0:
        raise ValueError(
            f"SFTConfig(num_train_epochs={sft_config.num_train_epochs:g}) would train nothing: expected "
            f"num_train_epochs > 0, or max_steps > 0; got max_steps={sft_config.max_steps}."
        )


# ============================================================================================ configs


def default_sft_config(output_dir: str | os.PathLike):
    """An `SFTConfig` with TRL's defaults, bf16 only where the hardware has it, logging to the console only."""
    from trl import SFTConfig

    return SFTConfig(output_dir=str(output_dir), use_cpu=not torch.cuda.is_available(), bf16=bf16_available(), report_to="none")


def bf16_available() -> bool:
    """Whether bf16 mixed precision runs natively here (a CUDA GPU that supports it)."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def hardware_overrides(sft_config) -> dict[str, Any]:
    """Settings that must change for the hardware: on CPU, no bf16 autocast and no gradient checkpointing."""
    if sft_config.device.type != "cpu":
        return {}
    overrides: dict[str, Any] = {}
    if sft_config.bf16:
        overrides["bf16"] = False
    if sft_config.gradient_checkpointing:
        overrides["gradient_checkpointing"] = False
        if any(f.name == "activation_checkpointing" for f in dataclasses.fields(sft_config)):
            overrides["activation_checkpointing"] = False
    if overrides:
        logger.info(f"Training on CPU: turning off {sorted(k for k in overrides if k != 'activation_checkpointing')}.")
    return overrides


def run_config(sft_config, run_dir: Path, name: str):
    """The user's `SFTConfig` for one run: its own `output_dir` and run name, token counting on, hardware fixes."""
    overrides = {"output_dir": str(run_dir), **hardware_overrides(sft_config)}
    if sft_config.include_num_input_tokens_seen in ("no", False):
        overrides["include_num_input_tokens_seen"] = "non_padding"
    if sft_config.run_name in (None, sft_config.output_dir):
        overrides["run_name"] = name
    return dataclasses.replace(sft_config, **overrides)


def jsonable(value: Any) -> Any:
    """Round-trip through JSON so stored and fresh summaries compare equal (sets sorted, enums as values)."""

    def default(obj):
        if isinstance(obj, (set, frozenset)):
            return sorted(obj, key=str)
        return getattr(obj, "value", str(obj))

    return json.loads(json.dumps(value, default=default))


def sft_config_summary(sft_config) -> dict[str, Any]:
    """Every training setting that can change what a run learns (for `run_info.json`, metadata and re-run checks).

    All `SFTConfig` fields except [`SFT_IGNORED_KEYS`] (logging, saving, reporting, workers, secrets), with the
    real `eos_token`/`pad_token`, plus the world size and the total batch size. With `load_best_model_at_end` the
    evaluation and saving schedule ([`SFT_BEST_CHECKPOINT_KEYS`]) is kept too: it decides the checkpoint kept.
    """
    values = sft_config.to_dict()
    ignored = SFT_IGNORED_KEYS - SFT_BEST_CHECKPOINT_KEYS if sft_config.load_best_model_at_end else SFT_IGNORED_KEYS
    summary = {key: value for key, value in values.items() if key not in ignored}
    for key in [key for key in summary if key.endswith(SFT_SECRET_SUFFIX)]:
        if key in ("eos_token", "pad_token"):
            summary[key] = getattr(sft_config, key, None)
        else:
            del summary[key]
    summary["world_size"] = sft_config.world_size
    summary["total_train_batch_size"] = (
        sft_config.per_device_train_batch_size * sft_config.gradient_accumulation_steps * sft_config.world_size
    )
    return jsonable(summary)


def peft_config_summary(peft_config) -> dict[str, Any] | None:
    """Every `LoraConfig` field except PEFT's bookkeeping ([`PEFT_IGNORED_KEYS`]), or None for full fine-tunes."""
    if peft_config is None:
        return None
    values = peft_config.to_dict()
    return jsonable({key: value for key, value in values.items() if key not in PEFT_IGNORED_KEYS})

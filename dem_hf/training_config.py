"""Training settings for [`dem_hf.training`]: the base, its tokenizer, the `SFTConfig` of each run, LoRA checks.

Each run gets the user's `trl.SFTConfig` with its own `output_dir` and run name, token counting turned on and
settings the hardware cannot run turned off ([`run_config`]). A `peft.LoraConfig` is checked against the base's
module tree before training ([`check_peft_config`]). The settings that decide what a run learns are summarised
for `run_info.json` and the vectors' metadata ([`sft_config_summary`], [`peft_config_summary`]).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

SFT_SUMMARY_KEYS = (
    "learning_rate", "lr_scheduler_type", "warmup_steps", "warmup_ratio", "weight_decay", "optim", "max_steps",
    "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "packing",
    "packing_strategy", "padding_free", "completion_only_loss", "assistant_only_loss", "dataset_text_field",
    "loss_type", "seed", "bf16", "fp16", "gradient_checkpointing", "model_init_kwargs", "chat_template_path",
)
PEFT_SUMMARY_KEYS = (
    "peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "modules_to_save",
    "use_rslora", "rank_pattern", "alpha_pattern", "layers_to_transform", "init_lora_weights", "bias",
)


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

    Only LoRA is turned into vectors (DoRA, LoRA biases and the like are refused, see [`dem_hf.lora`]). Every
    listed target module (and `modules_to_save` entry) must exist in the base; a regex must match at least one
    module; adapters on the output layer are refused (TRL computes the loss from `lm_head.weight` directly).
    """
    from peft import LoraConfig
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    from .lora import _check_supported

    if not isinstance(peft_config, LoraConfig):
        raise ValueError(
            f"peft_config must be a peft.LoraConfig (distribution vectors are built from LoRA factors), got "
            f"{type(peft_config).__name__}."
        )
    _check_supported(peft_config.to_dict())
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
    """The training settings that decide what a run learns (for `run_info.json`, metadata and re-run checks)."""
    values = sft_config.to_dict()
    summary = {key: values[key] for key in SFT_SUMMARY_KEYS if key in values}
    summary["world_size"] = sft_config.world_size
    summary["total_train_batch_size"] = (
        sft_config.per_device_train_batch_size * sft_config.gradient_accumulation_steps * sft_config.world_size
    )
    return jsonable(summary)


def peft_config_summary(peft_config) -> dict[str, Any] | None:
    if peft_config is None:
        return None
    values = peft_config.to_dict()
    return jsonable({key: values[key] for key in PEFT_SUMMARY_KEYS if key in values})

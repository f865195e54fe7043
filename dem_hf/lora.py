"""Reading PEFT LoRA adapters into low-rank distribution vectors, exactly.

PEFT stores, per adapted module `m`, `m.lora_A.weight` (r × in) and `m.lora_B.weight` (out × r); the
module's delta is `B @ A * scaling` with `scaling = alpha / r` (or `alpha / sqrt(r)` under rsLoRA),
`alpha` and `r` possibly overridden per module by `alpha_pattern` / `rank_pattern`. Embedding adapters
use `lora_embedding_A` (r × vocab) and `lora_embedding_B` (dim × r) and their delta is transposed, as is
that of `fan_in_fan_out` (Conv1D) layers. `modules_to_save` are whole trained copies of a module: their
delta against the base is dense.

Variants whose delta is not a fixed linear function of the factors (DoRA, LoRA biases, trainable token
indices, `target_parameters`) are refused with a clear error rather than merged wrongly.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .tensors import TensorDict, TensorSource, fingerprint, open_weights, untied_state_dict
from .vectors import LORA_A, LORA_B, LoraModule

logger = logging.getLogger(__name__)  # stdlib: `dem-hf merge` need not import transformers

PEFT_PREFIX = "base_model.model."
FACTOR_KEYS = {
    ".lora_A.weight": ("A", False),
    ".lora_B.weight": ("B", False),
    ".lora_embedding_A": ("A", True),
    ".lora_embedding_B": ("B", True),
}


@dataclass
class LoraVectorParts:
    tensors: dict[str, torch.Tensor]
    lora_modules: dict[str, LoraModule]
    base_fingerprint: dict | None
    base_model_name_or_path: str | None
    default_name: str | None


def _pattern_value(module: str, patterns: dict, default):
    """PEFT-style per-module override: a key matches the module name or a dotted suffix / regex of it."""
    for key, value in (patterns or {}).items():
        if module == key or re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


def _scaling(config, module: str, rank: int) -> float:
    alpha = _pattern_value(module, config.get("alpha_pattern"), config["lora_alpha"])
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _check_supported(config: dict) -> None:
    peft_type = str(config.get("peft_type", "LORA")).upper().removeprefix("PEFTTYPE.")
    refusals = {
        "peft_type": peft_type != "LORA",
        "use_dora (DoRA's magnitude rescaling is not a linear delta)": config.get("use_dora"),
        "lora_bias": config.get("lora_bias"),
        "trainable_token_indices": config.get("trainable_token_indices"),
        "target_parameters": config.get("target_parameters"),
    }
    for what, refused in refusals.items():
        if refused:
            raise ValueError(
                f"Unsupported PEFT adapter ({what}: {config.get(what.split(' ')[0])!r}); dem_hf merges plain LoRA "
                "adapters (with rsLoRA, alpha/rank patterns and modules_to_save)."
            )


def _peft_model_base(model) -> TensorDict:
    """The base weights inside an in-memory `PeftModel`, under the base model's own tensor names."""
    tensors = {}
    for name, tensor in untied_state_dict(model).items():
        if ".lora_" in name or ".modules_to_save." in name:
            continue
        name = name.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".").replace(".original_module.", ".")
        tensors[name] = tensor
    return TensorDict(tensors)


def _load_adapter(adapter, adapter_name: str, **hub_kwargs):
    """(state dict with PEFT's saved keys, config dict, in-memory base or None, source name)."""
    try:
        from peft import PeftModel, get_peft_model_state_dict
    except ImportError as error:  # pragma: no cover - peft is a dependency
        raise ImportError("from_peft needs `pip install peft`.") from error
    if isinstance(adapter, PeftModel):
        if adapter_name not in adapter.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} not found; the model has {sorted(adapter.peft_config)}.")
        config = adapter.peft_config[adapter_name].to_dict()
        state = get_peft_model_state_dict(adapter, adapter_name=adapter_name)
        # Copies on the CPU: the vector must not follow weights that keep training, nor live on a GPU.
        return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}, config, _peft_model_base(adapter), None
    from safetensors.torch import load_file

    from .hub_download import resolve_pretrained

    folder = Path(resolve_pretrained(adapter, **hub_kwargs))
    config_file, weights_file = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not config_file.is_file():
        raise FileNotFoundError(f"{str(folder)!r} has no adapter_config.json; it is not a PEFT adapter folder.")
    if not weights_file.is_file():
        raise FileNotFoundError(f"{str(folder)!r} has no adapter_model.safetensors (only safetensors adapters are read).")
    return load_file(weights_file), json.loads(config_file.read_text()), None, folder.name


def _resolve_base(base, in_memory_base, config) -> tuple[TensorSource | None, str | None]:
    if base is not None:
        source, base_id, _ = open_weights(base)
        return source, base_id
    if in_memory_base is not None:
        return in_memory_base, config.get("base_model_name_or_path")
    base_id = config.get("base_model_name_or_path")
    if base_id:
        try:
            source, _, _ = open_weights(base_id, local_files_only=True)
            return source, base_id
        except (OSError, ValueError) as error:
            logger.warning(f"Base model {base_id!r} of the adapter is not available locally ({error}); "
                           "the vector gets no base fingerprint. Pass base=... to check it against its base.")
    return None, base_id


def vector_parts_from_peft(adapter, *, base=None, adapter_name: str = "default", **hub_kwargs) -> LoraVectorParts:
    """Split a PEFT LoRA adapter into low-rank factors, scalings and dense `modules_to_save` deltas."""
    state, config, in_memory_base, default_name = _load_adapter(adapter, adapter_name, **hub_kwargs)
    _check_supported(config)
    base_source, base_id = _resolve_base(base, in_memory_base, config)

    factors: dict[str, dict[str, torch.Tensor]] = {}
    transposed: dict[str, bool] = {}
    dense: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        key = key.removeprefix(PEFT_PREFIX)
        for suffix, (which, is_embedding) in FACTOR_KEYS.items():
            if key.endswith(suffix):
                target = key[: -len(suffix)] + ".weight"
                factors.setdefault(target, {})[which] = tensor
                transposed[target] = is_embedding or bool(config.get("fan_in_fan_out"))
                break
        else:
            if ".base_layer." in key:
                continue  # PEFT's copy of an adapted embedding's own base weight: no change
            dense[key] = tensor  # a modules_to_save copy: the whole trained module

    modules = {}
    tensors: dict[str, torch.Tensor] = {}
    for target, pair in factors.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"Adapter has only half of the LoRA factors for {target!r}: {sorted(pair)}.")
        rank = pair["A"].shape[0]
        module_name = target.removesuffix(".weight")
        modules[target] = LoraModule(scaling=_scaling(config, module_name, rank), transpose=transposed[target])
        tensors[target + LORA_A], tensors[target + LORA_B] = pair["A"], pair["B"]
    if isinstance(adapter, torch.nn.Module):
        _use_live_scalings(adapter, adapter_name, modules)

    if dense:
        if base_source is None:
            raise ValueError(
                f"The adapter saves whole modules ({sorted(dense)[:3]}); their delta needs the base: pass base=..."
            )
        absent = sorted(n for n in dense if n not in base_source)
        if absent:
            raise ValueError(f"The adapter's modules_to_save {absent[:5]} do not exist in the base model.")
        for name, trained in dense.items():
            base_tensor = base_source.get(name).detach().to("cpu", torch.float32)
            tensors[name] = (trained.to("cpu", torch.float32) - base_tensor).to(trained.dtype)
    if not tensors:
        raise ValueError("The adapter holds no LoRA factors and no modules_to_save: nothing to merge.")
    return LoraVectorParts(
        tensors=tensors,
        lora_modules=modules,
        base_fingerprint=fingerprint(base_source) if base_source is not None else None,
        base_model_name_or_path=base_id,
        default_name=default_name,
    )


def _use_live_scalings(model, adapter_name: str, modules: dict[str, LoraModule]) -> None:
    """For an in-memory PeftModel, take each module's scaling from the layer itself (exact by construction)."""
    for target, module in modules.items():
        layer = model.get_submodule(PEFT_PREFIX + target.removesuffix(".weight"))
        scaling = getattr(layer, "scaling", {}).get(adapter_name)
        if scaling is not None:
            module.scaling = float(scaling)

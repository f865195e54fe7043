"""Reading PEFT LoRA adapters into low-rank distribution vectors, exactly as PEFT's `merge_and_unload()` merges them.

The adapter is read with PEFT's own helpers: its config with `PeftConfig.from_pretrained` (or the live
`LoraConfig` of a `PeftModel`), its weights with `load_peft_weights` (or `get_peft_model_state_dict`), the
per-module rank and alpha with `get_pattern_key` (the matching `LoraModel` uses when it builds the layers), and
which modules the config targets with `check_target_module_exists`. Nothing of PEFT's matching is re-implemented.

Per adapted module `m`, PEFT stores `m.lora_A.weight` (r × in) and `m.lora_B.weight` (out × r); the delta is
`B @ A * scaling` with `scaling = alpha / r` (or `alpha / sqrt(r)` under rsLoRA). Embedding adapters use
`lora_embedding_A` / `lora_embedding_B` and their delta is transposed, as is that of `fan_in_fan_out` (Conv1D)
layers. These stay low-rank in the vector ([`~dem_hf.vectors.vector.LoraModule`]).

Every other tensor of the adapter is a whole tensor PEFT loads into the model: `modules_to_save` copies, trained
biases (`bias="lora_only"` or `"all"`) and embedding weights saved beside an embedding adapter. Its delta against
the base is dense and goes into the vector as such (dropped when it is zero).

Tied embeddings (a base that stores one tensor for the input embedding and the output head) merge as PEFT merges
them: LoRA on either changes the shared tensor. What PEFT's merge would *untie* (a `modules_to_save` copy of one
of them) or apply twice (LoRA on both, under `ensure_weight_tying`) is refused: the merged folder keeps the base's
layout, one tensor for both. Variants whose delta is not a fixed linear function of the factors (DoRA, LoRA
biases, trainable token indices, `target_parameters`, ...) and initialisations that change the base weights
(PiSSA, OLoRA, CorDA, LoftQ, ...) are refused with a clear error rather than merged wrongly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import logging
from ..io.tensors import (
    TensorDict,
    TensorSource,
    fingerprint,
    open_weights,
    untied_state_dict,
)
from .config import LORA_A, LORA_B, LoraModule

logger = logging.get_logger(__name__)

PEFT_PREFIX = "base_model.model."
FACTOR_KEYS = {
    ".lora_A.weight": ("A", False),
    ".lora_B.weight": ("B", False),
    ".lora_embedding_A": ("A", True),
    ".lora_embedding_B": ("B", True),
}
# Config fields whose delta is not B·A·scaling on the base (refused when set).
UNSUPPORTED_FIELDS = {
    "use_dora": "DoRA's magnitude rescaling is not a linear delta",
    "lora_bias": "a bias on lora_B",
    "trainable_token_indices": "trainable tokens",
    "target_parameters": "LoRA on parameters instead of modules",
    "layer_replication": "layers replicated by the adapter",
    "alora_invocation_tokens": "activated LoRA only acts after its invocation tokens",
    "use_qalora": "QA-LoRA pools the input",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA",
    "megatron_config": "Megatron parallel layers",
}
# init_lora_weights values that change the base weights: the adapter is relative to a base dem_hf does not have.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "mica")


@dataclass
class LoraVectorParts:
    tensors: dict[str, torch.Tensor]
    lora_modules: dict[str, LoraModule]
    base_fingerprint: dict | None
    base_model_name_or_path: str | None
    default_name: str | None


@dataclass
class _Adapter:
    state: dict[str, torch.Tensor]  # PEFT's saved keys without the `base_model.model.` prefix
    config: object  # peft.LoraConfig
    model: torch.nn.Module | None  # the PeftModel, when given in memory
    source: str  # for messages
    default_name: str | None


@dataclass
class _Base:
    source: TensorSource | None
    name: str | None
    tied: dict[str, str]  # {tensor the base does not store: the tensor it shares}, from the model class


# ------------------------------------------------------------------------------------------------ reading


def _load_adapter(adapter, adapter_name: str, **hub_kwargs) -> _Adapter:
    try:
        from peft import PeftModel, get_peft_model_state_dict
    except ImportError as error:  # pragma: no cover - peft is a dependency
        raise ImportError("from_peft needs `pip install peft`.") from error
    if isinstance(adapter, PeftModel):
        if adapter_name not in adapter.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} not found; the model has {sorted(adapter.peft_config)}.")
        state = get_peft_model_state_dict(adapter, adapter_name=adapter_name)
        # Copies on the CPU: the vector must not follow weights that keep training, nor live on a GPU.
        state = {k.removeprefix(PEFT_PREFIX): v.detach().to("cpu", copy=True) for k, v in state.items()}
        return _Adapter(state, adapter.peft_config[adapter_name], adapter, f"PeftModel adapter {adapter_name!r}", None)
    return _load_adapter_folder(adapter, **hub_kwargs)


def _load_adapter_folder(adapter, **hub_kwargs) -> _Adapter:
    from peft import PeftConfig
    from peft.utils.save_and_load import load_peft_weights

    from ..hub.download import resolve_pretrained

    adapter_files = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"]  # nothing else of the repo
    folder = Path(resolve_pretrained(adapter, allow_patterns=adapter_files, **hub_kwargs))
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{str(folder)!r} has no adapter_config.json; it is not a PEFT adapter folder.")
    if not any((folder / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")):
        raise FileNotFoundError(f"{str(folder)!r} has no adapter_model.safetensors (nor adapter_model.bin).")
    try:
        config = PeftConfig.from_pretrained(str(folder))
    except (TypeError, ValueError, KeyError, AttributeError) as error:
        raise ValueError(f"{str(config_file)!r} is not a valid PEFT adapter config: {error}") from error
    state = load_peft_weights(str(folder), device="cpu")
    return _Adapter({k.removeprefix(PEFT_PREFIX): v for k, v in state.items()}, config, None, str(folder), folder.name)


def check_supported_adapter(config) -> None:
    """Refuse adapters whose merge is not B·A·scaling on the base. `config` is a `LoraConfig` or its `to_dict()`."""
    if isinstance(config, dict):  # the training checks pass LoraConfig.to_dict()
        from types import SimpleNamespace

        config = SimpleNamespace(**config)
    peft_type = str(getattr(config, "peft_type", "LORA")).upper().removeprefix("PEFTTYPE.")
    if peft_type != "LORA":
        raise ValueError(f"Unsupported PEFT adapter type {peft_type!r}; dem_hf merges LoRA adapters.")
    for field, what in UNSUPPORTED_FIELDS.items():
        value = getattr(config, field, None)
        if value:
            raise ValueError(
                f"Unsupported PEFT adapter ({field}={value!r}: {what}); dem_hf merges plain LoRA adapters (with rsLoRA, "
                "alpha/rank patterns, trained biases and modules_to_save)."
            )
    init = str(getattr(config, "init_lora_weights", True)).lower()
    if init.startswith(BASE_CHANGING_INITS):
        raise ValueError(
            f"Unsupported PEFT adapter (init_lora_weights={init!r} changes the base weights, so the adapter is relative "
            "to another base); save it with `path_initial_model_for_weight_conversion=...` to convert it to plain LoRA."
        )


def _model_class_ties(model_class) -> dict[str, str]:
    ties = getattr(model_class, "_tied_weights_keys", None)
    return dict(ties) if isinstance(ties, dict) else {}


def _folder_ties(config: dict) -> dict[str, str]:
    import transformers

    ties = {}
    for architecture in config.get("architectures") or []:
        ties.update(_model_class_ties(getattr(transformers, architecture, None)))
    return ties


def _peft_model_base(model) -> TensorDict:
    """The base weights inside an in-memory `PeftModel`, under the base model's own tensor names."""
    tensors = {}
    for name, tensor in untied_state_dict(model).items():
        if ".lora_" in name or ".modules_to_save." in name:
            continue
        name = name.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".").replace(".original_module.", ".")
        tensors[name] = tensor
    return TensorDict(tensors)


def _resolve_base(base, adapter: _Adapter) -> _Base:
    if base is not None:
        source, base_id, config = open_weights(base)
        ties = _model_class_ties(type(base)) if hasattr(base, "state_dict") else _folder_ties(config)
        return _Base(source, base_id, ties)
    base_id = getattr(adapter.config, "base_model_name_or_path", None)
    if adapter.model is not None:
        if getattr(adapter.config, "bias", "none") != "none":
            raise ValueError(
                f"The adapter trains biases (bias={adapter.config.bias!r}) in the PeftModel's own base layers, so the "
                "model no longer holds the base's biases: pass base=... (the base model it was trained from)."
            )
        inner = adapter.model.get_base_model()
        return _Base(_peft_model_base(adapter.model), base_id, _model_class_ties(type(inner)))
    if base_id:
        try:
            source, _, config = open_weights(base_id, local_files_only=True)
            return _Base(source, base_id, _folder_ties(config))
        except (OSError, ValueError) as error:
            logger.warning(f"Base model {base_id!r} of the adapter is not available locally ({error}); "
                           "the vector gets no base fingerprint. Pass base=... to check it against its base.")
    return _Base(None, base_id, {})


# ------------------------------------------------------------------------------------------------ LoRA factors


def _split_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    """({module: {"A", "B", "embedding"}}, {key: whole tensor}) from PEFT's saved keys."""
    factors: dict[str, dict] = {}
    whole: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        for suffix, (which, is_embedding) in FACTOR_KEYS.items():
            if key.endswith(suffix):
                entry = factors.setdefault(key[: -len(suffix)], {})
                entry[which], entry["embedding"] = tensor, is_embedding
                break
        else:
            whole[key] = tensor
    return factors, whole


def _rank_and_alpha(config, module: str) -> tuple[int, float]:
    """The rank and alpha PEFT gives `module`, by PEFT's own pattern matching."""
    from peft.utils.other import get_pattern_key

    rank_pattern, alpha_pattern = getattr(config, "rank_pattern", None) or {}, getattr(config, "alpha_pattern", None) or {}
    rank = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), config.r)
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), config.lora_alpha)
    return rank, alpha


def _check_targeted(config, modules) -> None:
    """Refuse factors for modules the config does not target: PEFT would not load them."""
    from peft.tuners.tuners_utils import check_target_module_exists

    if isinstance(config.target_modules, str) and config.target_modules == "all-linear":
        return  # resolved against the model by PEFT; the saved factors are what it resolved to
    untargeted = sorted(m for m in modules if not check_target_module_exists(config, m))
    if untargeted:
        raise ValueError(
            f"The adapter holds LoRA factors for modules its config does not target: {untargeted[:5]} (PEFT would not "
            "load them); the adapter's config and weights do not belong together."
        )


def _lora_module(adapter: _Adapter, module: str, pair: dict, adapter_name: str) -> LoraModule:
    if set(pair) != {"A", "B", "embedding"}:
        raise ValueError(f"Adapter has only half of the LoRA factors for {module!r}: {sorted(set(pair) - {'embedding'})}.")
    a, b = pair["A"], pair["B"]
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(
            f"The adapter's LoRA factors for {module!r} have shapes {list(a.shape)} and {list(b.shape)}; dem_hf merges "
            "LoRA on Linear, Conv1D and Embedding layers (2-D factors), not convolutions."
        )
    rank, alpha = _rank_and_alpha(adapter.config, module)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise ValueError(f"The adapter's config gives {module!r} the rank {rank!r}; expected an integer > 0.")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise ValueError(f"The adapter's config gives {module!r} the lora_alpha {alpha!r}; expected a finite number.")
    if not (a.shape[0] == b.shape[1] == rank):
        raise ValueError(
            f"The adapter's LoRA factors for {module!r} have rank {a.shape[0]} (A) and {b.shape[1]} (B); its config "
            f"gives that module rank {rank}."
        )
    scaling = alpha / math.sqrt(rank) if adapter.config.use_rslora else alpha / rank
    if adapter.model is not None:  # exact by construction: the layer's own scaling (set_scale included)
        layer = adapter.model.get_submodule(PEFT_PREFIX + module)
        scaling = getattr(layer, "scaling", {}).get(adapter_name, scaling)
        transpose = pair["embedding"] or bool(getattr(layer, "fan_in_fan_out", False))
    else:
        transpose = pair["embedding"] or bool(adapter.config.fan_in_fan_out)
    if not isinstance(scaling, (int, float)) or isinstance(scaling, bool) or not math.isfinite(scaling):
        raise ValueError(f"The adapter gives {module!r} the scaling {scaling!r}; expected a finite number.")
    return LoraModule(scaling=float(scaling), transpose=transpose)


def _lora_targets(factors: dict[str, dict], base: _Base) -> dict[str, str]:
    """{module: base tensor its delta lands on}; LoRA on a tied tensor the base does not store lands on its twin."""
    targets = {module: module + ".weight" for module in factors}
    if base.source is None:
        return targets
    for module, target in targets.items():
        twin = base.tied.get(target)
        if target in base.source or twin is None or twin not in base.source:
            continue
        if twin.removesuffix(".weight") in factors:
            raise ValueError(
                f"The adapter has LoRA factors on both tied tensors {target!r} and {twin!r} (ensure_weight_tying?); the "
                "base stores them as one tensor and PEFT's merge_and_unload() adds the shared delta to it twice. "
                "dem_hf refuses rather than pick one."
            )
        targets[module] = twin
    return targets


# ------------------------------------------------------------------------------------------------ whole tensors


def _whole_tensor_deltas(whole: dict[str, torch.Tensor], base: _Base, source: str) -> dict[str, torch.Tensor]:
    """Dense deltas of the tensors PEFT loads whole (modules_to_save, trained biases, saved embeddings); zero ones dropped."""
    if not whole:
        return {}
    if base.source is None:
        raise ValueError(
            f"The adapter ({source}) saves whole tensors ({sorted(whole)[:3]}: modules_to_save, trained biases or "
            "embedding weights); their delta needs the base: pass base=..."
        )
    values = {key.replace(".base_layer.", "."): (key, tensor) for key, tensor in whole.items()}
    deltas = {}
    for name, (key, trained) in values.items():
        is_base_layer = ".base_layer." in key  # an adapted layer's own weight or bias, loaded in place by PEFT
        if name not in base.source:
            twin = base.tied.get(name)
            if not (is_base_layer and twin is not None and twin in base.source):
                _check_tied_copy(name, trained, values, base)
                continue
            name = twin  # the adapted layer's weight is the shared tensor itself
        if tuple(trained.shape) != tuple(base.source.shape(name)):
            raise ValueError(
                f"The adapter saves {key!r} with shape {list(trained.shape)}, the base's {name!r} has shape "
                f"{list(base.source.shape(name))} (a resized vocabulary, or another base?)."
            )
        delta = trained.detach().to("cpu", torch.float32) - base.source.get(name).detach().to("cpu", torch.float32)
        if delta.any():
            if not is_base_layer:
                _check_not_untied(name, values, base)
            deltas[name] = delta.to(trained.dtype)
    return deltas


def _check_tied_copy(name: str, trained: torch.Tensor, values: dict, base: _Base) -> None:
    """A saved tensor the base does not store: fine only as the identical copy of its tied twin (ensure_weight_tying)."""
    twin = base.tied.get(name)
    if twin is None or twin not in base.source:
        raise ValueError(f"The adapter's modules_to_save {[name]} do not exist in the base model.")
    if twin not in values or not torch.equal(values[twin][1], trained):
        raise ValueError(
            f"The adapter's modules_to_save {[name]} unties it from {twin!r}: PEFT's merged model changes one of the two "
            "tied tensors alone, but the base stores them as one tensor. Train with ensure_weight_tying=True, or on a "
            "base with tie_word_embeddings=False."
        )


def _check_not_untied(name: str, values: dict, base: _Base) -> None:
    """A modules_to_save copy of a tensor that the base shares with another: PEFT's merge unties them."""
    shared_with = [other for other, twin in base.tied.items() if twin == name and other not in base.source]
    if shared_with and not all(other in values for other in shared_with):
        raise ValueError(
            f"The adapter's modules_to_save {[name]} unties it from {shared_with}: PEFT's merged model changes "
            f"{name!r} alone, but the base stores the tied tensors as one. Train with ensure_weight_tying=True, or on a "
            "base with tie_word_embeddings=False."
        )


# ------------------------------------------------------------------------------------------------ entry point


def vector_parts_from_peft(adapter, *, base=None, adapter_name: str = "default", **hub_kwargs) -> LoraVectorParts:
    """Split a PEFT LoRA adapter into low-rank factors, scalings and dense deltas (modules_to_save, trained biases).

    Everything is checked before the result is returned; nothing is merged here.
    """
    loaded = _load_adapter(adapter, adapter_name, **hub_kwargs)
    check_supported_adapter(loaded.config)
    if loaded.model is not None and any(getattr(m, "merged_adapters", None) for m in loaded.model.modules()):
        raise ValueError("The PeftModel has merged adapters (merge_adapter()); unmerge them before making a vector.")
    resolved = _resolve_base(base, loaded)
    factors, whole = _split_state(loaded.state)
    targets = _lora_targets(factors, resolved)
    _check_targeted(loaded.config, factors)

    modules: dict[str, LoraModule] = {}
    tensors: dict[str, torch.Tensor] = {}
    for module, target in targets.items():
        modules[target] = _lora_module(loaded, module, factors[module], adapter_name)
        tensors[target + LORA_A], tensors[target + LORA_B] = factors[module]["A"], factors[module]["B"]
    tensors.update(_whole_tensor_deltas(whole, resolved, loaded.source))
    if not tensors:
        raise ValueError("The adapter holds no LoRA factors and no trained tensors: nothing to merge.")
    return LoraVectorParts(
        tensors=tensors,
        lora_modules=modules,
        base_fingerprint=fingerprint(resolved.source) if resolved.source is not None else None,
        base_model_name_or_path=resolved.name,
        default_name=loaded.default_name,
    )

"""Uniform, tensor-at-a-time views of weights, whether in a folder or in memory; base fingerprints; and the checks
that two models can be subtracted.

A *tensor source* answers `keys()`, `shape(name)`, `dtype(name)` / `dtype_name(name)`, `get(name)` and
`head(name, count)` (torch), and `read_array(name, start, stop)` / `head_float32(name, count)` (NumPy).
[`CheckpointReader`] is the on-disk source; [`TensorDict`] wraps tensors already in memory, and
[`model_tensors`] turns a `PreTrainedModel` into one, dropping tied duplicates exactly as
`save_pretrained` does so that the names match the model's checkpoint.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from .dtypes import FLOAT_DTYPES, dtype_name_of_torch, to_float32, torch_dtype_label
from .reader import CheckpointReader, to_numpy

if TYPE_CHECKING:
    import torch

FINGERPRINT_SAMPLED_TENSORS = 4
FINGERPRINT_SAMPLED_VALUES = 64
ARCHITECTURE_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "tie_word_embeddings")


class TensorSource(Protocol):
    def keys(self) -> list[str]: ...
    def __contains__(self, name: str) -> bool: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def dtype(self, name: str) -> torch.dtype: ...
    def dtype_name(self, name: str) -> str: ...
    def get(self, name: str) -> torch.Tensor: ...
    def head(self, name: str, count: int) -> torch.Tensor: ...
    def read_array(self, name: str, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray: ...
    def head_float32(self, name: str, count: int) -> np.ndarray: ...


class TensorDict:
    """A tensor source over a `{name: tensor}` dict held in memory. `get` returns the stored tensor itself."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.tensors[name].dtype

    def dtype_name(self, name: str) -> str:
        return dtype_name_of_torch(self.tensors[name].dtype)

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def head(self, name: str, count: int) -> torch.Tensor:
        return self.tensors[name].reshape(-1)[:count]

    def read_array(self, name: str, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows `start:stop` as NumPy (storage dtype, see [`dem_hf.io.dtypes`]): a view on CPU, copied into `out` if given."""
        tensor = self.tensors[name]
        rows = to_numpy(tensor if tensor.dim() == 0 else tensor[start:stop])
        if out is None:
            return rows
        flat = out.reshape(-1)[: rows.size]
        np.copyto(flat, rows.reshape(-1))
        return flat.reshape(rows.shape)

    def head_float32(self, name: str, count: int) -> np.ndarray:
        values = to_numpy(self.tensors[name].reshape(-1)[:count])
        return to_float32(values, self.dtype_name(name))


def untied_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict without tied duplicates (first name wins), detached, as `save_pretrained` keeps it."""
    kept: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    for name, tensor in model.state_dict().items():
        identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and identity in seen:
            continue
        seen.add(identity)
        kept[name] = tensor.detach()
    return kept


def model_tensors(model: torch.nn.Module) -> TensorDict:
    """A tensor source over an in-memory model's own parameters and buffers (no copies)."""
    return TensorDict(untied_state_dict(model))


def open_weights(model_or_path, **hub_kwargs) -> tuple[TensorSource, str | None, dict]:
    """Open a model given as a folder, a Hub id or a `PreTrainedModel`.

    Returns the tensor source, the name or path it came from (or None for an anonymous in-memory model)
    and the model's config as a dict (empty if unknown).
    """
    if hasattr(model_or_path, "state_dict"):  # a torch module (checked without importing torch)
        config = getattr(model_or_path, "config", None)
        name = getattr(config, "_name_or_path", None) or None
        return model_tensors(model_or_path), name, (config.to_dict() if config is not None else {})
    if not isinstance(model_or_path, (str, os.PathLike)):
        raise ValueError(
            f"Expected a model folder, a Hub id or a PreTrainedModel, got {type(model_or_path).__name__}."
        )
    from ..hub.download import resolve_checkpoint

    folder = resolve_checkpoint(model_or_path, **hub_kwargs)  # from the Hub: config, tokenizer, safetensors only
    config_file = Path(folder) / "config.json"
    config = {}
    if config_file.is_file():
        import json

        config = json.loads(config_file.read_text())
    return CheckpointReader(folder), str(model_or_path), config


def _digest(parts: list[bytes]) -> str:
    hasher = hashlib.sha256()
    for part in parts:
        hasher.update(part)
        hasher.update(b"\0")
    return hasher.hexdigest()[:16]


def fingerprint(source: TensorSource) -> dict[str, str | int]:
    """Identify a base model cheaply: names and shapes, dtypes, and a hash of a sample of values.

    Only a few values of a few tensors are read, so this costs milliseconds even for a 7B checkpoint.
    Values are hashed as float32, so the `values` part does not depend on the storage dtype (the `dtypes`
    part tells dtypes apart).
    """
    names = sorted(source.keys())
    float_names = [n for n in names if source.dtype_name(n) in FLOAT_DTYPES and source.shape(n)]
    step = max(1, len(float_names) // FINGERPRINT_SAMPLED_TENSORS)
    sampled = float_names[::step][:FINGERPRINT_SAMPLED_TENSORS]
    values = [source.head_float32(name, FINGERPRINT_SAMPLED_VALUES).tobytes() for name in sampled]
    return {
        "num_tensors": len(names),
        "structure": _digest([f"{n}:{list(source.shape(n))}".encode() for n in names]),
        "dtypes": _digest([f"{n}:{torch_dtype_label(source.dtype_name(n))}".encode() for n in names]),
        "values": _digest([n.encode() for n in sampled] + values),
    }


def fingerprint_mismatch(expected: dict, actual: dict) -> str | None:
    """Say how two fingerprints differ, in words, or return None when they identify the same weights.

    Values are hashed as float32, so a base stored in bf16 and the same base loaded in float32 match: the
    delta of a vector computed against either applies to both.
    """
    if expected == actual:
        return None
    if expected.get("structure") != actual.get("structure"):
        return (
            f"tensor names or shapes differ ({expected.get('num_tensors')} tensors expected, "
            f"{actual.get('num_tensors')} found)"
        )
    if expected.get("values") != actual.get("values"):
        return "weight values differ (same architecture, different weights)"
    return None  # only the storage dtypes differ (e.g. a bf16 checkpoint loaded in float32): same weights


def check_same_architecture(base_config: dict, tuned_config: dict) -> None:
    """Compare the config keys that decide whether two checkpoints can be subtracted."""
    for key in ARCHITECTURE_KEYS:
        if key in base_config and key in tuned_config and base_config[key] != tuned_config[key]:
            what = "vocab-size mismatch" if key == "vocab_size" else f"{key} differs"
            raise ValueError(
                f"Base and fine-tuned model are not the same architecture ({what}): "
                f"base {key}={base_config[key]!r}, fine-tuned {key}={tuned_config[key]!r}."
            )


def check_same_tensors(base: TensorSource, tuned: TensorSource) -> None:
    """Same tensor names and shapes on both sides, and float where the other is float, or a `ValueError`."""
    base_names, tuned_names = set(base.keys()), set(tuned.keys())
    if missing := sorted(base_names - tuned_names):
        raise ValueError(f"The fine-tuned model lacks tensors of the base: {missing[:5]}{' ...' if len(missing) > 5 else ''}.")
    if extra := sorted(tuned_names - base_names):
        raise ValueError(f"The fine-tuned model has tensors the base lacks: {extra[:5]}{' ...' if len(extra) > 5 else ''}.")
    for name in base.keys():
        if base.shape(name) != tuned.shape(name):
            raise ValueError(f"Shape of {name!r} differs: base {list(base.shape(name))}, fine-tuned {list(tuned.shape(name))}.")
        if (base.dtype_name(name) in FLOAT_DTYPES) != (tuned.dtype_name(name) in FLOAT_DTYPES):
            raise ValueError(
                f"Dtype of {name!r} differs: base {base.dtype(name)}, fine-tuned {tuned.dtype(name)}; a float tensor "
                "can only be compared with a float tensor (float dtypes may differ: deltas are taken in float32)."
            )

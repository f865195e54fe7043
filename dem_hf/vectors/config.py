"""Reading a saved vector's `vector_config.json`, every field checked.

A vector folder may have been edited by hand or written by another version: each field is checked for its type
and range (finite LoRA scalings, known vector types, a well-formed base fingerprint), the LoRA module table
against the factors actually stored (present, 2-D, ranks that agree), and unknown fields are refused. A problem
is a `ValueError` naming the file and the field, never a `TypeError`/`KeyError` traceback or a silent default.

Like [`dem_hf.vectors.vector`], this module imports no torch: `dem-hf merge` reads vector configs without it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

VECTOR_TYPES = ("full", "lora")
LORA_A, LORA_B = ".lora_A", ".lora_B"
REQUIRED_FIELDS = ("name", "vector_type")
OPTIONAL_FIELDS = ("base_model_name_or_path", "base_fingerprint", "lora_modules", "metadata", "dem_hf_version")
FINGERPRINT_FIELDS = ("num_tensors", "structure", "dtypes", "values")
LORA_MODULE_FIELDS = ("scaling", "transpose")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")


def check_vector_name(name: Any) -> str:
    """A vector or dataset name must be usable as a folder name and a CLI token."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or name in {".", ".."}:
        raise ValueError(
            f"Invalid name {name!r}: expected 1-96 characters from letters, digits, '.', '_' and '-', "
            "starting with a letter or digit (it becomes a folder name)."
        )
    return name


@dataclass
class VectorConfig:
    """The checked content of a `vector_config.json`; `lora_modules` maps a base tensor to `(scaling, transpose)`."""

    name: str
    vector_type: str
    base_model_name_or_path: str | None = None
    base_fingerprint: dict | None = None
    lora_modules: dict[str, tuple[float, bool]] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)


def _problem(config_file: Path, where: str, what: str) -> ValueError:
    return ValueError(f"{str(config_file)!r}, field {where!r}: {what}.")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_vector_config(config_file: str | Path) -> VectorConfig:
    """Parse and check `vector_config.json`; raise `ValueError` naming the file and the first bad field."""
    config_file = Path(config_file)
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{str(config_file)!r} is not valid JSON: {error}") from error
    if not isinstance(config, dict):
        raise ValueError(f"{str(config_file)!r}: expected a JSON object, got {type(config).__name__}.")
    unknown = sorted(set(config) - set(REQUIRED_FIELDS) - set(OPTIONAL_FIELDS))
    if unknown:
        raise ValueError(
            f"{str(config_file)!r} has unknown field(s) {unknown}; a vector config has {list(REQUIRED_FIELDS + OPTIONAL_FIELDS)} "
            "(written by a newer dem_hf?)."
        )
    for required in REQUIRED_FIELDS:
        if required not in config:
            raise _problem(config_file, required, "missing")
    try:
        name = check_vector_name(config["name"])
    except ValueError as error:
        raise _problem(config_file, "name", str(error).rstrip(".")) from None
    lora_modules = _lora_modules(config_file, config.get("lora_modules", {}))
    vector_type = config["vector_type"]
    if vector_type not in VECTOR_TYPES:
        raise _problem(config_file, "vector_type", f"expected one of {list(VECTOR_TYPES)}, got {vector_type!r}")
    if (vector_type == "lora") != bool(lora_modules):
        have = "is empty" if not lora_modules else f"has {len(lora_modules)} modules"
        raise _problem(config_file, "vector_type", f"{vector_type!r} but 'lora_modules' {have}")
    base_id = config.get("base_model_name_or_path")
    if base_id is not None and not isinstance(base_id, str):
        raise _problem(config_file, "base_model_name_or_path", f"expected null or a string, got {base_id!r}")
    metadata = config.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise _problem(config_file, "metadata", f"expected null or an object, got {metadata!r}")
    version = config.get("dem_hf_version")
    if version is not None and not isinstance(version, str):
        raise _problem(config_file, "dem_hf_version", f"expected a string, got {version!r}")
    return VectorConfig(
        name=name,
        vector_type=vector_type,
        base_model_name_or_path=base_id,
        base_fingerprint=_base_fingerprint(config_file, config.get("base_fingerprint")),
        lora_modules=lora_modules,
        metadata=metadata or {},
    )


def _base_fingerprint(config_file: Path, value: Any) -> dict | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _problem(config_file, "base_fingerprint", f"expected null or an object with {list(FINGERPRINT_FIELDS)}, got {value!r}")
    if sorted(value) != sorted(FINGERPRINT_FIELDS):
        raise _problem(config_file, "base_fingerprint", f"expected the fields {list(FINGERPRINT_FIELDS)}, got {sorted(value)}")
    count = value["num_tensors"]
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise _problem(config_file, "base_fingerprint.num_tensors", f"expected an integer >= 0, got {count!r}")
    for key in FINGERPRINT_FIELDS[1:]:
        if not isinstance(value[key], str):
            raise _problem(config_file, f"base_fingerprint.{key}", f"expected a string, got {value[key]!r}")
    return value


def _lora_modules(config_file: Path, value: Any) -> dict[str, tuple[float, bool]]:
    if not isinstance(value, dict):
        raise _problem(
            config_file, "lora_modules",
            f"expected an object mapping base tensor names to {{'scaling': number, 'transpose': bool}}, got {type(value).__name__}",
        )
    modules = {}
    for name, entry in value.items():
        where = f"lora_modules.{name}"
        if not isinstance(entry, dict) or sorted(entry) != list(LORA_MODULE_FIELDS):
            got = sorted(entry) if isinstance(entry, dict) else repr(entry)
            raise _problem(config_file, where, f"expected the fields {list(LORA_MODULE_FIELDS)}, got {got}")
        scaling, transpose = entry["scaling"], entry["transpose"]
        if not _is_number(scaling) or not math.isfinite(scaling):
            raise _problem(config_file, f"{where}.scaling", f"expected a finite number, got {scaling!r}")
        if not isinstance(transpose, bool):
            raise _problem(config_file, f"{where}.transpose", f"expected true or false, got {transpose!r}")
        modules[name] = (float(scaling), transpose)
    return modules


def check_lora_factors(config_file: str | Path, lora_modules: dict, tensors) -> None:
    """Check the LoRA module table against the stored tensors: both factors of each module, 2-D, of one rank, and no
    factor without its module. `tensors` is a tensor source (names and shapes only are read)."""
    config_file = Path(config_file)
    names = set(tensors.keys())
    for module in lora_modules:
        where = f"lora_modules.{module}"
        for suffix in (LORA_A, LORA_B):
            if module + suffix not in names:
                raise _problem(config_file, where, f"the vector has no tensor {module + suffix!r} (its LoRA factor)")
        a_shape, b_shape = list(tensors.shape(module + LORA_A)), list(tensors.shape(module + LORA_B))
        if len(a_shape) != 2 or len(b_shape) != 2:
            raise _problem(config_file, where, f"LoRA factors must be 2-D, got lora_A {a_shape} and lora_B {b_shape}")
        if a_shape[0] != b_shape[1]:
            raise _problem(config_file, where, f"rank {a_shape[0]} in lora_A {a_shape} but {b_shape[1]} in lora_B {b_shape}")
    for name in sorted(names):
        for suffix in (LORA_A, LORA_B):
            if name.endswith(suffix) and name.removesuffix(suffix) not in lora_modules:
                raise _problem(
                    config_file, "lora_modules",
                    f"tensor {name!r} is a LoRA factor but 'lora_modules' has no entry {name.removesuffix(suffix)!r}",
                )


@dataclass
class LoraModule:
    """How to rebuild one module's delta from its factors: `(B @ A) * scaling`, transposed if `transpose`."""

    scaling: float
    transpose: bool = False

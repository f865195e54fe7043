"""The facts a DEM model card states, gathered offline: see [`dem_hf.merging.card.render`] for how they are rendered.

- the base model: its Hub id ([`hub_id_of`]), how to name it, and its license, read from its `README.md` in a local
  folder or the Hugging Face cache (never downloaded);
- the vectors: their training data (Hub dataset ids are told from local names by [`is_hub_dataset_id`]), size and
  training run ([`CardFacts`]);
- the coefficient search: the parts of a saved search result the card shows, read defensively ([`SearchSummary`]);
- the framework versions ([`framework_versions`]).
"""

from __future__ import annotations

import math
import platform
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import yaml

from ... import __version__, logging
from ...hub.download import hub_id_of
from ...hub.push import validate_repo_id
from ..config import DEMConfig

logger = logging.get_logger(__name__)

CARD_NAME = "README.md"
DATA_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".parquet", ".arrow", ".txt", ".gz", ".zip", ".zst")
VERSIONED_PACKAGES = (
    ("Transformers", "transformers"),
    ("PyTorch", "torch"),
    ("huggingface_hub", "huggingface_hub"),
    ("PEFT", "peft"),
)


# ------------------------------------------------------------------------------------------------ ids and versions


def framework_versions() -> dict[str, str]:
    """Installed versions of dem_hf, Python and the libraries a DEM model is built with, in a fixed order."""
    versions = {"dem_hf": __version__}
    for label, package in VERSIONED_PACKAGES:
        try:
            versions[label] = importlib_metadata.version(package)
        except importlib_metadata.PackageNotFoundError:
            continue
    versions["Python"] = platform.python_version()
    return versions


def is_hub_dataset_id(name: Any) -> bool:
    """Whether `name` looks like a Hub dataset id (`namespace/name`) rather than a local name or file.

    Bare names (`"math"`) are treated as local names: they are valid repo ids, but nothing tells them apart from a
    vector's or a folder's name. Existing local paths and names ending like data files are local too.
    """
    if not isinstance(name, str) or name.count("/") != 1 or name.lower().endswith(DATA_FILE_SUFFIXES):
        return False
    try:
        validate_repo_id(name)
    except ValueError:
        return False
    return not Path(name).exists()


def card_metadata(text: str) -> dict[str, Any]:
    """The YAML metadata block at the top of a model card (between two `---` lines), as a dict; `{}` without one.

    Only the base's license is read this way (`huggingface_hub.ModelCard` would import the whole Hub client, about
    0.4 s of a merge's start-up). Raises `yaml.YAMLError` or `ValueError` for a block that is not a YAML mapping.
    """
    lines = text.lstrip().splitlines()
    if not lines or lines[0].rstrip() != "---":
        return {}
    end = next((i for i, line in enumerate(lines[1:], start=1) if line.rstrip() == "---"), None)
    if end is None:
        return {}
    metadata = yaml.safe_load("\n".join(lines[1:end])) or {}
    if not isinstance(metadata, dict):
        raise ValueError(f"The metadata block is a {type(metadata).__name__}, expected a mapping.")
    return metadata


# ------------------------------------------------------------------------------------------------ facts


@dataclass
class CardFacts:
    """What the card says about the base and the vectors, gathered once (offline)."""

    base_model: str | None
    base_display: str
    license: str | None
    license_name: str | None
    license_link: str | None
    vector_datasets: dict[str, list[str]]
    vector_details: dict[str, str]

    @classmethod
    def collect(
        cls, config: DEMConfig, merger: Any | None, vectors: Mapping[str, Any], *, base_model: str | None, base_folder
    ) -> CardFacts:
        reference = config.base_model_name_or_path
        if base_model is not None:
            validate_repo_id(base_model)
        hub_id = base_model or hub_id_of(reference)
        folder = Path(base_folder) if base_folder is not None else _base_folder(reference, merger)
        license_fields = _base_license(folder, hub_id)
        return cls(
            base_model=hub_id,
            base_display=_base_display(reference, hub_id),
            license=license_fields.get("license"),
            license_name=license_fields.get("license_name"),
            license_link=license_fields.get("license_link"),
            vector_datasets={name: _datasets_of(name, info) for name, info in config.vectors.items()},
            vector_details={name: _vector_details(info, vectors.get(name)) for name, info in config.vectors.items()},
        )

    @property
    def hub_datasets(self) -> list[str]:
        seen: list[str] = []
        for names in self.vector_datasets.values():
            seen += [name for name in names if is_hub_dataset_id(name) and name not in seen]
        return seen


def _base_folder(reference: str | None, merger: Any | None) -> Path | None:
    if merger is not None and getattr(merger, "base_folder", None) is not None:
        return Path(merger.base_folder)
    if reference is not None and Path(reference).expanduser().is_dir():
        return Path(reference).expanduser()
    return None


def _base_license(folder: Path | None, hub_id: str | None) -> dict[str, str]:
    """`license` (and `license_name`/`license_link` for `other`) from the base's README.md, if it is on disk: in
    the base folder, else in the Hugging Face cache for the base's Hub id (never downloaded)."""
    readme = folder / CARD_NAME if folder is not None else None
    if (readme is None or not readme.is_file()) and hub_id is not None:
        # heavy: huggingface_hub.file_download pulls in httpx; only a base known by its Hub id needs it
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(hub_id, CARD_NAME)
        readme = Path(cached) if isinstance(cached, str) else None
    if readme is None or not readme.is_file():
        return {}
    try:
        data = card_metadata(readme.read_text(encoding="utf-8-sig"))
    except (ValueError, OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        logger.info(f"Could not read the base model's card {readme}: {error}")
        return {}
    fields = {key: data.get(key) for key in ("license", "license_name", "license_link")}
    return {key: str(value) for key, value in fields.items() if isinstance(value, str) and value}


def _base_display(reference: str | None, hub_id: str | None) -> str:
    if hub_id is not None:
        return f"[{hub_id}](https://huggingface.co/{hub_id})"
    if reference is None:
        return "an unrecorded base model"
    return f"a local model (`{Path(reference).name}`)"


def _datasets_of(name: str, info: Mapping[str, Any]) -> list[str]:
    """The training data of one vector: `metadata["dataset"]` / `["datasets"]`, else the vector's own name."""
    meta = info.get("metadata") or {}
    found: list[str] = []
    for key in ("datasets", "dataset"):
        value = meta.get(key)
        values = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else []
        found += [str(v) for v in values if isinstance(v, str) and v and str(v) not in found]
    return found or [name]


def _vector_details(info: Mapping[str, Any], vector: Any | None) -> str:
    """A short description of a vector's size (from the loaded vector) and training run (from its metadata)."""
    parts = []
    if vector is not None:
        parts.append(_vector_size(vector))
    compute = (info.get("metadata") or {}).get("compute") or {}
    if isinstance(compute, Mapping):
        if isinstance(compute.get("global_step"), int):
            parts.append(f"{compute['global_step']:,} steps")
        if isinstance(compute.get("tokens_seen"), int):
            parts.append(f"{compute['tokens_seen']:,} tokens")
    return ", ".join(parts) or "-"


def _vector_size(vector: Any) -> str:
    if not vector.lora_modules:
        return f"{len(vector.target_names)} tensors"
    ranks = sorted({vector.tensors.shape(module + ".lora_A")[0] for module in vector.lora_modules})
    rank = f"r={ranks[0]}" if len(ranks) == 1 else f"r={ranks[0]}-{ranks[-1]}"
    dense = len(vector.dense_names) - 2 * len(vector.lora_modules)
    extra = f" + {dense} dense tensors" if dense > 0 else ""
    return f"LoRA {rank} on {len(vector.lora_modules)} modules{extra}"


# ------------------------------------------------------------------------------------------------ search


@dataclass
class SearchSummary:
    """The parts of a `search_result` dict (`dem_hf.search.run.SearchResult.to_dict()`) the card shows.

    Read defensively: any key may be missing, so cards of configs written by older or newer versions still render.
    """

    strategy: str | None
    objective: str | None
    metric: str | None
    best_objective: float | None
    best_coefficients: dict[str, float]
    num_candidates: int | None
    wall_time: float | None
    compute: float | None
    candidates: list[dict[str, Any]]
    perplexities: dict[str, float]
    base_perplexities: dict[str, float]
    set_tokens: dict[str, int]

    @classmethod
    def read(cls, result: Mapping[str, Any] | None) -> SearchSummary | None:
        if not isinstance(result, Mapping):
            return None
        candidates = [_candidate(c) for c in _first(result, "candidates", "history", "trials", default=[]) or []]
        candidates = [c for c in candidates if c is not None]
        best_coefficients = _numbers(_summarised(_first(result, "best_coefficients", default=None)))
        best_value = _number(_first(result, "best_objective", default=None))
        best = _best_candidate(candidates, best_coefficients)
        if best is not None:
            best_coefficients = best_coefficients or best["coefficients"]
            best_value = best_value if best_value is not None else best["objective"]
        perplexities = best["perplexities"] if best is not None else {}
        objective = _first(result, "objective", "objective_name", default=None)
        search_config = result.get("search_config") if isinstance(result.get("search_config"), Mapping) else {}
        count = _first(result, "num_candidates", "num_evaluations", default=None)
        return cls(
            strategy=_text(_first(result, "strategy", default=None) or search_config.get("strategy")),
            objective=_text(objective if isinstance(objective, str) else None),
            metric=_text(_first(result, "metric", default=None) or search_config.get("metric")),
            best_objective=best_value,
            best_coefficients=best_coefficients,
            num_candidates=count if isinstance(count, int) and not isinstance(count, bool) else len(candidates) or None,
            wall_time=_number(_first(result, "wall_time_s", "wall_time", default=None)),
            compute=_number(_first(result, "compute", default=None)),
            candidates=candidates,
            perplexities=perplexities,
            base_perplexities=_numbers(_first(result, "base_perplexities", default=None)),
            set_tokens=_set_tokens(result.get("eval_sets")),
        )


def _first(mapping: Mapping[str, Any], *keys: str, default: Any) -> Any:
    for key in keys:
        if key in mapping and mapping[key] is not None:
            return mapping[key]
    return default


def _number(value: Any) -> float | None:
    if isinstance(value, Mapping):
        value = _first(value, "perplexity", "value", default=None)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _numbers(values: Any) -> dict[str, float]:
    if not isinstance(values, Mapping):
        return {}
    numbers = {str(name): _number(value) for name, value in values.items()}
    return {name: value for name, value in numbers.items() if value is not None}


def _text(value: Any) -> str | None:
    return str(value) if value not in (None, "") else None


def _set_tokens(eval_sets: Any) -> dict[str, int]:
    if not isinstance(eval_sets, Mapping):
        return {}
    tokens = {str(n): info.get("num_tokens") for n, info in eval_sets.items() if isinstance(info, Mapping)}
    return {n: t for n, t in tokens.items() if isinstance(t, int) and not isinstance(t, bool)}


def _candidate(entry: Any) -> dict[str, Any] | None:
    if not isinstance(entry, Mapping):
        return None
    coefficients = _numbers(_summarised(_first(entry, "coefficients", default=None)))
    if not coefficients:
        return None
    return {
        "coefficients": coefficients,
        "objective": _number(_first(entry, "objective", "value", default=None)),
        "perplexities": _numbers(_first(entry, "perplexities", default=None)),
    }


def _summarised(coefficients: Any) -> Any:
    """Per-group coefficients (`{vector: {group: ω}}`) with each vector's groups replaced by their mean."""
    if not isinstance(coefficients, Mapping):
        return coefficients
    return {n: (_mean(v) if isinstance(v, Mapping) else v) for n, v in coefficients.items()}


def _mean(values: Mapping[str, Any]) -> float | None:
    numbers = [v for v in values.values() if _number(v) is not None]
    return sum(numbers) / len(numbers) if numbers else None


def _best_candidate(candidates: list[dict[str, Any]], coefficients: dict[str, float]) -> dict[str, Any] | None:
    if coefficients:
        matching = [c for c in candidates if c["coefficients"] == coefficients]
        if matching:
            return matching[0]
    scored = [c for c in candidates if c["objective"] is not None]
    return min(scored, key=lambda c: c["objective"]) if scored else None

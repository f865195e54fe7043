"""`DEMConfig` and the JSON config mixin every dem_hf config uses, saved beside the standard Transformers files.

Configs follow the PEFT/TRL habit: plain dataclasses whose fields carry `metadata={"help": ...}` (so
`transformers.HfArgumentParser` can build a command line from them), validated in `__post_init__`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .. import __version__

logger = logging.getLogger(__name__)  # stdlib: `dem-hf merge` need not import transformers

WEIGHTINGS = ("sum", "average")


class JsonConfigMixin:
    """`save_pretrained` / `from_pretrained` of a dataclass as one JSON file.

    Keys written by a newer dem_hf that this version does not know are dropped with a warning rather than
    failing, so old code can still read new folders.
    """

    config_name: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            logger.warning(
                f"Ignoring unknown keys {unknown} in {cls.__name__} (written by a newer dem_hf?); "
                f"this is dem_hf {__version__}."
            )
        return cls(**{key: value for key, value in values.items() if key in known})

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write the config as `<save_directory>/<config_name>` and return the file's path."""
        path = Path(save_directory) / self.config_name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        subfolder: str | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        force_download: bool = False,
    ):
        """Read `<config_name>` from a folder, or from a Hub repo (only that file is downloaded).

        The Hub arguments are Transformers' (see [`dem_hf.hub.download.resolve_pretrained`]).
        """
        from ..hub.download import resolve_pretrained

        try:
            directory = resolve_pretrained(
                pretrained_model_name_or_path, subfolder=subfolder, revision=revision, token=token, cache_dir=cache_dir,
                local_files_only=local_files_only, force_download=force_download, allow_patterns=[cls.config_name],
            )
        except FileNotFoundError as error:
            raise FileNotFoundError(f"No {cls.config_name} found: {error}") from error
        path = Path(directory) / cls.config_name
        if not path.is_file():
            raise FileNotFoundError(f"No {cls.config_name} in {str(pretrained_model_name_or_path)!r}.")
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{str(path)!r} is not valid JSON: {error}") from error
        return cls.from_dict(values)


def check_coefficients(coefficients: dict[str, float], known: list[str] | None = None) -> dict[str, float]:
    """Validate a `{vector name: weight}` mapping: finite numbers, and only known names if given.

    A weight may be any real number: a Python `int`/`float`, a NumPy scalar (`np.float32(0.5)`), a torch or NumPy
    array holding exactly one value (`torch.tensor(0.5)`), a `fractions.Fraction`. It is returned as a plain Python
    `float`, so configs stay JSON. Booleans, NaN/inf, strings, complex numbers and arrays of more than one value are
    refused with a `ValueError`.
    """
    if not isinstance(coefficients, dict):
        raise ValueError(f"Expected coefficients as a dict {{vector name: weight}}, got {type(coefficients).__name__}.")
    if known is not None:
        unknown = sorted(set(coefficients) - set(known))
        if unknown:
            raise ValueError(f"Coefficients name unknown vectors {unknown}; the vectors are {sorted(known)}.")
    return {name: _finite_number(name, weight) for name, weight in coefficients.items()}


def _finite_number(name: str, weight: Any) -> float:
    """`weight` as a Python float, unwrapping one-value NumPy/torch arrays (without importing either library)."""
    shape = getattr(weight, "shape", None)
    if shape is not None and callable(getattr(weight, "item", None)) and not isinstance(weight, (str, bytes)):
        if math.prod(shape) != 1:
            raise ValueError(
                f"Coefficient for {name!r} must be one number, got an array of shape {tuple(shape)}: {weight!r}."
            )
        weight = weight.item()  # NumPy and torch scalars become Python bool/int/float
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
        raise ValueError(f"Coefficient for {name!r} must be a finite number, got {weight!r}.")
    return float(weight)


@dataclass
class DEMConfig(JsonConfigMixin):
    """Configuration of a Distribution-Edited Model, stored as `dem_config.json` beside the merged weights.

    Args:
        base_model_name_or_path: the base model θ the vectors were computed against: a Hub id, or the absolute
            path of a local folder (so a saved DEM folder restores from any working directory; configs written
            before dem_hf recorded absolute paths may hold a path relative to the working directory).
        base_revision: the commit of the base's Hub repo that was merged (recorded when the base is a Hub id).
        weighting: `"sum"` for DEM's free weights θ + Σ ω_i Δ_i (task arithmetic), or `"average"` for
            the normalised convention θ + Σ (ω_i / Σω) Δ_i, i.e. the weighted parameter average of the
            fine-tuned models (the data-ablation convention).
        coefficients: `{vector name: ω}` used by the last merge (or found by the search).
        vectors: `{vector name: {"vector_type", "source", ...}}` describing each distribution vector. `"source"`
            is the absolute path of the folder the vector was read from, or a Hub repo id with `"revision"` (a
            commit) and `"subfolder"`; `None` for a vector built in memory (saved under the DEM folder's `vectors/`).
        search_result: the last coefficient search (see [`SearchResult`]), if any.
        max_shard_size: cap per weight shard written by `save_pretrained`.
        dem_hf_version: version of dem_hf that wrote the config.

    Example:
        ```python
        >>> config = DEMConfig(base_model_name_or_path="HuggingFaceTB/SmolLM2-135M", weighting="sum")
        >>> config.save_pretrained("out")
        >>> DEMConfig.from_pretrained("out").weighting
        'sum'
        ```
    """

    config_name: ClassVar[str] = "dem_config.json"

    base_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Base model the distribution vectors were computed against."}
    )
    base_revision: str | None = field(
        default=None, metadata={"help": "Commit of the base's Hub repo, when the base is a Hub id."}
    )
    weighting: str = field(
        default="sum",
        metadata={"help": "'sum': θ + Σ ω_i Δ_i (DEM). 'average': weights normalised to sum to 1 (parameter average)."},
    )
    coefficients: dict[str, float] = field(default_factory=dict, metadata={"help": "Merging weight per vector."})
    vectors: dict[str, dict[str, Any]] = field(
        default_factory=dict, metadata={"help": "Description of each distribution vector, by name."}
    )
    search_result: dict[str, Any] | None = field(default=None, metadata={"help": "The last coefficient search."})
    max_shard_size: str = field(default="2GB", metadata={"help": "Largest weight shard written by a merge."})
    dem_hf_version: str = field(default=__version__, metadata={"help": "dem_hf version that wrote this config."})

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"Unknown weighting {self.weighting!r}; expected one of {list(WEIGHTINGS)}.")
        self.coefficients = check_coefficients(self.coefficients)















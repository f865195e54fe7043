"""`DEMConfig` and the JSON config mixin every dem_hf config uses, saved beside the standard Transformers files.

Configs follow the PEFT/TRL habit: plain dataclasses whose fields carry `metadata={"help": ...}` (so
`transformers.HfArgumentParser` can build a command line from them), validated in `__post_init__`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .. import __version__, logging
from .operators import MERGE_METHODS, MergeOperator, check_merge_operator

logger = logging.get_logger(__name__)

WEIGHTINGS = ("sum", "average")
# Version of dem_config.json's layout. 1 (files without the key): one float per vector. 2: a vector's coefficient
# may also be a {group: ω} dict (per-layer / per-module coefficients, see dem_hf.merging.groups).
SCHEMA_VERSION = 2


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


def check_any_coefficients(
    coefficients: dict[str, Any], known: list[str] | None = None, groups: list[str] | None = None
) -> dict[str, float | dict[str, float]]:
    """Validate coefficients of any granularity: `{vector name: ω or {group: ω}}`.

    A vector's coefficient is a number (checked as by [`check_coefficients`]) or a non-empty dict `{group: ω}` of
    numbers (see `dem_hf.merging.groups.coefficient_for` for how a tensor finds its value). `known` restricts the
    vector names and `groups` the group keys (when given; `[]` means the model has no groups at all).
    """
    if not isinstance(coefficients, dict):
        raise ValueError(f"Expected coefficients as a dict {{vector name: weight}}, got {type(coefficients).__name__}.")
    flat = check_coefficients({n: w for n, w in coefficients.items() if not isinstance(w, dict)}, known)
    checked: dict[str, float | dict[str, float]] = {}
    for name, weight in coefficients.items():
        if not isinstance(weight, dict):
            checked[name] = flat[name]
            continue
        if known is not None and name not in known:
            raise ValueError(f"Coefficients name unknown vectors {[name]}; the vectors are {sorted(known)}.")
        if not weight:
            raise ValueError(f"Per-group coefficients for {name!r} are an empty dict; give {{group: weight}} or a number.")
        if groups is not None and (unknown := sorted(set(weight) - set(groups))):
            expected = f"the groups are {groups}" if groups else "this model has no transformer blocks, so no groups"
            raise ValueError(f"Per-group coefficients for {name!r} name unknown groups {unknown}; {expected}.")
        checked[name] = {group: _finite_number(f"{name}[{group}]", w) for group, w in weight.items()}
    return checked


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


def parse_command_line_values(name: str, value: Any) -> Any:
    """A setting as `transformers.HfArgumentParser` hands it over (strings) turned into numbers; others unchanged.

    The command-line forms, for a field `--name` given one or more words:
    - numbers: `0 0.5 1` -> `[0.0, 0.5, 1.0]`;
    - per name: `math=0.5 chat=1` or `math=0.5,chat=1` -> `{"math": [0.5], "chat": [1.0]}`, and `math=0,1 chat=0,2`
      -> `{"math": [0.0, 1.0], "chat": [0.0, 2.0]}` (after a name, commas separate its values);
    - a JSON object: `'{"math": 0.5}'` -> `{"math": 0.5}` (values as written).

    Raises:
        ValueError: naming the field and the word that is neither a number nor `NAME=NUMBER[,NUMBER...]`.
    """
    words = [value] if isinstance(value, str) else value
    if not isinstance(words, list) or not words or not all(isinstance(word, str) for word in words):
        return value
    if len(words) == 1 and words[0].lstrip().startswith("{"):
        try:
            return json.loads(words[0])
        except json.JSONDecodeError as error:
            raise ValueError(f"{name}: expected a JSON object, got {words[0]!r} ({error}).") from None
    expected = f"{name}: expected numbers, NAME=NUMBER[,NUMBER...] pairs or a JSON object"
    if not any("=" in word for word in words):
        return [_command_line_number(word, expected) for word in words]
    values: dict[str, list[float]] = {}
    for word in words:
        key = None
        for part in word.split(","):
            if "=" in part:
                key, _, part = part.partition("=")
                if not key or key in values:
                    raise ValueError(f"{expected}; got {word!r}" + (f" (name {key!r} twice)." if key else "."))
                values[key] = []
            elif key is None:
                raise ValueError(f"{expected}; got {word!r}.")
            values[key].append(_command_line_number(part, expected))
    return values


def parse_command_line_mapping(name: str, value: Any) -> Any:
    """`{name: number}` from the command-line forms of [`parse_command_line_values`] (`math=0.5 chat=1`, JSON)."""
    value = parse_command_line_values(name, value)
    if isinstance(value, dict) and all(isinstance(v, list) for v in value.values()):
        if any(len(v) != 1 for v in value.values()):
            raise ValueError(f"{name}: expected one number per name (NAME=NUMBER), got {value}.")
        return {key: numbers[0] for key, numbers in value.items()}
    if isinstance(value, list) and all(isinstance(v, float) for v in value):
        raise ValueError(f"{name}: expected NAME=NUMBER pairs, got bare numbers {value}.")
    return value


def _command_line_number(text: str, expected: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{expected}; got {text!r}.") from None


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
        coefficients: `{vector name: ω}` used by the last merge (or found by the search); a vector's ω may be a
            `{group: ω}` dict of per-layer / per-module coefficients (see `dem_hf.merging.groups`). From the command
            line `math=0.7 chat=0.5` or a JSON object (see [`parse_command_line_values`]); `None` is `{}`.
        vectors: `{vector name: {"vector_type", "source", ...}}` describing each distribution vector. `"source"`
            is the absolute path of the folder the vector was read from, or a Hub repo id with `"revision"` (a
            commit) and `"subfolder"`; `None` for a vector built in memory (saved under the DEM folder's `vectors/`).
        merge_method: how the vectors' deltas of each tensor are combined (see [`dem_hf.merging.operators`]):
            `"task_arithmetic"` (θ + Σ w_i Δ_i, the default; configs written before dem_hf had operators load as
            it), `"ties"`, `"dare_linear"`, `"dare_ties"` or `"breadcrumbs"`. A streaming merge with `"ties"` or
            `"breadcrumbs"` holds every vector's delta of one tensor at a time (about (vectors + 2) × the largest
            tensor in float32 per merge thread); the others stream row blocks like task arithmetic.
        density: fraction of each delta's entries kept, in (0, 1]; required by every method but task arithmetic.
        gamma: fraction of the largest magnitudes `"breadcrumbs"` removes (default 0.01); only for breadcrumbs.
        seed: seed of DARE's random drop (default 0); only for `"dare_linear"` and `"dare_ties"`.
        search_result: the last coefficient search (see [`SearchResult`]), if any.
        max_shard_size: cap per weight shard written by `save_pretrained`.
        dem_hf_version: version of dem_hf that wrote the config.
        schema_version: layout of this file: 2 (per-group coefficients allowed); files without it are version 1
            (one float per vector) and load unchanged. A newer version is refused.

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
        metadata={
            "help": "'sum': θ + Σ ω_i Δ_i (DEM). 'average': weights normalised to sum to 1 (parameter average).",
            "choices": WEIGHTINGS,
        },
    )
    # `| str | None`: how HfArgumentParser takes a command-line value (as TrainingArguments' dict fields do).
    coefficients: dict[str, float | dict[str, float]] | str | None = field(
        default_factory=dict,
        metadata={"help": "Merging weight per vector (NAME=WEIGHT ...), or a JSON object, per group too.", "nargs": "+"},
    )
    vectors: dict[str, dict[str, Any]] = field(
        default_factory=dict,
        metadata={"help": "Description of each distribution vector, by name (recorded by a merge, not a command-line "
                  "setting)."},
    )
    search_result: dict[str, Any] | None = field(
        default=None, metadata={"help": "The last coefficient search (recorded by a search, not a command-line setting)."}
    )
    max_shard_size: str = field(default="2GB", metadata={"help": "Largest weight shard written by a merge, e.g. 2GB."})
    dem_hf_version: str = field(
        default=__version__, metadata={"help": "dem_hf version that wrote this config (recorded, not a setting)."}
    )
    merge_method: str = field(
        default="task_arithmetic",
        metadata={"help": "How each tensor's deltas are combined.", "choices": MERGE_METHODS},
    )
    density: float | None = field(
        default=None, metadata={"help": "Fraction of each delta's entries kept, in (0, 1] (all methods but task_arithmetic)."}
    )
    gamma: float | None = field(
        default=None, metadata={"help": "breadcrumbs only: fraction of the largest magnitudes removed (default 0.01)."}
    )
    seed: int | None = field(default=None, metadata={"help": "dare_linear/dare_ties only: seed of the random drop (default 0)."})
    schema_version: int = field(
        default=SCHEMA_VERSION, metadata={"help": "Layout version of dem_config.json (recorded, not a setting)."}
    )

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"Unknown weighting {self.weighting!r}; expected one of {list(WEIGHTINGS)}.")
        if isinstance(self.schema_version, bool) or not isinstance(self.schema_version, int) or self.schema_version < 1:
            raise ValueError(f"schema_version must be an integer >= 1, got {self.schema_version!r}.")
        if self.schema_version > SCHEMA_VERSION:
            raise ValueError(
                f"This dem_config.json has schema_version {self.schema_version}, newer than this dem_hf reads "
                f"({SCHEMA_VERSION}); upgrade dem_hf (this is {__version__})."
            )
        self.schema_version = SCHEMA_VERSION  # what save_pretrained writes
        self.coefficients = check_any_coefficients(parse_command_line_mapping("coefficients", self.coefficients) or {})
        self.density, self.gamma, self.seed = check_merge_operator(self.merge_method, self.density, self.gamma, self.seed)

    @property
    def merge_operator(self) -> MergeOperator:
        """The merge method and its parameters as a [`MergeOperator`] (validated again: fields may have been edited)."""
        return MergeOperator(self.merge_method, self.density, self.gamma, self.seed)















"""Configuration dataclasses, saved as JSON beside the standard Transformers files.

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
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from . import __version__

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
    def from_pretrained(cls, directory: str | os.PathLike):
        """Read `<directory>/<config_name>`."""
        path = Path(directory) / cls.config_name
        if not path.is_file():
            raise FileNotFoundError(f"No {cls.config_name} in {str(directory)!r}.")
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


SEARCH_OBJECTIVES = ("mean", "weighted_mean", "max")
SEARCH_METRICS = ("perplexity", "log_perplexity", "relative_perplexity")
LORA_MODES = ("auto", "adapter", "update")
BAYESIAN_SAMPLERS = ("gp", "tpe")
GRADIENT_OPTIMIZERS = ("lbfgs", "adam")


def _check_positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")


def _check_bound_pair(label: str, pair: Any) -> tuple[float, float]:
    if isinstance(pair, (str, bytes)) or not hasattr(pair, "__len__") or len(pair) != 2:
        raise ValueError(f"Bounds{label} must be a pair (low, high), got {pair!r}.")
    low, high = pair
    for value in (low, high):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"Bounds{label} must be finite numbers, got {pair!r}.")
    if low > high:
        raise ValueError(f"Bounds{label} have low > high: ({low}, {high}); expected low <= high.")
    return float(low), float(high)


DEVICE_PATTERN = re.compile(r"(cpu|cuda|mps|xpu|npu|hpu|mlu|musa)(:\d+)?|auto")


def check_device(device: Any) -> None:
    """Refuse a device torch cannot name, before any model is loaded (`None` is the default CPU)."""
    if device is None or (isinstance(device, str) and DEVICE_PATTERN.fullmatch(device)):
        return
    if type(device).__name__ == "device" and type(device).__module__ == "torch":
        return
    raise ValueError(
        f"device: expected a torch device such as cpu, cuda, cuda:0, mps or auto, got {device!r}."
    )


def _check_values(label: str, values: Any) -> list[float]:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ValueError(f"Grid values{label} must be a list of numbers, got {values!r}.")
    values = list(values)
    if not values:
        raise ValueError(f"Grid values{label} are empty; give at least one value.")
    checked = check_coefficients({str(i): v for i, v in enumerate(values)})
    if len(set(checked.values())) != len(checked):
        raise ValueError(f"Grid values{label} repeat a value: {values}.")
    return list(checked.values())


@dataclass
class SearchConfig(JsonConfigMixin):
    """How [`DEMMerger.search`] chooses the coefficients ω by validation perplexity.

    Every candidate ω is scored by a forward pass over the validation sets of the model θ + Σ ω_i Δ_i,
    switched in place. The objective aggregates one number per validation set (`metric`) across sets
    (`objective`); lower is better.

    Args:
        strategy: `"grid"` (the DEM paper's full product of `grid_values`), `"random"` (uniform within
            `bounds`), `"bayesian"` (Optuna) or `"gradient"` (L-BFGS-B or Adam on ω itself, using
            ∂L/∂ω_i = ⟨∇θ L, Δ_i⟩); strategies added with `dem_hf.search.register_strategy` are accepted too.
        objective: `"mean"` over the validation sets (default), `"weighted_mean"` (with `objective_weights`),
            `"max"` (worst case), or a callable `f({set name: PerplexityResult}) -> float` (lower is better;
            not with `strategy="gradient"`).
        metric: what each set contributes: `"perplexity"`, `"log_perplexity"` (mean NLL per token) or
            `"relative_perplexity"` (perplexity divided by the base model's, which costs one more forward pass).
        objective_weights: `{set name: weight}` for `objective="weighted_mean"`.
        allow_extra_eval_sets: accept validation sets whose name is no vector's name (they are scored like
            the others); by default such a name is refused as a probable typo.
        bounds: `(low, high)` for every coefficient, or `{vector name: (low, high)}`.
        grid_values: values tried per coefficient by `"grid"`, one list for all or `{vector name: [...]}`;
            default `grid_points` evenly spaced values spanning `bounds`.
        grid_points: number of values per coefficient when `grid_values` is not given.
        n_trials: candidates evaluated by `"random"` and `"bayesian"`.
        bayesian_sampler: `"gp"` (Optuna's Gaussian-process sampler, best for a few smooth coefficients) or
            `"tpe"`.
        initial_coefficients: start of `"gradient"` and first trial of `"bayesian"`; default the merger's
            current coefficients, clipped into `bounds`.
        gradient_optimizer: `"lbfgs"` (SciPy's L-BFGS-B: quasi-Newton within the bounds) or `"adam"`
            (projected Adam with a cosine-decayed step).
        gradient_steps: at most this many gradient evaluations (one forward + backward pass each).
        gradient_lr: Adam step size, in coefficient units.
        gradient_tolerance: stop when the objective improves by less than this, relatively (L-BFGS-B; also
            its bound on the projected gradient), or when no coefficient moves more than this (Adam).
        seed: seed of `"random"` and `"bayesian"`.
        batch_size: sequences per forward pass.
        max_length: truncate validation sequences to this many tokens (default: the model's
            `max_position_embeddings`); longer than the model allows is refused.
        lora_mode: how LoRA vectors are switched: `"adapter"` (their factors run beside each layer with the
            coefficient as the adapter scaling, so a candidate merges nothing, but every forward pass does
            extra rank-r matmuls), `"update"` (their deltas are added to the weights in place, like full
            vectors: one memory pass per changed vector and candidate), or `"auto"` (default): `"adapter"`
            for `strategy="gradient"` (autograd then needs no weight gradients), else `"update"`, which costs
            less per candidate unless the validation sets are tiny (see benchmarks/RESULTS.md).
        cache_deltas: keep deltas in memory (float32, one copy per vector; LoRA deltas of `"update"` formed
            once) for fast switching; default: when they fit in half the available memory.
        device: device to load the base model on when `DEMMerger.search` is given no model (`cpu`, `cuda`,
            `cuda:0`, `mps`, ..., or `auto`: an accelerator when there is one).

    Example:
        ```python
        >>> config = SearchConfig(strategy="bayesian", metric="log_perplexity", bounds=(0.0, 2.0), n_trials=25)
        >>> result = merger.search({"math": math_val, "chat": chat_val}, config)
        ```
    """

    config_name: ClassVar[str] = "search_config.json"

    strategy: str = field(default="grid", metadata={"help": "Search strategy: grid, random, bayesian or gradient."})
    objective: Any = field(
        default="mean", metadata={"help": "Aggregate over validation sets: mean, weighted_mean, max, or a callable."}
    )
    metric: str = field(
        default="perplexity",
        metadata={"help": "Per-set quantity: perplexity, log_perplexity (mean NLL) or relative_perplexity (vs base)."},
    )
    objective_weights: dict[str, float] | None = field(
        default=None, metadata={"help": "Weight per validation set for objective='weighted_mean'."}
    )
    allow_extra_eval_sets: bool = field(
        default=False, metadata={"help": "Accept validation sets whose name matches no vector."}
    )
    bounds: Any = field(default=(0.0, 2.0), metadata={"help": "(low, high) for every coefficient, or per vector."})
    grid_values: Any = field(
        default=None, metadata={"help": "Values per coefficient for the grid (default: grid_points spanning bounds)."}
    )
    grid_points: int = field(default=5, metadata={"help": "Values per coefficient when grid_values is not given."})
    n_trials: int = field(default=30, metadata={"help": "Candidates evaluated by the random and bayesian strategies."})
    bayesian_sampler: str = field(default="gp", metadata={"help": "Optuna sampler for bayesian: gp or tpe."})
    initial_coefficients: dict[str, float] | None = field(
        default=None, metadata={"help": "Starting point of gradient (and first bayesian trial)."}
    )
    gradient_optimizer: str = field(default="lbfgs", metadata={"help": "Gradient optimiser: lbfgs or adam."})
    gradient_steps: int = field(default=20, metadata={"help": "Most gradient evaluations (forward + backward)."})
    gradient_lr: float = field(default=0.1, metadata={"help": "Adam step size for the gradient strategy."})
    gradient_tolerance: float = field(
        default=1e-4, metadata={"help": "Stop when the objective (L-BFGS-B) or the coefficients (Adam) move less."}
    )
    seed: int = field(default=0, metadata={"help": "Random seed of the random and bayesian strategies."})
    batch_size: int = field(default=8, metadata={"help": "Sequences per forward pass."})
    max_length: int | None = field(default=None, metadata={"help": "Truncate validation sequences to this many tokens."})
    lora_mode: str = field(
        default="auto", metadata={"help": "LoRA vectors: adapter (scalings), update (weights) or auto."}
    )
    cache_deltas: bool | None = field(
        default=None, metadata={"help": "Keep dense deltas in memory (default: when they fit in half the free RAM)."}
    )
    device: str | None = field(default=None, metadata={"help": "Device for the base model when none is given."})

    def __post_init__(self) -> None:
        from .search import SEARCH_STRATEGIES  # the registry lives with the strategies

        if self.strategy not in SEARCH_STRATEGIES:
            raise ValueError(f"Unknown search strategy {self.strategy!r}; expected one of {sorted(SEARCH_STRATEGIES)}.")
        if not callable(self.objective) and self.objective not in SEARCH_OBJECTIVES:
            raise ValueError(
                f"Unknown objective {self.objective!r}; expected one of {list(SEARCH_OBJECTIVES)} or a callable "
                "taking {set name: PerplexityResult} and returning a float."
            )
        if callable(self.objective) and self.strategy == "gradient":
            raise ValueError(
                "strategy='gradient' needs a differentiable built-in objective "
                f"({list(SEARCH_OBJECTIVES)}); use a callable objective with grid, random or bayesian."
            )
        if self.metric not in SEARCH_METRICS:
            raise ValueError(f"Unknown metric {self.metric!r}; expected one of {list(SEARCH_METRICS)}.")
        self._check_objective_weights()
        self.bounds = self._normalised_bounds(self.bounds)
        if self.grid_values is not None:
            if isinstance(self.grid_values, dict):
                self.grid_values = {name: _check_values(f" for {name!r}", v) for name, v in self.grid_values.items()}
            else:
                self.grid_values = _check_values("", self.grid_values)
        if self.initial_coefficients is not None:
            self.initial_coefficients = check_coefficients(self.initial_coefficients)
        for name in ("grid_points", "n_trials", "gradient_steps", "batch_size"):
            _check_positive_int(name, getattr(self, name))
        if self.max_length is not None:
            _check_positive_int("max_length", self.max_length, minimum=2)
        for name in ("gradient_lr", "gradient_tolerance"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
                raise ValueError(f"{name} must be a positive number, got {value!r}.")
        if self.bayesian_sampler not in BAYESIAN_SAMPLERS:
            raise ValueError(f"Unknown bayesian_sampler {self.bayesian_sampler!r}; expected one of {list(BAYESIAN_SAMPLERS)}.")
        if self.gradient_optimizer not in GRADIENT_OPTIMIZERS:
            raise ValueError(
                f"Unknown gradient_optimizer {self.gradient_optimizer!r}; expected one of {list(GRADIENT_OPTIMIZERS)}."
            )
        if self.lora_mode not in LORA_MODES:
            raise ValueError(f"Unknown lora_mode {self.lora_mode!r}; expected one of {list(LORA_MODES)}.")
        _check_positive_int("seed", self.seed, minimum=0)
        check_device(self.device)

    def _check_objective_weights(self) -> None:
        if self.objective == "weighted_mean" and not self.objective_weights:
            raise ValueError("objective='weighted_mean' needs objective_weights={set name: weight}.")
        if self.objective_weights is None:
            return
        if self.objective != "weighted_mean":
            raise ValueError(f"objective_weights are only used by objective='weighted_mean', not {self.objective!r}.")
        weights = check_coefficients(self.objective_weights)
        if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"objective_weights must be >= 0 with a positive sum, got {weights}.")
        self.objective_weights = weights

    @staticmethod
    def _normalised_bounds(bounds: Any) -> Any:
        if isinstance(bounds, dict):
            if not bounds:
                raise ValueError("bounds is an empty dict; give (low, high) or {vector name: (low, high)}.")
            return {name: _check_bound_pair(f" for {name!r}", pair) for name, pair in bounds.items()}
        return _check_bound_pair("", bounds)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields; a callable objective is recorded by its qualified name."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if callable(self.objective):
            values["objective"] = f"callable:{getattr(self.objective, '__qualname__', repr(self.objective))}"
        values["bounds"] = (
            {n: list(p) for n, p in self.bounds.items()} if isinstance(self.bounds, dict) else list(self.bounds)
        )
        return json.loads(json.dumps(values))

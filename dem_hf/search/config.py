"""`SearchConfig`: how [`DEMMerger.search`] chooses the coefficients, validated in `__post_init__`."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..merging.config import (
    JsonConfigMixin,
    check_any_coefficients,
    check_coefficients,
    parse_command_line_mapping,
    parse_command_line_values,
)
from ..merging.groups import GRANULARITIES
from .registry import BUILTIN_STRATEGIES, strategy_names

SEARCH_OBJECTIVES = ("mean", "weighted_mean", "max")
SEARCH_METRICS = ("perplexity", "log_perplexity", "relative_perplexity")
LORA_MODES = ("auto", "adapter", "update")
BAYESIAN_SAMPLERS = ("gp", "tpe")
GRADIENT_OPTIMIZERS = ("lbfgs", "adam")
SEARCH_DTYPES = ("auto", "float32", "bfloat16", "float16")
DENSITY = "(density)"  # the density's name among a search's dimensions (no vector can be named so)
# Most parameters (vectors × groups) the random and bayesian strategies accept: beyond this, sampling a box of
# that many dimensions with a few dozen trials finds little (and Optuna's GP slows down); use "gradient".
MAX_SAMPLED_PARAMETERS = 32
DEVICE_PATTERN = re.compile(r"(cpu|cuda|mps|xpu|npu|hpu|mlu|musa)(:\d+)?|auto")


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
            ∂L/∂ω_i = ⟨∇θ L, Δ_i⟩); strategies added with `dem_hf.search.run.register_strategy` are accepted too.
        objective: `"mean"` over the validation sets (default), `"weighted_mean"` (with `objective_weights`),
            `"max"` (worst case), or, from Python only, a callable `f({set name: PerplexityResult}) -> float` (lower
            is better; not with `strategy="gradient"`); the field is typed `str` so that HfArgumentParser can
            offer the built-in names as choices.
        metric: what each set contributes: `"perplexity"`, `"log_perplexity"` (mean NLL per token) or
            `"relative_perplexity"` (perplexity divided by the base model's, which costs one more forward pass).
        objective_weights: `{set name: weight}` for `objective="weighted_mean"`.
        allow_extra_eval_sets: accept validation sets whose name is no vector's name (they are scored like
            the others); by default such a name is refused as a probable typo.
        bounds: `(low, high)` for every coefficient, or `{vector name: (low, high)}`; `None` is `(0, 2)`.
        grid_values: values tried per coefficient by `"grid"`, one list for all or `{vector name: [...]}`;
            default `grid_points` evenly spaced values spanning `bounds`.
        grid_points: number of values per coefficient when `grid_values` is not given.
        n_trials: candidates evaluated by `"random"` and `"bayesian"`.
        bayesian_sampler: `"gp"` (Optuna's Gaussian-process sampler, best for a few smooth coefficients) or
            `"tpe"`.
        initial_coefficients: start of `"gradient"` and first trial of `"bayesian"`; default the merger's
            current coefficients, clipped into `bounds`.
        gradient_optimizer: `"lbfgs"` (SciPy's L-BFGS-B: quasi-Newton within the bounds) or `"adam"`
            (projected Adam with a cosine-decayed step). At `"layer"`/`"module"` granularity the per-group fit
            always takes projected Adam steps (its minibatch gradients are stochastic).
        gradient_steps: at most this many gradient evaluations (one forward + backward pass each).
        gradient_lr: Adam step size, in coefficient units.
        gradient_tolerance: stop when the objective improves by less than this, relatively (L-BFGS-B; also
            its bound on the projected gradient), or when no coefficient moves more than this (Adam).
        seed: seed of `"random"` and `"bayesian"`.
        batch_size: sequences per forward pass (unused when `batch_tokens` is given).
        batch_tokens: a budget of padded tokens per forward pass instead of `batch_size`: each batch takes as many
            consecutive length-sorted validation sequences as fit (a sequence longer than the budget runs alone).
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
            `cuda:0`, `mps`, ...). The default (`None`, same as `"auto"`) is the accelerator when there is one (CUDA,
            then MPS; under `accelerate launch` this process's own GPU), else the CPU; before issue 17 the default
            was the CPU, which `"cpu"` still gives.
        dtype: dtype to load the base model in when `DEMMerger.search` is given no model: `"auto"` (default) is
            bfloat16 on a CUDA device that supports it, else the checkpoint's dtype; `"float32"`, `"bfloat16"`,
            `"float16"` force one. The search stays exact in a low precision: every tensor it switches keeps a
            float32 master copy taken from the checkpoint, rounded once per switch as a fresh merge rounds, and the
            losses are summed in float32 (then float64).
        search_density: also search the merge operator's `density` (the merger's `DEMConfig.merge_method` must be
            one that has a density) within `density_bounds`, as one more dimension of the grid (`grid_points`
            values), random and bayesian strategies; the best density becomes `DEMConfig.density`. Not with
            `strategy="gradient"` (the density is not differentiable).
        density_bounds: `(low, high)` of the density search, within (0, 1].
        granularity: `"vector"` (one ω per vector, default), `"layer"` (one per vector and transformer block, plus
            `embeddings` and `head`) or `"module"` (per block: attention, mlp, norm); see `dem_hf.merging.groups`.
            The best coefficients are then `{vector: {group: ω}}`. Per-group search suits `strategy="gradient"`
            (one backward pass gives every ω_{i,g}); `random` and `bayesian` accept at most
            `MAX_SAMPLED_PARAMETERS` (32) vectors × groups, and `grid` none. The fit starts from
            `initial_coefficients`, else the merger's current coefficients (a per-vector ω on each of its groups):
            run a `"vector"` search first to start from the per-vector optimum (it records its best in the merger).
        layer_regularization: weight λ of the penalty λ·Σ_{i,g} (ω_{i,g} − ω⁰_{i,g})² pulling the per-group fit
            toward its start ω⁰ (added to the objective the fit minimises; not to the recorded objectives).
        holdout_fraction: share of each validation set's sequences (split by sequence, seeded with `seed`) kept
            out of the per-group fit to score every step; the result keeps the step with the best held-out
            objective, and stops after `early_stopping_patience` steps without improvement. `0` fits on everything
            and keeps the best fit objective (no early stopping).
        gradient_batch_sequences: sequences per validation set in each stochastic step of the per-group fit (drawn
            without replacement from the fit part, seeded); `None` uses all of them (full-batch steps).
        early_stopping_patience: steps of the per-group fit without a better held-out objective before it stops.

    On a command line (`transformers.HfArgumentParser(SearchConfig)`, `dem-hf search`) the dict and list fields
    take words: `--bounds 0 2`, `--bounds math=0,1 chat=0,2`, `--grid_values 0 0.5 1`, `--objective_weights math=2
    chat=1`, or a JSON object (`--initial_coefficients '{"math": 0.5}'`).

    Example:
        ```python
        >>> config = SearchConfig(strategy="bayesian", metric="log_perplexity", bounds=(0.0, 2.0), n_trials=25)
        >>> result = merger.search({"math": math_val, "chat": chat_val}, config)
        ```
    """

    config_name: ClassVar[str] = "search_config.json"

    # Fields typed `X | str | None` take a command-line value (strings) through HfArgumentParser, as
    # TrainingArguments' dict fields do; `__post_init__` turns it into X (see `parse_command_line_values`).
    strategy: str = field(
        default="grid",
        metadata={"help": "Search strategy (one registered with register_strategy works from Python).",
                  "choices": sorted(BUILTIN_STRATEGIES)},
    )
    objective: str = field(
        default="mean",
        metadata={"help": "Aggregate over validation sets (from Python also a callable {set: PerplexityResult} -> "
                  "float, which a command line cannot name).", "choices": SEARCH_OBJECTIVES},
    )
    metric: str = field(
        default="perplexity",
        metadata={"help": "Per-set quantity: perplexity, log_perplexity (mean NLL) or relative_perplexity (vs base).",
                  "choices": SEARCH_METRICS},
    )
    objective_weights: dict[str, float] | str | None = field(
        default=None,
        metadata={"help": "Weight per validation set for objective='weighted_mean': SET=WEIGHT ... or a JSON object.",
                  "nargs": "+"},
    )
    allow_extra_eval_sets: bool = field(
        default=False, metadata={"help": "Accept validation sets whose name matches no vector."}
    )
    bounds: tuple[float, float] | str | dict[str, tuple[float, float]] | None = field(
        default=(0.0, 2.0),
        metadata={"help": "LOW HIGH for every coefficient, or per vector NAME=LOW,HIGH ... (None: 0 2).", "nargs": "+"},
    )
    grid_values: list[float] | str | dict[str, list[float]] | None = field(
        default=None,
        metadata={"help": "Values per coefficient for the grid, VALUE ... or per vector NAME=VALUE,VALUE ... "
                  "(default: grid_points values spanning bounds).", "nargs": "+"},
    )
    grid_points: int = field(default=5, metadata={"help": "Values per coefficient when grid_values is not given."})
    n_trials: int = field(default=30, metadata={"help": "Candidates evaluated by the random and bayesian strategies."})
    bayesian_sampler: str = field(
        default="gp", metadata={"help": "Optuna sampler for bayesian.", "choices": BAYESIAN_SAMPLERS}
    )
    initial_coefficients: dict[str, float] | str | None = field(
        default=None,
        metadata={"help": "Starting point of gradient (and first bayesian trial): NAME=WEIGHT ... or a JSON object.",
                  "nargs": "+"},
    )
    gradient_optimizer: str = field(
        default="lbfgs", metadata={"help": "Gradient optimiser.", "choices": GRADIENT_OPTIMIZERS}
    )
    gradient_steps: int = field(default=20, metadata={"help": "Most gradient evaluations (forward + backward)."})
    gradient_lr: float = field(default=0.1, metadata={"help": "Adam step size for the gradient strategy."})
    gradient_tolerance: float = field(
        default=1e-4, metadata={"help": "Stop when the objective (L-BFGS-B) or the coefficients (Adam) move less."}
    )
    seed: int = field(default=0, metadata={"help": "Random seed of the random and bayesian strategies."})
    batch_size: int = field(default=8, metadata={"help": "Sequences per forward pass (unless batch_tokens is set)."})
    batch_tokens: int | None = field(
        default=None, metadata={"help": "Padded tokens per forward pass, instead of batch_size sequences."}
    )
    max_length: int | None = field(default=None, metadata={"help": "Truncate validation sequences to this many tokens."})
    lora_mode: str = field(
        default="auto",
        metadata={"help": "LoRA vectors: adapter (scalings), update (weights) or auto.", "choices": LORA_MODES},
    )
    cache_deltas: bool | None = field(
        default=None, metadata={"help": "Keep dense deltas in memory (default: when they fit in half the free RAM)."}
    )
    device: str | None = field(
        default=None,
        metadata={"help": "Device for the base model when none is given (default: the accelerator if any, else cpu)."},
    )
    dtype: str = field(
        default="auto",
        metadata={"help": "Dtype for the base model when none is given (auto: bfloat16 on a CUDA GPU that has it, "
                  "else the checkpoint's).", "choices": SEARCH_DTYPES},
    )
    search_density: bool = field(default=False, metadata={"help": "Also search the merge operator's density."})
    density_bounds: tuple[float, float] | str | None = field(
        default=(0.1, 1.0), metadata={"help": "LOW HIGH of the density search, within (0, 1] (None: 0.1 1).", "nargs": "+"}
    )
    granularity: str = field(
        default="vector",
        metadata={"help": "One coefficient per vector, per vector and layer, or per module group.", "choices": GRANULARITIES},
    )
    layer_regularization: float = field(
        default=1e-3, metadata={"help": "L2 pull of per-group coefficients toward their start (gradient fit)."}
    )
    holdout_fraction: float = field(
        default=0.25, metadata={"help": "Share of validation sequences held out to stop the per-group fit early."}
    )
    gradient_batch_sequences: int | None = field(
        default=None, metadata={"help": "Sequences per set in each stochastic step of the per-group fit (None: all)."}
    )
    early_stopping_patience: int = field(
        default=5, metadata={"help": "Per-group fit steps without a better held-out objective before stopping."}
    )

    def __post_init__(self) -> None:
        self._parse_command_line_values()
        if self.strategy not in strategy_names():
            raise ValueError(f"Unknown search strategy {self.strategy!r}; expected one of {strategy_names()}.")
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
        self._check_granularity()
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
        if self.dtype not in SEARCH_DTYPES:
            raise ValueError(f"Unknown dtype {self.dtype!r}; expected one of {list(SEARCH_DTYPES)}.")
        if self.batch_tokens is not None:
            _check_positive_int("batch_tokens", self.batch_tokens)
        self._check_density_search()

    def _check_density_search(self) -> None:
        if not isinstance(self.search_density, bool):
            raise ValueError(f"search_density must be True or False, got {self.search_density!r}.")
        low, high = self.density_bounds = _check_bound_pair(" (density_bounds)", self.density_bounds)
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"density_bounds must lie within (0, 1], got {(low, high)}.")
        if self.search_density and self.strategy == "gradient":
            raise ValueError("search_density=True needs strategy grid, random or bayesian: the density is not differentiable.")

    def _check_granularity(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"Unknown granularity {self.granularity!r}; expected one of {list(GRANULARITIES)}.")
        if self.initial_coefficients is not None:
            self.initial_coefficients = check_any_coefficients(self.initial_coefficients)
            grouped = sorted(n for n, v in self.initial_coefficients.items() if isinstance(v, dict))
            if grouped and self.granularity == "vector":
                raise ValueError(
                    f"initial_coefficients give per-group values for {grouped}, but granularity='vector' searches one "
                    "number per vector; pass numbers, or granularity='layer' / 'module'."
                )
        if self.granularity != "vector" and self.strategy == "grid":
            raise ValueError(
                f"strategy='grid' cannot search granularity={self.granularity!r}: its product grid has grid_points ** "
                "(vectors × groups) candidates; use strategy='gradient' (or random / bayesian for a few groups)."
            )
        for name in ("layer_regularization", "holdout_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
        if self.holdout_fraction >= 1:
            raise ValueError(f"holdout_fraction must be below 1 (some sequences must be fitted), got {self.holdout_fraction!r}.")
        if self.gradient_batch_sequences is not None:
            _check_positive_int("gradient_batch_sequences", self.gradient_batch_sequences)
        _check_positive_int("early_stopping_patience", self.early_stopping_patience)

    def _parse_command_line_values(self) -> None:
        """Turn the strings HfArgumentParser hands over into what the checks below expect (others unchanged)."""
        for name in ("objective_weights", "initial_coefficients"):
            setattr(self, name, parse_command_line_mapping(name, getattr(self, name)))
        self.grid_values = parse_command_line_values("grid_values", self.grid_values)
        bounds = parse_command_line_values("bounds", self.bounds)
        self.bounds = (0.0, 2.0) if bounds is None else bounds
        density_bounds = parse_command_line_values("density_bounds", self.density_bounds)
        self.density_bounds = (0.1, 1.0) if density_bounds is None else density_bounds

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
        values["density_bounds"] = list(self.density_bounds)
        values["bounds"] = (
            {n: list(p) for n, p in self.bounds.items()} if isinstance(self.bounds, dict) else list(self.bounds)
        )
        return json.loads(json.dumps(values))


def check_device(device: Any) -> None:
    """Refuse a device torch cannot name, before any model is loaded (`None` is the default: `"auto"`)."""
    if device is None or (isinstance(device, str) and DEVICE_PATTERN.fullmatch(device)):
        return
    if type(device).__name__ == "device" and type(device).__module__ == "torch":
        return
    raise ValueError(
        f"device: expected a torch device such as cpu, cuda, cuda:0, mps or auto, got {device!r}."
    )


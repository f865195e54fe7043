"""Coefficient search by validation perplexity: the search loop and its input checks ([`SearchResult`] is in
`result.py`).

[`run_search`] (what [`DEMMerger.search`] calls) validates everything cheap first (names, bounds, set
sizes, lengths), tokenises each validation set once, loads the base model once, and hands a
[`SearchProblem`] to a strategy. A strategy only asks for scores: `problem.evaluate(coefficients)` (one
forward pass over all validation sets) or `problem.value_and_grad(coefficients)` (one forward + backward
pass). The problem switches the model in place ([`~dem_hf.search.candidates.CandidateModel`]), caches every
candidate (asking twice costs nothing), counts compute in forward-pass equivalents (a backward counts
as two forwards) and records every candidate for the result. The base weights are restored exactly at
the end, even when the search fails or is interrupted.

Strategies live in [`SEARCH_STRATEGIES`]; `grid`, `random`, `bayesian` and `gradient` are in
`dem_hf/search/strategies.py` (imported on first use through `dem_hf/search/registry.py`), and
[`register_strategy`] adds more.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from .. import logging
from ..evaluation.loading import load_dataset_source
from ..evaluation.perplexity import EvaluationSet, tokenize_for_evaluation
from ..merging.config import check_any_coefficients
from ..merging.groups import group_names, mean_coefficient
from .config import DENSITY, MAX_SAMPLED_PARAMETERS, SearchConfig
from .problem import Candidate, SearchProblem
from .registry import SEARCH_STRATEGIES, get_strategy, register_strategy
from .result import SearchResult

if TYPE_CHECKING:
    from ..merging.merger import DEMMerger

__all__ = ["SEARCH_STRATEGIES", "Candidate", "SearchProblem", "SearchResult", "register_strategy", "run_search"]

logger = logging.get_logger(__name__)









# ---------------------------------------------------------------------------------------------- entry point


def run_search(
    merger: DEMMerger,
    eval_datasets: Mapping[str, Any],
    search_config: SearchConfig | None = None,
    *,
    tokenizer: Any | None = None,
    model: torch.nn.Module | None = None,
    show_progress: bool | None = None,
    **tokenize_kwargs: Any,
) -> SearchResult:
    """Search the merger's coefficients by validation perplexity; see [`DEMMerger.search`].

    Everything cheap is validated before the model is loaded; the model's weights are restored exactly
    when the search ends, fails or is interrupted.
    """
    config = search_config if search_config is not None else SearchConfig()
    if not isinstance(config, SearchConfig):
        raise ValueError(f"search_config must be a SearchConfig, got {type(config).__name__}.")
    names, bounds, initial = check_search_inputs(merger, eval_datasets, config)
    eval_sets = prepare_eval_sets(merger, eval_datasets, config, tokenizer, model, tokenize_kwargs)
    if config.granularity != "vector" and config.strategy == "gradient":
        from .layerwise import split_holdout

        split_holdout(eval_sets, config.holdout_fraction, config.seed)  # too few sequences: refused before loading
    join_launched_processes()
    model = model if model is not None else load_search_model(merger, config)
    vectors = [merger.vectors[n] for n in names]
    weighting = merger.config.weighting
    lora_mode = resolve_lora_mode(config)
    with candidate_model(merger, model, vectors, config, lora_mode) as switcher:
        problem = SearchProblem(switcher, eval_sets, config, names, bounds, initial, weighting, show_progress)
        start = time.perf_counter()
        try:
            if problem.objective.needs_base:
                base = problem.base()
                problem.objective.base_losses = torch.tensor([base[n].loss for n in eval_sets], dtype=torch.float64)
            get_strategy(config.strategy)(problem)
        finally:
            problem.close()
        wall = time.perf_counter() - start
    if not problem.records:
        raise ValueError(f"The {config.strategy!r} strategy evaluated no candidate.")
    best = min(problem.records, key=lambda c: c.objective)
    logger.info(f"Best coefficients {best.coefficients}: {problem.objective.description} = {best.objective:.6g}")
    warn_about_bounds(best.coefficients, search_region(config, bounds))
    return SearchResult(
        best_coefficients=dict(best.coefficients),
        best_density=best.density,
        best_objective=best.objective,
        objective=problem.objective.description,
        strategy=config.strategy,
        candidates=problem.records,
        wall_time_s=wall,
        compute=problem.compute,
        num_cache_hits=problem.cache_hits,
        base_perplexities={n: r.perplexity for n, r in problem.base_results.items()} if problem.base_results else None,
        eval_sets={
            n: {"num_sequences": len(s), "num_tokens": s.num_tokens, "num_truncated": s.num_truncated}
            for n, s in eval_sets.items()
        },
        weighting=weighting,
        search_config=config.to_dict(),
        granularity=config.granularity,
    )


def candidate_model(merger: DEMMerger, model: torch.nn.Module, vectors: list, config: SearchConfig, lora_mode: str):
    """The in-place switcher: a `CandidateModel`, or an `OperatorCandidateModel` for a merge operator other than
    task arithmetic (LoRA vectors then switched as dense deltas)."""
    operator = merger.config.merge_operator
    if operator.is_task_arithmetic:
        from .candidates import CandidateModel

        return CandidateModel(
            model, merger.base, vectors, lora_mode=lora_mode, cache_deltas=config.cache_deltas, granularity=config.granularity
        )
    from .operator_candidates import OperatorCandidateModel

    return OperatorCandidateModel(model, merger.base, vectors, operator, granularity=config.granularity)


def check_operator_search(merger: DEMMerger, config: SearchConfig, bounds: dict, initial: dict) -> None:
    """Refuse what a merge operator cannot search, and add the density dimension to `bounds` and `initial`."""
    operator = merger.config.merge_operator
    if config.search_density:
        if operator.density is None:
            raise ValueError(
                f"search_density=True searches the merge operator's density, but merge_method={operator.method!r} has "
                "none; set DEMConfig.merge_method to ties, dare_linear, dare_ties or breadcrumbs (with a density)."
            )
        low, high = config.density_bounds
        bounds[DENSITY] = (low, high)
        initial[DENSITY] = min(max(operator.density, low), high)
    if not operator.is_task_arithmetic and config.lora_mode == "adapter":
        raise ValueError(
            f"lora_mode='adapter' cannot apply merge_method={operator.method!r} (a sparsified delta has no low-rank "
            "form); use lora_mode='update' or 'auto'."
        )


def resolve_lora_mode(config: SearchConfig) -> str:
    """`lora_mode="auto"`: adapters for the gradient strategy (no weight gradients needed), in-place updates
    otherwise (a memory pass per changed vector costs less than rank-r matmuls in every forward pass)."""
    if config.lora_mode != "auto":
        return config.lora_mode
    return "adapter" if config.strategy == "gradient" else "update"


def search_region(config: SearchConfig, bounds: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    """The interval each coefficient was searched over: its bounds, or for a grid of given values their range (a
    coefficient given one value only is not searched, and left out)."""
    if config.strategy != "grid" or config.grid_values is None:
        return dict(bounds)
    values = config.grid_values if isinstance(config.grid_values, dict) else {n: config.grid_values for n in bounds}
    region = {n: (float(min(values[n])), float(max(values[n]))) for n in bounds}
    return {n: (lo, hi) for n, (lo, hi) in region.items() if lo < hi}


def warn_about_bounds(best: Mapping[str, Any], region: Mapping[str, tuple[float, float]]) -> list[str]:
    """Warn, per coefficient, when the best value sits on a bound of the searched interval: the optimum may lie
    beyond it. Returns the warnings."""
    messages = []
    for name, (low, high) in region.items():
        value = best.get(name)
        if isinstance(value, Mapping):  # per-group coefficients: one message per vector
            on_bound = sorted(g for g, v in value.items() if math.isclose(v, low, abs_tol=1e-9) or math.isclose(v, high, abs_tol=1e-9))
            if on_bound:
                messages.append(
                    f"The best per-group coefficients of {name!r} sit on a bound of [{low:g}, {high:g}] for groups "
                    f"{on_bound}: the optimum may lie beyond it. Widen SearchConfig(bounds=...) and search again."
                )
            continue
        if value is None:
            continue
        side = "lower" if math.isclose(value, low, abs_tol=1e-9) else "upper" if math.isclose(value, high, abs_tol=1e-9) else None
        if side is None:
            continue
        wider = (low - (high - low), high) if side == "lower" else (low, high + (high - low))
        messages.append(
            f"The best coefficient for {name!r} ({value:g}) sits on the {side} bound {low if side == 'lower' else high:g} "
            f"of the searched interval [{low:g}, {high:g}]: the optimum may lie beyond it. Widen the search, e.g. "
            f"SearchConfig(bounds={{{name!r}: ({wider[0]:g}, {wider[1]:g}), ...}}), and search again."
        )
    for message in messages:
        logger.warning(message)
    return messages


# ---------------------------------------------------------------------------------------------- input checks


def check_search_inputs(
    merger: DEMMerger, eval_datasets: Any, config: SearchConfig
) -> tuple[list[str], dict[str, tuple[float, float]], dict[str, Any]]:
    """Validate names against the merger's vectors; return the vector names, per-vector bounds and a start (per
    vector a number, or `{group: ω}` at `"layer"`/`"module"` granularity, clipped into the bounds later).

    Every validation set must be named after a vector (so a typo cannot silently add a set to the
    objective) unless `config.allow_extra_eval_sets` is set or `config.objective_weights` names the sets.
    Vectors without a validation set of their own are fine: the objective is over all sets.
    """
    names = list(merger.resolve_coefficients())
    if not isinstance(eval_datasets, Mapping) or not eval_datasets:
        raise ValueError(
            "eval_datasets must be a non-empty dict {set name: dataset or EvaluationSet}, got "
            f"{type(eval_datasets).__name__ if not isinstance(eval_datasets, Mapping) else 'an empty dict'}."
        )
    sets = list(eval_datasets)
    if not all(isinstance(n, str) for n in sets):
        raise ValueError(f"Validation set names must be strings, got {sets}.")
    extra = [n for n in sets if n not in names]
    if extra and not (config.allow_extra_eval_sets or config.objective_weights):
        raise ValueError(
            f"Validation sets {extra} match no vector; the vectors are {names}. Name each set after the vector "
            "trained on its distribution, or pass SearchConfig(allow_extra_eval_sets=True) to score extra sets."
        )
    if config.objective_weights and (unknown := sorted(set(config.objective_weights) - set(sets))):
        raise ValueError(f"objective_weights name unknown validation sets {unknown}; the sets are {sets}.")
    bounds = _per_vector(config.bounds, names, "bounds")
    if isinstance(config.grid_values, dict):
        _per_vector(config.grid_values, names, "grid_values")
    start = config.initial_coefficients or {}
    check_any_coefficients(start, known=names, groups=merger.group_keys if config.granularity != "vector" else None)
    chosen = {n: start.get(n, merger.config.coefficients.get(n, 1.0)) for n in names}
    if config.granularity == "vector":  # a per-group recorded coefficient starts a per-vector search at its mean
        initial = {n: min(max(mean_coefficient(chosen[n]), lo), hi) for n, (lo, hi) in bounds.items()}
    else:
        initial = chosen
        _check_dimension(merger, names, config)
    check_operator_search(merger, config, bounds, initial)
    return names, bounds, initial


def _check_dimension(merger: DEMMerger, names: list[str], config: SearchConfig) -> None:
    """The groups exist (the base has transformer blocks) and sampling strategies get few enough parameters."""
    changed = {tensor for n in names for tensor in merger.vectors[n].target_names}
    count = len(names) * len(group_names(changed, config.granularity))
    if config.strategy in ("random", "bayesian") and count > MAX_SAMPLED_PARAMETERS:
        raise ValueError(
            f"strategy={config.strategy!r} at granularity={config.granularity!r} would sample {count} coefficients "
            f"({len(names)} vectors × {count // len(names)} groups), more than it handles ({MAX_SAMPLED_PARAMETERS}); "
            "use strategy='gradient' (one backward pass gives every coefficient's derivative), or a coarser granularity."
        )


def _per_vector(value: Any, names: list[str], what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        return {n: value for n in names}
    if unknown := sorted(set(value) - set(names)):
        raise ValueError(f"{what} name unknown vectors {unknown}; the vectors are {names}.")
    if missing := [n for n in names if n not in value]:
        raise ValueError(f"{what} has no entry for vectors {missing}; give one per vector {names}, or one for all.")
    return {n: value[n] for n in names}


def _max_positions(merger: DEMMerger, model: torch.nn.Module | None) -> int | None:
    if model is not None:
        config = getattr(model, "config", None)
    else:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(merger.base_folder)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    value = getattr(config, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def prepare_eval_sets(
    merger: DEMMerger, eval_datasets: Mapping[str, Any], config: SearchConfig, tokenizer: Any,
    model: torch.nn.Module | None, tokenize_kwargs: dict[str, Any],
) -> dict[str, EvaluationSet]:
    """Tokenise each validation set once (raw datasets) or check it (`EvaluationSet`s).

    A set given as a path (a JSON/JSONL, CSV, Parquet, Arrow or text file, a folder saved with `save_to_disk`, or a
    Hub dataset id) is loaded as training data is ([`~dem_hf.evaluation.loading.load_dataset_source`], its
    `validation` split or its only one). Raw sequences longer than `config.max_length` (default: the model's `max_position_embeddings`) are
    truncated with a warning. A `max_length` above the model's limit, or an `EvaluationSet` holding longer
    sequences, is refused: the model cannot score those positions.
    """
    limit = _max_positions(merger, model)
    if config.max_length is not None and limit is not None and config.max_length > limit:
        raise ValueError(f"max_length={config.max_length} exceeds the model's max_position_embeddings={limit}.")
    max_length = config.max_length or limit
    prepared = {}
    for name, data in eval_datasets.items():
        if isinstance(data, (str, os.PathLike)):  # a data file, a saved dataset folder or a Hub dataset id
            data = load_dataset_source(data, name, split="validation")
        if isinstance(data, EvaluationSet):
            if len(data) == 0:
                raise ValueError(f"Validation set {name!r} is empty; it needs at least one sequence.")
            if limit is not None and data.max_sequence_length > limit:
                raise ValueError(
                    f"Validation set {name!r} has sequences of {data.max_sequence_length} tokens, more than the model "
                    f"allows ({limit}); tokenise it with max_length={limit} or pass the raw dataset (truncated for you)."
                )
            prepared[name] = data
            continue
        if tokenizer is None:
            tokenizer = _load_tokenizer(merger)
        try:
            prepared[name] = tokenize_for_evaluation(data, tokenizer, max_length=max_length, **tokenize_kwargs)
        except ValueError as error:
            raise ValueError(f"Validation set {name!r}: {error}") from error
    return prepared


def _load_tokenizer(merger: DEMMerger) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(merger.base_folder)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"Could not load a tokenizer from the base model folder {str(merger.base_folder)!r} ({error}); "
            "pass tokenizer= to search, or EvaluationSets from tokenize_for_evaluation."
        ) from error


def load_search_model(merger: DEMMerger, config: SearchConfig) -> torch.nn.Module:
    """The base model, in eval mode, on [`resolve_device`]`(config.device)` (default: the accelerator when there is
    one) and in [`resolve_dtype`]`(config.dtype, device)` (default: bfloat16 on a CUDA GPU that supports it, else
    the checkpoint's dtype).

    Example:
        ```python
        >>> model = load_search_model(merger, SearchConfig(device="cpu"))  # the CPU, in the checkpoint's dtype
        ```
    """
    from transformers import AutoModelForCausalLM

    device = resolve_device(config.device)
    model = AutoModelForCausalLM.from_pretrained(merger.base_folder, dtype=resolve_dtype(config.dtype, device))
    return model.to(device).eval()


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`None` or `"auto"` as this process's accelerator when there is one (CUDA, then MPS; under `accelerate launch`
    or `torchrun`, the GPU of this process's `LOCAL_RANK`), else the CPU; other values as they are.

    Example:
        ```python
        >>> resolve_device("cpu"), resolve_device(None)  # on a machine with one GPU
        (device(type='cpu'), device(type='cuda', index=0))
        ```
    """
    if device is not None and device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    mps = getattr(torch.backends, "mps", None)
    return torch.device("mps") if mps is not None and mps.is_available() else torch.device("cpu")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype | str:
    """The dtype to load the search model in: `"auto"` is bfloat16 on a CUDA device that supports it, else the
    checkpoint's own (`"auto"` for `from_pretrained`); other names as the torch dtype.

    Example:
        ```python
        >>> resolve_dtype("auto", torch.device("cpu")), resolve_dtype("float16", torch.device("cpu"))
        ('auto', torch.float16)
        ```
    """
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return "auto"


def join_launched_processes() -> None:
    """Under a launcher that started several processes (`WORLD_SIZE` > 1, as `accelerate launch` sets) but with no
    process group yet, form it with `accelerate.PartialState()`, so that the validation sets are shared across the
    processes (see `dem_hf.evaluation.distributed`)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        from accelerate import PartialState

        PartialState()

"""What a search strategy works with: [`SearchProblem`] (cached, counted evaluations and gradients of candidates),
the [`Objective`] it minimises, and the [`Candidate`] records a search keeps.

A strategy asks `problem.evaluate(coefficients)` for the objective of a candidate (one forward pass over all
validation sets) or `problem.value_and_grad(coefficients)` for the objective and its gradient with respect to
every parameter (one forward + backward pass). The problem caches candidates (asking twice costs nothing), counts
compute in forward-pass equivalents and records every candidate; the best one wins.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .. import logging
from ..evaluation.perplexity import (
    EvaluationSet,
    PerplexityResult,
    compute_perplexities,
)
from ..merging.groups import VECTOR_GROUP, value_for_group
from .config import DENSITY, SearchConfig

if TYPE_CHECKING:
    from .candidates import CandidateModel

logger = logging.get_logger(__name__)

FORWARD_COST, GRADIENT_COST = 1.0, 3.0  # forward-pass equivalents of an evaluation and of a gradient


@dataclass
class Candidate:
    """One evaluated candidate: its coefficients, objective and per-set numbers, and what it cost
    (`compute` in forward-pass equivalents, `seconds` of wall time).

    At `"layer"`/`"module"` granularity `coefficients` is `{vector: {group: ω}}`, and a step of the per-group
    gradient fit also records `fit_objective` (the objective on that step's fit sequences, before the regulariser)
    and `holdout_objective` (on the held-out sequences); its `objective`, which picks the best candidate, is the
    held-out one (the fit one without a holdout), and its per-set numbers are the held-out sequences'.
    """

    coefficients: dict[str, float] | dict[str, dict[str, float]]
    objective: float
    perplexities: dict[str, float]
    losses: dict[str, float]
    compute: float
    seconds: float
    label: str = ""
    gradient: dict[str, float] | None = None
    fit_objective: float | None = None
    holdout_objective: float | None = None
    density: float | None = None


# ---------------------------------------------------------------------------------------------- objective


class Objective:
    """The number a search minimises: an aggregate (`mean`, `weighted_mean`, `max`) of a per-set metric, or a
    user callable of `{set name: PerplexityResult}`. Built-in objectives are torch functions of the per-set
    losses, so their derivative with respect to each loss comes from autograd."""

    def __init__(self, config: SearchConfig, set_names: list[str]) -> None:
        self.config, self.set_names = config, set_names
        self.base_losses: torch.Tensor | None = None
        weights = config.objective_weights or {}
        self.weights = torch.tensor([weights.get(n, 0.0) for n in set_names], dtype=torch.float64)

    @property
    def needs_base(self) -> bool:
        return not callable(self.config.objective) and self.config.metric == "relative_perplexity"

    @property
    def description(self) -> str:
        if callable(self.config.objective):
            return f"callable {getattr(self.config.objective, '__qualname__', repr(self.config.objective))}"
        text = f"{self.config.objective} {self.config.metric} over {self.set_names}"
        if self.config.objective == "weighted_mean":
            text += f" with weights {self.config.objective_weights}"
        return text

    def _torch(self, losses: torch.Tensor) -> torch.Tensor:
        metric = self.config.metric
        if metric == "log_perplexity":
            per_set = losses
        elif metric == "relative_perplexity":
            per_set = (losses - self.base_losses).exp()
        else:
            per_set = losses.exp()
        if self.config.objective == "max":
            return per_set.max()
        if self.config.objective == "weighted_mean":
            return (per_set * self.weights).sum() / self.weights.sum()
        return per_set.mean()

    def value(self, results: Mapping[str, PerplexityResult]) -> float:
        if callable(self.config.objective):
            return float(self.config.objective(dict(results)))
        return float(self._torch(torch.tensor([results[n].loss for n in self.set_names], dtype=torch.float64)))

    def loss_gradient(self, results: Mapping[str, PerplexityResult]) -> dict[str, float]:
        """∂objective/∂ℓ_s for every set s (ℓ_s: mean NLL per token)."""
        losses = torch.tensor([results[n].loss for n in self.set_names], dtype=torch.float64, requires_grad=True)
        self._torch(losses).backward()
        return dict(zip(self.set_names, losses.grad.tolist()))


# ---------------------------------------------------------------------------------------------- problem


class SearchProblem:
    """What a strategy works with: the coefficients to choose, bounds and config, and cached, counted evaluations.

    A strategy sees a flat list of real parameters, `parameter_names`: at `"vector"` granularity the vector names
    (one ω per vector, as always), at `"layer"`/`"module"` granularity one `"<vector>:<group>"` per vector and group
    of `groups` (the groups of the tensors the vectors change). `evaluate` / `value_and_grad` take
    `{parameter name: ω}`.

    Attributes:
        vector_names: the vectors, in order.
        groups: the groups (`["all"]` at `"vector"` granularity).
        parameter_names: the parameters, in order (vector-major).
        dimensions: what a grid, random or bayesian strategy chooses: `parameter_names`, after `DENSITY` when the
            merge operator's density is searched too (first, so a grid varies it slowest and the sparsified deltas
            are rebuilt once per density).
        bounds: `{parameter name: (low, high)}` (a vector's bounds on each of its groups; and `DENSITY`'s).
        initial: a starting point inside the bounds (`config.initial_coefficients` or the merger's, a per-vector
            number on each of its groups).
        config: the [`SearchConfig`].
    """

    def __init__(self, candidates: CandidateModel, eval_sets: dict[str, EvaluationSet], config: SearchConfig,
                 vector_names: list[str], bounds: dict[str, tuple[float, float]], initial: dict[str, Any],
                 weighting: str, show_progress: bool | None) -> None:
        self.candidates, self.eval_sets, self.config = candidates, eval_sets, config
        self.vector_names, self.weighting = vector_names, weighting
        self.granularity = getattr(candidates, "granularity", "vector")
        self.groups = list(getattr(candidates, "groups", [VECTOR_GROUP]))
        self.per_group = self.granularity != "vector"
        self.parameters = {
            (self.parameter_name(v, g) if self.per_group else v): (i, j)
            for i, v in enumerate(vector_names) for j, g in enumerate(self.groups)
        }
        if len(self.parameters) != len(vector_names) * len(self.groups):
            raise ValueError(f"Vector names {vector_names} clash once joined with group names; rename the vectors.")
        self.parameter_names = list(self.parameters)
        self.bounds = {n: bounds[vector_names[i]] for n, (i, _) in self.parameters.items()}
        self.initial = {n: self._start(initial[vector_names[i]], self.groups[j], bounds[vector_names[i]])
                        for n, (i, j) in self.parameters.items()}
        self.dimensions = list(self.parameter_names)
        if DENSITY in bounds:
            self.dimensions.insert(0, DENSITY)
            self.bounds[DENSITY], self.initial[DENSITY] = bounds[DENSITY], initial[DENSITY]
        self.total_tokens = sum(s.num_tokens for s in eval_sets.values())
        self.objective = Objective(config, list(eval_sets))
        self.records: list[Candidate] = []
        self.compute = 0.0
        self.cache_hits = 0
        self._cache: dict[tuple, Candidate] = {}
        self._show_progress = show_progress if show_progress is not None else logging.is_progress_bar_enabled()
        self._bar = None
        self.base_results: dict[str, PerplexityResult] | None = None

    @staticmethod
    def parameter_name(vector: str, group: str) -> str:
        return f"{vector}:{group}"

    @staticmethod
    def _start(value: Any, group: str, bounds: tuple[float, float]) -> float:
        low, high = bounds
        return min(max(float(value_for_group(value, group) if isinstance(value, Mapping) else value), low), high)

    def nested(self, coefficients: Mapping[str, float]) -> dict[str, Any]:
        """Flat parameters as merger coefficients: `{vector: ω}`, or `{vector: {group: ω}}` per group."""
        if not self.per_group:
            return {n: float(coefficients[n]) for n in self.vector_names}
        nested: dict[str, dict[str, float]] = {v: {} for v in self.vector_names}
        for name, (i, j) in self.parameters.items():
            nested[self.vector_names[i]][self.groups[j]] = float(coefficients[name])
        return nested

    # ------------------------------------------------------------------ strategy API

    def expect(self, total: int | None) -> None:
        """Tell the progress bar how many candidates to expect."""
        if self._bar is None:
            self._bar = logging.tqdm(total=total, desc="Search", unit="cand", disable=not self._show_progress)

    def evaluate(self, coefficients: Mapping[str, float], label: str = "") -> float:
        """The objective of θ + Σ ω_i Δ_i (cached; `inf` for an undefined averaged candidate with Σω = 0)."""
        key, weights = self._key(coefficients)
        if key is None:
            return math.inf
        if key in self._cache:
            self.cache_hits += 1
            return self._cache[key].objective
        start = time.perf_counter()
        if DENSITY in coefficients:
            self.candidates.set_density(float(coefficients[DENSITY]))
        self.candidates.set_weights(weights)
        results = compute_perplexities(
            self.candidates.model, self.eval_sets, batch_size=self.config.batch_size,
            batch_tokens=self.config.batch_tokens, show_progress=False
        )
        return self._record(key, coefficients, results, FORWARD_COST, start, label).objective

    def value_and_grad(self, coefficients: Mapping[str, float], label: str = "") -> tuple[float, dict[str, float]]:
        """The objective and its gradient with respect to each parameter (one forward + backward pass)."""
        key, _ = self._key(coefficients)
        cached = self._cache.get(key) if key is not None else None
        if cached is not None and cached.gradient is not None:
            self.cache_hits += 1
            return cached.objective, dict(cached.gradient)
        start = time.perf_counter()
        results, gradient = self.gradient_on(self.eval_sets, coefficients)
        record = self._record(key, coefficients, results, GRADIENT_COST, start, label, gradient, replace=cached)
        return record.objective, gradient

    def gradient_on(
        self, eval_sets: Mapping[str, EvaluationSet], coefficients: Mapping[str, float]
    ) -> tuple[dict[str, PerplexityResult], dict[str, float]]:
        """Per-set results on `eval_sets` (e.g. a minibatch of the validation sequences) and the gradient of the
        objective over them with respect to each parameter; not recorded, not counted (see `cost_of`)."""
        key, weights = self._key(coefficients)
        if key is None:
            raise ValueError(f"The 'average' weighting is undefined where the coefficients sum to 0: {dict(coefficients)}.")
        self.candidates.set_weights(weights)
        results, set_grads = self.candidates.loss_gradients(
            eval_sets, self.config.batch_size, batch_tokens=self.config.batch_tokens
        )
        d_loss = self.objective.loss_gradient(results)
        d_weights = sum(d_loss[s] * torch.tensor(set_grads[s], dtype=torch.float64) for s in set_grads)
        d_omega = self._chain(coefficients, d_weights)
        return results, {n: float(d_omega[i, j]) for n, (i, j) in self.parameters.items()}

    def results_on(self, eval_sets: Mapping[str, EvaluationSet], coefficients: Mapping[str, float]) -> dict[str, PerplexityResult]:
        """Per-set results of a candidate on `eval_sets` (one forward pass); not recorded, not counted."""
        _, weights = self._key(coefficients)
        self.candidates.set_weights(weights)
        return compute_perplexities(self.candidates.model, eval_sets, batch_size=self.config.batch_size,
            batch_tokens=self.config.batch_tokens, show_progress=False)

    def cost_of(self, eval_sets: Mapping[str, EvaluationSet], per_pass: float) -> float:
        """Forward-pass equivalents of `per_pass` over `eval_sets`, as a share of all validation tokens."""
        return per_pass * sum(s.num_tokens for s in eval_sets.values()) / max(self.total_tokens, 1)

    # ------------------------------------------------------------------ internals

    def _omega(self, coefficients: Mapping[str, float]) -> torch.Tensor:
        omega = torch.zeros(len(self.vector_names), len(self.groups), dtype=torch.float64)
        for name, (i, j) in self.parameters.items():
            omega[i, j] = float(coefficients[name])
        return omega

    def _key(self, coefficients: Mapping[str, float]) -> tuple[tuple | None, list[list[float]]]:
        """The cache key and the effective (vectors × groups) weights; 'average' normalises each group's column."""
        omega = self._omega(coefficients)
        if self.weighting == "average":
            totals = omega.sum(dim=0)
            if bool((totals.abs() < 1e-12).any()):
                logging.warning_once(logger, "Skipping candidates whose coefficients sum to 0: undefined under 'average' weighting.")
                return None, omega.tolist()
            weights = [[float(omega[i, j]) / float(totals[j]) for j in range(omega.shape[1])] for i in range(omega.shape[0])]
        else:
            weights = omega.tolist()
        density = (round(float(coefficients[DENSITY]), 12),) if DENSITY in coefficients else ()
        return tuple(round(w, 12) for row in weights for w in row) + density, weights

    def _chain(self, coefficients: Mapping[str, float], d_weights: torch.Tensor) -> torch.Tensor:
        """∂/∂ω from ∂/∂w: identity for 'sum'; w_{i,g} = ω_{i,g}/Σ_j ω_{j,g} for 'average'."""
        if self.weighting != "average":
            return d_weights
        omega = self._omega(coefficients).requires_grad_(True)
        (omega / omega.sum(dim=0, keepdim=True)).backward(d_weights)
        return omega.grad

    def base(self) -> dict[str, PerplexityResult]:
        """Per-set results of the base model (evaluated once)."""
        if self.base_results is None:
            self.candidates.set_weights([0.0] * len(self.vector_names))
            self.base_results = compute_perplexities(
                self.candidates.model, self.eval_sets, batch_size=self.config.batch_size,
            batch_tokens=self.config.batch_tokens, show_progress=False
            )
            self.compute += FORWARD_COST
        return self.base_results

    def _record(self, key, coefficients, results, cost, start, label, gradient=None, replace=None, **extra) -> Candidate:
        objective = extra.pop("objective") if "objective" in extra else self.objective.value(results)
        record = Candidate(
            coefficients=self.nested(coefficients),
            objective=objective,
            perplexities={n: r.perplexity for n, r in results.items()},
            losses={n: r.loss for n, r in results.items()},
            compute=cost,
            seconds=time.perf_counter() - start,
            label=label,
            gradient=gradient,
            density=float(coefficients[DENSITY]) if DENSITY in coefficients else None,
            **extra,
        )
        if replace is not None:
            self.records.remove(replace)
        self.records.append(record)
        if key is not None:
            self._cache[key] = record
        self.compute += cost
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(best=f"{min(r.objective for r in self.records):.5g}", refresh=False)
        return record

    def record(self, coefficients: Mapping[str, float], results, cost: float, start: float, label: str, **extra) -> Candidate:
        """Record a candidate a strategy scored itself (e.g. on held-out sequences): counted, never cached.
        `extra`: `objective`, `gradient`, `fit_objective`, `holdout_objective`."""
        gradient = extra.pop("gradient", None)
        return self._record(None, coefficients, results, cost, start, label, gradient, **extra)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

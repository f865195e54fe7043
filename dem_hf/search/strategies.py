"""What a search strategy works with ([`SearchProblem`]), the objective it minimises, the strategy registry,
and the built-in strategies: `grid`, `random`, `bayesian` (Optuna) and `gradient`.

A strategy is a function `strategy(problem) -> None` registered under a name with [`register_strategy`].
It asks `problem.evaluate(coefficients)` for the objective of a candidate (one forward pass over all
validation sets) or `problem.value_and_grad(coefficients)` for the objective and its gradient with respect
to every coefficient (one forward + backward pass). The problem caches candidates (asking twice costs
nothing), counts compute in forward-pass equivalents and records every candidate; the best one wins.
"""

from __future__ import annotations

import itertools
import math
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from .. import logging

from ..evaluation.perplexity import (
    EvaluationSet,
    PerplexityResult,
    compute_perplexities,
)
from .config import SearchConfig
from .registry import register_strategy

if TYPE_CHECKING:
    from .candidates import CandidateModel

logger = logging.get_logger(__name__)

"""Search strategies by name: callables that take a [`SearchProblem`] and evaluate candidates through it."""

FORWARD_COST, GRADIENT_COST = 1.0, 3.0  # forward-pass equivalents of an evaluation and of a gradient




@dataclass
class Candidate:
    """One evaluated candidate: its coefficients, objective and per-set numbers, and what it cost
    (`compute` in forward-pass equivalents, `seconds` of wall time)."""

    coefficients: dict[str, float]
    objective: float
    perplexities: dict[str, float]
    losses: dict[str, float]
    compute: float
    seconds: float
    label: str = ""
    gradient: dict[str, float] | None = None


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
    """What a strategy works with: the vectors, bounds and config, and cached, counted evaluations.

    Attributes:
        vector_names: coefficient names, in order.
        bounds: `{vector name: (low, high)}`.
        initial: a starting point inside the bounds (`config.initial_coefficients` or the merger's).
        config: the [`SearchConfig`].
    """

    def __init__(self, candidates: CandidateModel, eval_sets: dict[str, EvaluationSet], config: SearchConfig,
                 vector_names: list[str], bounds: dict[str, tuple[float, float]], initial: dict[str, float],
                 weighting: str, show_progress: bool | None) -> None:
        self.candidates, self.eval_sets, self.config = candidates, eval_sets, config
        self.vector_names, self.bounds, self.initial, self.weighting = vector_names, bounds, initial, weighting
        self.objective = Objective(config, list(eval_sets))
        self.records: list[Candidate] = []
        self.compute = 0.0
        self.cache_hits = 0
        self._cache: dict[tuple, Candidate] = {}
        self._show_progress = show_progress if show_progress is not None else logging.is_progress_bar_enabled()
        self._bar = None
        self.base_results: dict[str, PerplexityResult] | None = None

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
        self.candidates.set_weights(weights)
        results = compute_perplexities(
            self.candidates.model, self.eval_sets, batch_size=self.config.batch_size, show_progress=False
        )
        return self._record(key, coefficients, results, FORWARD_COST, start, label).objective

    def value_and_grad(self, coefficients: Mapping[str, float], label: str = "") -> tuple[float, dict[str, float]]:
        """The objective and its gradient with respect to each coefficient (one forward + backward pass)."""
        key, weights = self._key(coefficients)
        if key is None:
            raise ValueError(f"The 'average' weighting is undefined where the coefficients sum to 0: {dict(coefficients)}.")
        cached = self._cache.get(key)
        if cached is not None and cached.gradient is not None:
            self.cache_hits += 1
            return cached.objective, dict(cached.gradient)
        start = time.perf_counter()
        self.candidates.set_weights(weights)
        results, set_grads = self.candidates.loss_gradients(self.eval_sets, self.config.batch_size)
        d_loss = self.objective.loss_gradient(results)
        d_weights = [sum(d_loss[s] * set_grads[s][i] for s in set_grads) for i in range(len(weights))]
        gradient = dict(zip(self.vector_names, self._chain(coefficients, d_weights)))
        record = self._record(key, coefficients, results, GRADIENT_COST, start, label, gradient, replace=cached)
        return record.objective, gradient

    # ------------------------------------------------------------------ internals

    def _key(self, coefficients: Mapping[str, float]) -> tuple[tuple | None, list[float]]:
        omega = [float(coefficients[n]) for n in self.vector_names]
        if self.weighting == "average":
            total = sum(omega)
            if abs(total) < 1e-12:
                logging.warning_once(logger, "Skipping candidates whose coefficients sum to 0: undefined under 'average' weighting.")
                return None, omega
            weights = [w / total for w in omega]
        else:
            weights = omega
        return tuple(round(w, 12) for w in weights), weights

    def _chain(self, coefficients: Mapping[str, float], d_weights: list[float]) -> list[float]:
        """∂/∂ω from ∂/∂w: identity for 'sum'; w = ω/Σω for 'average'."""
        if self.weighting != "average":
            return d_weights
        omega = torch.tensor([float(coefficients[n]) for n in self.vector_names], dtype=torch.float64, requires_grad=True)
        (omega / omega.sum()).backward(torch.tensor(d_weights, dtype=torch.float64))
        return omega.grad.tolist()

    def base(self) -> dict[str, PerplexityResult]:
        """Per-set results of the base model (evaluated once)."""
        if self.base_results is None:
            self.candidates.set_weights([0.0] * len(self.vector_names))
            self.base_results = compute_perplexities(
                self.candidates.model, self.eval_sets, batch_size=self.config.batch_size, show_progress=False
            )
            self.compute += FORWARD_COST
        return self.base_results

    def _record(self, key, coefficients, results, cost, start, label, gradient=None, replace=None) -> Candidate:
        record = Candidate(
            coefficients={n: float(coefficients[n]) for n in self.vector_names},
            objective=self.objective.value(results),
            perplexities={n: r.perplexity for n, r in results.items()},
            losses={n: r.loss for n, r in results.items()},
            compute=cost,
            seconds=time.perf_counter() - start,
            label=label,
            gradient=gradient,
        )
        if replace is not None:
            self.records.remove(replace)
        self.records.append(record)
        self._cache[key] = record
        self.compute += cost
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(best=f"{min(r.objective for r in self.records):.5g}", refresh=False)
        return record

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# ---------------------------------------------------------------------------------------------- strategies


def _grid_values(problem: SearchProblem) -> dict[str, list[float]]:
    values = problem.config.grid_values
    if values is None:
        count = problem.config.grid_points
        return {
            n: sorted({lo + (hi - lo) * i / max(count - 1, 1) for i in range(count)}) for n, (lo, hi) in problem.bounds.items()
        }
    return {n: list(values[n] if isinstance(values, dict) else values) for n in problem.vector_names}


@register_strategy("grid")
def grid_search(problem: SearchProblem) -> None:
    """The DEM paper's search: every combination of `grid_values` (the last coefficient varies fastest, so
    consecutive candidates differ in one vector and a switch reads one delta)."""
    values = _grid_values(problem)
    problem.expect(math.prod(len(v) for v in values.values()))
    for point in itertools.product(*(values[n] for n in problem.vector_names)):
        problem.evaluate(dict(zip(problem.vector_names, point)), label="grid")


@register_strategy("random")
def random_search(problem: SearchProblem) -> None:
    """`n_trials` candidates drawn uniformly within `bounds` (seeded)."""
    rng = random.Random(problem.config.seed)
    problem.expect(problem.config.n_trials)
    for trial in range(problem.config.n_trials):
        point = {n: rng.uniform(*problem.bounds[n]) for n in problem.vector_names}
        problem.evaluate(point, label=f"random {trial}")


@register_strategy("bayesian")
def bayesian_search(problem: SearchProblem) -> None:
    """Optuna's Gaussian-process (`bayesian_sampler="gp"`) or TPE sampler over `bounds`, `n_trials` trials,
    starting from `problem.initial`."""
    try:
        import optuna
    except ImportError as error:  # pragma: no cover
        raise ImportError("strategy='bayesian' needs Optuna: `pip install optuna`.") from error
    config = problem.config
    if config.bayesian_sampler == "gp":
        sampler = optuna.samplers.GPSampler(seed=config.seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=config.seed)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(direction="minimize", sampler=sampler)
        study.enqueue_trial(dict(problem.initial))
        problem.expect(config.n_trials)

        def objective(trial) -> float:
            point = {n: trial.suggest_float(n, *problem.bounds[n]) for n in problem.vector_names}
            return problem.evaluate(point, label=f"trial {trial.number}")

        study.optimize(objective, n_trials=config.n_trials)
    finally:
        optuna.logging.set_verbosity(verbosity)


class _BudgetSpent(Exception):
    """Raised inside an optimiser's callback when the evaluation budget is used up."""


@register_strategy("gradient")
def gradient_search(problem: SearchProblem) -> None:
    """Gradient descent on ω itself: ∂L/∂ω_i = ⟨∇θ L, Δ_i⟩, every coefficient's derivative from one backward pass.

    With `gradient_optimizer="lbfgs"` (default) SciPy's L-BFGS-B takes the steps: a quasi-Newton method
    that honours the bounds and, on a few smooth coefficients, converges in a handful of gradients. With
    `"adam"`, projected Adam: a step of size `gradient_lr` (cosine-decayed to a twentieth), then a clamp
    into the bounds. Either way at most `gradient_steps` gradients are computed, and the search stops
    early when the objective improves by less than `gradient_tolerance` (relative, L-BFGS-B) or no
    coefficient moves more than `gradient_tolerance` (Adam).
    """
    problem.expect(problem.config.gradient_steps)
    if problem.config.gradient_optimizer == "adam":
        _adam(problem)
    else:
        _lbfgs(problem)


def _lbfgs(problem: SearchProblem) -> None:
    try:
        import numpy as np
        from scipy.optimize import minimize
    except ImportError as error:  # pragma: no cover
        raise ImportError(
            "gradient_optimizer='lbfgs' needs SciPy: `pip install scipy`, or use gradient_optimizer='adam'."
        ) from error
    config, names = problem.config, problem.vector_names
    calls = 0

    def value_and_grad(x):
        nonlocal calls
        if calls >= config.gradient_steps:
            raise _BudgetSpent
        calls += 1
        value, gradient = problem.value_and_grad(dict(zip(names, x.tolist())), label=f"step {calls - 1}")
        return value, np.array([gradient[n] for n in names])

    try:
        minimize(
            value_and_grad,
            np.array([problem.initial[n] for n in names]),
            jac=True,
            method="L-BFGS-B",
            bounds=[problem.bounds[n] for n in names],
            options={"maxfun": config.gradient_steps, "ftol": config.gradient_tolerance, "gtol": config.gradient_tolerance},
        )
    except _BudgetSpent:
        pass


def _adam(problem: SearchProblem) -> None:
    config, names = problem.config, problem.vector_names
    low = torch.tensor([problem.bounds[n][0] for n in names], dtype=torch.float64)
    high = torch.tensor([problem.bounds[n][1] for n in names], dtype=torch.float64)
    omega = torch.nn.Parameter(torch.tensor([problem.initial[n] for n in names], dtype=torch.float64))
    optimizer = torch.optim.Adam([omega], lr=config.gradient_lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(config.gradient_steps - 1, 1), eta_min=config.gradient_lr / 20
    )
    for step in range(config.gradient_steps):
        _, gradient = problem.value_and_grad(dict(zip(names, omega.tolist())), label=f"step {step}")
        if step == config.gradient_steps - 1:
            break
        previous = omega.detach().clone()
        omega.grad = torch.tensor([gradient[n] for n in names], dtype=torch.float64)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            omega.copy_(torch.minimum(torch.maximum(omega, low), high))
        if float((omega.detach() - previous).abs().max()) < config.gradient_tolerance:
            break

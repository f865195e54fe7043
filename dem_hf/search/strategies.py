"""The built-in search strategies: `grid`, `random`, `bayesian` (Optuna) and `gradient`.

A strategy is a function `strategy(problem) -> None` registered under a name with [`register_strategy`]. It asks
its [`SearchProblem`] (`dem_hf/search/problem.py`) for the objective of candidates, or for their gradient, over the
problem's `parameter_names`: one per vector, or one per vector and group at `"layer"`/`"module"` granularity (the
`gradient` strategy then runs the per-group fit of `dem_hf/search/layerwise.py`).
"""

from __future__ import annotations

import itertools
import math
import random

import torch

from .. import logging
from .config import DENSITY
from .problem import FORWARD_COST, GRADIENT_COST, Candidate, Objective, SearchProblem
from .registry import register_strategy

__all__ = ["FORWARD_COST", "GRADIENT_COST", "Candidate", "Objective", "SearchProblem"]

logger = logging.get_logger(__name__)


# ---------------------------------------------------------------------------------------------- strategies


def _grid_values(problem: SearchProblem) -> dict[str, list[float]]:
    values, count = problem.config.grid_values, problem.config.grid_points
    if values is None:
        chosen = {
            n: sorted({lo + (hi - lo) * i / max(count - 1, 1) for i in range(count)})
            for n, (lo, hi) in problem.bounds.items() if n != DENSITY
        }
    else:
        chosen = {n: list(values[n] if isinstance(values, dict) else values) for n in problem.parameter_names}
    if DENSITY in problem.bounds:
        low, high = problem.bounds[DENSITY]
        steps = [i / max(count - 1, 1) for i in range(count)]
        chosen[DENSITY] = sorted({low * (1 - t) + high * t for t in steps})  # the bounds themselves at the ends
    return chosen


@register_strategy("grid")
def grid_search(problem: SearchProblem) -> None:
    """The DEM paper's search: every combination of `grid_values` (the last coefficient varies fastest, so
    consecutive candidates differ in one vector and a switch reads one delta)."""
    values = _grid_values(problem)
    problem.expect(math.prod(len(v) for v in values.values()))
    for point in itertools.product(*(values[n] for n in problem.dimensions)):
        problem.evaluate(dict(zip(problem.dimensions, point)), label="grid")


@register_strategy("random")
def random_search(problem: SearchProblem) -> None:
    """`n_trials` candidates drawn uniformly within `bounds` (seeded)."""
    rng = random.Random(problem.config.seed)
    problem.expect(problem.config.n_trials)
    for trial in range(problem.config.n_trials):
        point = {n: rng.uniform(*problem.bounds[n]) for n in problem.dimensions}
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
            point = {n: trial.suggest_float(n, *problem.bounds[n]) for n in problem.dimensions}
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

    At `"layer"`/`"module"` granularity the per-group fit of [`~dem_hf.search.layerwise.fit_per_group`] runs
    instead: projected Adam on stochastic minibatches, an L2 pull toward the start, early stopping on held-out
    sequences.
    """
    if problem.per_group:
        from .layerwise import fit_per_group

        fit_per_group(problem)
        return
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
    config, names = problem.config, problem.parameter_names
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
    config, names = problem.config, problem.parameter_names
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

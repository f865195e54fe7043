"""The per-group gradient fit: one coefficient ω_{i,g} per vector i and group g (transformer block, or module group).

What the `gradient` strategy runs at `SearchConfig(granularity="layer" | "module")`. Per-group coefficients have many
more degrees of freedom than per-vector ones, so the fit is guarded against fitting the validation data:

- **held-out sequences**: `holdout_fraction` of each validation set's sequences (split by sequence, seeded) are not
  fitted; every step is scored on them, the result keeps the step with the best held-out objective, and the fit
  stops after `early_stopping_patience` steps without a better one;
- **a pull toward the start**: the fit minimises objective(ω) + λ·Σ_{i,g} (ω_{i,g} − ω⁰_{i,g})² with
  λ = `layer_regularization` and ω⁰ the start (`initial_coefficients`, else the merger's current coefficients);
- **bounds**: projected Adam (a step of `gradient_lr`, cosine-decayed to a twentieth, then a clamp into `bounds`);
- **stochastic steps**: each step's gradient is taken on `gradient_batch_sequences` sequences per set drawn from
  the fit part (all of it when `None`); one backward pass gives ∂/∂ω_{i,g} for every i and g
  (`CandidateModel.loss_gradients`).

Every step is recorded as a [`Candidate`] with its `fit_objective` (on the step's fit sequences, before the penalty)
and `holdout_objective`, so overfitting is visible in the `SearchResult` and its table. Compute is counted in
forward-pass equivalents as a share of all validation tokens: a gradient on a minibatch costs 3 × its share, a
held-out evaluation 1 × its share.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping

import torch

from .. import logging
from ..evaluation.perplexity import EvaluationSet
from .problem import FORWARD_COST, GRADIENT_COST, SearchProblem

logger = logging.get_logger(__name__)


def subset(eval_set: EvaluationSet, indices: list[int]) -> EvaluationSet:
    """The sequences `indices` (ascending, so the length order is kept) of an `EvaluationSet`, as a new one."""
    return EvaluationSet(
        input_ids=[eval_set.input_ids[i] for i in indices],
        loss_mask=[eval_set.loss_mask[i] for i in indices],
        example_indices=[eval_set.example_indices[i] for i in indices],
        pad_token_id=eval_set.pad_token_id,
        max_length=eval_set.max_length,
        dataset_format=eval_set.dataset_format,
    )


def split_holdout(
    eval_sets: Mapping[str, EvaluationSet], fraction: float, seed: int
) -> tuple[dict[str, EvaluationSet], dict[str, EvaluationSet]]:
    """`(fit, held out)` sets: `round(fraction · n)` sequences of each set, drawn with `seed`, are held out (none
    when `fraction` is 0). A set too small to keep a sequence on each side is refused with a `ValueError`."""
    if fraction <= 0:
        return dict(eval_sets), {}
    fit, held = {}, {}
    generator = torch.Generator().manual_seed(seed)
    for name, eval_set in eval_sets.items():
        count = len(eval_set)
        held_count = round(fraction * count)
        if held_count < 1 or held_count >= count:
            raise ValueError(
                f"Validation set {name!r} has {count} sequence(s): too few to hold out {fraction:.0%} of them and fit "
                "on the rest (the per-group fit needs at least one of each); give more sequences, or "
                "SearchConfig(holdout_fraction=0) to fit on everything without early stopping."
            )
        order = torch.randperm(count, generator=generator).tolist()
        held[name] = subset(eval_set, sorted(order[:held_count]))
        fit[name] = subset(eval_set, sorted(order[held_count:]))
    return fit, held


def minibatch(
    eval_sets: Mapping[str, EvaluationSet], sequences: int | None, generator: torch.Generator
) -> dict[str, EvaluationSet]:
    """`sequences` sequences of each set drawn without replacement (all of a smaller set; every set when `None`)."""
    if sequences is None:
        return dict(eval_sets)
    drawn = {}
    for name, eval_set in eval_sets.items():
        if len(eval_set) <= sequences:
            drawn[name] = eval_set
        else:
            drawn[name] = subset(eval_set, sorted(torch.randperm(len(eval_set), generator=generator)[:sequences].tolist()))
    return drawn


def fit_per_group(problem: SearchProblem) -> None:
    """Fit ω_{i,g} by projected Adam on the regularised objective, with held-out early stopping (see the module)."""
    config, names = problem.config, problem.parameter_names
    fit_sets, held_sets = split_holdout(problem.eval_sets, config.holdout_fraction, config.seed)
    start = torch.tensor([problem.initial[n] for n in names], dtype=torch.float64)
    low = torch.tensor([problem.bounds[n][0] for n in names], dtype=torch.float64)
    high = torch.tensor([problem.bounds[n][1] for n in names], dtype=torch.float64)
    omega = torch.nn.Parameter(start.clone())
    optimizer = torch.optim.Adam([omega], lr=config.gradient_lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(config.gradient_steps - 1, 1), eta_min=config.gradient_lr / 20
    )
    generator = torch.Generator().manual_seed(config.seed)
    problem.expect(config.gradient_steps)
    best, waited = math.inf, 0
    for step in range(config.gradient_steps):
        began = time.perf_counter()
        coefficients = dict(zip(names, omega.detach().tolist()))
        batch = minibatch(fit_sets, config.gradient_batch_sequences, generator)
        results, gradient = problem.gradient_on(batch, coefficients)
        fit_value = problem.objective.value(results)
        cost = problem.cost_of(batch, GRADIENT_COST)
        held_value, shown = None, results
        if held_sets:
            shown = problem.results_on(held_sets, coefficients)
            held_value = problem.objective.value(shown)
            cost += problem.cost_of(held_sets, FORWARD_COST)
        problem.record(
            coefficients, shown, cost, began, f"step {step}", objective=held_value if held_sets else fit_value,
            gradient=gradient, fit_objective=fit_value, holdout_objective=held_value,
        )
        if held_value is not None:
            best, waited = (held_value, 0) if held_value < best else (best, waited + 1)
            if waited >= config.early_stopping_patience:
                logger.info(f"Per-group fit stopped early at step {step}: no better held-out objective for {waited} steps.")
                break
        if step == config.gradient_steps - 1:
            break
        penalty = 2.0 * config.layer_regularization * (omega.detach() - start)
        omega.grad = torch.tensor([gradient[n] for n in names], dtype=torch.float64) + penalty
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            omega.copy_(torch.minimum(torch.maximum(omega, low), high))

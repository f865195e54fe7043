"""The search strategies by name: a registry that imports no strategy code.

[`SearchConfig`] checks a strategy name here without importing the strategies (Optuna, SciPy); the built-in
strategies (`grid`, `random`, `bayesian`, `gradient`, in `dem_hf/search/strategies.py`) are imported only when a
search runs, through [`get_strategy`]. [`register_strategy`] adds a strategy of your own.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .strategies import SearchProblem

    Strategy = Callable[[SearchProblem], None]

BUILTIN_STRATEGIES = ("grid", "random", "bayesian", "gradient")
SEARCH_STRATEGIES: dict[str, Strategy] = {}  # filled by `register_strategy`, built-ins on first use


def register_strategy(name: str) -> Callable[[Strategy], Strategy]:
    """Decorator adding a strategy `fn(problem: SearchProblem) -> None` under `name`.

    Example:
        ```python
        >>> @register_strategy("ones")
        ... def ones(problem):
        ...     problem.evaluate({name: 1.0 for name in problem.vector_names})
        >>> merger.search(eval_sets, SearchConfig(strategy="ones"))
        ```
    """

    def decorator(fn: Strategy) -> Strategy:
        SEARCH_STRATEGIES[name] = fn
        return fn

    return decorator


def strategy_names() -> list[str]:
    """Every strategy name a [`SearchConfig`] accepts: the built-ins and the registered ones."""
    return sorted({*BUILTIN_STRATEGIES, *SEARCH_STRATEGIES})


def get_strategy(name: str) -> Strategy:
    """The strategy registered as `name`, importing the built-in strategies on first use."""
    if name in BUILTIN_STRATEGIES and name not in SEARCH_STRATEGIES:
        importlib.import_module(".strategies", __package__)
    if name not in SEARCH_STRATEGIES:
        raise ValueError(f"Unknown search strategy {name!r}; expected one of {strategy_names()}.")
    return SEARCH_STRATEGIES[name]

"""Pictures of a coefficient search: the objective against the coefficients.

- one vector: the objective against its coefficient;
- two vectors: a heat map (a full grid is drawn as cells, other strategies as coloured points, with the
  path of a gradient search);
- more: parallel coordinates, one line per candidate across the coefficient axes (each spanning its bounds) and the
  objective, coloured by the objective, the best in red.

Every plot shows the bounds of the search (dashed) and the base model's point ω = 0 (a black cross: the objective
there when a candidate at ω = 0 was evaluated), and says that a lower objective is better.

matplotlib is imported only when a plot is asked for (`pip install dem_hf[plot]`); figures are drawn on
the Agg canvas, so no display and no global pyplot state are involved.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..io.outputs import write_file_atomic

if TYPE_CHECKING:
    from .result import SearchResult

BEST_COLOR = "#d62728"
BASE_COLOR = "black"
BOUNDS_STYLE = {"color": "gray", "linestyle": "--", "linewidth": 0.9}
OBJECTIVE_LABEL = "objective (lower is better)"


def import_matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("Plotting a search needs matplotlib: `pip install dem_hf[plot]`.") from error
    return Figure, FigureCanvasAgg


def plot_search(result: SearchResult | Mapping[str, Any], path: str | os.PathLike | None = None, *, title: str | None = None):
    """Draw a search's candidates: objective against coefficients. Saves a PNG at `path` if given.

    Args:
        result: a [`SearchResult`] or its `to_dict()` (e.g. `merger.config.search_result`).
        path: where to save the figure as PNG.
        title: figure title (default: strategy, objective and number of candidates).

    Returns:
        `matplotlib.figure.Figure`.

    Example:
        ```python
        >>> from dem_hf.search.plots import plot_search
        >>> plot_search(merger.search(eval_sets), "search.png")
        ```
    """
    from .result import SearchResult

    if isinstance(result, Mapping):
        result = SearchResult.from_dict(result)
    candidates = [c for c in result.candidates if math.isfinite(c.objective)]
    if not candidates:
        raise ValueError("The search result has no candidate with a finite objective to plot.")
    names = list(result.best_coefficients)
    bounds = searched_bounds(result, names)
    Figure, FigureCanvasAgg = import_matplotlib()
    figure = Figure(figsize=(7.5, 5.5) if len(names) < 3 else (max(7.5, 1.6 * (len(names) + 1)), 5.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    if any(c.fit_objective is not None for c in candidates):  # the per-group fit: objectives per step
        _steps(axes, candidates, result)
    elif len(names) == 1:
        _line(axes, candidates, names[0], result, bounds)
    elif len(names) == 2:
        _heat_map(figure, axes, candidates, names, result, bounds)
    else:
        _parallel_coordinates(figure, axes, candidates, names, result, bounds)
    axes.set_title(title or f"{result.strategy} search: {len(result.candidates)} candidates\n{result.objective}", fontsize=9)
    figure.tight_layout()
    if path is not None:
        write_file_atomic(path, lambda handle: figure.savefig(handle, format="png", dpi=120), binary=True)
    return figure


def _steps(axes, candidates, result) -> None:
    """The per-group gradient fit, step by step: fit and held-out objectives (overfitting shows as a gap)."""
    steps = range(len(candidates))
    axes.plot(steps, [c.fit_objective for c in candidates], "o-", markersize=3, label="fit (minibatch)")
    if any(c.holdout_objective is not None for c in candidates):
        axes.plot(steps, [c.holdout_objective for c in candidates], "s-", markersize=3, label="held-out")
    best = min(steps, key=lambda i: candidates[i].objective)
    axes.plot([best], [candidates[best].objective], "*", color=BEST_COLOR, markersize=14, label="best (kept)")
    axes.set_xlabel(f"step ({result.granularity} granularity)")
    axes.set_ylabel("objective")
    axes.legend()


def searched_bounds(result: SearchResult, names: list[str]) -> dict[str, tuple[float, float]]:
    """The interval each coefficient was searched over, from the result's `search_config`: the grid's range for a
    grid of given values, else the bounds (each vector's, or one pair for all); `{}` when not recorded."""
    config = result.search_config or {}
    spec = config.get("grid_values") if result.strategy == "grid" and config.get("grid_values") is not None else None
    if spec is not None:
        values = spec if isinstance(spec, Mapping) else {n: spec for n in names}
        return {n: (float(min(values[n])), float(max(values[n]))) for n in names if n in values and len(values[n])}
    bounds = config.get("bounds")
    if bounds is None:
        return {}
    per_vector = bounds if isinstance(bounds, Mapping) else {n: bounds for n in names}
    return {n: (float(per_vector[n][0]), float(per_vector[n][1])) for n in names if n in per_vector}


def _base_point(candidates, names: list[str]):
    """The candidate at ω = 0 (the base model), if one was evaluated."""
    return next((c for c in candidates if all(c.coefficients[n] == 0 for n in names)), None)


def _line(axes, candidates, name: str, result, bounds) -> None:
    points = sorted((c.coefficients[name], c.objective) for c in candidates)
    axes.plot([p[0] for p in points], [p[1] for p in points], "o-", color="#1f77b4", markersize=4)
    axes.plot([result.best_coefficients[name]], [result.best_objective], "*", color=BEST_COLOR, markersize=14, label="best")
    if name in bounds:
        for position, edge in enumerate(bounds[name]):
            axes.axvline(edge, **BOUNDS_STYLE, label="bounds" if position == 0 else None)
    base = _base_point(candidates, [name])
    if base is not None:
        axes.plot([0.0], [base.objective], "X", color=BASE_COLOR, markersize=10, label="base (ω = 0)")
    else:
        axes.axvline(0.0, color=BASE_COLOR, linewidth=0.8, label="base (ω = 0)")
    axes.set_xlabel(f"ω[{name}]")
    axes.set_ylabel(OBJECTIVE_LABEL)
    axes.legend(fontsize=8)


def _heat_map(figure, axes, candidates, names: list[str], result, bounds) -> None:
    x_name, y_name = names
    xs = sorted({c.coefficients[x_name] for c in candidates})
    ys = sorted({c.coefficients[y_name] for c in candidates})
    if result.strategy == "grid" and len(xs) * len(ys) == len(candidates):
        values = {(c.coefficients[x_name], c.coefficients[y_name]): c.objective for c in candidates}
        grid = [[values[(x, y)] for x in xs] for y in ys]
        image = axes.imshow(grid, origin="lower", cmap="viridis_r", aspect="auto")
        axes.set_xticks(range(len(xs)), [f"{x:.3g}" for x in xs])
        axes.set_yticks(range(len(ys)), [f"{y:.3g}" for y in ys])
        best = (xs.index(result.best_coefficients[x_name]), ys.index(result.best_coefficients[y_name]))
        for row, y in enumerate(ys):
            for column, x in enumerate(xs):
                axes.text(column, row, f"{values[(x, y)]:.4g}", ha="center", va="center", fontsize=7, color="white")
        # cells are indexed: the grid's edges are the bounds; the base is marked where the grid holds ω = 0
        axes.add_patch(_rectangle((-0.5, -0.5), len(xs), len(ys), label="bounds"))
        base = (xs.index(0.0), ys.index(0.0)) if 0.0 in xs and 0.0 in ys else None
    else:
        image = axes.scatter(
            [c.coefficients[x_name] for c in candidates], [c.coefficients[y_name] for c in candidates],
            c=[c.objective for c in candidates], cmap="viridis_r", s=40, edgecolors="k", linewidths=0.3,
        )
        if result.strategy == "gradient":
            axes.plot([c.coefficients[x_name] for c in candidates], [c.coefficients[y_name] for c in candidates],
                      "-", color="gray", linewidth=0.8, zorder=0)
        best = (result.best_coefficients[x_name], result.best_coefficients[y_name])
        if x_name in bounds and y_name in bounds:
            (x_low, x_high), (y_low, y_high) = bounds[x_name], bounds[y_name]
            axes.add_patch(_rectangle((x_low, y_low), x_high - x_low, y_high - y_low, label="bounds"))
        base = (0.0, 0.0)
    axes.plot(*best, "*", color=BEST_COLOR, markersize=16, markeredgecolor="white", label="best")
    if base is not None:
        axes.plot(*base, "X", color=BASE_COLOR, markersize=10, markeredgecolor="white", label="base (ω = 0)")
    figure.colorbar(image, ax=axes, label=OBJECTIVE_LABEL)
    axes.set_xlabel(f"ω[{x_name}]")
    axes.set_ylabel(f"ω[{y_name}]")
    axes.legend(loc="best", fontsize=8)


def _rectangle(corner, width: float, height: float, label: str):
    from matplotlib.patches import Rectangle

    return Rectangle(corner, width, height, fill=False, **BOUNDS_STYLE, label=label)


def _parallel_coordinates(figure, axes, candidates, names: list[str], result, bounds) -> None:
    from matplotlib import cm, colormaps, colors

    columns = [*names, "objective"]
    table = [[c.coefficients[n] for n in names] + [c.objective] for c in candidates]
    # each coefficient axis spans its bounds (the candidates' range where none were recorded), the objective its range
    low = [bounds[n][0] if n in bounds else min(row[i] for row in table) for i, n in enumerate(names)]
    high = [bounds[n][1] if n in bounds else max(row[i] for row in table) for i, n in enumerate(names)]
    low.append(min(row[-1] for row in table))
    high.append(max(row[-1] for row in table))
    scale = [(h - lo) or 1.0 for lo, h in zip(low, high)]
    norm = colors.Normalize(vmin=low[-1], vmax=high[-1])
    colormap = colormaps["viridis_r"]
    best = min(range(len(table)), key=lambda i: table[i][-1])
    for index in sorted(range(len(table)), key=lambda i: -table[i][-1]):  # best drawn last, on top
        row = table[index]
        ys = [(v - lo) / s for v, lo, s in zip(row, low, scale)]
        if index == best:
            continue
        axes.plot(range(len(columns)), ys, color=colormap(norm(row[-1])), alpha=0.5, linewidth=0.9)
    ys = [(v - lo) / s for v, lo, s in zip(table[best], low, scale)]
    axes.plot(range(len(columns)), ys, color=BEST_COLOR, linewidth=2.5, label="best")
    base = [(i, (0.0 - low[i]) / scale[i]) for i in range(len(names)) if low[i] <= 0.0 <= high[i]]
    if base:
        axes.plot([i for i, _ in base], [y for _, y in base], "X", color=BASE_COLOR, markersize=8, label="base (ω = 0)")
    if bounds:
        axes.plot([], [], **BOUNDS_STYLE, label="axis ends: bounds")
    axes.set_xticks(range(len(columns)), [f"ω[{n}]" if n != "objective" else OBJECTIVE_LABEL for n in columns])
    axes.set_yticks([])
    for i in range(len(columns)):
        axes.axvline(i, color="k", linewidth=0.6)
        axes.text(i, -0.04, f"{low[i]:.3g}", ha="center", va="top", fontsize=7)
        axes.text(i, 1.04, f"{high[i]:.3g}", ha="center", va="bottom", fontsize=7)
    axes.set_ylim(-0.12, 1.12)
    figure.colorbar(cm.ScalarMappable(norm=norm, cmap=colormap), ax=axes, label=OBJECTIVE_LABEL)
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.07), fontsize=8, frameon=False)

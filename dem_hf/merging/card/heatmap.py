"""Per-group coefficients on the model card: a table (groups × vectors) and a heat map PNG saved beside it.

The heat map needs matplotlib (the `plot` extra: `pip install "dem_hf[plot]"`); without it the card shows the table
and says how to get the picture. Pure apart from [`save_heatmap`], which writes the PNG.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..groups import ALL_GROUPS, is_per_group, sort_groups, value_for_group

HEATMAP_NAME = "coefficients_heatmap.png"


def has_matplotlib() -> bool:
    """Whether the heat map can be drawn (matplotlib installed), without importing it."""
    return importlib.util.find_spec("matplotlib") is not None


def coefficient_grid(coefficients: Mapping[str, Any]) -> tuple[list[str], list[str], list[list[float]]]:
    """`(groups, vectors, values)` of per-group coefficients: the groups any vector names (model order, `"*"` last:
    "every group not named"), and `values[g][v]` the weight vector `v` has on group `g` (a per-vector number on every
    group). Empty lists when no coefficient is per group."""
    if not is_per_group(coefficients):
        return [], [], []
    groups = sort_groups({g for value in coefficients.values() if isinstance(value, Mapping) for g in value})
    vectors = list(coefficients)
    return groups, vectors, [[float(value_for_group(coefficients[v], g)) for v in vectors] for g in groups]


def group_label(group: str) -> str:
    return "other groups (`*`)" if group == ALL_GROUPS else f"`{group}`"


def save_heatmap(coefficients: Mapping[str, Any], path: str | os.PathLike) -> Path | None:
    """Draw ω per vector × group as a PNG at `path` (one column per vector, one row per group, values written in
    the cells); `None` (nothing written) when no coefficient is per group or matplotlib is missing."""
    groups, vectors, values = coefficient_grid(coefficients)
    if not groups or not has_matplotlib():
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global state, safe in threads

    figure = Figure(figsize=(1.6 + 1.1 * len(vectors), 1.2 + 0.35 * len(groups)), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(values, aspect="auto", cmap="viridis")
    axes.set_xticks(range(len(vectors)), labels=vectors, rotation=30, ha="right")
    axes.set_yticks(range(len(groups)), labels=[g if g != ALL_GROUPS else "* (others)" for g in groups])
    if len(groups) * len(vectors) <= 400:
        for row, line in enumerate(values):
            for column, value in enumerate(line):
                axes.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=7, color="white")
    axes.set_title("Coefficient ω per vector and group")
    figure.colorbar(image, ax=axes)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path)
    return path

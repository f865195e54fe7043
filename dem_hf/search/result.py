"""`SearchResult`: every candidate a search scored, the best one, and tables of them (per vector and per group)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from .. import __version__
from ..merging.groups import mean_coefficient
from .problem import Candidate


@dataclass
class SearchResult:
    """What a coefficient search found, and everything it evaluated on the way.

    Args:
        best_coefficients: the coefficients ω with the lowest objective: `{vector: ω}`, or `{vector: {group: ω}}`
            at `"layer"`/`"module"` granularity (the step with the best held-out objective of the per-group fit).
        best_objective: that objective's value.
        objective: the objective in words, e.g. `"mean log_perplexity over ['chat', 'math']"`.
        strategy: the strategy's name.
        candidates: every candidate evaluated, in order (see [`Candidate`]).
        wall_time_s: seconds from the first evaluation to the last.
        compute: forward-pass equivalents used (one evaluation over all validation sets = 1, a gradient = 3).
        num_cache_hits: candidates asked for again and answered from the cache.
        base_perplexities: the base model's perplexity per set, when the objective needed it.
        eval_sets: per validation set, `num_sequences`, `num_tokens` and `num_truncated`.
        weighting: the merger's weighting (`"sum"` or `"average"`).
        search_config: the [`SearchConfig`] used, as a dict.
        best_density: the merge operator's density of the best candidate, when the density was searched.
        granularity: `"vector"`, `"layer"` or `"module"`.

    Saved in `dem_config.json` by `DEMMerger.save_pretrained`; `SearchResult.from_dict(merger.config.search_result)`
    brings it back.

    Example:
        ```python
        >>> result = merger.search(eval_sets, SearchConfig(strategy="gradient"))
        >>> result.best_coefficients, result.best_objective, result.compute
        >>> print(result.table(top=10))
        ```
    """

    best_coefficients: dict[str, float]
    best_objective: float
    objective: str
    strategy: str
    candidates: list[Candidate]
    wall_time_s: float
    compute: float
    num_cache_hits: int = 0
    base_perplexities: dict[str, float] | None = None
    eval_sets: dict[str, dict[str, int]] = field(default_factory=dict)
    weighting: str = "sum"
    search_config: dict[str, Any] = field(default_factory=dict)
    dem_hf_version: str = __version__
    best_density: float | None = None
    granularity: str = "vector"

    @property
    def best(self) -> Candidate:
        """The best candidate's record."""
        return min(self.candidates, key=lambda c: c.objective)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SearchResult:
        values = dict(values)
        values["candidates"] = [Candidate(**c) for c in values.get("candidates", [])]
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in values.items() if k in known})

    def table(self, top: int | None = None) -> str:
        """A text table of the candidates, best first (`top` rows at most; all if `None`)."""
        rows = sorted(self.candidates, key=lambda c: c.objective)
        shown = rows if top is None or top <= 0 else rows[:top]
        vectors = list(self.best_coefficients)
        sets = list(self.eval_sets) or (list(shown[0].perplexities) if shown else [])
        split = any(c.fit_objective is not None for c in self.candidates)  # the per-group fit: fit and held-out
        grouped = any(isinstance(v, Mapping) for v in self.best_coefficients.values())
        header = ["#", *(f"mean:{v}" if grouped else v for v in vectors), "objective",
                  *(["fit", "held-out"] if split else []), *(f"ppl:{s}" for s in sets)]
        order = {id(c): i for i, c in enumerate(self.candidates)}
        body = [
            [str(order[id(c)]), *(f"{mean_coefficient(c.coefficients[v]):.4g}" for v in vectors), f"{c.objective:.6g}",
             *([_cell(c.fit_objective), _cell(c.holdout_objective)] if split else []),
             *(f"{c.perplexities.get(s, math.nan):.4f}" for s in sets)]
            for c in shown
        ]
        widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
        lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in [header, *body]]
        if len(shown) < len(rows):
            lines.append(f"({len(rows) - len(shown)} more candidates not shown)")
        return "\n".join(lines)

    def per_group_table(self) -> str:
        """The best per-group coefficients as text, a row per group and a column per vector ("" at "vector"
        granularity)."""
        groups = list(dict.fromkeys(g for v in self.best_coefficients.values() if isinstance(v, Mapping) for g in v))
        if not groups:
            return ""
        vectors = list(self.best_coefficients)
        rows = [["group", *vectors]] + [
            [g, *(f"{_value(self.best_coefficients[v], g):.4g}" for v in vectors)] for g in groups
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows)

    def to_pandas(self):
        """The candidates as a `pandas.DataFrame`: one column per coefficient, objective, perplexities."""
        import pandas as pd

        return pd.DataFrame(
            [
                {**_flat(c.coefficients), "objective": c.objective, "fit_objective": c.fit_objective,
                 "holdout_objective": c.holdout_objective, **{f"ppl:{k}": v for k, v in c.perplexities.items()},
                 "label": c.label}
                for c in self.candidates
            ]
        )


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.6g}"


def _value(coefficient: Any, group: str) -> float:
    return coefficient[group] if isinstance(coefficient, Mapping) else coefficient


def _flat(coefficients: Mapping[str, Any]) -> dict[str, float]:
    """`{vector: ω}` as it is, `{vector: {group: ω}}` as `{"vector:group": ω}` columns."""
    flat = {}
    for name, value in coefficients.items():
        if isinstance(value, Mapping):
            flat.update({f"{name}:{group}": w for group, w in value.items()})
        else:
            flat[name] = value
    return flat

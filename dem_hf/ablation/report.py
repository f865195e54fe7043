"""What a data-ablation simulation reports: ranked proxy scores, proxy-vs-trained correlations, compute, plots.

[`AblationResult`] is the ranked table [`~dem_hf.ablation.pool.evaluate_mixtures`] returns (text table, dict, CSV,
`pandas.DataFrame`); [`ProxyValidation`] is what [`~dem_hf.ablation.pool.validate_proxy`] returns: the proxy
ranking beside models really trained on each candidate mixture, with Pearson and Spearman correlations and the
training compute of both routes. Correlations are plain Python (no SciPy needed); plots need matplotlib
(`pip install dem_hf[plot]`), imported only when a plot is drawn.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..io.outputs import write_file_atomic

__all__ = [
    "AblationResult", "MixtureScore", "ProxyValidation", "pearson", "plot_ablation", "plot_proxy_validation",
    "rank_scores", "spearman", "sum_compute",
]

COMPUTE_KEYS = ("flops_6nd", "total_flos", "tokens_seen", "global_step", "train_runtime")


@dataclass
class MixtureScore:
    """The proxy score of one candidate mixture.

    Args:
        name: the candidate's name.
        weights: `{partition: weight}`, normalised to sum to 1 (the parameter average's weights).
        perplexities: `{validation set: perplexity}` of the parameter-averaged model.
        losses: `{validation set: mean NLL per token}`.
        objective: the aggregate the ranking uses (lower is better).
        rank: 1 for the best candidate.
    """

    name: str
    weights: dict[str, float]
    perplexities: dict[str, float]
    losses: dict[str, float]
    objective: float
    rank: int = 0


def rank_scores(scores: Sequence[MixtureScore]) -> list[MixtureScore]:
    """Scores sorted best first (lowest objective; NaN last; ties broken by name), with `rank` set from 1."""
    ordered = sorted(scores, key=lambda s: (math.isnan(s.objective), s.objective, s.name))
    for rank, score in enumerate(ordered, start=1):
        score.rank = rank
    return ordered


@dataclass
class AblationResult:
    """Candidate data mixtures ranked by proxy perplexity (see [`~dem_hf.ablation.pool.evaluate_mixtures`]).

    Args:
        scores: one [`MixtureScore`] per candidate, best first.
        objective: the ranking objective in words, e.g. `"mean perplexity over ['web', 'code']"`.
        partitions: the pool's partition names, in pool order.
        eval_sets: per validation set, `num_sequences`, `num_tokens` and `num_truncated`.
        base_perplexities: the base model's perplexity per set, when the objective needed it.
        compute: forward passes over all validation sets (one per distinct candidate, plus the base if needed).
        wall_time_s: seconds spent evaluating.

    Example:
        ```python
        >>> result = evaluate_mixtures(pool, ["web,code", "web=0.7,books=0.3"], {"val": val})
        >>> print(result.table())
        >>> result.to_csv("ablation.csv")
        ```
    """

    scores: list[MixtureScore]
    objective: str
    partitions: list[str]
    eval_sets: dict[str, dict[str, int]] = field(default_factory=dict)
    base_perplexities: dict[str, float] | None = None
    compute: float = 0.0
    wall_time_s: float = 0.0
    dem_hf_version: str = __version__

    @property
    def best(self) -> MixtureScore:
        """The best-ranked candidate."""
        return self.scores[0]

    @property
    def ranking(self) -> list[str]:
        """Candidate names, best first."""
        return [score.name for score in self.scores]

    def __getitem__(self, name: str) -> MixtureScore:
        for score in self.scores:
            if score.name == name:
                return score
        raise KeyError(f"No candidate named {name!r}; the candidates are {self.ranking}.")

    def rows(self) -> list[dict[str, Any]]:
        """One flat record per candidate, best first: rank, candidate, objective, `ppl:<set>`, `weight:<partition>`."""
        sets = list(self.eval_sets) or (list(self.scores[0].perplexities) if self.scores else [])
        return [
            {"rank": s.rank, "candidate": s.name, "objective": s.objective,
             **{f"ppl:{n}": s.perplexities.get(n, math.nan) for n in sets},
             **{f"weight:{p}": s.weights.get(p, 0.0) for p in self.partitions}}
            for s in self.scores
        ]

    def table(self, top: int | None = None) -> str:
        """A text table, best first (`top` rows at most; all if `None` or 0)."""
        rows = self.rows()
        shown = rows if not top or top <= 0 else rows[:top]
        if not rows:
            return "(no candidates)"
        header = list(rows[0])
        body = [[_cell(row[key]) for key in header] for row in shown]
        text = _align([header, *body])
        if len(shown) < len(rows):
            text += f"\n({len(rows) - len(shown)} more candidates not shown)"
        return text

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> AblationResult:
        values = dict(values)
        values["scores"] = [MixtureScore(**s) for s in values.get("scores", [])]
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in values.items() if k in known})

    def to_pandas(self):
        """The ranked table as a `pandas.DataFrame` (one row per candidate, best first)."""
        import pandas as pd

        return pd.DataFrame(self.rows())

    def to_csv(self, path: str | os.PathLike) -> Path:
        """Write the ranked table as CSV, atomically (a temporary file renamed into place). Returns the path."""
        rows = self.rows()
        header = list(rows[0]) if rows else ["rank", "candidate", "objective"]
        return write_file_atomic(path, lambda handle: _write_csv(handle, header, rows))


@dataclass
class ProxyValidation:
    """Proxy perplexities beside the perplexities of models really trained on each candidate mixture.

    Args:
        proxy: the [`AblationResult`] of the candidates.
        trained_perplexities: `{candidate: {validation set: perplexity}}` of the model trained on the mixture.
        trained_objectives: `{candidate: objective}` of those models (same objective as the proxy).
        pearson: Pearson correlation between proxy and trained objectives over the candidates.
        spearman: Spearman rank correlation between them.
        per_set: `{validation set: {"pearson": r, "spearman": rho}}` between proxy and trained perplexities.
        compute: training compute of the pool (`"pool"`) and of training every candidate (`"candidates"`), each
            summed over runs per key of `run_info.json`'s compute; `"candidates_over_pool"` their ratios.
        runs: `{candidate: run folder}` of the trained mixtures.
        plot_path: where the scatter plot was saved, if one was asked for.
    """

    proxy: AblationResult
    trained_perplexities: dict[str, dict[str, float]]
    trained_objectives: dict[str, float]
    pearson: float
    spearman: float
    per_set: dict[str, dict[str, float]]
    compute: dict[str, Any]
    runs: dict[str, str] = field(default_factory=dict)
    plot_path: str | None = None

    def table(self) -> str:
        """Candidates in proxy order with the proxy and trained objectives and both ranks, then the correlations."""
        trained_order = sorted(self.trained_objectives, key=lambda n: (self.trained_objectives[n], n))
        header = ["candidate", "proxy", "trained", "proxy rank", "trained rank"]
        body = [[s.name, _cell(s.objective), _cell(self.trained_objectives[s.name]), str(s.rank),
                 str(trained_order.index(s.name) + 1)] for s in self.proxy.scores]
        return _align([header, *body]) + f"\nPearson r = {self.pearson:.4f}, Spearman rho = {self.spearman:.4f}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------- statistics


def _finite_pairs(xs: Sequence[float], ys: Sequence[float]) -> tuple[list[float], list[float]]:
    if len(xs) != len(ys):
        raise ValueError(f"A correlation needs two sequences of one length, got {len(xs)} and {len(ys)} values.")
    pairs = [(float(x), float(y)) for x, y in zip(xs, ys) if math.isfinite(x) and math.isfinite(y)]
    return [x for x, _ in pairs], [y for _, y in pairs]


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Pearson correlation (`scipy.stats.pearsonr`) over the pairs where both values are finite; NaN with fewer than
    two pairs or when either side is constant."""
    return _correlation("pearsonr", xs, ys)


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman rank correlation (`scipy.stats.spearmanr`: average ranks for ties) over the pairs where both values are
    finite; NaN with fewer than two pairs or when either side is constant."""
    return _correlation("spearmanr", xs, ys)


def _correlation(function: str, xs: Sequence[float], ys: Sequence[float]) -> float:
    xs, ys = _finite_pairs(xs, ys)
    if len(xs) < 2 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return math.nan  # undefined (SciPy would warn and return NaN, or refuse fewer than two pairs)
    import scipy.stats  # heavy: only a correlation needs it

    value = float(getattr(scipy.stats, function)(xs, ys).statistic)
    return max(-1.0, min(1.0, value))


def sum_compute(records: Mapping[str, Mapping[str, Any] | None]) -> dict[str, Any]:
    """Sum the runs' recorded compute (`run_info.json` / vector metadata) per key of `COMPUTE_KEYS`.

    A key is `None` when any run lacks it (a sum over part of the runs would understate the cost); `runs` counts
    the runs and `missing` names those without any compute record.
    """
    missing = sorted(name for name, record in records.items() if not record)
    totals: dict[str, Any] = {"runs": len(records), "missing": missing}
    for key in COMPUTE_KEYS:
        values = [record.get(key) if record else None for record in records.values()]
        if not values or any(v is None for v in values):
            totals[key] = None
        else:
            totals[key] = sum(values) if all(isinstance(v, int) for v in values) else math.fsum(values)
    return totals


def compute_ratios(candidates: Mapping[str, Any], pool: Mapping[str, Any]) -> dict[str, float | None]:
    """`candidates[key] / pool[key]` per compute key (None where either is unknown or the pool's is 0)."""
    return {key: candidates[key] / pool[key] if candidates.get(key) is not None and pool.get(key) else None
            for key in COMPUTE_KEYS}


# ---------------------------------------------------------------------------------------------- plots


def plot_ablation(result: AblationResult, path: str | os.PathLike | None = None, *, top: int | None = 30):
    """Horizontal bars of the proxy objective per candidate, best on top. Saves a PNG at `path` if given.

    Returns:
        `matplotlib.figure.Figure`.
    """
    from ..search.plots import BEST_COLOR, import_matplotlib

    scores = [s for s in result.scores if math.isfinite(s.objective)][: top or None]
    if not scores:
        raise ValueError("The ablation result has no candidate with a finite objective to plot.")
    Figure, FigureCanvasAgg = import_matplotlib()
    figure = Figure(figsize=(7.5, max(2.5, 0.35 * len(scores) + 1.2)))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    positions = list(range(len(scores)))[::-1]
    colors = [BEST_COLOR if s.rank == 1 else "#1f77b4" for s in scores]
    axes.barh(positions, [s.objective for s in scores], color=colors)
    axes.set_yticks(positions, [s.name for s in scores], fontsize=8)
    low, high = min(s.objective for s in scores), max(s.objective for s in scores)
    axes.set_xlim(low - 0.1 * ((high - low) or abs(low) or 1.0), high + 0.05 * ((high - low) or abs(high) or 1.0))
    axes.set_xlabel(f"proxy objective (lower is better): {result.objective}", fontsize=8)
    axes.set_title(f"Data-ablation proxy: {len(result.scores)} candidate mixtures", fontsize=9)
    figure.tight_layout()
    if path is not None:
        write_file_atomic(path, lambda handle: figure.savefig(handle, format="png", dpi=120), binary=True)
    return figure


def plot_proxy_validation(validation: ProxyValidation, path: str | os.PathLike | None = None):
    """Scatter of proxy objective (x) against trained-on-the-mixture objective (y), one labelled point per
    candidate, with the correlations in the title. Saves a PNG at `path` if given.

    Returns:
        `matplotlib.figure.Figure`.
    """
    from ..search.plots import import_matplotlib

    Figure, FigureCanvasAgg = import_matplotlib()
    figure = Figure(figsize=(6.5, 5.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    names = [s.name for s in validation.proxy.scores]
    xs = [validation.proxy[n].objective for n in names]
    ys = [validation.trained_objectives[n] for n in names]
    axes.scatter(xs, ys, s=40, color="#1f77b4", edgecolors="k", linewidths=0.3)
    for name, x, y in zip(names, xs, ys):
        axes.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    axes.set_xlabel("proxy objective: parameter average of partition models (lower is better)", fontsize=8)
    axes.set_ylabel("objective trained on the mixture (lower is better)", fontsize=8)
    axes.set_title(
        f"{validation.proxy.objective}\nPearson r = {validation.pearson:.3f}, Spearman rho = {validation.spearman:.3f}",
        fontsize=9,
    )
    figure.tight_layout()
    if path is not None:
        write_file_atomic(path, lambda handle: figure.savefig(handle, format="png", dpi=120), binary=True)
    return figure


# ---------------------------------------------------------------------------------------------- helpers


def _write_csv(handle, header: list[str], rows: list[dict[str, Any]]) -> None:
    writer = csv.DictWriter(handle, fieldnames=header)
    writer.writeheader()
    writer.writerows(rows)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _align(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows)

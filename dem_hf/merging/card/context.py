"""What a DEM model card says: its YAML metadata ([`card_data_for`]) and the variables of its Jinja template
([`template_context`]), from a config and the facts [`dem_hf.merging.card.facts`] gathered. Rendering and writing are
in [`dem_hf.merging.card.render`].
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub.repocard_data import EvalResult, ModelCardData

from ..arithmetic import effective_weights
from ..config import DEMConfig
from ..groups import is_per_group, mean_coefficient
from .facts import (
    CardFacts,
    SearchSummary,
    framework_versions,
    hub_id_of,
    is_hub_dataset_id,
)
from .heatmap import HEATMAP_NAME, coefficient_grid, group_label, has_matplotlib

CARD_TAGS = ("dem", "merge", "dem_hf")
LIBRARY_NAME = "transformers"
PIPELINE_TAG = "text-generation"
MAX_CANDIDATE_ROWS = 10
WEIGHTING_FORMULAS = {
    "sum": "θ_DEM = θ + Σ_i ω_i · Δ_i",
    "average": "θ_DEM = θ + Σ_i (ω_i / Σ_j ω_j) · Δ_i",
}
WEIGHTING_EXPLANATIONS = {
    "sum": (
        "`sum` (the DEM paper's convention): the coefficients are free weights, as in task arithmetic; they need "
        "not sum to 1, and the effective weight of each vector is its coefficient."
    ),
    "average": (
        "`average` (the data-ablation convention): the coefficients are normalised to sum to 1, so the merge is "
        "the weighted parameter average Σ_i (ω_i / Σ_j ω_j) · θ_i of the fine-tuned models."
    ),
}


def card_data_for(
    config: DEMConfig, facts: CardFacts, search: SearchSummary | None, model_id: str, license: str | None
) -> ModelCardData:
    """The card's YAML metadata: base model, Hub datasets, license, tags, and the search's validation perplexities
    as a `model-index` (one result per validation set)."""
    eval_results = _eval_results(search, facts) if search is not None else []
    extra = {}
    if license == "other" and facts.license == "other":
        extra = {"license_name": facts.license_name, "license_link": facts.license_link}
    return ModelCardData(
        base_model=facts.base_model,
        datasets=facts.hub_datasets or None,
        library_name=LIBRARY_NAME,
        license=license,
        pipeline_tag=PIPELINE_TAG,
        tags=list(CARD_TAGS),
        model_name=model_id.rsplit("/", 1)[-1],
        eval_results=eval_results or None,
        **{key: value for key, value in extra.items() if value},
    )


def _eval_results(search: SearchSummary, facts: CardFacts) -> list[EvalResult]:
    results = []
    for name, perplexity in search.perplexities.items():
        datasets = facts.vector_datasets.get(name, [])
        hub_ids = [d for d in datasets if is_hub_dataset_id(d)]
        results.append(
            EvalResult(
                task_type=PIPELINE_TAG,
                task_name="Text Generation",
                dataset_type=hub_ids[0] if len(hub_ids) == 1 else name,
                dataset_name=name,
                dataset_split="validation",
                metric_type="perplexity",
                metric_name="Validation perplexity",
                metric_value=round(perplexity, 4),
            )
        )
    return results


def template_context(
    config: DEMConfig,
    facts: CardFacts,
    search: SearchSummary | None,
    model_id: str,
    vectors_included: bool,
    versions: Mapping[str, str] | None,
) -> dict[str, Any]:
    """The variables of the card's Jinja template: the merge (formula, vectors, coefficients), the search, the
    loading snippet and the framework versions."""
    coefficients = {name: config.coefficients.get(name, 1.0) for name in config.vectors}
    return {
        "model_id": model_id,
        "model_title": model_id.rsplit("/", 1)[-1],
        "base_display": facts.base_display,
        "base_reference": _display_path(config.base_model_name_or_path),
        "weighting": config.weighting,
        "weighting_formula": WEIGHTING_FORMULAS[config.weighting],
        "weighting_explanation": WEIGHTING_EXPLANATIONS[config.weighting],
        "merge_method": config.merge_operator.describe(),
        "vector_rows": _vector_rows(config, facts, coefficients),
        "group_table": _group_table(coefficients),
        "example_coefficients": _example_coefficients(coefficients),
        "search": _search_context(search, list(config.vectors)) if search is not None else None,
        "vectors_included": vectors_included,
        "vector_locations": [] if vectors_included else _vector_locations(config),
        "versions": [f"{name}: {value}" for name, value in (versions or framework_versions()).items()],
        "has_lora": any(info.get("vector_type") == "lora" for info in config.vectors.values()),
    }


def _group_table(coefficients: dict[str, Any]) -> dict[str, Any] | None:
    """Per-group coefficients as a table (a row per group, a column per vector) and the heat map's file name (or
    `None` without matplotlib: the card then says how to get it); `None` when every coefficient is one number."""
    groups, vectors, values = coefficient_grid(coefficients)
    if not groups:
        return None
    return {
        "columns": [f"ω `{v}`" for v in vectors],
        "rows": [{"group": group_label(g), "values": [_format_number(x) for x in line]} for g, line in zip(groups, values)],
        "heatmap": HEATMAP_NAME if has_matplotlib() else None,
    }


def _vector_rows(config: DEMConfig, facts: CardFacts, coefficients: dict[str, Any]) -> list[dict[str, str]]:
    try:
        effective = None if is_per_group(coefficients) else effective_weights(coefficients, config.weighting)
    except ValueError:  # "average" of coefficients summing to 0: no effective weights to show
        effective = None
    return [
        {
            "name": f"`{name}`",
            "type": "LoRA (low-rank)" if info.get("vector_type") == "lora" else "full",
            "data": ", ".join(_dataset_link(d) for d in facts.vector_datasets[name]),
            "coefficient": _coefficient_cell(coefficients[name]),
            "effective": _format_number(effective[name]) if effective is not None else "-",
            "details": _escape(facts.vector_details[name]),
        }
        for name, info in config.vectors.items()
    ]


def _coefficient_cell(value: Any) -> str:
    if isinstance(value, Mapping):
        return f"per group (mean {_format_number(mean_coefficient(value))}, see below)"
    return _format_number(value)


def _vector_locations(config: DEMConfig) -> list[dict[str, str]]:
    """Where each vector is when the folder does not hold it, as `dem_config.json` records it: a Hub repo at a commit,
    a local folder (by its last component: the card names no local paths), or nowhere (built in memory)."""
    rows = []
    for name, info in config.vectors.items():
        source, revision, subfolder = info.get("source"), info.get("revision"), info.get("subfolder")
        if not source:
            where = "nowhere on disk: it was built in memory and not saved"
        elif revision:
            inside = f"folder `{_escape(subfolder)}` of " if subfolder else ""
            where = f"{inside}the Hub repo [{source}](https://huggingface.co/{source}) at commit `{revision[:12]}`"
        else:
            where = f"a local folder (`{_escape(_display_path(source))}`) on the machine that saved the model"
        rows.append({"name": f"`{name}`", "where": where})
    return rows


def _search_context(search: SearchSummary, vector_names: list[str]) -> dict[str, Any]:
    names = list(dict.fromkeys([*search.perplexities, *search.base_perplexities, *search.set_tokens]))
    perplexity_rows = [_perplexity_row(name, search) for name in names]
    scored = [c for c in search.candidates if c["objective"] is not None]
    ranked = sorted(scored, key=lambda c: (c["objective"], str(c["coefficients"])))
    columns = [n for n in vector_names if any(n in c["coefficients"] for c in ranked)]
    rows = [
        {
            "rank": str(index),
            "coefficients": [_format_number(c["coefficients"][n]) if n in c["coefficients"] else "-" for n in columns],
            "objective": _format_number(c["objective"]),
        }
        for index, c in enumerate(ranked[:MAX_CANDIDATE_ROWS], start=1)
    ]
    return {
        "strategy": _escape(search.strategy or "unknown"),
        "objective": _escape(_objective_label(search)),
        "num_candidates": f"{search.num_candidates:,}" if search.num_candidates is not None else "-",
        "best_objective": _format_number(search.best_objective) if search.best_objective is not None else "-",
        "best_coefficients": ", ".join(f"{n}={_format_number(w)}" for n, w in search.best_coefficients.items()) or "-",
        "wall_time": _format_seconds(search.wall_time) if search.wall_time is not None else None,
        "compute": _format_number(search.compute) if search.compute is not None else None,
        "has_tokens": bool(search.set_tokens),
        "perplexity_rows": perplexity_rows,
        "has_base": bool(search.base_perplexities),
        "candidate_columns": [f"ω `{n}`" for n in columns],
        "candidate_rows": rows,
        "more_candidates": max(0, len(ranked) - MAX_CANDIDATE_ROWS),
    }


def _perplexity_row(name: str, search: SearchSummary) -> dict[str, str]:
    merged, base = search.perplexities.get(name), search.base_perplexities.get(name)
    change = f"{(merged / base - 1.0) * 100.0:+.1f}%" if merged is not None and base else "-"
    tokens = search.set_tokens.get(name)
    return {
        "name": f"`{name}`",
        "tokens": f"{tokens:,}" if tokens is not None else "-",
        "base": _format_number(base) if base is not None else "-",
        "merged": _format_number(merged) if merged is not None else "-",
        "change": change,
    }


def _objective_label(search: SearchSummary) -> str:
    """The objective as the search described it (e.g. `mean perplexity over ['chat', 'math']`)."""
    if search.objective and search.metric and search.metric not in search.objective:
        return f"{search.objective} of {search.metric.replace('_', ' ')}"
    return search.objective or search.metric or "unknown"


def _example_coefficients(coefficients: dict[str, float]) -> str:
    """A `{name: ω}` literal for the re-merge snippet: the current coefficients, each halved, for illustration."""
    return "{" + ", ".join(
        f'"{name}": {_format_number(mean_coefficient(value) / 2)}' for name, value in coefficients.items()
    ) + "}"


def _dataset_link(name: str) -> str:
    if is_hub_dataset_id(name):
        return f"[{name}](https://huggingface.co/datasets/{name})"
    return f"`{_escape(_display_path(name))}`"


def _display_path(reference: str | None) -> str | None:
    """A reference as shown on the card: Hub ids as they are, local paths by their last component only."""
    if reference is None:
        return None
    last = Path(reference).name or reference
    # A bare name reads the same either way: only `namespace/name` asks the validator (it imports the Hub client).
    if last != reference and hub_id_of(reference) == reference:
        return reference
    return last


def _format_number(value: float) -> str:
    """Numbers for tables: up to 4 decimals, no trailing zeros (`0.5`, `9.7412`, `12`)."""
    text = f"{value:.4f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def _format_seconds(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes < 120 else f"{minutes // 60} h {minutes % 60} min"


def _escape(text: str) -> str:
    """Make free text safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")

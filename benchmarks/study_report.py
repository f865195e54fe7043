"""The study's report: Markdown tables, a bar chart and a Pareto chart of `dem_vs_mixing.py` results (pure functions
of a result dict, so earlier result files can be redrawn together).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import NamedTuple

from dem_hf.demo.pipeline import DemoConfig
from dem_hf.merging.groups import coefficient_summary


# The study's settings are changes to these (the demo's defaults when the first records were written): the options'
# defaults and what the settings tags leave out. Fixed here, so that a new default of the demo neither changes a
# setting already run nor renames its caches and record. Its DEM stage fits per layer on the full batch, as its cached
# settings did (the demo fits on 3 sequences per set: the `--dem-batch-sequences 3` variant row is that fit).
STUDY_REFERENCE = DemoConfig(
    n_train=400, n_val=16, n_test=32, max_steps=30, batch_size=4, learning_rate=5e-4, lr_scheduler_type="constant",
    warmup_ratio=0.0, finetuning="lora", max_length=128, lora_r=16, lora_alpha=32, strategy="bayesian", n_trials=12,
    metric="log_perplexity", bounds=[0.0, 2.0], granularity="layer", group_steps=12, group_batch_sequences=None,
    eval_steps=0, early_stopping_patience=0, eval_batch_size=8, seed=0,
    # Plain DEM: every run from the base, the per-layer fit from the per-vector search's best; the grid is the mixing
    # side (warm starts and the fit from ω = 1/k: benchmarks/dem_warm_start.py).
    warm_start=0.0, group_init="per_vector", mixture_baseline=False,
)


def _means(row: dict[str, float], names: list[str]) -> tuple[float, float]:
    values = [row[n] for n in names]
    return sum(values) / len(values), math.exp(sum(math.log(v) for v in values) / len(values))


class Entry(NamedTuple):
    """One DEM model of a result: its test perplexities and what it cost."""

    row: dict[str, float]  # test perplexity per distribution
    flops: float  # training runs + searches
    passes: float  # search forward-pass equivalents
    tokens: int  # training tokens of its runs
    training_flops: float  # of its runs alone


def dem_entries(result: dict) -> dict[str, Entry]:
    """Every DEM model of a result: the demo's (per vector, per layer), the variants, and DEM from a shared warm start
    (`benchmarks/dem_warm_start.py`, when `result["warm_starts"]` holds its results at the same settings)."""
    dem_flops = sum(run_cost(c) for c in result["dem_runs"].values())
    dem_tokens = sum(c["tokens_seen"] for c in result["dem_runs"].values())
    pass_flops = result["forward_pass_flops"]
    entries, searched = {}, 0.0
    for label, row in result["dem_models"].items():  # the demo's searches run in sequence: per layer starts at per vector
        searched += result["dem_search_passes"].get(label.removeprefix("DEM ").strip() or "per vector", 0.0)
        entries[label] = Entry(row, dem_flops + searched * pass_flops, searched, dem_tokens, dem_flops)
    for label, variant in result.get("dem_variants", {}).items():
        passes = variant["compute_forward_passes"]
        entries[f"DEM, {label}"] = Entry(variant["test_perplexity"], dem_flops + passes * pass_flops, passes, dem_tokens,
                                         dem_flops)
    for warm in result.get("warm_starts", []):
        entries.update(warm_start_entries(warm, pass_flops))
    return entries


def run_cost(compute: dict) -> float:
    """A training run's FLOPs: the trainer's count, plus its evaluations' forward passes where it was evaluated
    (`--eval_steps`: runs kept at their best checkpoint)."""
    return compute["total_flos"] + compute.get("eval_flops", 0.0)


def all_mixtures(result: dict) -> dict[str, dict]:
    """The grid's mixtures, then the uniform mixture at other budgets (`--mixture-fractions`), by label."""
    return {**result["mixtures"], **result.get("budget_mixtures", {})}


def budget_mixture_label(fraction: float) -> str:
    """A uniform mixture trained on `fraction` of DEM's tokens (outside the grid, which trains on DEM's tokens)."""
    return f"uniform, {fraction:g} of the tokens" if fraction < 1 else f"uniform, {fraction:g}x the tokens"


def warm_start_label(warm: dict, search: str) -> str:
    """A `dem_warm_start.py` result's DEM model, e.g. "DEM warm-started (0.25 of the steps) per layer" (+ " from
    ω = 1/k" when the per-layer fit started there, without a per-vector search)."""
    schedule = warm.get("run_schedule")
    runs = f", runs evaluated every {schedule[0]} steps, patience {schedule[1]}" if schedule else ""
    start = " from ω = 1/k" if warm.get("group_init") == "uniform" else ""
    return f"DEM warm-started ({warm['fraction']:g} of the steps{runs}) {search}{start}"


def warm_start_entries(warm: dict, pass_flops: float) -> dict[str, Entry]:
    """The DEM models of one `dem_warm_start.py` result: its training (warm start + runs) plus its searches, which
    run in sequence (per layer starts from per vector, when there is one)."""
    dem, searched, entries = warm["dem"], 0.0, {}
    for search, found in dem["searches"].items():
        searched += found["compute_forward_passes"]
        row = dem["test_perplexity"].get(f"DEM {search}") or dem["test_perplexity"]["DEM"]  # "DEM" alone: per vector only
        entries[warm_start_label(warm, search)] = Entry(
            row, warm["training_flops"] + searched * pass_flops, searched, warm["training_tokens"], warm["training_flops"])
    return entries


def report_markdown(result: dict) -> str:
    names = result["distributions"]
    off = result.get("off_distribution")
    dem_flops = sum(run_cost(c) for c in result["dem_runs"].values())
    grid_flops = sum(run_cost(m["compute"]) for m in result["mixtures"].values())
    entries = dem_entries(result)
    rows = [("base model", result["base"], None, None)]
    other_budgets = result.get("budget_mixtures", {})
    for label, m in all_mixtures(result).items():
        rows.append((f"mixture: {label}", m["test_perplexity"], m["compute"]["tokens_seen"], run_cost(m["compute"])))
    singles = result.get("singles", {})
    if all(f"{n} only" in singles for n in names):  # each specialist on its own data: what routing would reach
        routed = {n: singles[f"{n} only"][n] for n in names}
        rows.append(("each specialist on its own distribution (oracle routing)", routed, None, None))
    for label, entry in entries.items():
        coefficients = result.get("dem_variants", {}).get(label.removeprefix("DEM, "), {}).get("coefficients")
        shown = label + (": " + coefficient_summary(coefficients) if coefficients else "")
        rows.append((f"**{shown}**", entry.row, entry.tokens, entry.flops))
    off_header = f" off-distribution ({off['name']}) |" if off else ""
    lines = ["| model | " + " | ".join(names) + f" | mean ppl | geo-mean ppl |{off_header} train tokens | FLOPs | x grid |",
             "|---|" + "---|" * (len(names) + 5 + bool(off))]
    for label, row, tokens, flops in rows:
        mean, geo = _means(row, names)
        key = label.strip("*").split(": ")[0] if label.startswith("**DEM, ") else label.strip("*")
        off_value = off["perplexity"].get(key) if off else None
        off_cell = (f" {off_value:.3f} |" if off_value is not None else " - |") if off else ""
        lines.append(f"| {label} | " + " | ".join(f"{row[n]:.3f}" for n in names) + f" | {mean:.3f} | {geo:.3f} |{off_cell} "
                     + (f"{tokens:,}" if tokens else "-") + " | " + (f"{flops:.3g}" if flops else "-") + " | "
                     + (f"{flops / grid_flops:.2f}" if flops and grid_flops else "-") + " |")
    if not result["mixtures"]:
        lines += ["", "No mixture trained yet (`--mixtures` left the grid empty)."]
        return "\n".join(lines)
    best_label, best = min(result["mixtures"].items(), key=lambda kv: _means(kv[1]["test_perplexity"], names)[0])
    best_mean = _means(best["test_perplexity"], names)[0]
    lines.append("")
    lines.append(f"Mixing grid: {len(result['mixtures'])} runs, {grid_flops:.3g} FLOPs; best mixture: {best_label} "
                 f"(mean {best_mean:.3f}). DEM's {len(result['dem_runs'])} runs: {dem_flops:.3g} FLOPs; one validation "
                 f"pass: {result['forward_pass_flops']:.3g} FLOPs.")
    best_any_label, best_any = best_label, best_mean
    if other_budgets:
        means = {label: _means(m["test_perplexity"], names)[0] for label, m in other_budgets.items()}
        lines.append("The uniform mixture at other budgets (outside the grid): " + "; ".join(f"{label}: mean {mean:.3f}"
                                                                          for label, mean in means.items()) + ".")
        best_any_label, best_any = min([(best_label, best_mean), *means.items()], key=lambda kv: kv[1])
    for label, entry in entries.items():
        mean = _means(entry.row, names)[0]
        line = (f"- {label}: mean {mean:.3f}, {100 * (mean / best_mean - 1):+.2f}% vs the best mixture, at "
                f"{entry.flops / grid_flops:.2f}x the grid's compute; searches {entry.passes:.1f} forward-pass "
                f"equivalents = {100 * entry.passes * result['forward_pass_flops'] / entry.training_flops:.1f}% of its "
                "training compute")
        if best_any_label != best_label:
            line += f"; {100 * (mean / best_any - 1):+.2f}% vs the best mixture at any budget ({best_any_label})"
        off_value = off["perplexity"].get(label) if off else None
        if off_value is not None:
            best_off = min(off["perplexity"][f"mixture: {m}"] for m in result["mixtures"])
            line += f"; off-distribution {off_value:.3f} vs the mixtures' best {best_off:.3f}"
        lines.append(line + ".")
    return "\n".join(lines)


def bar_chart(result: dict, path: Path) -> None:
    plt = _pyplot()
    names = result["distributions"]
    series = {"base": result["base"], **{f"mix: {k}": m["test_perplexity"] for k, m in all_mixtures(result).items()},
              **{label: entry.row for label, entry in dem_entries(result).items()}}
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(2.2 * len(names) + 3, 4.5))
    for i, (label, row) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(names))]
        ax.bar(xs, [row[n] for n in names], width, label=label)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("test perplexity (lower is better)")
    ax.set_title(f"DEM vs data mixing at equal training tokens ({_regime(result)}, SmolLM2-135M-Instruct)")
    ax.legend(fontsize=7, ncols=2)
    _save(fig, path)


def pareto_chart(results: list[dict], path: Path) -> None:
    """x: training + search FLOPs; y: mean held-out test perplexity. Each mixture at its own run's cost, the best of
    the grid at the whole grid's cost (what finding it took), each DEM model at its runs + searches. Left: every
    model; right: the same, zoomed on the models within 5% of the best one (where DEM meets mixing)."""
    plt = _pyplot()
    fig, (whole, zoom) = plt.subplots(1, 2, figsize=(15, 5.5))
    best = min(_pareto_points(whole, results, legend=True))
    _pareto_points(zoom, results, legend=False)
    zoom.set_ylim(best * 0.995, best * 1.05)
    zoom.set_title("zoom: within 5% of the best model")
    whole.set_title("DEM vs data mixing: quality against compute")
    for ax in (whole, zoom):
        ax.set_xscale("log")
        ax.set_xlabel("training + search FLOPs")
    whole.set_ylabel("mean held-out test perplexity (lower is better)")
    whole.legend(fontsize=6)
    _save(fig, path)


def _pareto_points(ax, results: list[dict], legend: bool) -> list[float]:
    """Draw every result's mixtures and DEM models on `ax`; returns every mean perplexity drawn."""
    markers, means = "osD^v<>", []
    for index, result in enumerate(results):
        names, regime = result["distributions"], _regime(result)
        marker = markers[index % len(markers)]

        def label(text: str) -> str | None:
            return f"{text} ({regime})" if legend else None

        mixtures = {name: (_means(m["test_perplexity"], names)[0], run_cost(m["compute"]))
                    for name, m in result["mixtures"].items()}
        ax.scatter([f for _, f in mixtures.values()], [m for m, _ in mixtures.values()], marker=marker, color="tab:blue",
                   label=label("one mixture run"))
        grid = sum(f for _, f in mixtures.values())
        if mixtures:
            ax.scatter([grid], [min(m for m, _ in mixtures.values())], marker=marker, color="navy", s=80,
                       label=label(f"best of {len(mixtures)} mixtures, grid cost"))
        other_budgets = [(_means(m["test_perplexity"], names)[0], run_cost(m["compute"]))
                         for m in result.get("budget_mixtures", {}).values()]
        if other_budgets:
            ax.scatter([f for _, f in other_budgets], [m for m, _ in other_budgets], marker=marker, color="tab:cyan",
                       label=label("uniform mixture at other budgets"))
        for name, entry in dem_entries(result).items():
            mean = _means(entry.row, names)[0]
            ax.scatter([entry.flops], [mean], marker=marker, color="tab:red")
            ax.annotate(_point_label(name), (entry.flops, mean), fontsize=6, xytext=(3, 3), textcoords="offset points",
                        annotation_clip=True)
            means.append(mean)
        ax.scatter([], [], marker=marker, color="tab:red", label=label("DEM: runs + searches"))
        means += [m for m, _ in mixtures.values()] + [m for m, _ in other_budgets]
    return means


def _regime(result: dict) -> str:
    """The settings that tell one result from another: the distributions (when not the demo's), full or LoRA, the
    examples per distribution (when not the demo's), steps and schedule, and early stopping."""
    config, defaults = result["config"], STUDY_REFERENCE
    tuning = "full" if config.get("finetuning") == "full" else f"LoRA r{config['lora_r']}"
    parts = ["+".join(config["distributions"])] if config["distributions"] != defaults.distributions else []
    parts.append(tuning)
    if config["n_train"] != defaults.n_train:
        parts.append(f"{config['n_train']} examples each")
    steps = "up to " if config.get("eval_steps") else ""
    parts.append(f"{steps}{config['max_steps']} steps/dataset, {config.get('lr_scheduler_type', 'constant')} lr")
    if config.get("eval_steps"):
        parts.append(f"best checkpoint, patience {config.get('early_stopping_patience') or '-'}")
    return ", ".join(parts)


def _point_label(label: str) -> str:
    """A DEM model's label, shortened for the chart: "DEM warm-started (0.4 of the steps, runs evaluated every 5
    steps, patience 2) per layer" -> "warm 0.4 (runs 5/p2) per layer"."""
    def short(match: re.Match) -> str:
        fraction, every, patience = match.groups()
        return f"warm {fraction} " + (f"(runs {every}/p{patience}) " if every else "")

    pattern = r"warm-started \(([\d.]+) of the steps(?:, runs evaluated every (\d+) steps, patience (\d+))?\) "
    return re.sub(pattern, short, label.removeprefix("DEM, ").removeprefix("DEM "))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)

"""The study's report: Markdown tables, a bar chart and a Pareto chart of `dem_vs_mixing.py` results (pure functions
of a result dict, so earlier result files can be redrawn together).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from dem_hf.merging.groups import coefficient_summary


def _means(row: dict[str, float], names: list[str]) -> tuple[float, float]:
    values = [row[n] for n in names]
    return sum(values) / len(values), math.exp(sum(math.log(v) for v in values) / len(values))


def dem_entries(result: dict) -> dict[str, tuple[dict[str, float], float, float]]:
    """`{label: (test perplexities, FLOPs of runs + searches, search forward passes)}` of every DEM model."""
    dem_flops = sum(c["total_flos"] for c in result["dem_runs"].values())
    pass_flops = result["forward_pass_flops"]
    entries, searched = {}, 0.0
    for label, row in result["dem_models"].items():  # the demo's searches run in sequence: per layer starts at per vector
        searched += result["dem_search_passes"].get(label.removeprefix("DEM ").strip() or "per vector", 0.0)
        entries[label] = (row, dem_flops + searched * pass_flops, searched)
    for label, variant in result.get("dem_variants", {}).items():
        passes = variant["compute_forward_passes"]
        entries[f"DEM, {label}"] = (variant["test_perplexity"], dem_flops + passes * pass_flops, passes)
    return entries


def report_markdown(result: dict) -> str:
    names = result["distributions"]
    off = result.get("off_distribution")
    dem_flops = sum(c["total_flos"] for c in result["dem_runs"].values())
    dem_tokens = sum(c["tokens_seen"] for c in result["dem_runs"].values())
    grid_flops = sum(m["compute"]["total_flos"] for m in result["mixtures"].values())
    entries = dem_entries(result)
    rows = [("base model", result["base"], None, None)]
    for label, m in result["mixtures"].items():
        rows.append((f"mixture: {label}", m["test_perplexity"], m["compute"]["tokens_seen"], m["compute"]["total_flos"]))
    singles = result.get("singles", {})
    if all(f"{n} only" in singles for n in names):  # each specialist on its own data: what routing would reach
        routed = {n: singles[f"{n} only"][n] for n in names}
        rows.append(("each specialist on its own distribution (oracle routing)", routed, None, None))
    for label, (row, flops, _) in entries.items():
        coefficients = result.get("dem_variants", {}).get(label.removeprefix("DEM, "), {}).get("coefficients")
        shown = label + (": " + coefficient_summary(coefficients) if coefficients else "")
        rows.append((f"**{shown}**", row, dem_tokens, flops))
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
    for label, (row, flops, passes) in entries.items():
        mean = _means(row, names)[0]
        line = (f"- {label}: mean {mean:.3f}, {100 * (mean / best_mean - 1):+.2f}% vs the best mixture, at "
                f"{flops / grid_flops:.2f}x the grid's compute; searches {passes:.1f} forward-pass equivalents = "
                f"{100 * passes * result['forward_pass_flops'] / dem_flops:.1f}% of DEM's training compute")
        if off:
            key = label if label in off["perplexity"] else label.split(": ")[0]
            best_off = min(off["perplexity"][f"mixture: {m}"] for m in result["mixtures"])
            line += f"; off-distribution {off['perplexity'][key]:.3f} vs the mixtures' best {best_off:.3f}"
        lines.append(line + ".")
    return "\n".join(lines)


def bar_chart(result: dict, path: Path) -> None:
    plt = _pyplot()
    names = result["distributions"]
    series = {"base": result["base"], **{f"mix: {k}": m["test_perplexity"] for k, m in result["mixtures"].items()},
              **{label: row for label, (row, _, _) in dem_entries(result).items()}}
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
    the grid at the whole grid's cost (what finding it took), each DEM model at its runs + searches."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    markers = "osD^v<>"
    for index, result in enumerate(results):
        names, regime = result["distributions"], _regime(result)
        marker = markers[index % len(markers)]
        mixtures = {label: (_means(m["test_perplexity"], names)[0], m["compute"]["total_flos"]) for label, m in result["mixtures"].items()}
        ax.scatter([f for _, f in mixtures.values()], [m for m, _ in mixtures.values()], marker=marker, color="tab:blue",
                   label=f"one mixture run ({regime})")
        grid = sum(f for _, f in mixtures.values())
        if mixtures:
                ax.scatter([grid], [min(m for m, _ in mixtures.values())], marker=marker, color="navy", s=80,
                       label=f"best of {len(mixtures)} mixtures, grid cost ({regime})")
        for label, (row, flops, _) in dem_entries(result).items():
            ax.scatter([flops], [_means(row, names)[0]], marker=marker, color="tab:red")
            ax.annotate(label.removeprefix("DEM, ").removeprefix("DEM "), (flops, _means(row, names)[0]), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
        ax.scatter([], [], marker=marker, color="tab:red", label=f"DEM: runs + searches ({regime})")
    ax.set_xscale("log")
    ax.set_xlabel("training + search FLOPs")
    ax.set_ylabel("mean held-out test perplexity (lower is better)")
    ax.set_title("DEM vs data mixing: quality against compute")
    ax.legend(fontsize=7)
    _save(fig, path)


def _regime(result: dict) -> str:
    config = result["config"]
    tuning = "full" if config.get("finetuning") == "full" else f"LoRA r{config['lora_r']}"
    return f"{tuning}, {config['max_steps']} steps/dataset, {config.get('lr_scheduler_type', 'constant')} lr"


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

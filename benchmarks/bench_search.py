"""Coefficient search on a real model: cost per candidate, and gradient / Bayesian search against the grid.

SmolLM2-135M-Instruct (offline, `dem_hf.demo.assets`) with one LoRA adapter per real distribution
(math, chat, champ, code: r=16, all linear layers, `--train-steps` SFT steps with TRL through
`dem_hf.train_distributions`), and the same adapters densified into full vectors (θ + Δ is the same model,
stored as dense deltas).

(a) Time per candidate / time of one plain forward pass over the same validation sets. Measured in
    interleaved rounds (plain forward, then each switching path), so machine load hits all alike; the
    median over rounds is reported. Each round draws new coefficients for every vector (worst case: every
    delta changes) and, for the dense paths, also switches one coefficient only (what a grid mostly does).
(b) The full grid (`--grid-points` values per coefficient over `--bounds`) against `gradient` (L-BFGS-B) and
    `bayesian` (Optuna GP) given 5% of the grid's compute, in forward-pass equivalents (an evaluation = 1,
    a gradient = 3). For each objective the grid's best comes from the same grid run (its candidates
    record per-set losses, so every objective can be read off them).

Run from the repository root:

    python benchmarks/bench_search.py                # everything (trains the adapters once, cached)
    python benchmarks/bench_search.py --skip-grid    # (a) only

Intermediate results are cached in benchmarks/.work/search/ (git-ignored); delete it to start over.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dem_hf import DEMConfig, DEMMerger, DistributionVector, SearchConfig, SearchResult
from dem_hf.evaluation.perplexity import compute_perplexities, tokenize_for_evaluation
from dem_hf.io.tensors import TensorDict
from dem_hf.search.candidates import CandidateModel

WORK = ROOT / "benchmarks" / ".work" / "search"
CACHE = ROOT / "examples" / ".cache"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vectors", nargs="+", default=["math", "chat", "champ", "code"])
    parser.add_argument("--train-steps", type=int, default=30)
    parser.add_argument("--timing-texts", type=int, default=8, help="Validation texts per set for (a).")
    parser.add_argument("--timing-max-length", type=int, default=256)
    parser.add_argument("--search-texts", type=int, default=3, help="Validation texts per set for (b).")
    parser.add_argument("--search-max-length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--timing-threads", type=int, default=1, help="torch threads while timing (a).")
    parser.add_argument("--grid-points", type=int, default=5)
    parser.add_argument("--bounds", nargs=2, type=float, default=(0.0, 2.0))
    parser.add_argument("--budget", type=float, default=0.05, help="Share of the grid's compute for gradient/bayesian.")
    parser.add_argument("--search-vectors", choices=["lora", "full"], default="lora")
    parser.add_argument("--lora-mode", default="auto")
    parser.add_argument("--skip-grid", action="store_true")
    parser.add_argument("--skip-timing", action="store_true")
    return parser.parse_args()


# ---------------------------------------------------------------------------------------------- assets


def train_vectors(model_dir: Path, data, names: list[str], steps: int) -> list[DistributionVector]:
    from peft import LoraConfig
    from trl import SFTConfig

    from dem_hf import train_distributions

    runs = WORK / f"runs-r16-steps{steps}"
    config = SFTConfig(
        output_dir=str(runs), max_steps=steps, per_device_train_batch_size=4, gradient_accumulation_steps=1,
        learning_rate=5e-4, max_length=256, logging_steps=10, save_strategy="no", report_to="none", seed=0,
        lr_scheduler_type="constant", bf16=False, gradient_checkpointing=False,
    )
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    start = time.perf_counter()
    vectors = train_distributions(str(model_dir), {n: data[n]["train"] for n in names}, config, lora, output_dir=runs)
    print(f"LoRA vectors ready in {time.perf_counter() - start:.0f} s (cached in {runs})", flush=True)
    return vectors


def densified(vector: DistributionVector) -> DistributionVector:
    """The same Δ as dense float32 deltas: a full vector of the model the adapter trained."""
    deltas = TensorDict({name: vector.delta(name) for name in vector.target_names})
    return DistributionVector(vector.name, deltas, base_fingerprint=vector.base_fingerprint)


def validation_sets(data, names, tokenizer, texts: int, max_length: int):
    return {
        n: tokenize_for_evaluation(data[n]["validation"].select(range(texts)), tokenizer, max_length=max_length)
        for n in names
    }


def load_base(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto").eval()


# ---------------------------------------------------------------------------------------------- (a) timing


def timed(fn) -> tuple[float, float]:
    """Wall and CPU (process) seconds of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def measure_switching(model_dir, merger_full, merger_lora, sets, rounds: int, batch_size: int = 8) -> dict:
    """Interleaved rounds: a plain forward pass, then a candidate (switch + forward) on every path.

    Wall time on a shared machine swings with other jobs, so CPU time of this process (single-threaded, so
    no OpenMP spin-waiting is counted) is the primary measure; wall-clock medians are reported beside it.
    """
    names = merger_full.vector_names
    plain = load_base(model_dir)
    paths = {
        "full": (merger_full, "update"),
        "lora-adapter": (merger_lora, "adapter"),
        "lora-update": (merger_lora, "update"),
    }
    switchers = {
        path: CandidateModel(load_base(model_dir), m.base, [m.vectors[n] for n in names], lora_mode=mode)
        for path, (m, mode) in paths.items()
    }
    rng = random.Random(0)
    wall: dict[str, list[float]] = {"plain": []}
    cpu: dict[str, list[float]] = {"plain": []}
    switch_only: dict[str, list[float]] = {}

    def record(key: str, seconds: tuple[float, float]) -> None:
        wall.setdefault(key, []).append(seconds[0])
        cpu.setdefault(key, []).append(seconds[1])

    def forward(model) -> None:
        compute_perplexities(model, sets, batch_size=batch_size, show_progress=False)

    forward(plain)  # warm-up
    for round_index in range(rounds):
        weights = [rng.uniform(0.0, 2.0) for _ in names]
        record("plain", timed(lambda: forward(plain)))
        for path, switcher in switchers.items():
            def candidate(w=weights, s=switcher):
                s.set_weights(w)
                forward(s.model)

            record(path + " (all change)", timed(candidate))
            switch_only.setdefault(path + " (all change)", []).append(
                timed(lambda s=switcher: s.set_weights([rng.uniform(0.0, 2.0) for _ in names]))[1]
            )
            if path != "lora-adapter":  # an adapter candidate costs the same whatever changed
                one = list(switcher.weights)
                one[round_index % len(one)] += 0.5

                def one_change(w=one, s=switcher):
                    s.set_weights(w)
                    forward(s.model)

                record(path + " (one changes)", timed(one_change))
                switch_only.setdefault(path + " (one changes)", []).append(
                    timed(lambda s=switcher, i=round_index: s.set_weights(
                        [w + 0.25 * (j == i % len(names)) for j, w in enumerate(s.weights)]))[1]
                )
        print(f"  round {round_index + 1}/{rounds} (CPU s): " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in cpu.items()),
              flush=True)
    for switcher in switchers.values():
        switcher.restore()
    plain_cpu, plain_wall = statistics.median(cpu["plain"]), statistics.median(wall["plain"])
    return {
        "plain_forward_cpu_s": plain_cpu,
        "plain_forward_wall_s": plain_wall,
        "tokens": sum(sum(len(ids) for ids in s.input_ids) for s in sets.values()),
        "scored_tokens": sum(s.num_tokens for s in sets.values()),
        "median_cpu_s": {k: statistics.median(v) for k, v in cpu.items()},
        "median_wall_s": {k: statistics.median(v) for k, v in wall.items()},
        "ratio_cpu": {k: statistics.median(v) / plain_cpu for k, v in cpu.items() if k != "plain"},
        "ratio_wall": {k: statistics.median(v) / plain_wall for k, v in wall.items() if k != "plain"},
        "switch_only_cpu_s": {k: statistics.median(v) for k, v in switch_only.items()},
        "rounds_cpu": cpu,
        "rounds_wall": wall,
    }


# ---------------------------------------------------------------------------------------------- (b) search


def objective_from_losses(candidate, objective: str) -> float:
    losses = list(candidate.losses.values())
    if objective == "mean perplexity":
        return sum(math.exp(x) for x in losses) / len(losses)
    return sum(losses) / len(losses)  # mean log_perplexity


def run_strategy(merger, sets, config: SearchConfig, cache_file: Path) -> SearchResult:
    if cache_file.is_file():
        return SearchResult.from_dict(json.loads(cache_file.read_text()))
    result = merger.search(sets, config, show_progress=True)
    cache_file.write_text(json.dumps(result.to_dict()))
    return result


def compare_strategies(merger, sets, args, tag: str) -> dict:
    bounds = tuple(args.bounds)
    start = {n: min(max(1.0, bounds[0]), bounds[1]) for n in merger.vector_names}  # a fresh merger's ω = 1
    common = dict(bounds=bounds, lora_mode=args.lora_mode, batch_size=8, initial_coefficients=start)
    grid = run_strategy(merger, sets, SearchConfig(strategy="grid", grid_points=args.grid_points, **common),
                        WORK / f"grid-{tag}.json")
    budget = args.budget * grid.compute
    rows = {}
    for objective, metric in (("mean perplexity", "perplexity"), ("mean log_perplexity", "log_perplexity")):
        best_grid = min(grid.candidates, key=lambda c: objective_from_losses(c, objective))
        rows[objective] = {"grid": {
            "best": objective_from_losses(best_grid, objective), "coefficients": best_grid.coefficients,
            "compute": grid.compute, "evaluations": len(grid.candidates), "wall_s": grid.wall_time_s,
        }}
        for strategy, extra in (
            ("gradient", dict(gradient_steps=max(1, int(budget // 3)))),
            ("bayesian", dict(n_trials=max(1, int(budget)))),
        ):
            config = SearchConfig(strategy=strategy, metric=metric, **common, **extra)
            result = run_strategy(merger, sets, config, WORK / f"{strategy}-{metric}-{tag}.json")
            best = result.best
            rows[objective][strategy] = {
                "best": objective_from_losses(best, objective), "coefficients": best.coefficients,
                "compute": result.compute, "evaluations": len(result.candidates), "wall_s": result.wall_time_s,
            }
        for row in rows[objective].values():
            row["gap_percent"] = 100 * (row["best"] / rows[objective]["grid"]["best"] - 1)
            row["compute_percent"] = 100 * row["compute"] / grid.compute
    return {"grid_candidates": len(grid.candidates), "budget_fe": budget, "rows": rows,
            "grid_candidate_median_s": statistics.median(c.seconds for c in grid.candidates)}


# ---------------------------------------------------------------------------------------------- report


def print_report(report: dict) -> None:
    print("\n## Search benchmark\n")
    print(f"machine: {report['machine']}")
    for run in report["commands"]:
        print(f"- {run['date']}: `{run['command']}`")
    print()
    for size, timing in report.get("timing", {}).items():
        print(f"(a) {size}: {timing['tokens']} tokens ({timing['scored_tokens']} scored); plain forward "
              f"{timing['plain_forward_cpu_s']:.2f} CPU s, {timing['plain_forward_wall_s']:.2f} wall s "
              f"(medians of {len(timing['rounds_cpu']['plain'])} rounds, {timing.get('threads', '?')} thread(s))")
        print("| path | CPU s per candidate | / plain forward (CPU) | switch alone (CPU s) | wall s per candidate "
              "| / plain forward (wall) |\n|---|---|---|---|---|---|")
        for path, ratio in timing["ratio_cpu"].items():
            switch = timing["switch_only_cpu_s"].get(path)
            print(f"| {path} | {timing['median_cpu_s'][path]:.2f} | {ratio:.3f} | "
                  f"{f'{switch:.3f}' if switch is not None else '-'} | {timing['median_wall_s'][path]:.2f} | "
                  f"{timing['ratio_wall'][path]:.3f} |")
        print()
    search = report.get("search")
    if search:
        print(f"(b) grid of {search['grid_candidates']} candidates; budget {search['budget_fe']:.1f} forward-pass "
              f"equivalents; grid candidate median {search['grid_candidate_median_s']:.2f} s")
        print("| objective | strategy | best objective | gap to grid best | evaluations | compute (fe) | % of grid compute "
              "| wall (s) | best coefficients |\n|---|---|---|---|---|---|---|---|---|")
        for objective, rows in search["rows"].items():
            for strategy, row in rows.items():
                coefficients = ", ".join(f"{n}={w:.2f}" for n, w in row["coefficients"].items())
                print(f"| {objective} | {strategy} | {row['best']:.4f} | {row['gap_percent']:+.2f}% | {row['evaluations']} | "
                      f"{row['compute']:g} | {row['compute_percent']:.1f}% | {row['wall_s']:.0f} | {coefficients} |")


def main() -> None:
    args = parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    from transformers import AutoTokenizer

    from dem_hf.demo import prepare_distributions, prepare_smollm2

    model_dir = prepare_smollm2(CACHE)
    data = prepare_distributions(CACHE, n_train=400, n_val=32, n_test=64)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lora = train_vectors(model_dir, data, args.vectors, args.train_steps)
    full = [densified(v) for v in lora]
    merger_lora = DEMMerger.from_pretrained(model_dir, vectors=lora, config=DEMConfig())
    merger_full = DEMMerger.from_pretrained(model_dir, vectors=full, config=DEMConfig())
    report_file = WORK / "report.json"  # parts run separately (--skip-grid, --skip-timing) are merged here
    report = json.loads(report_file.read_text()) if report_file.is_file() else {"timing": {}}
    report["machine"] = (
        f"{platform.machine()}, {os.cpu_count()} CPUs (shared), {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, Python {platform.python_version()}"
    )
    report.setdefault("commands", []).append(
        {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "command": "python " + " ".join(sys.argv)}
    )
    if not args.skip_timing:
        for label, texts, length in (("timing sets", args.timing_texts, args.timing_max_length),
                                     ("search sets", args.search_texts, args.search_max_length)):
            sets = validation_sets(data, args.vectors, tokenizer, texts, length)
            print(f"(a) {label}: {texts} texts x <= {length} tokens per set", flush=True)
            threads = torch.get_num_threads()
            torch.set_num_threads(args.timing_threads)
            try:
                timing = measure_switching(model_dir, merger_full, merger_lora, sets, args.rounds)
            finally:
                torch.set_num_threads(threads)
            timing["threads"] = args.timing_threads
            report["timing"][f"{label}: {len(args.vectors)} sets x {texts} texts x <= {length} tokens"] = timing
            report_file.write_text(json.dumps(report, indent=2))
    if not args.skip_grid:
        sets = validation_sets(data, args.vectors, tokenizer, args.search_texts, args.search_max_length)
        merger = merger_lora if args.search_vectors == "lora" else merger_full
        tag = f"steps{args.train_steps}-{args.search_vectors}-{'-'.join(args.vectors)}-{args.grid_points}pts-{args.search_texts}x{args.search_max_length}"
        report["search"] = compare_strategies(merger, sets, args, tag)
        report_file.write_text(json.dumps(report, indent=2))
    report_file.write_text(json.dumps(report, indent=2))
    print_report(report)


if __name__ == "__main__":
    main()

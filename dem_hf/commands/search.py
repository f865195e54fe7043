"""`dem-hf search`: choose the coefficients by validation perplexity and print the candidates.

    dem-hf search --base HuggingFaceTB/SmolLM2-135M --vector vectors/math --vector vectors/chat \\
        --eval math=data/math_val.jsonl --eval chat=data/chat_val.jsonl \\
        --strategy gradient --metric log_perplexity --bounds 0 2 --plot search.png --output dem-model

Prints the best coefficients, the objective and a table of the candidates (best first); `--plot` saves a
PNG of the objective against the coefficients; `--output` saves the merged model with the search recorded
in its `dem_config.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..io.outputs import write_file_atomic
from ..merging.config import WEIGHTINGS, DEMConfig
from ..search.config import SearchConfig
from . import HELP

_HELP = {f.name: f.metadata.get("help", "") for f in SearchConfig.__dataclass_fields__.values()}


def _weighted(text: str) -> tuple[str, float]:
    import argparse

    name, sep, weight = text.partition("=")
    try:
        return name, float(weight) if sep else 1.0
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=WEIGHT with a number as WEIGHT, got {text!r}") from None


def register(subparsers) -> None:
    from .train import parse_named_dataset

    parser = subparsers.add_parser("search", help=HELP["search"])
    parser.add_argument("--base", required=True, help="Base model folder or Hub id.")
    parser.add_argument("--vector", action="append", required=True, metavar="DIR", help="A saved distribution vector; repeat.")
    parser.add_argument(
        "--eval", action="append", required=True, type=parse_named_dataset, metavar="NAME=PATH",
        help="A validation set named after its vector: a .json/.jsonl/.csv/.parquet file or a saved dataset folder; repeat.",
    )
    parser.add_argument("--strategy", default="grid", help=_HELP["strategy"] + " Default: grid.")
    parser.add_argument("--objective", default="mean", help=_HELP["objective"].replace(", or a callable", "") + " Default: mean.")
    parser.add_argument("--metric", default="perplexity", help=_HELP["metric"])
    parser.add_argument("--objective-weight", action="append", type=_weighted, metavar="SET=WEIGHT",
                        help="Weight of a validation set for --objective weighted_mean; repeat.")
    parser.add_argument("--allow-extra-eval-sets", action="store_true", help=_HELP["allow_extra_eval_sets"])
    parser.add_argument(
        "--bounds", nargs=2, type=float, metavar=("LOW", "HIGH"), default=(0.0, 2.0),
        help="Bounds of every coefficient. Default: 0 2.",
    )
    parser.add_argument("--grid-values", nargs="+", type=float, metavar="VALUE", help=_HELP["grid_values"])
    parser.add_argument("--grid-points", type=int, default=5, help=_HELP["grid_points"])
    parser.add_argument("--n-trials", type=int, default=30, help=_HELP["n_trials"])
    parser.add_argument("--gradient-steps", type=int, default=20, help=_HELP["gradient_steps"])
    parser.add_argument("--gradient-optimizer", default="lbfgs", help=_HELP["gradient_optimizer"])
    parser.add_argument("--seed", type=int, default=0, help=_HELP["seed"])
    parser.add_argument("--batch-size", type=int, default=8, help=_HELP["batch_size"])
    parser.add_argument("--max-length", type=int, help=_HELP["max_length"])
    parser.add_argument("--lora-mode", default="auto", help=_HELP["lora_mode"])
    parser.add_argument("--device", help=_HELP["device"])
    parser.add_argument("--weighting", choices=WEIGHTINGS, default="sum", help="'sum' (DEM) or 'average'.")
    parser.add_argument("--top", type=int, default=20, help="Rows of the candidate table (best first); 0 for all.")
    parser.add_argument("--plot", metavar="PNG", help="Save a plot of the objective against the coefficients.")
    parser.add_argument("--result-json", metavar="PATH", help="Also write the full search result as JSON.")
    parser.add_argument("--output", help="Save the merged model (best coefficients, search recorded) here.")
    parser.add_argument("--overwrite", action="store_true", help="Replace a non-empty --output folder.")
    parser.set_defaults(run=run)


def search_config_from_args(args) -> SearchConfig:
    return SearchConfig(
        strategy=args.strategy, objective=args.objective, metric=args.metric,
        objective_weights=dict(args.objective_weight) if args.objective_weight else None,
        allow_extra_eval_sets=args.allow_extra_eval_sets, bounds=tuple(args.bounds), grid_values=args.grid_values,
        grid_points=args.grid_points, n_trials=args.n_trials, gradient_steps=args.gradient_steps,
        gradient_optimizer=args.gradient_optimizer, seed=args.seed, batch_size=args.batch_size,
        max_length=args.max_length, lora_mode=args.lora_mode, device=args.device,
    )


def input_paths(args) -> dict[str, Path | None]:
    """The local files and folders a search or an ablation reads, which none of its outputs may overlap."""
    from ..io.outputs import local_folder

    inputs = {"base model": local_folder(args.base)}
    inputs.update({f"vector {str(path)!r}": local_folder(path) for path in args.vector})
    inputs.update({f"validation set {name!r}": local_folder(path) for name, path in args.eval})
    return inputs


def run(args) -> int:
    from ..io.outputs import check_not_inside, check_output_directory, check_output_file
    from ..merging.merger import DEMMerger
    from ..training.data import load_training_dataset
    from ..vectors.vector import DistributionVector

    config = search_config_from_args(args)  # validated before anything is loaded
    inputs = input_paths(args)
    if args.output:
        check_output_directory(args.output, args.overwrite)
        check_not_inside(args.output, inputs)
    check_output_file(args.result_json, inputs)
    check_output_file(args.plot, inputs)
    if args.plot:
        from ..search.plots import import_matplotlib

        import_matplotlib()  # fail now, not after the search, when matplotlib is missing
    names = [name for name, _ in args.eval]
    if len(set(names)) != len(names):
        raise ValueError(f"Two validation sets share a name: {names}.")
    vectors = [DistributionVector.from_pretrained(path) for path in args.vector]
    merger = DEMMerger.from_pretrained(args.base, vectors=vectors, config=DEMConfig(weighting=args.weighting))
    eval_sets = {name: load_training_dataset(path, name, split="validation") for name, path in args.eval}
    result = merger.search(eval_sets, config)
    best = ", ".join(f"{n}={w:.4g}" for n, w in result.best_coefficients.items())
    print(f"Best coefficients: {best}")
    print(f"Objective ({result.objective}): {result.best_objective:.6g}")
    print(
        f"{len(result.candidates)} candidates ({result.strategy}), {result.compute:g} forward-pass equivalents, "
        f"{result.wall_time_s:.1f} s"
    )
    print(result.table(top=args.top))
    if args.result_json:
        write_file_atomic(args.result_json, lambda handle: handle.write(json.dumps(result.to_dict(), indent=2) + "\n"))
        print(f"Search result written to {args.result_json}")
    if args.plot:
        from ..search.plots import plot_search

        plot_search(result, args.plot)
        print(f"Plot saved to {args.plot}")
    if args.output:
        out = merger.save_pretrained(args.output, overwrite=args.overwrite)
        print(f"Merged model saved to {out}")
    return 0

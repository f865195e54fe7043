"""`dem-hf search`: choose the coefficients by validation perplexity and print the candidates.

    dem-hf search --base HuggingFaceTB/SmolLM2-135M --vector vectors/math --vector vectors/chat \\
        --eval math=data/math_val.jsonl --eval chat=data/chat_val.jsonl \\
        --strategy gradient --metric log_perplexity --bounds 0 2 --plot search.png --output dem-model

Every `SearchConfig` field is an option (`--grid_points 9`, `--bounds 0 1.5`, per vector `--bounds math=0,1
chat=0,2`, `--objective weighted_mean --objective_weights math=2 chat=1`). Prints the best coefficients, the
objective and a table of the candidates (best first); `--plot` saves a PNG of the objective against the
coefficients; `--output` saves the merged model with the search recorded in its `dem_config.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..io.outputs import write_file_atomic
from ..merging.config import DEMConfig
from ..merging.groups import coefficient_summary
from ..search.config import SearchConfig
from .options import (
    add_command,
    add_config_options,
    add_option,
    add_switch,
    config_from_args,
)

# Repeats add up (`--objective_weights math=2 --objective_weights chat=1`), and `--objective-weight`, the flag of
# dem_hf 0.1's command line, still works.
OBJECTIVE_WEIGHTS = {"objective_weights": {"action": "extend", "metavar": "SET=WEIGHT"}}
OBJECTIVE_WEIGHT_ALIASES = {"objective_weights": ["--objective-weight", "--objective_weight"]}


def register(subparsers) -> None:
    from .train import parse_named_dataset

    parser = add_command(subparsers, "search", __doc__)
    add_option(parser, "base", required=True, help="Base model folder or Hub id.")
    add_option(parser, "vector", action="append", required=True, metavar="DIR", help="A saved distribution vector; repeat.")
    add_option(
        parser, "eval", action="append", required=True, type=parse_named_dataset, metavar="NAME=PATH",
        help="A validation set named after its vector: a .json/.jsonl/.csv/.parquet file or a saved dataset folder; repeat.",
    )
    add_option(parser, "top", type=int, default=20, help="Rows of the candidate table (best first); 0 for all.")
    add_option(parser, "plot", metavar="PNG", help="Save a plot of the objective against the coefficients.")
    add_option(parser, "result_json", metavar="PATH", help="Also write the full search result as JSON.")
    add_option(parser, "output", help="Save the merged model (best coefficients, search recorded) here.")
    add_switch(parser, "overwrite", help="Replace a non-empty --output folder.")
    add_config_options(parser.add_argument_group("merging (DEMConfig)"), DEMConfig, ["weighting"])
    add_config_options(
        parser.add_argument_group("search (SearchConfig)"), SearchConfig,
        aliases=OBJECTIVE_WEIGHT_ALIASES, **OBJECTIVE_WEIGHTS,
    )
    parser.set_defaults(run=run)


def search_config_from_args(args) -> SearchConfig:
    """The `SearchConfig` of the parsed options (validated: bad values are a `ValueError` before anything loads)."""
    return config_from_args(SearchConfig, args)


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
    dem_config = config_from_args(DEMConfig, args, ["weighting"])
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
    merger = DEMMerger.from_pretrained(args.base, vectors=vectors, config=dem_config)
    eval_sets = {name: load_training_dataset(path, name, split="validation") for name, path in args.eval}
    result = merger.search(eval_sets, config)
    print(f"Best coefficients: {coefficient_summary(result.best_coefficients)}")
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

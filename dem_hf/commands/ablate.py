"""`dem-hf ablate`: rank candidate data mixtures by the proxy perplexity of averaged partition models.

    dem-hf ablate --base HuggingFaceTB/SmolLM2-135M --vector pool/web/vector --vector pool/code/vector \\
        --vector pool/books/vector --candidate web,code --candidate "web=0.7,books=0.3" \\
        --eval val=data/val.jsonl --output ablation.csv --plot ablation.png

Each `--vector` is one partition's distribution vector (its name is the partition's name). A candidate is a
comma-separated list of partitions (uniform parameter average) or `NAME=WEIGHT` pairs (weights normalised to sum
to 1). Prints the candidates best first; `--output` writes the table as CSV, `--plot` a bar chart as PNG.
"""

from __future__ import annotations

from ..search.config import SearchConfig
from .options import add_command, add_config_options, add_option, config_from_args
from .search import OBJECTIVE_WEIGHT_ALIASES, OBJECTIVE_WEIGHTS, input_paths

# The SearchConfig fields an ablation uses: how candidates are scored, and on what.
SEARCH_FIELDS = ("objective", "metric", "objective_weights", "batch_size", "max_length", "device")


def register(subparsers) -> None:
    from .train import parse_named_dataset

    parser = add_command(subparsers, "ablate", __doc__)
    add_option(parser, "base", required=True, help="Base model folder or Hub id the partition models started from.")
    add_option(parser, "vector", action="append", required=True, metavar="DIR",
               help="A partition's saved distribution vector; repeat.")
    add_option(
        parser, "candidate", action="append", required=True, metavar="MIXTURE",
        help="A candidate mixture: 'a,b' (uniform average) or 'a=0.7,c=0.3' (weights); repeat.",
    )
    add_option(
        parser, "eval", action="append", required=True, type=parse_named_dataset, metavar="NAME=PATH",
        help="A validation set: a .json/.jsonl/.csv/.parquet file or a saved dataset folder; repeat.",
    )
    add_option(parser, "top", type=int, default=0, help="Rows of the printed table (best first); 0 for all.")
    add_option(parser, "output", metavar="CSV", help="Write the ranked table here as CSV.")
    add_option(parser, "plot", metavar="PNG", help="Save a bar chart of the proxy objective per candidate.")
    add_config_options(parser.add_argument_group("scoring (SearchConfig)"), SearchConfig, SEARCH_FIELDS,
                       aliases=OBJECTIVE_WEIGHT_ALIASES, **OBJECTIVE_WEIGHTS)
    parser.set_defaults(run=run)


def run(args) -> int:
    from ..ablation.partitions import check_mixtures
    from ..ablation.pool import PartitionPool, evaluate_mixtures
    from ..ablation.report import plot_ablation
    from ..io.outputs import check_output_file
    from ..training.data import load_training_dataset

    scoring = config_from_args(SearchConfig, args, SEARCH_FIELDS)  # checked before anything is loaded
    for output in (args.output, args.plot):
        check_output_file(output, input_paths(args))
    if args.plot:
        from ..search.plots import import_matplotlib

        import_matplotlib()  # fail now, not after the evaluation, when matplotlib is missing
    names = [name for name, _ in args.eval]
    if len(set(names)) != len(names):
        raise ValueError(f"Two validation sets share a name: {names}.")
    pool = PartitionPool.from_vectors(args.base, args.vector)
    check_mixtures(args.candidate, pool.names)  # before the validation data is read
    eval_sets = {name: load_training_dataset(path, name, split="validation") for name, path in args.eval}
    result = evaluate_mixtures(
        pool, args.candidate, eval_sets, **{name: getattr(scoring, name) for name in SEARCH_FIELDS},
    )
    print(f"Best mixture: {result.best.name} ({result.objective} = {result.best.objective:.6g})")
    print(f"{len(result.scores)} candidates, {result.compute:g} forward passes, {result.wall_time_s:.1f} s")
    print(result.table(top=args.top))
    if args.output:
        print(f"Table written to {result.to_csv(args.output)}")
    if args.plot:
        plot_ablation(result, args.plot)
        print(f"Plot saved to {args.plot}")
    return 0

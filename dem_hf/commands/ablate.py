"""`dem-hf ablate`: rank candidate data mixtures by the proxy perplexity of averaged partition models.

    dem-hf ablate --base HuggingFaceTB/SmolLM2-135M --vector pool/web/vector --vector pool/code/vector \\
        --vector pool/books/vector --candidate web,code --candidate "web=0.7,books=0.3" \\
        --eval val=data/val.jsonl --output ablation.csv --plot ablation.png

Each `--vector` is one partition's distribution vector (its name is the partition's name). A candidate is a
comma-separated list of partitions (uniform parameter average) or `NAME=WEIGHT` pairs (weights normalised to sum
to 1). Prints the candidates best first; `--output` writes the table as CSV, `--plot` a bar chart as PNG.
"""

from __future__ import annotations

from . import HELP
from .search import _HELP, _weighted, input_paths


def register(subparsers) -> None:
    from .train import parse_named_dataset

    parser = subparsers.add_parser("ablate", help=HELP["ablate"])
    parser.add_argument("--base", required=True, help="Base model folder or Hub id the partition models started from.")
    parser.add_argument("--vector", action="append", required=True, metavar="DIR",
                        help="A partition's saved distribution vector; repeat.")
    parser.add_argument(
        "--candidate", action="append", required=True, metavar="MIXTURE",
        help="A candidate mixture: 'a,b' (uniform average) or 'a=0.7,c=0.3' (weights); repeat.",
    )
    parser.add_argument(
        "--eval", action="append", required=True, type=parse_named_dataset, metavar="NAME=PATH",
        help="A validation set: a .json/.jsonl/.csv/.parquet file or a saved dataset folder; repeat.",
    )
    parser.add_argument(
        "--objective", default="mean", help=_HELP["objective"].replace(", or a callable", "") + " Default: mean."
    )
    parser.add_argument("--metric", default="perplexity", help=_HELP["metric"])
    parser.add_argument("--objective-weight", action="append", type=_weighted, metavar="SET=WEIGHT",
                        help="Weight of a validation set for --objective weighted_mean; repeat.")
    parser.add_argument("--batch-size", type=int, default=8, help=_HELP["batch_size"])
    parser.add_argument("--max-length", type=int, help=_HELP["max_length"])
    parser.add_argument("--device", help=_HELP["device"])
    parser.add_argument("--top", type=int, default=0, help="Rows of the printed table (best first); 0 for all.")
    parser.add_argument("--output", metavar="CSV", help="Write the ranked table here as CSV.")
    parser.add_argument("--plot", metavar="PNG", help="Save a bar chart of the proxy objective per candidate.")
    parser.set_defaults(run=run)


def run(args) -> int:
    from ..ablation.partitions import check_mixtures
    from ..ablation.pool import PartitionPool, evaluate_mixtures
    from ..ablation.report import plot_ablation
    from ..io.outputs import check_output_file
    from ..search.config import check_device
    from ..training.data import load_training_dataset

    check_device(args.device)
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
        pool, args.candidate, eval_sets, objective=args.objective, metric=args.metric,
        objective_weights=dict(args.objective_weight) if args.objective_weight else None,
        batch_size=args.batch_size, max_length=args.max_length, device=args.device,
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

"""`dem-hf merge`: stream base + Σ ω_i Δ_i into a Transformers folder."""

from __future__ import annotations

import argparse

from ..merging.config import WEIGHTINGS, DEMConfig
from ..merging.merger import DEMMerger
from ..vectors.vector import DistributionVector
from . import HELP, parse_weighted_path


def register(subparsers) -> None:
    parser = subparsers.add_parser("merge", help=HELP["merge"])
    parser.add_argument("--base", required=True, help="Base model folder or Hub id.")
    parser.add_argument(
        "--vector", action="append", required=True, type=parse_weighted_path, metavar="DIR=WEIGHT",
        help="A saved distribution vector and its coefficient; repeat for each vector.",
    )
    parser.add_argument("--output", required=True, help="Output folder (a standard Transformers checkpoint).")
    parser.add_argument("--weighting", choices=WEIGHTINGS, default="sum", help="'sum' (DEM) or 'average'.")
    parser.add_argument("--max-shard-size", default="2GB", help="Largest weight shard, e.g. 2GB.")
    parser.add_argument("--overwrite", action="store_true", help="Replace a non-empty output folder.")
    parser.add_argument(
        "--save-vectors", action=argparse.BooleanOptionalAction, default=True,
        help="Copy the vectors into OUTPUT/vectors/ (default), so the folder restores on its own.",
    )
    parser.set_defaults(run=run)


def run(args) -> int:
    vectors = [DistributionVector.from_pretrained(path) for path, _ in args.vector]
    coefficients = {vector.name: weight for vector, (_, weight) in zip(vectors, args.vector)}
    if len(coefficients) != len(vectors):
        raise ValueError(f"Two vectors share a name: {[v.name for v in vectors]}.")
    merger = DEMMerger.from_pretrained(args.base, vectors=vectors, config=DEMConfig(weighting=args.weighting))
    out = merger.save_pretrained(
        args.output, coefficients, overwrite=args.overwrite, max_shard_size=args.max_shard_size,
        save_vectors=args.save_vectors,
    )
    print(f"Merged {', '.join(f'{n}={w:g}' for n, w in coefficients.items())} into {out}")
    return 0

"""`dem-hf merge`: stream base + Σ ω_i Δ_i into a Transformers folder.

    dem-hf merge --base HuggingFaceTB/SmolLM2-135M --vector vectors/math=0.7 --vector vectors/chat=0.5 \\
        --output dem-model

Each `--vector DIR=WEIGHT` is a saved distribution vector and its coefficient; the options below `--output` are
`DEMConfig`'s. The merge reads a block of rows at a time and never imports torch for saved vectors, full or LoRA.
"""

from __future__ import annotations

from ..merging.config import DEMConfig
from ..merging.merger import DEMMerger
from ..vectors.vector import DistributionVector
from . import parse_weighted_path
from .options import (
    add_command,
    add_config_options,
    add_option,
    add_switch,
    config_from_args,
)

CONFIG_FIELDS = ("weighting", "merge_method", "density", "gamma", "seed", "max_shard_size")  # the rest is recorded


def register(subparsers) -> None:
    parser = add_command(subparsers, "merge", __doc__)
    add_option(parser, "base", required=True, help="Base model folder or Hub id.")
    add_option(
        parser, "vector", action="append", required=True, type=parse_weighted_path, metavar="DIR=WEIGHT",
        help="A saved distribution vector and its coefficient; repeat for each vector.",
    )
    add_option(parser, "output", required=True, help="Output folder (a standard Transformers checkpoint).")
    add_config_options(parser, DEMConfig, CONFIG_FIELDS)
    add_switch(parser, "overwrite", help="Replace a non-empty output folder.")
    add_switch(parser, "save_vectors", default=True,
               help="Copy the vectors into OUTPUT/vectors/, so the folder restores on its own.")
    parser.set_defaults(run=run)


def run(args) -> int:
    config = config_from_args(DEMConfig, args, CONFIG_FIELDS)  # checked before any vector is read
    vectors = [DistributionVector.from_pretrained(path) for path, _ in args.vector]
    coefficients = {vector.name: weight for vector, (_, weight) in zip(vectors, args.vector)}
    if len(coefficients) != len(vectors):
        raise ValueError(f"Two vectors share a name: {[v.name for v in vectors]}.")
    operator = {name: getattr(config, name) for name in ("merge_method", "density", "gamma", "seed")}
    merger = DEMMerger.from_pretrained(args.base, vectors=vectors, config=DEMConfig(weighting=config.weighting, **operator))
    out = merger.save_pretrained(
        args.output, coefficients, overwrite=args.overwrite, max_shard_size=config.max_shard_size,
        save_vectors=args.save_vectors,
    )
    print(f"Merged {', '.join(f'{n}={w:g}' for n, w in coefficients.items())} into {out}")
    return 0

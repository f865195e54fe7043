"""`dem-hf extract`: a distribution vector from a fine-tuned model or a PEFT adapter."""

from __future__ import annotations

from pathlib import Path

from ..io.outputs import check_not_inside, local_folder
from ..vectors.vector import DistributionVector
from . import HELP


def register(subparsers) -> None:
    parser = subparsers.add_parser("extract", help=HELP["extract"])
    parser.add_argument("--base", required=True, help="Base model folder or Hub id.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--finetuned", help="Fully fine-tuned model folder or Hub id.")
    source.add_argument("--adapter", help="PEFT LoRA adapter folder or Hub id (kept low-rank).")
    parser.add_argument("--name", required=True, help="Vector name, usually the dataset's.")
    parser.add_argument("--output", required=True, help="Folder for the vector.")
    parser.add_argument("--max-shard-size", default="2GB", help="Largest shard, e.g. 2GB.")
    parser.add_argument("--overwrite", action="store_true", help="Replace a non-empty output folder.")
    parser.set_defaults(run=run)


def run(args) -> int:
    inputs = {"base model": args.base, "fine-tuned model": args.finetuned, "adapter": args.adapter}
    check_not_inside(args.output, {label: local_folder(source) for label, source in inputs.items()})
    if args.finetuned:
        vector = DistributionVector.from_models(
            args.base, args.finetuned, name=args.name, save_directory=args.output,
            overwrite=args.overwrite, max_shard_size=args.max_shard_size,
        )
    else:
        vector = DistributionVector.from_peft(args.adapter, name=args.name, base=args.base)
        vector.save_pretrained(args.output, overwrite=args.overwrite, max_shard_size=args.max_shard_size)
    print(f"Saved {vector.vector_type} vector {vector.name!r} ({len(vector.target_names)} tensors) to {Path(args.output)}")
    return 0

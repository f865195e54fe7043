"""`dem-hf extract`: a distribution vector from a fine-tuned model or a PEFT adapter.

    dem-hf extract --base HuggingFaceTB/SmolLM2-135M --finetuned runs/math/model --name math --output vectors/math
    dem-hf extract --base HuggingFaceTB/SmolLM2-135M --adapter runs/chat/adapter --name chat --output vectors/chat

A full fine-tune gives the dense difference θ_ft − θ, streamed block by block into the vector's shards (NumPy,
no torch for two saved checkpoints; memory stays at a few block buffers whatever the model's size); a PEFT LoRA
adapter keeps its low-rank factors.
"""

from __future__ import annotations

from pathlib import Path

from ..io.outputs import check_not_inside, local_folder
from ..vectors.vector import DistributionVector
from .options import add_command, add_option, add_switch


def register(subparsers) -> None:
    parser = add_command(subparsers, "extract", __doc__)
    add_option(parser, "base", required=True, help="Base model folder or Hub id.")
    source = parser.add_mutually_exclusive_group(required=True)
    add_option(source, "finetuned", help="Fully fine-tuned model folder or Hub id.")
    add_option(source, "adapter", help="PEFT LoRA adapter folder or Hub id (kept low-rank).")
    add_option(parser, "name", required=True, help="Vector name, usually the dataset's.")
    add_option(parser, "output", required=True, help="Folder for the vector.")
    add_option(parser, "max_shard_size", default="2GB", help="Largest shard, e.g. 2GB.")
    add_switch(parser, "overwrite", help="Replace a non-empty output folder.")
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

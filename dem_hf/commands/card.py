"""`dem-hf card`: (re)write the model card (`README.md`) of a saved DEM folder, offline.

    dem-hf card dem-model --regenerate --model_id org/dem-model
"""

from __future__ import annotations

from pathlib import Path

from ..merging.card.render import CARD_NAME, write_model_card
from .options import add_command, add_option, add_switch


def register(subparsers) -> None:
    parser = add_command(subparsers, "card", __doc__)
    parser.add_argument("folder", help="Folder saved by `dem-hf merge` / save_pretrained (has dem_config.json).")
    add_switch(parser, "regenerate", help="Replace an existing README.md.")
    add_option(parser, "model_id", help="Repo id or path the card's loading snippet uses (default: folder name).")
    add_option(parser, "base_model", help="Hub id of the base model, when the merge used a local copy of it.")
    add_option(parser, "license", help="License id for the card (default: the base model's, where known).")
    parser.set_defaults(run=run)


def run(args) -> int:
    options = {"model_id": args.model_id, "base_model": args.base_model, "license": args.license}
    written = write_model_card(
        args.folder, regenerate=args.regenerate, **{key: value for key, value in options.items() if value}
    )
    if written is None:
        print(f"Kept the existing {Path(args.folder) / CARD_NAME}; pass --regenerate to replace it.")
    else:
        print(f"Wrote {written}")
    return 0

"""`dem-hf card`: (re)write the model card (`README.md`) of a saved DEM folder, offline."""

from __future__ import annotations

from pathlib import Path

from ..merging.card.render import CARD_NAME, write_model_card
from . import HELP


def register(subparsers) -> None:
    parser = subparsers.add_parser("card", help=HELP["card"])
    parser.add_argument("folder", help="Folder saved by `dem-hf merge` / save_pretrained (has dem_config.json).")
    parser.add_argument("--regenerate", action="store_true", help="Replace an existing README.md.")
    parser.add_argument("--model-id", help="Repo id or path the card's loading snippet uses (default: folder name).")
    parser.add_argument("--base-model", help="Hub id of the base model, when the merge used a local copy of it.")
    parser.add_argument("--license", help="License id for the card (default: the base model's, where known).")
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

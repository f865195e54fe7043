"""Subcommands of `dem-hf`; each module defines `register(subparsers)` and sets `run` on its parser.

`HELP` lists them in order with their one-line help. The CLI imports only the module of the subcommand
being run (a merge does not pay for importing TRL), so adding a subcommand is a module plus a line here.
"""

from __future__ import annotations

import argparse

HELP = {
    "extract": "Compute a distribution vector (full θ_ft − θ, or LoRA factors).",
    "merge": "Merge distribution vectors into a base model (streaming).",
    "train": "Fine-tune the base once per dataset with TRL and save one distribution vector per dataset.",
    "search": "Choose merging coefficients by validation perplexity.",
    "ablate": "Rank candidate data mixtures by the proxy perplexity of averaged partition models.",
    "push": "Push a saved (DEM) model folder to the Hub in one commit.",
    "card": "Write the model card (README.md) of a saved DEM folder.",
    "demo": "Run DEM end to end on a real model and real data (offline).",
}


def parse_weighted_path(text: str) -> tuple[str, float]:
    """Parse `PATH=WEIGHT` (or a bare `PATH`, weight 1.0) for `--vector`."""
    path, sep, weight = text.rpartition("=")
    if not sep:
        return text, 1.0
    try:
        return path, float(weight)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected PATH=WEIGHT with a number as WEIGHT, got {text!r}") from None

"""Subcommands of `dem-hf`; each module defines `register(subparsers)` and sets `run` on its parser."""

from __future__ import annotations

import argparse


def parse_weighted_path(text: str) -> tuple[str, float]:
    """Parse `PATH=WEIGHT` (or a bare `PATH`, weight 1.0) for `--vector`."""
    path, sep, weight = text.rpartition("=")
    if not sep:
        return text, 1.0
    try:
        return path, float(weight)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected PATH=WEIGHT with a number as WEIGHT, got {text!r}") from None

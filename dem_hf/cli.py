"""The `dem-hf` command line: one subcommand per pipeline stage, each in `dem_hf/commands/<name>.py`.

Errors a user can fix (bad paths, bad names, incompatible vectors) print one line and exit with status 2;
failures of the environment (network, Hub, full disk) print one line and exit with status 1; `--debug`
shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__

COMMANDS = ("extract", "merge", "train", "search", "push", "card", "demo")

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError, ImportError)
ENVIRONMENT_ERRORS = (OSError,)  # after USER_ERRORS, which holds some OSError subclasses


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dem-hf", description="Distribution-Edited Models for Hugging Face models.")
    parser.add_argument("--version", action="version", version=f"dem_hf {__version__}")
    parser.add_argument("--debug", action="store_true", help="Show full tracebacks on errors.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f".commands.{name}", __package__).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0
    except USER_ERRORS as error:
        if args.debug:
            raise
        print(f"dem-hf {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except ENVIRONMENT_ERRORS as error:
        if args.debug:
            raise
        print(f"dem-hf {args.command}: failed: {_one_line(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"dem-hf {args.command}: interrupted; no partial output was left.", file=sys.stderr)
        return 130


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


if __name__ == "__main__":
    sys.exit(main())

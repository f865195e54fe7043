"""The `dem-hf` command line: one subcommand per pipeline stage, each in `dem_hf/commands/<name>.py`.

Errors a user can fix (bad options, bad paths, bad names, incompatible vectors) print one line and exit with status 2;
failures of the environment (network, Hub, full disk) print one line and exit with status 1, and so does any
other exception (with a hint to rerun with `--debug`); `--debug` shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from .. import __version__
from . import HELP as COMMANDS

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError, ImportError)
ENVIRONMENT_ERRORS = (OSError,)  # after USER_ERRORS, which holds some OSError subclasses


class UsageError(Exception):
    """A command line argparse refuses (unknown option, invalid choice, missing value): one line, status 2."""


class CommandLineParser(argparse.ArgumentParser):
    """An `ArgumentParser` whose errors raise [`UsageError`] (one line in `main`) instead of printing the usage."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The `dem-hf` parser; only the subcommand named in `argv` is imported and given its full options."""
    parser = CommandLineParser(prog="dem-hf", description="Distribution-Edited Models for Hugging Face models.")
    parser.add_argument("--version", action="version", version=f"dem_hf {__version__}")
    parser.add_argument("--debug", action="store_true", help="Show full tracebacks on errors.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((arg for arg in (sys.argv[1:] if argv is None else argv) if arg in COMMANDS), None)
    for name, help_text in COMMANDS.items():
        if name == chosen:
            importlib.import_module(f".{name}", __package__).register(subparsers)
        else:
            subparsers.add_parser(name, help=help_text, description=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(argv)
    try:
        args = parser.parse_args(argv)
    except UsageError as error:
        print(_one_line(error), file=sys.stderr)
        return 2
    with _exit_cleanly_on_sigterm():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
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
    except Exception as error:  # a bug, or a library's own error type: still one line unless --debug
        if args.debug:
            raise
        message = f"{type(error).__name__}: {_one_line(error)}"
        print(f"dem-hf {args.command}: failed: {message} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


@contextmanager
def _exit_cleanly_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM (`kill`, a scheduler's time limit) into `SystemExit(143)` while a command runs, so that its
    temporary output is removed as on Ctrl-C (a SIGKILL's is removed by the next run on the same output)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGTERM"):
        yield
        return

    def terminate(signum, frame):
        print("dem-hf: terminated; no partial output was left.", file=sys.stderr)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


if __name__ == "__main__":
    sys.exit(main())

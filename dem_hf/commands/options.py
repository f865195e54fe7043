"""Command-line options in one style: TRL's underscores (`--grid_points`), the dashed spelling (`--grid-points`) as
an alias, listed choices, defaults shown in `--help`.

[`add_config_options`] turns the fields of a config dataclass into options exactly as `transformers.HfArgumentParser`
does (the same flags, types, choices, `nargs`, booleans with an optional value and a `--no_<name>` complement), so
that `dem-hf search` is built from `SearchConfig`, `dem-hf merge` from `DEMConfig` and `dem-hf demo` from
`DemoConfig`. It does not use `HfArgumentParser` itself because `dem-hf merge` of saved vectors must start without
importing transformers (or torch); `tests/test_cli.py` checks that both parse the same command lines to the same
configs.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

from . import HELP


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each option's help (but no `(default: None)`), and the description (the subcommand's docs, with
    examples) as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.required:
            return action.help
        return super()._get_help_string(action)


def add_command(subparsers, name: str, description: str | None, **kwargs) -> argparse.ArgumentParser:
    """A subcommand's parser: its one-line help in `dem-hf --help`, its docs as the description of its `--help`."""
    return subparsers.add_parser(
        name, help=HELP[name], description=description or HELP[name], formatter_class=HelpFormatter, **kwargs
    )


def flag_names(name: str) -> list[str]:
    """`--name`, and `--na-me` when the name has underscores (as HfArgumentParser and TRL's CLI spell them)."""
    return [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])


def add_option(parser, name: str, *aliases: str, **kwargs) -> argparse.Action:
    """`parser.add_argument` with the flag names of [`flag_names`] (plus `aliases`) and `dest=name`."""
    return parser.add_argument(*flag_names(name), *aliases, dest=name, **kwargs)


def add_switch(parser, name: str, default: bool = False, **kwargs) -> None:
    """A boolean option as HfArgumentParser makes one: `--name` (true), `--name false`, and `--no_name` when the
    default is true."""
    add_option(parser, name, type=string_to_bool, nargs="?", const=True, default=default, metavar="BOOL", **kwargs)
    if default:
        parser.add_argument(f"--no_{name}", f"--no-{name.replace('_', '-')}", action="store_false", dest=name,
                            default=argparse.SUPPRESS, help=f"Turn off --{name}.")


def string_to_bool(value: str | bool) -> bool:
    """`true/false`, `yes/no`, `1/0` (any case), as HfArgumentParser reads a boolean option's value."""
    if isinstance(value, bool):
        return value
    if value.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if value.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false (yes/no, 1/0), got {value!r}")


def add_config_options(
    parser,
    config_class: type,
    fields: Iterable[str] | None = None,
    aliases: Mapping[str, list[str]] | None = None,
    **overrides: Any,
) -> list[str]:
    """Add one option per field of `config_class` (all, or those named in `fields`) and return the field names.

    Args:
        parser: an `argparse.ArgumentParser` or an argument group.
        config_class: a dataclass whose fields carry `metadata={"help": ...}` (and optionally `choices`, `nargs`,
            `metavar`, `aliases`), typed as HfArgumentParser expects: `X`, `X | None`, `X | str | None`, `list[X]`.
        fields: the fields to offer (default: every field of the constructor).
        aliases: extra flag names per field, e.g. `{"lora_target_modules": ["--target-modules"]}`.
        overrides: keyword arguments of `add_argument` per field, e.g. `weighting={"default": "average"}`.
    """
    hints = typing.get_type_hints(config_class)
    chosen = [f for f in dataclasses.fields(config_class) if f.init and (fields is None or f.name in set(fields))]
    for field in chosen:
        kwargs = dict(field.metadata)
        extra = kwargs.pop("aliases", [])
        extra = [extra] if isinstance(extra, str) else list(extra)
        kwargs.update(_type_options(field, hints[field.name]))
        kwargs.update(overrides.get(field.name, {}))
        add_option(parser, field.name, *extra, *(aliases or {}).get(field.name, []), **kwargs)
        if kwargs.get("default") is True and kwargs.get("type") is string_to_bool:
            parser.add_argument(f"--no_{field.name}", f"--no-{field.name.replace('_', '-')}", action="store_false",
                                dest=field.name, default=argparse.SUPPRESS, help=f"Turn off --{field.name}.")
    return [field.name for field in chosen]


def config_from_args(config_class: type, args: argparse.Namespace, fields: Iterable[str] | None = None, **values: Any):
    """`config_class(...)` from the parsed options of its fields (those present in `args`) and `values`."""
    names = {f.name for f in dataclasses.fields(config_class) if f.init}
    if fields is not None:
        names &= set(fields)
    parsed = {name: getattr(args, name) for name in names if hasattr(args, name)}
    return config_class(**parsed, **values)


def _type_options(field: dataclasses.Field, annotation: Any) -> dict[str, Any]:
    """`type`, `nargs`, `default`/`required` for one field, following HfArgumentParser's reading of type hints."""
    options: dict[str, Any] = {}
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        members = typing.get_args(annotation)
        if str not in members and (len(members) != 2 or type(None) not in members):
            raise ValueError(f"Field {field.name!r}: only X | None or X | str | None can be an option, got {annotation}.")
        if type(None) not in members:
            annotation = members[0] if members[1] is str else members[1]
        elif bool not in members:
            annotation = members[0] if members[1] is type(None) else members[1]
        origin = typing.get_origin(annotation)
    default = _default(field)
    if annotation is bool or annotation == (bool | None):
        options["type"] = string_to_bool
        if annotation is bool or default is not None:
            options.update(default=False if default is dataclasses.MISSING else default, nargs="?", const=True)
            options.setdefault("metavar", "BOOL")
        return options
    if isinstance(origin, type) and issubclass(origin, list):
        options.update(type=typing.get_args(annotation)[0], nargs="+")
    else:
        options["type"] = annotation
    if default is dataclasses.MISSING:
        options["required"] = True
    else:
        options["default"] = default
    return options


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING

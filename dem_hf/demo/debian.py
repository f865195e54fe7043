"""Debian packages fetched without root: `apt-get download` into a temporary folder, then `dpkg-deb -x`.

[`fetch_debian_package`] unpacks a package once into `cache_dir/debian/<package>/root/` and records its
version in `cache_dir/debian/<package>/package.json`; a later call only reads that file. The folder is
built under a temporary name and renamed into place when complete ([`dem_hf.demo.files`]), so a failed
or interrupted fetch leaves nothing behind. Any Debian or Ubuntu machine that reaches its package
archive can fetch them; no root, no `apt-get install`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dem_hf.demo.files import _move_into_place, _temp_folder

from .. import logging as hf_logging

logger = hf_logging.get_logger(__name__)

_TOOLS = ("apt-get", "dpkg-deb")
_INFO_FILE = "package.json"
_COMMAND_TIMEOUT_S = 600


@dataclass(frozen=True)
class DebianPackage:
    """A Debian package unpacked in the cache.

    Args:
        name (`str`): the package name, e.g. `"jargon-text"`.
        version (`str`): its version, as `dpkg-deb -f <file>.deb Version` gives it (e.g. `"4.4.7-4.1"`).
        root (`pathlib.Path`): the folder the package's files were unpacked into (`root/usr/share/...`).
    """

    name: str
    version: str
    root: Path


def package_folder(cache_dir: str | os.PathLike[str], package: str) -> Path:
    """The cache folder of a Debian package: `cache_dir/debian/<package>`."""
    return Path(cache_dir).expanduser() / "debian" / package


def _cached(folder: Path) -> DebianPackage | None:
    info_file = folder / _INFO_FILE
    if not info_file.is_file():
        return None
    info = json.loads(info_file.read_text(encoding="utf-8"))
    return DebianPackage(info["package"], info["version"], folder / "root")


def missing_tools(cache_dir: str | os.PathLike[str], packages: tuple[str, ...]) -> list[str]:
    """The commands (`apt-get`, `dpkg-deb`) that fetching the packages not yet cached would need but are missing."""
    if all(_cached(package_folder(cache_dir, package)) is not None for package in packages):
        return []
    return [tool for tool in _TOOLS if shutil.which(tool) is None]


def check_debian_tools(cache_dir: str | os.PathLike[str], packages: tuple[str, ...], purpose: str) -> None:
    """Raise a `RuntimeError` naming the commands to run by hand when `apt-get`/`dpkg-deb` are missing.

    Nothing is checked for packages already in the cache.

    Args:
        cache_dir (`str` or `os.PathLike`): the cache folder.
        packages (`tuple[str, ...]`): Debian package names.
        purpose (`str`): what needs them, for the message (e.g. `'the "jargon" distribution'`).
    """
    missing = missing_tools(cache_dir, packages)
    if missing:
        by_hand = "; ".join(_manual_commands(cache_dir, package) for package in packages)
        raise RuntimeError(
            f"{purpose[0].upper()}{purpose[1:]} comes from the Debian package(s) {list(packages)}, fetched with "
            f"`apt-get download` and unpacked with `dpkg-deb -x`, but {' and '.join(f'`{t}`' for t in missing)} "
            f"is not on PATH. Install it (it comes with Debian and Ubuntu), or fetch the package(s) by hand on a "
            f"Debian or Ubuntu machine and copy the folder(s) here: {by_hand}."
        )


def _manual_commands(cache_dir: str | os.PathLike[str], package: str) -> str:
    folder = package_folder(cache_dir, package)
    return (
        f"`apt-get download {package} && dpkg-deb -x {package}_*.deb {folder}/root && "
        f"printf '{{\"package\": \"{package}\", \"version\": \"%s\"}}' "
        f"\"$(dpkg-deb -f {package}_*.deb Version)\" > {folder}/{_INFO_FILE}`"
    )


def _run(command: list[str], cwd: Path) -> str:
    try:
        completed = subprocess.run(
            command, cwd=cwd, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT_S, check=False
        )
    except FileNotFoundError as error:
        raise RuntimeError(f"`{command[0]}` is not installed; needed for `{' '.join(command)}`.") from error
    except subprocess.TimeoutExpired as error:
        raise RuntimeError(f"`{' '.join(command)}` did not finish in {_COMMAND_TIMEOUT_S} s.") from error
    if completed.returncode != 0:
        raise RuntimeError(
            f"`{' '.join(command)}` failed with exit status {completed.returncode}:\n{completed.stderr.strip()}"
        )
    return completed.stdout


def _download_and_unpack(package: str, into: Path) -> str:
    """Download `package` with `apt-get download`, unpack it into `into/root`; returns its version."""
    with tempfile.TemporaryDirectory(prefix="dem_hf-deb-") as download_dir:
        download = Path(download_dir)
        # apt-get writes `<name>_<version>_<arch>.deb` into the working folder (the epoch's `:` as `%3a`).
        _run(["apt-get", "download", package], cwd=download)
        files = sorted(download.glob("*.deb"))
        if len(files) != 1:
            raise RuntimeError(
                f"`apt-get download {package}` should leave one .deb file, left {[f.name for f in files]}."
            )
        version = _run(["dpkg-deb", "-f", str(files[0]), "Version"], cwd=download).strip()
        root = (into / "root").absolute()  # the commands run in the download folder: a relative cache would miss
        root.mkdir()
        _run(["dpkg-deb", "-x", str(files[0]), str(root)], cwd=download)
    return version


def fetch_debian_package(cache_dir: str | os.PathLike[str], package: str) -> DebianPackage:
    """Unpack a Debian package into the cache once (`apt-get download` + `dpkg-deb -x`), or reuse it.

    Args:
        cache_dir (`str` or `os.PathLike`):
            The cache folder; the package goes to `cache_dir/debian/<package>/`.
        package (`str`):
            The Debian package name, e.g. `"jargon-text"`.

    Returns:
        [`DebianPackage`]: its name, version and the folder its files were unpacked into.

    Raises:
        `RuntimeError`: `apt-get` or `dpkg-deb` is missing (the message gives the commands to run by hand), or
            a command failed (the message gives the command and its stderr). No folder is left in place then.

    Example:

    ```python
    >>> jargon = fetch_debian_package("examples/.cache", "jargon-text")  # about a second the first time
    >>> jargon.version, (jargon.root / "usr/share/doc/jargon-text/jargon.txt.gz").is_file()
    ('4.4.7-4.1', True)
    ```
    """
    folder = package_folder(cache_dir, package)
    cached = _cached(folder)
    if cached is not None:
        return cached
    check_debian_tools(cache_dir, (package,), f"the Debian package `{package}`")
    with _temp_folder(folder) as tmp:
        version = _download_and_unpack(package, tmp)
        info = {"package": package, "version": version}
        (tmp / _INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        # An incomplete folder (one made by hand) is replaced; one a concurrent fetch finished is kept.
        _move_into_place(tmp, folder, replace=folder.exists() and _cached(folder) is None)
    logger.info("Fetched the Debian package %s %s into %s", package, version, folder)
    fetched = _cached(folder)
    if fetched is None:
        raise RuntimeError(f"{folder} has no {_INFO_FILE} after the fetch of `{package}`.")
    return fetched

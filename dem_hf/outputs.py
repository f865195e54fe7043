"""Output folders that are complete or absent: checks before writing, and atomic replacement.

Every output folder of dem_hf (merged models, vectors, cards) is built under a temporary name beside its
target by [`atomic_directory`] and renamed into place only when complete, so a crash, a full disk or
Ctrl-C never leaves half a result and never destroys the previous one. Single files (search results,
plots, ablation tables) go through [`write_file_atomic`] the same way.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

WEIGHT_FILE_PATTERN = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt|gguf|h5|msgpack)(\.index\.json)?$")


def is_weight_file(name: str) -> bool:
    """True for checkpoint weight files and their indexes (which a merge writes anew)."""
    return bool(WEIGHT_FILE_PATTERN.fullmatch(name))


def check_output_directory(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse an output folder that exists and is not empty, unless `overwrite=True`. Returns the path."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"Output path {str(path)!r} exists and is a file; expected a folder path.")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ValueError(
            f"Output folder {str(path)!r} exists and is not empty; pass overwrite=True (--overwrite) to replace it."
        )
    return path


def check_not_inside(output: str | os.PathLike, inputs: dict[str, str | os.PathLike | None]) -> None:
    """Refuse an output folder that is, contains or lies inside one of the input folders."""
    out = Path(output).resolve()
    for label, folder in inputs.items():
        if folder is None:
            continue
        folder = Path(folder).resolve()
        if out == folder or folder in out.parents or out in folder.parents:
            raise ValueError(
                f"Output folder {str(out)!r} overlaps the input {label} at {str(folder)!r}; "
                "writing there could destroy the input. Choose another output folder."
            )


def _fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_directory(Path(root))


def _fsync_directory(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Build a folder under a temporary name beside `target`; move it into place only on success.

    On any exception (including `KeyboardInterrupt`) the temporary folder is removed and an existing
    `target` is left untouched. With `overwrite=True` the previous `target` is replaced only once the new
    one is complete and synced to disk.

    Example:
        ```python
        >>> with atomic_directory("out", overwrite=True) as tmp:
        ...     (tmp / "file.txt").write_text("complete or absent")
        ```
    """
    target = check_output_directory(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
        _fsync_tree(staging)
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, retired / target.name)
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
        _fsync_directory(target.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_file_atomic(path: str | os.PathLike, write: Callable[[IO[Any]], Any], *, binary: bool = False) -> Path:
    """Call `write(handle)` on a temporary file beside `path`, sync it, then rename it into place.

    A failure (including `KeyboardInterrupt` or a full disk) removes the temporary file and leaves the
    previous `path`, if any, untouched. Returns `path`.

    Example:
        ```python
        >>> write_file_atomic("result.json", lambda handle: handle.write(json.dumps(result)))
        >>> write_file_atomic("plot.png", lambda handle: figure.savefig(handle, format="png"), binary=True)
        ```
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb" if binary else "w", **({} if binary else {"newline": ""})) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path

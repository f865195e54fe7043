"""Output folders and files that are complete or absent, never written over an input, one writer at a time.

Every output folder of dem_hf (merged models, vectors, cards) is built under a temporary name beside its
target by [`atomic_directory`] and renamed into place only when complete, so a crash, a full disk or
Ctrl-C never leaves half a result and never destroys the previous one. Single files (search results,
plots, ablation tables) go through [`write_file_atomic`] the same way.

Both hold a lock beside the target ([`output_lock`], `.<name>.lock`) while they write: a second writer of the
same output fails at once with [`OutputInUseError`] instead of silently replacing the first one's result, and
with the lock held any `.<name>.tmp-*` left beside the target is stale (its run was killed) and is removed.
Temporary folders and files are created with the modes a plain `mkdir`/`open` gives (the process umask
applies), unlike `tempfile.mkdtemp`'s 0700 and `mkstemp`'s 0600, so the outputs are as readable as any file
the user creates.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from .. import logging

try:
    import fcntl
except ImportError:  # Windows: the lock falls back to creating its file exclusively
    fcntl = None

logger = logging.get_logger(__name__)

BINARY = getattr(os, "O_BINARY", 0)  # Windows opens descriptors in text mode without it
WEIGHT_FILE_PATTERN = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt|gguf|h5|msgpack)(\.index\.json)?$")


class OutputInUseError(FileExistsError):
    """Another writer (this process or another one) holds the lock of the output folder or file."""


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


def check_output_file(path: str | os.PathLike | None, inputs: dict[str, str | os.PathLike | None]) -> None:
    """Refuse an output file path that is a folder, or that is or lies inside one of `inputs` (files or folders)."""
    if path is None:
        return
    if Path(path).is_dir():
        raise ValueError(f"Output file {str(path)!r} is an existing folder; expected a file path.")
    check_not_inside(path, inputs, kind="Output file")


def file_mode() -> int:
    """The mode a plain `open` gives a new file: `0o666` less the process umask (read without changing it on Linux)."""
    try:
        with open("/proc/self/status") as status:
            umask = next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0o022)  # elsewhere: read by setting it, and put it back at once
        os.umask(umask)
    return 0o666 & ~umask


def local_folder(source: Any) -> Path | None:
    """`source` as a path when it names an existing local file or folder (not a Hub id or an in-memory model)."""
    if isinstance(source, (str, os.PathLike)) and os.path.exists(source):
        return Path(source)
    return None


def check_not_inside(
    output: str | os.PathLike, inputs: dict[str, str | os.PathLike | None], *, kind: str = "Output folder"
) -> None:
    """Refuse an output that is, contains or lies inside one of the inputs (folders or files); `None` inputs are skipped."""
    out = Path(output).resolve()
    for label, folder in inputs.items():
        if folder is None:
            continue
        folder = Path(folder).resolve()
        if out == folder or folder in out.parents or out in folder.parents:
            raise ValueError(
                f"{kind} {str(out)!r} overlaps the input {label} at {str(folder)!r}; "
                f"writing there could destroy the input. Choose another {kind.split()[-1].lower()}."
            )


# ---------------------------------------------------------------------------------------------------- the lock


def lock_path(target: str | os.PathLike) -> Path:
    """The lock file of an output: `.<name>.lock` beside it."""
    target = Path(target)
    return target.parent / f".{target.name}.lock"


@contextmanager
def output_lock(target: str | os.PathLike, timeout: float = 0.0) -> Iterator[Path]:
    """Hold the exclusive lock of output `target` (a folder or a file) for the duration of the block.

    The lock is `fcntl.flock` on `.<name>.lock` beside `target`, released by the system even when the process
    is killed; the file is removed on release. Without `fcntl` (Windows) the lock is the file's exclusive
    creation, which a killed run leaves behind (the error says to delete it). Raises [`OutputInUseError`] when
    another writer holds the lock for longer than `timeout` seconds (default: fail at once).

    Example:
        ```python
        >>> with output_lock("dem-model"):
        ...     ...  # no other dem_hf writer of dem-model runs meanwhile
        ```
    """
    path = lock_path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    while (descriptor := _try_lock(path)) is None:
        if time.monotonic() >= deadline:
            hint = "" if fcntl is not None else f" If no other run is writing it, delete {str(path)!r}."
            raise OutputInUseError(
                f"Output {str(target)!r} is being written by another process or call (lock {str(path)!r} is held); "
                f"wait for it to finish or choose another output.{hint}"
            )
        time.sleep(0.05)
    try:
        yield path
    finally:
        try:
            os.unlink(path)  # while still holding it: a writer waiting on this file sees it replaced and retries
        finally:
            os.close(descriptor)


def _try_lock(path: Path) -> int | None:
    """A descriptor holding the lock at `path`, or `None` when another writer holds it."""
    if fcntl is None:
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            return None
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            return None
        except BaseException:
            os.close(descriptor)
            raise
        if _same_file(descriptor, path):
            return descriptor
        os.close(descriptor)  # its holder removed this file on release: lock the one now at `path`


def _same_file(descriptor: int, path: Path) -> bool:
    try:
        current = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(descriptor)
    return (opened.st_dev, opened.st_ino) == (current.st_dev, current.st_ino)


# ------------------------------------------------------------------------------------------- temporary names


def _sibling(target: Path, kind: str) -> Path:
    """A fresh name beside `target`: `.<name>.<kind>-<8 random characters>`."""
    return target.parent / f".{target.name}.{kind}-{secrets.token_hex(4)}"


def _remove_stale_temporaries(target: Path) -> None:
    """With the lock of `target` held, remove what killed runs left beside it: `.<name>.tmp-*` (unfinished
    outputs) and `.<name>.old-*` (a previous result moved aside during an overwrite, put back if `target` is gone)."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(tmp|old)-[a-z0-9_]{{8}}")
    for entry in target.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match is None:
            continue
        previous = entry / target.name
        if match.group(1) == "old" and previous.exists() and not target.exists():
            os.replace(previous, target)
            logger.warning(f"Restored {str(target)!r}, which a killed run had moved aside to {str(entry)!r}.")
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        logger.info(f"Removed {str(entry)!r}, left by a killed run writing {str(target)!r}.")


# ------------------------------------------------------------------------------------------ folders and files


def _fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_directory(Path(root))


def _fsync_directory(folder: Path) -> None:
    if not hasattr(os, "O_DIRECTORY"):  # Windows cannot open a folder to sync it
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextmanager
def atomic_directory(
    target: str | os.PathLike, overwrite: bool = False, *, inputs: dict[str, str | os.PathLike | None] | None = None
) -> Iterator[Path]:
    """Build a folder under a temporary name beside `target`; move it into place only on success.

    Before anything is yielded, `target` is checked (absent or empty unless `overwrite=True`, and not overlapping
    any of `inputs`), its lock is taken ([`output_lock`]: a concurrent writer raises [`OutputInUseError`]) and
    leftovers of killed runs beside it are removed. On any exception (including `KeyboardInterrupt`) the
    temporary folder is removed and an existing `target` is left untouched. With `overwrite=True` the previous
    `target` is replaced only once the new one is complete and synced to disk; without it, a `target` that
    appeared meanwhile (another program) is never replaced: `FileExistsError`, and nothing is moved.

    Example:
        ```python
        >>> with atomic_directory("out", overwrite=True) as tmp:
        ...     (tmp / "file.txt").write_text("complete or absent")
        ```
    """
    target = check_output_directory(target, overwrite)
    check_not_inside(target, inputs or {})
    target.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(target):
        _remove_stale_temporaries(target)
        check_output_directory(target, overwrite)  # again, now that no other writer can change it
        staging = _sibling(target, "tmp")
        staging.mkdir()  # mode 0o777 & ~umask, as the final folder should have
        try:
            yield staging
            _fsync_tree(staging)
            _move_into_place(staging, target, overwrite)
            _fsync_directory(target.parent)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def _move_into_place(staging: Path, target: Path, overwrite: bool) -> None:
    if overwrite and (target.exists() or target.is_symlink()):
        retired = _sibling(target, "old")
        retired.mkdir()
        os.replace(target, retired / target.name)
        try:
            os.replace(staging, target)
        except BaseException:
            os.replace(retired / target.name, target)
            raise
        shutil.rmtree(retired, ignore_errors=True)
        return
    try:
        os.rename(staging, target)  # POSIX replaces an empty folder only; a non-empty one or a file is an error
    except OSError as error:
        if target.is_dir() and not any(target.iterdir()):  # Windows: even an empty folder is in the way
            target.rmdir()
            os.rename(staging, target)
            return
        if target.exists() or target.is_symlink():
            raise FileExistsError(
                f"Output {str(target)!r} appeared while this run was writing it (created by another program?); "
                "it was left untouched and this run's result was discarded. Pass overwrite=True (--overwrite) "
                "to replace it, or choose another output."
            ) from error
        raise


def write_file_atomic(path: str | os.PathLike, write: Callable[[IO[Any]], Any], *, binary: bool = False) -> Path:
    """Call `write(handle)` on a temporary file beside `path`, sync it, then rename it into place.

    A failure (including `KeyboardInterrupt` or a full disk) removes the temporary file and leaves the
    previous `path`, if any, untouched. Concurrent writers of one `path` take turns (its lock, waited on for up
    to a minute); temporaries left by killed writers of `path` are removed. The file gets the mode a plain
    `open` gives (`0o666` less the umask). Returns `path`.

    Example:
        ```python
        >>> write_file_atomic("result.json", lambda handle: handle.write(json.dumps(result)))
        >>> write_file_atomic("plot.png", lambda handle: figure.savefig(handle, format="png"), binary=True)
        ```
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"Output file {str(path)!r} is an existing folder; expected a file path.")
    path.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(path, timeout=60.0):
        _remove_stale_temporaries(path)
        temporary = _sibling(path, "tmp")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | BINARY, 0o666)
        try:
            with os.fdopen(descriptor, "wb" if binary else "w", **({} if binary else {"newline": ""})) as handle:
                write(handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
    return path

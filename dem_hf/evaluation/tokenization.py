"""Turning a validation set, in any format TRL's `SFTTrainer` trains on, into an [`EvaluationSet`].

[`tokenize_for_evaluation`] tokenises each example once and builds a loss mask saying which tokens
are scored. Formats are detected from the columns as `SFTTrainer` does:

| columns | format | scored tokens |
|---|---|---|
| `text` (or `text_column`) | language modelling | all but the first; EOS appended as `SFTTrainer` does |
| `prompt`, `completion` (strings) | prompt-completion | completion only (`completion_only_loss`) |
| `messages` (list of `{role, content}`) | conversational | all, or assistant turns (`assistant_only_loss`) |
| `prompt`, `completion` (message lists) | conversational prompt-completion | completion only |
| `conversations` (`{from, value}`) | ShareGPT, converted to `messages` | as conversational |
| `input_ids` (+ `labels` / `completion_mask` / `assistant_masks`) | pre-tokenised | as the masks say |

Sequences longer than `max_length` keep their first `max_length` tokens and a warning says how many
were cut. The first token of a sequence is never scored: nothing precedes it to predict it from.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .. import logging
from .sets import EvaluationSet, build_evaluation_set

__all__ = ["tokenize_for_evaluation"]

logger = logging.get_logger(__name__)

_EXPECTED_COLUMNS = (
    "'{text}' (language modelling), 'prompt' + 'completion' (prompt-completion, strings or message lists), "
    "'messages' (conversational), 'conversations' (ShareGPT from/value) or 'input_ids' (pre-tokenised)"
)
_NO_LIMIT = int(1e29)  # tokenizers without a limit report `model_max_length = int(1e30)`
_TOKENIZE_CHUNK = 1024


def tokenize_for_evaluation(
    dataset: Any,
    tokenizer: Any,
    *,
    max_length: int | None = None,
    text_column: str | None = None,
    completion_only_loss: bool | None = None,
    assistant_only_loss: bool = False,
    add_eos_token: bool = True,
    formatting_func: Callable[[dict[str, Any]], str] | None = None,
    chat_template: str | None = None,
) -> EvaluationSet:
    """Tokenise a validation set once, in any dataset format TRL's `SFTTrainer` accepts.

    Args:
        dataset (`datasets.Dataset`, `IterableDataset`, `list[dict]`, `dict[str, list]` or `list[str]`):
            The examples. A list of strings is read as a `text` column. An `IterableDataset` is read to
            the end. The format is chosen from the columns (see the module docstring).
        tokenizer (`PreTrainedTokenizerBase`):
            The model's tokenizer. Text is tokenised with `tokenizer(text)`, so BOS (and EOS) appear
            exactly where the tokenizer adds them; conversations go through
            `tokenizer.apply_chat_template`.
        max_length (`int`, *optional*):
            Longer sequences keep their first `max_length` tokens, and a warning reports how many were
            cut. Defaults to `tokenizer.model_max_length` (no limit if the tokenizer sets none).
        text_column (`str`, *optional*, defaults to `"text"`):
            Column holding plain text (TRL's `dataset_text_field`).
        completion_only_loss (`bool`, *optional*):
            Score only completion tokens of prompt-completion data (TRL's `completion_only_loss`).
            `None` (the default) means `True` for prompt-completion data and, for pre-tokenised data,
            "use the `completion_mask` column if there is one". `True` on other data is an error.
        assistant_only_loss (`bool`, defaults to `False`):
            Score only assistant tokens of conversations; needs a chat template with
            `{% generation %}` markers (TRL's `assistant_only_loss`).
        add_eos_token (`bool`, defaults to `True`):
            Append the EOS token to texts and completions that do not end with it, as `SFTTrainer`
            does before training, so predicting the end of a text is scored too. Conversations are
            left to their chat template.
        formatting_func (`Callable[[dict], str]`, *optional*):
            Turns each example into the text to score (TRL's `formatting_func`).
        chat_template (`str`, *optional*):
            A Jinja chat template to use instead of `tokenizer.chat_template`.

    Returns:
        [`EvaluationSet`]: the token ids and loss masks, sorted by length.

    Raises:
        `ValueError`: the dataset is empty, has none of the known columns, or asks for an option its
        format does not support.

    Example:

    ```python
    >>> from datasets import Dataset
    >>> from dem_hf.evaluation.perplexity import tokenize_for_evaluation, compute_perplexity
    >>> data = Dataset.from_dict({"prompt": ["Q: 2+2?"], "completion": [" A: 4"]})
    >>> eval_set = tokenize_for_evaluation(data, tokenizer, max_length=512)  # prompt tokens not scored
    >>> compute_perplexity(model, eval_set).perplexity
    ```
    """
    text_column = text_column or "text"
    max_length = resolve_max_length(max_length, tokenizer)
    rows, columns = _as_rows(dataset)
    if formatting_func is not None:
        rows, columns, text_column = [{"text": formatting_func(row)} for row in rows], ["text"], "text"
    dataset_format = _detect_format(rows[0], columns, text_column)
    if dataset_format == "conversational" and "messages" not in columns:
        rows = [_sharegpt_to_messages(row) for row in rows]
    _check_loss_options(dataset_format, completion_only_loss, assistant_only_loss, columns)
    if dataset_format.startswith("conversational"):
        _check_chat_template(tokenizer, chat_template)

    sequences = _ENCODERS[dataset_format](
        rows,
        tokenizer,
        text_column=text_column,
        completion_only_loss=completion_only_loss is not False,
        assistant_only_loss=assistant_only_loss,
        add_eos_token=add_eos_token,
        chat_template=chat_template,
    )
    return build_evaluation_set(sequences, _pad_token_id(tokenizer), max_length, dataset_format)


def resolve_max_length(max_length: int | None, tokenizer: Any) -> int | None:
    """Validate `max_length`; `None` becomes the tokenizer's `model_max_length`, or `None` if it sets no limit."""
    if max_length is None:
        limit = getattr(tokenizer, "model_max_length", None)
        return int(limit) if isinstance(limit, int) and 0 < limit < _NO_LIMIT else None
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
        raise ValueError(f"max_length must be an integer >= 2 (or None for the default), got {max_length!r}.")
    return max_length


def _as_rows(dataset: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """The examples as a list of dicts, and the column names."""
    if type(dataset).__name__ in {"DatasetDict", "IterableDatasetDict"}:
        raise ValueError(
            f"Expected one split (a `Dataset`), got a `{type(dataset).__name__}` with splits "
            f"{sorted(dataset.keys())}: pass e.g. `dataset['validation']`."
        )
    if isinstance(dataset, Mapping):  # columnar dict
        columns = list(dataset.keys())
        lengths = {len(values) for values in dataset.values()}
        if len(lengths) > 1:
            raise ValueError(f"All columns must have the same length, got lengths {sorted(lengths)} for {columns}.")
        rows = [dict(zip(columns, values)) for values in zip(*dataset.values())]
    elif isinstance(dataset, str):
        raise ValueError("Expected a dataset or a list of texts, got a single string: wrap it in a list.")
    elif hasattr(dataset, "column_names") and hasattr(dataset, "__len__"):  # datasets.Dataset
        columns = list(dataset.column_names)
        rows = list(dataset.with_format(None)) if hasattr(dataset, "with_format") else list(dataset)
    else:  # list of dicts or strings, IterableDataset, generator
        rows = [{"text": row} if isinstance(row, str) else dict(row) for row in dataset]
        columns = list(rows[0].keys()) if rows else list(getattr(dataset, "column_names", None) or [])
    if not rows:
        raise ValueError(f"The evaluation dataset is empty (columns found: {columns}); it needs at least one example.")
    return rows, columns


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "role" in value[0]


def _detect_format(first_row: dict[str, Any], columns: Sequence[str], text_column: str) -> str:
    if "input_ids" in columns:
        return "tokenized"
    if "prompt" in columns and "completion" in columns:
        return "conversational_prompt_completion" if _is_messages(first_row["prompt"]) else "prompt_completion"
    if "messages" in columns or "conversations" in columns:
        return "conversational"
    if text_column in columns:
        return "text"
    hint = " (a prompt-only dataset has nothing to score: add a 'completion' column)" if "prompt" in columns else ""
    raise ValueError(
        f"Could not find the evaluation data. Expected columns: {_EXPECTED_COLUMNS.format(text=text_column)}; "
        f"found: {list(columns)}{hint}. Pass `text_column=` for text in another column, or `formatting_func=`."
    )


def _sharegpt_to_messages(row: dict[str, Any]) -> dict[str, Any]:
    """`{"conversations": [{"from", "value"}]}` to `{"messages": [{"role", "content"}]}` (TRL's ChatML)."""
    roles = {"human": "user", "gpt": "assistant"}
    messages = [
        {"role": roles.get(turn.get("from"), turn.get("from")), "content": turn.get("value")}
        if "from" in turn
        else turn
        for turn in row["conversations"]
    ]
    return {**{k: v for k, v in row.items() if k != "conversations"}, "messages": messages}


def _check_loss_options(
    dataset_format: str, completion_only_loss: bool | None, assistant_only_loss: bool, columns: Sequence[str]
) -> None:
    has_completion = dataset_format.endswith("prompt_completion") or "completion_mask" in columns
    if completion_only_loss and not has_completion:
        raise ValueError(
            f"completion_only_loss=True needs prompt-completion data ('prompt' + 'completion' columns, or "
            f"'input_ids' + 'completion_mask'); got {dataset_format!r} data with columns {list(columns)}."
        )
    if assistant_only_loss and not dataset_format.startswith("conversational"):
        raise ValueError(
            f"assistant_only_loss=True needs conversational data ('messages', or 'prompt' + 'completion' as "
            f"message lists); got {dataset_format!r} data with columns {list(columns)}."
        )


def _check_chat_template(tokenizer: Any, chat_template: str | None) -> None:
    if chat_template is None and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "Conversational data needs a chat template, but the tokenizer has none: set "
            "`tokenizer.chat_template` or pass `chat_template=`."
        )


# Each encoder returns (token ids, loss mask as 0/1) per example, in dataset order.
_Encoded = list[tuple[list[int], list[int]]]


def _encode_text(rows: list[dict], tokenizer: Any, *, text_column: str, add_eos_token: bool, **_: Any) -> _Encoded:
    texts = [row[text_column] for row in rows]
    _check_strings(texts, text_column)
    ids = _batch_tokenize(tokenizer, texts)
    if add_eos_token:
        ids = [_with_eos(seq, tokenizer) for seq in ids]
    return [(seq, [1] * len(seq)) for seq in ids]


def _encode_prompt_completion(
    rows: list[dict], tokenizer: Any, *, completion_only_loss: bool, add_eos_token: bool, **_: Any
) -> _Encoded:
    prompts, completions = [row["prompt"] for row in rows], [row["completion"] for row in rows]
    _check_strings(prompts, "prompt")
    _check_strings(completions, "completion")
    prompt_ids = _batch_tokenize(tokenizer, prompts)
    full_ids = _batch_tokenize(tokenizer, [p + c for p, c in zip(prompts, completions)])
    if add_eos_token:
        full_ids = [_with_eos(seq, tokenizer) for seq in full_ids]
    return [_completion_masked(p, f, tokenizer, completion_only_loss) for p, f in zip(prompt_ids, full_ids)]


def _encode_conversational(
    rows: list[dict], tokenizer: Any, *, assistant_only_loss: bool, chat_template: str | None, **_: Any
) -> _Encoded:
    encoded = []
    for row in rows:
        out = _apply_chat_template(
            tokenizer, row["messages"], row, chat_template, return_assistant_tokens_mask=assistant_only_loss
        )
        mask = list(out["assistant_masks"]) if assistant_only_loss else [1] * len(out["input_ids"])
        if assistant_only_loss and 1 not in mask:
            raise ValueError(
                "assistant_only_loss=True but a conversation has no assistant tokens: the chat template needs "
                "`{% generation %}` ... `{% endgeneration %}` around assistant turns."
            )
        encoded.append((list(out["input_ids"]), mask))
    return encoded


def _encode_conversational_prompt_completion(
    rows: list[dict],
    tokenizer: Any,
    *,
    completion_only_loss: bool,
    assistant_only_loss: bool,
    chat_template: str | None,
    **_: Any,
) -> _Encoded:
    encoded = []
    for row in rows:
        prompt = _apply_chat_template(tokenizer, row["prompt"], row, chat_template, add_generation_prompt=True)
        full = _apply_chat_template(
            tokenizer,
            list(row["prompt"]) + list(row["completion"]),
            row,
            chat_template,
            return_assistant_tokens_mask=assistant_only_loss,
        )
        ids, mask = _completion_masked(
            list(prompt["input_ids"]), list(full["input_ids"]), tokenizer, completion_only_loss
        )
        if assistant_only_loss:
            mask = [m & a for m, a in zip(mask, full["assistant_masks"])]
        encoded.append((ids, mask))
    return encoded


def _encode_tokenized(rows: list[dict], tokenizer: Any, *, completion_only_loss: bool, **_: Any) -> _Encoded:
    encoded = []
    for row in rows:
        ids = [int(t) for t in row["input_ids"]]
        if row.get("labels") is not None:
            mask = [int(label != -100) for label in row["labels"]]
        else:
            mask = [1] * len(ids)
            if completion_only_loss and row.get("completion_mask") is not None:
                mask = [m & int(c) for m, c in zip(mask, row["completion_mask"])]
            if row.get("assistant_masks") is not None:
                mask = [m & int(a) for m, a in zip(mask, row["assistant_masks"])]
        if len(mask) != len(ids):
            raise ValueError(f"A loss mask / labels row has {len(mask)} entries for {len(ids)} input_ids.")
        encoded.append((ids, mask))
    return encoded


_ENCODERS: dict[str, Callable[..., _Encoded]] = {
    "text": _encode_text,
    "prompt_completion": _encode_prompt_completion,
    "conversational": _encode_conversational,
    "conversational_prompt_completion": _encode_conversational_prompt_completion,
    "tokenized": _encode_tokenized,
}


def _check_strings(values: list[Any], column: str) -> None:
    for index, value in enumerate(values):
        if not isinstance(value, str):
            raise ValueError(f"Column {column!r} must hold strings; example {index} holds a {type(value).__name__}.")


def _batch_tokenize(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """`tokenizer(text)["input_ids"]` for every text (special tokens as the tokenizer adds them)."""
    ids: list[list[int]] = []
    for start in range(0, len(texts), _TOKENIZE_CHUNK):
        chunk = texts[start : start + _TOKENIZE_CHUNK]
        ids.extend(list(seq) for seq in tokenizer(chunk, truncation=False, verbose=False)["input_ids"])
    return ids


def _with_eos(ids: list[int], tokenizer: Any) -> list[int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None or (ids and ids[-1] == eos):
        return ids
    return ids + [eos]


def _completion_masked(
    prompt_ids: list[int], full_ids: list[int], tokenizer: Any, completion_only_loss: bool
) -> tuple[list[int], list[int]]:
    """The prompt+completion ids with a mask scoring the completion: it starts where the ids diverge."""
    prompt_len = 0
    for a, b in zip(prompt_ids, full_ids):
        if a != b:
            break
        prompt_len += 1
    if prompt_len < len(prompt_ids):
        logging.warning_once(
            logger,
            "The tokenized prompt is not a prefix of the tokenized prompt+completion (tokens merge across the "
            "boundary, or the chat template renders the prompt differently alone); the completion is taken to "
            f"start where they diverge. First case: {tokenizer.decode(prompt_ids[prompt_len:])!r}."
        )
    scored_from = prompt_len if completion_only_loss else 0
    return full_ids, [0] * scored_from + [1] * (len(full_ids) - scored_from)


def _apply_chat_template(
    tokenizer: Any, messages: list[dict], row: dict[str, Any], chat_template: str | None, **kwargs: Any
) -> Mapping[str, Any]:
    tools = row.get("tools")
    tools = json.loads(tools) if isinstance(tools, str) else tools
    extra = row.get("chat_template_kwargs") or {}
    return tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, chat_template=chat_template, tools=tools, **extra, **kwargs
    )


def _pad_token_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0  # padding is masked out of attention and loss, so any valid id works

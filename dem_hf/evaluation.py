"""Token-weighted corpus perplexity, built to be called many times on the same validation sets.

The coefficient search scores every candidate merge by the perplexity of the merged model on a few
validation sets, so this module splits the work in two:

1. [`tokenize_for_evaluation`] turns a dataset, in any format TRL's `SFTTrainer` trains on, into an
   [`EvaluationSet`]: token ids and a loss mask, sorted by length, tokenised once.
2. [`compute_perplexity`] / [`compute_perplexities`] run the model over an evaluation set and return a
   [`PerplexityResult`]: `exp(Σ NLL / Σ scored tokens)` over the whole corpus (token-weighted, not a
   mean of per-sequence perplexities), with padding and, by default, prompt tokens excluded.

Speed comes from three choices: the padded batches of an `EvaluationSet` are built once and cached;
sequences are sorted by length so a batch holds little padding; and the model is asked for logits
only at the positions whose next token is scored (Transformers' boolean `logits_to_keep`), so the
vocabulary projection and the log-softmax never run on padding, prompts or the last position.
Models whose forward does not take that argument fall back to full logits and
`cross_entropy(..., ignore_index=-100)` on the shifted labels, which gives the same numbers.

Formats, detected from the columns as `SFTTrainer` does:

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

import inspect
import json
import math
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from transformers.utils import logging

logger = logging.get_logger(__name__)

PERPLEXITY_METRIC_PATH: str = str(Path(__file__).resolve().parent / "metrics" / "perplexity")
"""Folder of the `evaluate` metric module: `evaluate.load(PERPLEXITY_METRIC_PATH)` works offline."""

KNOWN_FORMATS = ("text", "prompt_completion", "conversational", "conversational_prompt_completion", "tokenized")
_EXPECTED_COLUMNS = (
    "'{text}' (language modelling), 'prompt' + 'completion' (prompt-completion, strings or message lists), "
    "'messages' (conversational), 'conversations' (ShareGPT from/value) or 'input_ids' (pre-tokenised)"
)
_NO_LIMIT = int(1e29)  # tokenizers without a limit report `model_max_length = int(1e30)`
_TOKENIZE_CHUNK = 1024


# --------------------------------------------------------------------------------------------------
# Data containers
# --------------------------------------------------------------------------------------------------
class EvaluationBatch(NamedTuple):
    """One padded batch: `input_ids`, `attention_mask` (1 = real token), `loss_mask` (True = scored) and,
    for left padding only, `position_ids` counting from each sequence's first real token."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor | None = None

    @property
    def labels(self) -> torch.Tensor:
        """Transformers-style labels: the input ids with unscored positions set to -100."""
        return self.input_ids.masked_fill(~self.loss_mask, -100)


@dataclass(repr=False)
class EvaluationSet:
    """A validation set tokenised once, for repeated perplexity evaluation.

    Build it with [`tokenize_for_evaluation`]. Sequences are stored sorted by decreasing length (ties
    keep dataset order), so consecutive sequences batch with little padding and the longest batch
    runs first (an out-of-memory error shows at once). Padded batches are cached per batch size,
    padding side and device by [`EvaluationSet.batches`].

    Args:
        input_ids (`list[torch.Tensor]`):
            One 1-D `int64` tensor of token ids per sequence, sorted by decreasing length.
        loss_mask (`list[torch.Tensor]`):
            One 1-D `bool` tensor per sequence, `True` where the token is scored. The first token is
            never scored.
        example_indices (`list[int]`):
            Index in the source dataset of each stored sequence.
        pad_token_id (`int`):
            Id used to pad batches (never scored, masked out of attention).
        max_length (`int` or `None`):
            Length the sequences were truncated to, `None` for no limit.
        dataset_format (`str`):
            One of `"text"`, `"prompt_completion"`, `"conversational"`,
            `"conversational_prompt_completion"`, `"tokenized"`.
        num_truncated (`int`):
            How many sequences were cut to `max_length`.
        num_skipped (`int`):
            How many examples were dropped because no token of theirs is scored.

    Example:

    ```python
    >>> from datasets import Dataset
    >>> from dem_hf.evaluation import tokenize_for_evaluation
    >>> eval_set = tokenize_for_evaluation(Dataset.from_dict({"text": ["w1 w2 w3", "w4"]}), tokenizer)
    >>> len(eval_set), eval_set.num_tokens
    (2, 4)
    ```
    """

    input_ids: list[torch.Tensor]
    loss_mask: list[torch.Tensor]
    example_indices: list[int]
    pad_token_id: int
    max_length: int | None = None
    dataset_format: str = "tokenized"
    num_truncated: int = 0
    num_skipped: int = 0
    _batch_cache: dict[tuple, list[EvaluationBatch]] = field(default_factory=dict, init=False, compare=False)

    def __post_init__(self) -> None:
        if not (len(self.input_ids) == len(self.loss_mask) == len(self.example_indices)):
            raise ValueError(
                "EvaluationSet needs one loss mask and one example index per sequence; got "
                f"{len(self.input_ids)} sequences, {len(self.loss_mask)} masks, {len(self.example_indices)} indices."
            )
        if self.dataset_format not in KNOWN_FORMATS:
            raise ValueError(f"dataset_format must be one of {KNOWN_FORMATS}, got {self.dataset_format!r}.")

    def __len__(self) -> int:
        return len(self.input_ids)

    def __repr__(self) -> str:
        return (
            f"EvaluationSet(num_sequences={len(self)}, num_tokens={self.num_tokens}, "
            f"max_sequence_length={self.max_sequence_length}, max_length={self.max_length}, "
            f"dataset_format={self.dataset_format!r}, num_truncated={self.num_truncated}, "
            f"num_skipped={self.num_skipped})"
        )

    @property
    def num_tokens(self) -> int:
        """Number of scored tokens: the denominator of the perplexity."""
        return int(sum(int(mask.sum()) for mask in self.loss_mask))

    @property
    def max_sequence_length(self) -> int:
        """Length of the longest stored sequence."""
        return max((len(ids) for ids in self.input_ids), default=0)

    def num_batches(self, batch_size: int) -> int:
        """Number of batches [`EvaluationSet.batches`] yields for `batch_size`."""
        return math.ceil(len(self) / batch_size)

    def batches(
        self,
        batch_size: int = 8,
        *,
        padding_side: Literal["right", "left"] = "right",
        device: torch.device | str | None = None,
    ) -> list[EvaluationBatch]:
        """Padded batches of consecutive (length-sorted) sequences, built once and cached.

        Args:
            batch_size (`int`, defaults to 8): sequences per batch.
            padding_side (`"right"` or `"left"`, defaults to `"right"`): where padding goes.
            device (`torch.device` or `str`, *optional*): where the tensors live (CPU by default).
        """
        _check_batching(batch_size, padding_side)
        device = torch.device(device) if device is not None else torch.device("cpu")
        key = (batch_size, padding_side, str(device))
        if key not in self._batch_cache:
            self._batch_cache[key] = [
                _pad_batch(
                    self.input_ids[start : start + batch_size],
                    self.loss_mask[start : start + batch_size],
                    self.pad_token_id,
                    padding_side,
                    device,
                )
                for start in range(0, len(self), batch_size)
            ]
        return self._batch_cache[key]


@dataclass(frozen=True)
class PerplexityResult:
    """Token-weighted corpus perplexity of a model on one evaluation set.

    Args:
        loss (`float`): mean negative log-likelihood per scored token, in nats (`Σ NLL / num_tokens`).
        perplexity (`float`): `exp(loss)` (`inf` if that overflows).
        num_tokens (`int`): scored tokens (padding, prompts and first tokens excluded).
        num_sequences (`int`): sequences evaluated.

    `float(result)` is the perplexity. Pool several results with [`PerplexityResult.combine`].

    Example:

    ```python
    >>> result = compute_perplexity(model, eval_set)
    >>> result.perplexity, result.loss, result.num_tokens
    (63.98, 4.1586, 1024)
    ```
    """

    loss: float
    perplexity: float
    num_tokens: int
    num_sequences: int

    @classmethod
    def from_nll(cls, total_nll: float, num_tokens: int, num_sequences: int) -> PerplexityResult:
        """Build a result from a summed negative log-likelihood and the number of tokens it covers."""
        if num_tokens <= 0:
            raise ValueError(f"A perplexity needs at least one scored token, got num_tokens={num_tokens}.")
        loss = total_nll / num_tokens
        return cls(loss=loss, perplexity=_safe_exp(loss), num_tokens=num_tokens, num_sequences=num_sequences)

    @classmethod
    def combine(cls, results: Iterable[PerplexityResult]) -> PerplexityResult:
        """Pool results as if their sets were one corpus (token-weighted, not a mean of perplexities)."""
        results = list(results)
        if not results:
            raise ValueError("PerplexityResult.combine needs at least one result, got none.")
        return cls.from_nll(
            sum(r.loss * r.num_tokens for r in results),
            sum(r.num_tokens for r in results),
            sum(r.num_sequences for r in results),
        )

    def to_dict(self) -> dict[str, float | int]:
        return {
            "loss": self.loss,
            "perplexity": self.perplexity,
            "num_tokens": self.num_tokens,
            "num_sequences": self.num_sequences,
        }

    def __float__(self) -> float:
        return self.perplexity


# --------------------------------------------------------------------------------------------------
# Tokenisation
# --------------------------------------------------------------------------------------------------
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
    >>> from dem_hf.evaluation import tokenize_for_evaluation, compute_perplexity
    >>> data = Dataset.from_dict({"prompt": ["Q: 2+2?"], "completion": [" A: 4"]})
    >>> eval_set = tokenize_for_evaluation(data, tokenizer, max_length=512)  # prompt tokens not scored
    >>> compute_perplexity(model, eval_set).perplexity
    ```
    """
    text_column = text_column or "text"
    max_length = _resolve_max_length(max_length, tokenizer)
    rows, columns = _as_rows(dataset)
    if formatting_func is not None:
        rows, columns, text_column = [{"text": formatting_func(row)} for row in rows], ["text"], "text"
    dataset_format = _detect_format(rows[0], columns, text_column)
    if dataset_format == "conversational" and "messages" not in columns:
        rows = [_sharegpt_to_messages(row) for row in rows]
    _check_loss_options(dataset_format, completion_only_loss, assistant_only_loss, columns)
    if dataset_format.startswith("conversational"):
        _check_chat_template(tokenizer, chat_template)

    encode = _ENCODERS[dataset_format]
    sequences = encode(
        rows,
        tokenizer,
        text_column=text_column,
        completion_only_loss=completion_only_loss is not False,
        assistant_only_loss=assistant_only_loss,
        add_eos_token=add_eos_token,
        chat_template=chat_template,
    )
    return _build_evaluation_set(sequences, tokenizer, max_length, dataset_format)


def _resolve_max_length(max_length: int | None, tokenizer: Any) -> int | None:
    if max_length is None:
        limit = getattr(tokenizer, "model_max_length", None)
        return int(limit) if isinstance(limit, int) and 0 < limit < _NO_LIMIT else None
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
        raise ValueError(f"max_length must be an integer >= 2 (or None for the default), got {max_length!r}.")
    return max_length


def _as_rows(dataset: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """The examples as a list of dicts, and the column names."""
    if hasattr(dataset, "keys") and hasattr(dataset, "values") and _is_dataset_dict(dataset):
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


def _is_dataset_dict(obj: Any) -> bool:
    return type(obj).__name__ in {"DatasetDict", "IterableDatasetDict"}


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
        logger.warning_once(
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


def _build_evaluation_set(
    sequences: _Encoded, tokenizer: Any, max_length: int | None, dataset_format: str
) -> EvaluationSet:
    truncated, dropped_tokens, kept = 0, 0, []
    for index, (ids, mask) in enumerate(sequences):
        if max_length is not None and len(ids) > max_length:
            truncated, dropped_tokens = truncated + 1, dropped_tokens + len(ids) - max_length
            ids, mask = ids[:max_length], mask[:max_length]
        mask_t = torch.tensor(mask, dtype=torch.bool) if ids else torch.zeros(0, dtype=torch.bool)
        if len(mask_t):
            mask_t[0] = False  # nothing predicts the first token
        if mask_t.any():
            kept.append((torch.tensor(ids, dtype=torch.long), mask_t, index))
    if truncated:
        logger.warning(
            f"{truncated} of {len(sequences)} evaluation sequences were longer than max_length={max_length} tokens "
            f"and were truncated to their first {max_length} tokens ({dropped_tokens} tokens not scored). Pass a "
            "larger `max_length` to score them whole."
        )
    skipped = len(sequences) - len(kept)
    if not kept:
        raise ValueError(
            f"None of the {len(sequences)} evaluation examples has a token to score (each needs at least two tokens "
            "and, with completion_only_loss, a completion within max_length)."
        )
    if skipped:
        logger.warning(f"{skipped} of {len(sequences)} evaluation examples have no token to score and were skipped.")
    kept.sort(key=lambda item: -len(item[0]))  # stable: ties keep dataset order
    return EvaluationSet(
        input_ids=[ids for ids, _, _ in kept],
        loss_mask=[mask for _, mask, _ in kept],
        example_indices=[index for _, _, index in kept],
        pad_token_id=_pad_token_id(tokenizer),
        max_length=max_length,
        dataset_format=dataset_format,
        num_truncated=truncated,
        num_skipped=skipped,
    )


def _pad_token_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0  # padding is masked out of attention and loss, so any valid id works


# --------------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------------
def _check_batching(batch_size: int, padding_side: str) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}.")


def _pad_batch(
    input_ids: list[torch.Tensor],
    loss_mask: list[torch.Tensor],
    pad_token_id: int,
    padding_side: str,
    device: torch.device,
) -> EvaluationBatch:
    width = max(len(ids) for ids in input_ids)
    ids = torch.full((len(input_ids), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(input_ids), width), dtype=torch.long)
    scored = torch.zeros((len(input_ids), width), dtype=torch.bool)
    for row, (seq, mask) in enumerate(zip(input_ids, loss_mask)):
        span = slice(0, len(seq)) if padding_side == "right" else slice(width - len(seq), width)
        ids[row, span], attention[row, span], scored[row, span] = seq, 1, mask
    positions = (attention.cumsum(-1) - 1).clamp_min(0).to(device) if padding_side == "left" else None
    return EvaluationBatch(ids.to(device), attention.to(device), scored.to(device), positions)


# --------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------
def batch_nll(model: torch.nn.Module, batch: EvaluationBatch) -> torch.Tensor:
    """Summed negative log-likelihood (nats, float32 scalar) of the scored tokens of one batch.

    Differentiable (it sets no grad mode), so gradient-based coefficient search can reuse it;
    [`compute_perplexity`] calls it under `torch.inference_mode()`. Logits are computed only where the
    next token is scored when the model supports a boolean `logits_to_keep`, else in full.

    Example:

    ```python
    >>> batch = eval_set.batches(8)[0]
    >>> nll = batch_nll(model, batch)  # divide by batch.loss_mask.sum() for the mean
    ```
    """
    input_ids, attention_mask, loss_mask, position_ids = batch
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if position_ids is not None:  # left padding: positions start at each sequence's first real token
        kwargs["position_ids"] = position_ids
    keep = torch.zeros_like(loss_mask)
    keep[:, :-1] = loss_mask[:, 1:]  # the logit at t predicts token t + 1
    if _accepts_logits_mask(model):
        kwargs["logits_to_keep"] = keep
    outputs = model(**kwargs)
    logits = outputs.logits if hasattr(outputs, "logits") else outputs[0]
    if logits.dim() == 2:  # (num scored tokens, vocab), in row-major order of `keep`
        return F.cross_entropy(logits.float(), input_ids[:, 1:][loss_mask[:, 1:]], reduction="sum")
    labels = batch.labels[:, 1:]
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")


_LOGITS_MASK_SUPPORT: dict[type, bool] = {}


def _accepts_logits_mask(model: torch.nn.Module) -> bool:
    """Whether the model slices hidden states with Transformers' `slice_logits_to_keep` (boolean masks)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT forwards kwargs
    cls = type(base)
    if cls not in _LOGITS_MASK_SUPPORT:
        module = sys.modules.get(cls.__module__)
        try:
            takes_arg = "logits_to_keep" in inspect.signature(base.forward).parameters
        except (TypeError, ValueError):
            takes_arg = False
        _LOGITS_MASK_SUPPORT[cls] = takes_arg and hasattr(module, "slice_logits_to_keep")
    return _LOGITS_MASK_SUPPORT[cls]


def compute_perplexity(
    model: torch.nn.Module,
    data: EvaluationSet | Any,
    tokenizer: Any | None = None,
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    padding_side: Literal["right", "left"] = "right",
    show_progress: bool | None = None,
    desc: str | None = None,
    **tokenize_kwargs: Any,
) -> PerplexityResult:
    """Token-weighted corpus perplexity `exp(Σ NLL / Σ scored tokens)` of a causal LM.

    Padding is never scored; prompt tokens are not scored by default (see
    [`tokenize_for_evaluation`]). Runs under `torch.inference_mode()` on the model's device, with the
    model in eval mode (each submodule's previous mode is restored afterwards). Batches hold
    length-sorted sequences; the result does not depend on `batch_size` or `padding_side` beyond
    float rounding.

    Args:
        model (`PreTrainedModel` or `PeftModel`):
            A causal language model returning `.logits`.
        data (`EvaluationSet` or a dataset):
            An [`EvaluationSet`] (tokenise once, evaluate many times) or anything
            [`tokenize_for_evaluation`] accepts, which is then tokenised with `tokenizer`.
        tokenizer (`PreTrainedTokenizerBase`, *optional*):
            Needed when `data` is not an `EvaluationSet`.
        batch_size (`int`, defaults to 8):
            Sequences per forward pass.
        max_length (`int`, *optional*):
            Truncation length when tokenising `data`; defaults to the smaller of the tokenizer's
            `model_max_length` and the model's `max_position_embeddings`.
        padding_side (`"right"` or `"left"`, defaults to `"right"`):
            Where batches are padded; left padding passes matching `position_ids`.
        show_progress (`bool`, *optional*):
            Show a tqdm bar. By default it follows `transformers.utils.logging.disable_progress_bar()`
            and `datasets.disable_progress_bars()` / `huggingface_hub` settings.
        desc (`str`, *optional*):
            Progress bar label.
        tokenize_kwargs:
            Passed to [`tokenize_for_evaluation`] when `data` is not yet tokenised
            (`text_column`, `completion_only_loss`, `assistant_only_loss`, `add_eos_token`, ...).

    Returns:
        [`PerplexityResult`]: `loss` (mean NLL in nats), `perplexity`, `num_tokens`, `num_sequences`.

    Example:

    ```python
    >>> from dem_hf import compute_perplexity
    >>> from dem_hf.evaluation import tokenize_for_evaluation
    >>> eval_set = tokenize_for_evaluation(validation_dataset, tokenizer, max_length=512)
    >>> result = compute_perplexity(model, eval_set, batch_size=16)
    >>> print(f"{result.perplexity:.2f} over {result.num_tokens} tokens")
    ```
    """
    results = compute_perplexities(
        model,
        {"eval": data},
        tokenizer,
        batch_size=batch_size,
        max_length=max_length,
        padding_side=padding_side,
        show_progress=show_progress,
        desc=desc,
        **tokenize_kwargs,
    )
    return results["eval"]


def compute_perplexities(
    model: torch.nn.Module,
    eval_datasets: Mapping[str, EvaluationSet | Any],
    tokenizer: Any | None = None,
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    padding_side: Literal["right", "left"] = "right",
    show_progress: bool | None = None,
    desc: str | None = None,
    **tokenize_kwargs: Any,
) -> dict[str, PerplexityResult]:
    """[`compute_perplexity`] on several named sets at once, with one progress bar.

    Args:
        model (`PreTrainedModel` or `PeftModel`): a causal language model.
        eval_datasets (`Mapping[str, EvaluationSet | dataset]`): named evaluation sets, each an
            [`EvaluationSet`] or anything [`tokenize_for_evaluation`] accepts.
        tokenizer, batch_size, max_length, padding_side, show_progress, desc, tokenize_kwargs:
            As in [`compute_perplexity`].

    Returns:
        `dict[str, PerplexityResult]`: one result per name, in the order given.

    Example:

    ```python
    >>> sets = {name: tokenize_for_evaluation(ds, tokenizer) for name, ds in validation.items()}
    >>> {name: r.perplexity for name, r in compute_perplexities(model, sets).items()}
    {'math': 5.62, 'chat': 8.57}
    ```
    """
    if not isinstance(eval_datasets, Mapping) or not eval_datasets:
        raise ValueError(
            f"Expected a non-empty mapping of name -> evaluation set, got {type(eval_datasets).__name__}"
            f"{' (empty)' if isinstance(eval_datasets, Mapping) else ''}."
        )
    _check_batching(batch_size, padding_side)
    eval_sets = {
        name: _as_evaluation_set(data, tokenizer, model, max_length, tokenize_kwargs)
        for name, data in eval_datasets.items()
    }
    device = _model_device(model)
    for name, eval_set in eval_sets.items():
        _warn_if_too_long(model, eval_set, name)
    # Built (and cached) outside inference mode, so that gradient code may reuse the same batches.
    batches = {name: s.batches(batch_size, padding_side=padding_side, device=device) for name, s in eval_sets.items()}
    total = sum(len(b) for b in batches.values())
    sums: dict[str, torch.Tensor] = {}
    with _eval_mode(model), torch.inference_mode(), _progress(total, desc, show_progress) as bar:
        for name in eval_sets:
            if len(eval_sets) > 1:
                bar.set_postfix_str(name, refresh=False)
            total_nll = torch.zeros((), dtype=torch.float64, device=device)
            for batch in batches[name]:
                total_nll += batch_nll(model, batch).double()
                bar.update(1)
            sums[name] = total_nll
    return {
        name: PerplexityResult.from_nll(float(sums[name]), eval_set.num_tokens, len(eval_set))
        for name, eval_set in eval_sets.items()
    }


def _as_evaluation_set(
    data: Any, tokenizer: Any | None, model: torch.nn.Module, max_length: int | None, tokenize_kwargs: dict
) -> EvaluationSet:
    if isinstance(data, EvaluationSet):
        if max_length is not None or tokenize_kwargs:
            options = sorted(["max_length"] * (max_length is not None) + list(tokenize_kwargs))
            raise ValueError(
                f"Tokenisation options {options} have no effect on an already tokenised EvaluationSet: pass them to "
                "`tokenize_for_evaluation` instead, or pass the raw dataset."
            )
        return data
    if tokenizer is None:
        raise ValueError(
            f"Got a {type(data).__name__} to evaluate but no tokenizer: pass `tokenizer=` or an EvaluationSet "
            "from `tokenize_for_evaluation`."
        )
    if max_length is None:
        max_length = _default_max_length(model, tokenizer)
    return tokenize_for_evaluation(data, tokenizer, max_length=max_length, **tokenize_kwargs)


def _model_max_positions(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    value = getattr(config, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def _default_max_length(model: torch.nn.Module, tokenizer: Any) -> int | None:
    limits = [x for x in (_resolve_max_length(None, tokenizer), _model_max_positions(model)) if x is not None]
    return min(limits) if limits else None


def _warn_if_too_long(model: torch.nn.Module, eval_set: EvaluationSet, name: str) -> None:
    limit = _model_max_positions(model)
    if limit is not None and eval_set.max_sequence_length > limit:
        logger.warning(
            f"Evaluation set {name!r} has sequences of {eval_set.max_sequence_length} tokens, longer than the "
            f"model's max_position_embeddings={limit}; tokenise with max_length={limit} for reliable numbers."
        )


def _model_device(model: torch.nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


class _eval_mode:
    """Put every submodule in eval mode, and give each its own previous mode back on exit."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.modes: list[tuple[torch.nn.Module, bool]] = []

    def __enter__(self) -> torch.nn.Module:
        self.modes = [(module, module.training) for module in self.model.modules()]
        self.model.eval()
        return self.model

    def __exit__(self, *exc: object) -> None:
        for module, training in self.modes:
            module.training = training


def _progress(total: int, desc: str | None, show_progress: bool | None) -> Any:
    if show_progress is None:
        show_progress = logging.is_progress_bar_enabled() and not _hub_progress_bars_disabled()
    return logging.tqdm(total=total, desc=desc or "Perplexity", unit="batch", disable=not show_progress)


def _hub_progress_bars_disabled() -> bool:
    try:
        from huggingface_hub.utils import are_progress_bars_disabled
    except ImportError:  # pragma: no cover
        return False
    return bool(are_progress_bars_disabled())


def _safe_exp(value: float) -> float:
    try:
        return math.exp(value)
    except OverflowError:
        return math.inf

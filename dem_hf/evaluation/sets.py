"""The tokenised validation set and its padded batches.

An [`EvaluationSet`] holds token ids and loss masks, tokenised once by
[`~dem_hf.evaluation.tokenization.tokenize_for_evaluation`] and sorted by length; [`EvaluationSet.batches`]
pads consecutive sequences into [`EvaluationBatch`]es, built once per batch size, padding side and
device, then cached, because the coefficient search evaluates the same sets many times.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch

from .. import logging

__all__ = ["KNOWN_FORMATS", "EvaluationBatch", "EvaluationSet"]

logger = logging.get_logger(__name__)

KNOWN_FORMATS = ("text", "prompt_completion", "conversational", "conversational_prompt_completion", "tokenized")


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
    >>> from dem_hf.evaluation.perplexity import tokenize_for_evaluation
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
        return sum(int(mask.sum()) for mask in self.loss_mask)

    @property
    def max_sequence_length(self) -> int:
        """Length of the longest stored sequence."""
        return max((len(ids) for ids in self.input_ids), default=0)

    def num_batches(self, batch_size: int, *, max_tokens: int | None = None) -> int:
        """Number of batches [`EvaluationSet.batches`] yields for `batch_size` (or a `max_tokens` budget)."""
        return len(batch_spans([len(ids) for ids in self.input_ids], batch_size, max_tokens))

    def batches(
        self,
        batch_size: int = 8,
        *,
        padding_side: Literal["right", "left"] = "right",
        device: torch.device | str | None = None,
        max_tokens: int | None = None,
        shard: tuple[int, int] = (0, 1),
    ) -> list[EvaluationBatch]:
        """Padded batches of consecutive (length-sorted) sequences, built once and cached.

        Args:
            batch_size (`int`, defaults to 8): sequences per batch (unused when `max_tokens` is given).
            padding_side (`"right"` or `"left"`, defaults to `"right"`): where padding goes.
            device (`torch.device` or `str`, *optional*): where the tensors live (CPU by default).
            max_tokens (`int`, *optional*): a budget of padded tokens per batch instead of a fixed number of
                sequences: each batch takes as many consecutive sequences as fit (its longest, the first, times its
                size); a sequence longer than the budget gets a batch of its own.
            shard (`(rank, world_size)`, defaults to `(0, 1)`): only the sequences `rank, rank + world_size, ...`
                (one process's share in data-parallel evaluation; still sorted by length).

        Returns:
            `list[EvaluationBatch]`: the batches, longest first.
        """
        check_batching(batch_size, padding_side, max_tokens)
        rank, world_size = shard
        device = torch.device(device if device is not None else "cpu")
        key = (batch_size, padding_side, str(device), max_tokens, rank, world_size)
        if key not in self._batch_cache:
            ids, masks = self.input_ids[rank::world_size], self.loss_mask[rank::world_size]
            self._batch_cache[key] = [
                _pad_batch(ids[start:stop], masks[start:stop], self.pad_token_id, padding_side, device)
                for start, stop in batch_spans([len(i) for i in ids], batch_size, max_tokens)
            ]
        return self._batch_cache[key]


def batch_spans(lengths: Sequence[int], batch_size: int, max_tokens: int | None = None) -> list[tuple[int, int]]:
    """`(start, stop)` of each batch of consecutive sequences, whose lengths are sorted decreasingly: `batch_size`
    sequences each, or with `max_tokens`, as many as keep `size × longest` within the budget (at least one).

    Example:
        ```python
        >>> batch_spans([9, 5, 4, 4, 2], batch_size=8, max_tokens=12)
        [(0, 1), (1, 3), (3, 5)]
        ```
    """
    if max_tokens is None:
        return [(start, min(start + batch_size, len(lengths))) for start in range(0, len(lengths), batch_size)]
    spans, start = [], 0
    while start < len(lengths):
        size = max(1, max_tokens // max(lengths[start], 1))
        spans.append((start, min(start + size, len(lengths))))
        start = spans[-1][1]
    return spans


def build_evaluation_set(
    sequences: Sequence[tuple[list[int], list[int]]], pad_token_id: int, max_length: int | None, dataset_format: str
) -> EvaluationSet:
    """An [`EvaluationSet`] from `(token ids, 0/1 loss mask)` per example, in dataset order.

    Sequences longer than `max_length` keep their first `max_length` tokens (with a warning), first
    tokens are never scored, examples left with nothing to score are dropped (with a warning), and
    the rest are sorted by decreasing length.
    """
    truncated, dropped_tokens, kept = 0, 0, []
    for index, (ids, mask) in enumerate(sequences):
        if max_length is not None and len(ids) > max_length:
            truncated, dropped_tokens = truncated + 1, dropped_tokens + len(ids) - max_length
            ids, mask = ids[:max_length], mask[:max_length]
        mask_t = torch.tensor(mask, dtype=torch.bool)
        mask_t[:1] = False  # nothing predicts the first token
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
        pad_token_id=pad_token_id,
        max_length=max_length,
        dataset_format=dataset_format,
        num_truncated=truncated,
        num_skipped=skipped,
    )


def check_batching(batch_size: int, padding_side: str, max_tokens: int | None = None) -> None:
    """Raise a `ValueError` unless `batch_size` is a positive integer, `padding_side` right or left, and
    `max_tokens` (a padded-token budget per batch) `None` or a positive integer."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}.")
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1):
        raise ValueError(f"batch_tokens (padded tokens per batch) must be a positive integer or None, got {max_tokens!r}.")


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

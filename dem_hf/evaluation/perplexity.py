"""Token-weighted corpus perplexity, built to be called many times on the same validation sets.

The coefficient search scores every candidate merge by the perplexity of the merged model on a few
validation sets, so the work is split in two:

1. [`tokenize_for_evaluation`] (in `dem_hf.evaluation.tokenization`) turns a dataset, in any format TRL's
   `SFTTrainer` trains on, into an [`EvaluationSet`] (in `dem_hf.evaluation.sets`): token ids and a
   loss mask, sorted by length, tokenised once.
2. [`compute_perplexity`] / [`compute_perplexities`] (this module) run the model over an evaluation
   set and return a [`PerplexityResult`]: `exp(Σ NLL / Σ scored tokens)` over the whole corpus
   (token-weighted, not a mean of per-sequence perplexities), with padding and, by default, prompt
   tokens excluded.

Speed comes from three choices: the padded batches of an `EvaluationSet` are built once and cached;
sequences are sorted by length so a batch holds little padding; and the model is asked for logits
only at the positions whose next token is scored (Transformers' boolean `logits_to_keep`), so the
vocabulary projection and the log-softmax never run on padding, prompts or the last position.
Models whose forward does not take that argument fall back to full logits and
`cross_entropy(..., ignore_index=-100)` on the shifted labels, which gives the same numbers.

The data-side names are re-exported here, so `from dem_hf.evaluation.perplexity import tokenize_for_evaluation,
EvaluationSet` keeps working.
"""

from __future__ import annotations

import inspect
import math
import sys
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from .. import logging
from .distributed import float64_sum, input_device, process_share, sum_across_processes
from .sets import KNOWN_FORMATS, EvaluationBatch, EvaluationSet, check_batching
from .tokenization import resolve_max_length, tokenize_for_evaluation

__all__ = [
    "KNOWN_FORMATS",
    "PERPLEXITY_METRIC_PATH",
    "EvaluationBatch",
    "EvaluationSet",
    "PerplexityResult",
    "batch_nll",
    "compute_perplexities",
    "compute_perplexity",
    "tokenize_for_evaluation",
]

logger = logging.get_logger(__name__)

PERPLEXITY_METRIC_PATH: str = str(Path(__file__).resolve().parent / "metrics" / "perplexity")
"""Folder of the `evaluate` metric module: `evaluate.load(PERPLEXITY_METRIC_PATH)` works offline."""


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
    batch_tokens: int | None = None,
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
            Sequences per forward pass (unused when `batch_tokens` is given).
        batch_tokens (`int`, *optional*):
            A budget of padded tokens per forward pass instead of a fixed `batch_size`: each batch takes as many
            consecutive length-sorted sequences as keep `sequences × longest` within it, so short sequences run
            in wide batches and long ones in narrow batches (a sequence longer than the budget runs alone).
        max_length (`int`, *optional*):
            Truncation length when tokenising `data`; defaults to the smaller of the tokenizer's
            `model_max_length` and the model's `max_position_embeddings`.
        padding_side (`"right"` or `"left"`, defaults to `"right"`):
            Where batches are padded; left padding passes matching `position_ids`.
        show_progress (`bool`, *optional*):
            Show a tqdm bar. By default it follows `dem_hf.logging.disable_progress_bar()`, else
            `transformers.logging.disable_progress_bar()` and `huggingface_hub`'s settings.
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
    >>> from dem_hf.evaluation.perplexity import tokenize_for_evaluation
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
        batch_tokens=batch_tokens,
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
    batch_tokens: int | None = None,
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
        tokenizer, batch_size, batch_tokens, max_length, padding_side, show_progress, desc, tokenize_kwargs:
            As in [`compute_perplexity`] (devices and data parallelism too).

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
    check_batching(batch_size, padding_side, batch_tokens)
    eval_sets = {
        name: _as_evaluation_set(data, tokenizer, model, max_length, tokenize_kwargs)
        for name, data in eval_datasets.items()
    }
    device, share = input_device(model), process_share()
    for name, eval_set in eval_sets.items():
        _warn_if_too_long(model, eval_set, name)
    # Built (and cached) outside inference mode, so that gradient code may reuse the same batches.
    batches = {
        name: s.batches(batch_size, padding_side=padding_side, device=device, max_tokens=batch_tokens, shard=share)
        for name, s in eval_sets.items()
    }
    total = sum(len(b) for b in batches.values())
    nlls: dict[str, list[torch.Tensor]] = {name: [] for name in eval_sets}
    with _eval_mode(model), torch.inference_mode(), _progress(total, desc, show_progress) as bar:
        for name in eval_sets:
            if len(eval_sets) > 1:
                bar.set_postfix_str(name, refresh=False)
            for batch in batches[name]:
                nlls[name].append(batch_nll(model, batch))
                bar.update(1)
    totals = sum_across_processes(torch.stack([float64_sum(nlls[name]) for name in eval_sets])).tolist()
    return {
        name: PerplexityResult.from_nll(totals[index], eval_set.num_tokens, len(eval_set))
        for index, (name, eval_set) in enumerate(eval_sets.items())
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
    limits = [x for x in (resolve_max_length(None, tokenizer), _model_max_positions(model)) if x is not None]
    return min(limits) if limits else None


def _warn_if_too_long(model: torch.nn.Module, eval_set: EvaluationSet, name: str) -> None:
    limit = _model_max_positions(model)
    if limit is not None and eval_set.max_sequence_length > limit:
        logger.warning(
            f"Evaluation set {name!r} has sequences of {eval_set.max_sequence_length} tokens, longer than the "
            f"model's max_position_embeddings={limit}; tokenise with max_length={limit} for reliable numbers."
        )


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Put every submodule in eval mode, and give each its own previous mode back on exit."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def _progress(total: int, desc: str | None, show_progress: bool | None) -> Any:
    if show_progress is None:
        show_progress = logging.is_progress_bar_enabled()
    return logging.tqdm(total=total, desc=desc or "Perplexity", unit="batch", disable=not show_progress)


def _safe_exp(value: float) -> float:
    try:
        return math.exp(value)
    except OverflowError:
        return math.inf

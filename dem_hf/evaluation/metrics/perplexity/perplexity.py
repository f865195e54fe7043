"""Token-weighted corpus perplexity as an `evaluate` metric, loadable offline from this folder.

Load it with `evaluate.load(dem_hf.evaluation.perplexity.PERPLEXITY_METRIC_PATH)`. The numbers come from
`dem_hf.evaluation.perplexity.compute_perplexity`, so they match what the DEM coefficient search optimises.
"""

from __future__ import annotations

from typing import Any

import datasets
import evaluate

from dem_hf.evaluation.perplexity import compute_perplexity

_DESCRIPTION = """
Perplexity of a causal language model on a corpus of texts, token-weighted:
exp(sum of the negative log-likelihoods of all scored tokens / number of scored tokens).
Unlike the Hub's `perplexity` metric, which averages per-text perplexities (so short texts weigh
as much as long ones), every token counts once. Each text is tokenised as the tokenizer does
(BOS where it adds one) with EOS appended, as TRL's SFTTrainer trains; the first token of a text is
not scored, nor is padding.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): the texts to score.
    model_id (`str`, *optional*): a model id or local folder, loaded with `AutoModelForCausalLM`.
    model (`PreTrainedModel`, *optional*): an already loaded model, instead of `model_id`.
    tokenizer (`str` or `PreTrainedTokenizerBase`, *optional*): defaults to the one saved with
        `model_id` (required with `model`).
    batch_size (`int`, defaults to 8): texts per forward pass.
    max_length (`int`, *optional*): longer texts are truncated (with a warning); defaults to the
        smaller of the tokenizer's and the model's limits.
    add_eos_token (`bool`, defaults to `True`): append EOS to each text.
    device (`str`, *optional*): where to run a model loaded from `model_id`.
Returns:
    `perplexity` (`float`), `loss` (mean negative log-likelihood per token, nats), `num_tokens` (`int`).
Example:
    >>> import evaluate
    >>> from dem_hf.evaluation.perplexity import PERPLEXITY_METRIC_PATH
    >>> perplexity = evaluate.load(PERPLEXITY_METRIC_PATH)
    >>> perplexity.compute(predictions=["The sky is blue."], model_id="HuggingFaceTB/SmolLM2-135M")
    {'perplexity': ..., 'loss': ..., 'num_tokens': 6}
"""


class Perplexity(evaluate.Metric):
    """Token-weighted corpus perplexity (see `_DESCRIPTION`)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
            reference_urls=["https://huggingface.co/docs/transformers/perplexity"],
        )

    def _compute(
        self,
        predictions: list[str],
        model_id: str | None = None,
        model: Any = None,
        tokenizer: Any = None,
        batch_size: int = 8,
        max_length: int | None = None,
        add_eos_token: bool = True,
        device: str | None = None,
    ) -> dict[str, float | int]:
        model, tokenizer = _load(model_id, model, tokenizer, device)
        result = compute_perplexity(
            model,
            {"text": list(predictions)},
            tokenizer,
            batch_size=batch_size,
            max_length=max_length,
            add_eos_token=add_eos_token,
        )
        return {"perplexity": result.perplexity, "loss": result.loss, "num_tokens": result.num_tokens}


def _load(model_id: str | None, model: Any, tokenizer: Any, device: str | None) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (model_id is None) == (model is None):
        raise ValueError(
            "Pass exactly one of `model_id` (a model id or folder) and `model` (a loaded model); got "
            f"model_id={model_id!r} and model={type(model).__name__ if model is not None else None}."
        )
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(model_id)
        if device is not None:
            model = model.to(device)
    if tokenizer is None and model_id is None:
        raise ValueError("A `tokenizer` (object or id) is needed with a loaded `model`.")
    if tokenizer is None or isinstance(tokenizer, str):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer or model_id)
    return model, tokenizer

"""Exact checks of dem_hf.evaluation.perplexity: token-weighted perplexity, masking, batching, formats, metric."""

from __future__ import annotations

import logging
import math
import random

import pytest
import torch
from datasets import Dataset, DatasetDict
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from dem_hf.evaluation.perplexity import (
    PERPLEXITY_METRIC_PATH,
    EvaluationSet,
    PerplexityResult,
    batch_nll,
    compute_perplexities,
    compute_perplexity,
    tokenize_for_evaluation,
)
from tests.conftest import VOCAB, make_llama, make_tokenizer

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}w58 {{ m['content'] }} {{ eos_token }} "
    "{% else %}w59 {% generation %}{{ m['content'] }} {{ eos_token }}{% endgeneration %} {% endif %}"
    "{% endfor %}{% if add_generation_prompt %}w59 {% endif %}"
)
USER, ASSISTANT = VOCAB.index("w58"), VOCAB.index("w59")
BOS, EOS = 2, 3


def w(*indices: int) -> str:
    return " ".join(f"w{i}" for i in indices)


def ids_of(*indices: int) -> list[int]:
    return [VOCAB.index(f"w{i}") for i in indices]



@pytest.fixture
def model():
    return make_llama(seed=0, tie_word_embeddings=False)


@pytest.fixture
def zero_head_model():
    model = make_llama(seed=0, tie_word_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    return model


@pytest.fixture
def chat_tokenizer():
    tokenizer = make_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def random_texts(n: int, seed: int = 0, low: int = 1, high: int = 30) -> list[str]:
    rng = random.Random(seed)
    return [w(*(rng.randrange(60) for _ in range(rng.randint(low, high)))) for _ in range(n)]


def reference_nll(model, ids: list[int], scored: list[int]) -> float:
    """Σ −log p(ids[t] | ids[:t]) over positions `scored`, one unpadded sequence, float64 log-softmax."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    log_probs = torch.log_softmax(logits, dim=-1)
    return float(sum(-log_probs[t - 1, ids[t]] for t in scored))


# --- exact values ---------------------------------------------------------------------------------
def test_zero_lm_head_gives_vocab_size(zero_head_model, tokenizer):
    result = compute_perplexity(zero_head_model, random_texts(5), tokenizer, batch_size=2, show_progress=False)
    assert result.perplexity == pytest.approx(len(VOCAB), rel=1e-5)
    assert result.loss == pytest.approx(math.log(len(VOCAB)), rel=1e-6)
    assert float(result) == result.perplexity


def test_hand_computed_nll_one_sequence(model, tokenizer):
    eval_set = tokenize_for_evaluation(["w5 w17 w3 w42 w8"], tokenizer)
    ids = ids_of(5, 17, 3, 42, 8) + [EOS]
    assert eval_set.input_ids[0].tolist() == ids
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)
    expected = -sum(log_probs[t - 1, ids[t]].item() for t in range(1, len(ids))) / (len(ids) - 1)
    result = compute_perplexity(model, eval_set, show_progress=False)
    assert result.num_tokens == len(ids) - 1 and result.num_sequences == 1
    assert result.loss == pytest.approx(expected, rel=1e-6)
    assert result.perplexity == pytest.approx(math.exp(expected), rel=1e-6)


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("batch_size", [1, 2, 3, 8])
def test_padding_and_batch_size_do_not_change_result(model, tokenizer, batch_size, padding_side):
    texts = random_texts(7, seed=1)
    eval_set = tokenize_for_evaluation(texts, tokenizer)
    total = sum(reference_nll(model, ids.tolist(), range(1, len(ids))) for ids in eval_set.input_ids)
    num_tokens = sum(len(ids) - 1 for ids in eval_set.input_ids)
    result = compute_perplexity(model, eval_set, batch_size=batch_size, padding_side=padding_side, show_progress=False)
    assert result.num_tokens == num_tokens
    assert result.loss == pytest.approx(total / num_tokens, rel=1e-5)


def test_logits_only_for_scored_positions(model, tokenizer):
    """The vocabulary projection runs on scored positions only: no padding, prompt or last position."""
    eval_set = tokenize_for_evaluation(
        {"prompt": [w(1, 2, 3, 4), w(5)], "completion": [" " + w(6), " " + w(7, 8, 9)]}, tokenizer
    )
    rows = []
    handle = model.lm_head.register_forward_hook(lambda module, args, out: rows.append(args[0].shape))
    try:
        compute_perplexity(model, eval_set, batch_size=2, show_progress=False)
    finally:
        handle.remove()
    assert rows == [torch.Size([eval_set.num_tokens, model.config.hidden_size])] and eval_set.num_tokens == 6


def test_fallback_without_logits_to_keep_matches(model, tokenizer):
    class FullLogits(torch.nn.Module):  # a forward without `logits_to_keep`: full logits, ignore_index path
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)

    eval_set = tokenize_for_evaluation({"prompt": random_texts(4, 2), "completion": random_texts(4, 3)}, tokenizer)
    fast = compute_perplexity(model, eval_set, batch_size=3, show_progress=False)
    full = compute_perplexity(FullLogits(model), eval_set, batch_size=3, show_progress=False)
    assert full.loss == pytest.approx(fast.loss, rel=1e-6) and full.num_tokens == fast.num_tokens


def test_batch_nll_is_differentiable(model, tokenizer):
    eval_set = tokenize_for_evaluation(random_texts(3), tokenizer)
    compute_perplexity(model, eval_set, batch_size=3, show_progress=False)  # caches the batches
    batch = eval_set.batches(3)[0]
    assert not batch.input_ids.is_inference()  # so autograd may save them for backward
    batch_nll(model, batch).backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0


# --- prompt / completion --------------------------------------------------------------------------
def test_prompt_tokens_excluded_from_loss(model, tokenizer):
    data = Dataset.from_dict({"prompt": [w(1, 2, 3)], "completion": [" " + w(4, 5)]})
    ids = ids_of(1, 2, 3, 4, 5) + [EOS]
    eval_set = tokenize_for_evaluation(data, tokenizer)
    assert eval_set.dataset_format == "prompt_completion"
    assert eval_set.input_ids[0].tolist() == ids
    assert eval_set.loss_mask[0].tolist() == [False, False, False, True, True, True]
    result = compute_perplexity(model, eval_set, show_progress=False)
    assert result.num_tokens == 3
    assert result.loss == pytest.approx(reference_nll(model, ids, [3, 4, 5]) / 3, rel=1e-6)


def test_prompt_tokens_included_on_request(model, tokenizer):
    data = {"prompt": [w(1, 2, 3), w(9)], "completion": [" " + w(4, 5), " " + w(7, 7, 7)]}
    included = compute_perplexity(model, data, tokenizer, completion_only_loss=False, show_progress=False)
    as_text = compute_perplexity(model, [w(1, 2, 3, 4, 5), w(9, 7, 7, 7)], tokenizer, show_progress=False)
    assert included.num_tokens == as_text.num_tokens == 5 + 4
    assert included.loss == pytest.approx(as_text.loss, rel=1e-6)


# --- special tokens -------------------------------------------------------------------------------
def bos_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def test_bos_and_eos_follow_tokenizer_and_trl():
    tokenizer = bos_tokenizer()
    eval_set = tokenize_for_evaluation([w(1, 2), w(3) + " </s>"], tokenizer)
    assert [ids.tolist() for ids in eval_set.input_ids] == [[BOS, *ids_of(1, 2), EOS], [BOS, *ids_of(3), EOS]]
    assert all(not mask[0] and mask[1:].all() for mask in eval_set.loss_mask)  # BOS itself is never scored
    no_eos = tokenize_for_evaluation([w(1, 2)], tokenizer, add_eos_token=False)
    assert no_eos.input_ids[0].tolist() == [BOS, *ids_of(1, 2)]


# --- conversational -------------------------------------------------------------------------------
MESSAGES = [{"role": "user", "content": w(1, 2)}, {"role": "assistant", "content": w(3, 4, 5)}]
CHAT_IDS = [BOS, USER, *ids_of(1, 2), EOS, ASSISTANT, *ids_of(3, 4, 5), EOS]


def test_conversational_messages(model, zero_head_model, chat_tokenizer):
    data = Dataset.from_list([{"messages": MESSAGES}])
    eval_set = tokenize_for_evaluation(data, chat_tokenizer)
    assert eval_set.dataset_format == "conversational"
    assert eval_set.input_ids[0].tolist() == CHAT_IDS and eval_set.num_tokens == len(CHAT_IDS) - 1
    result = compute_perplexity(model, eval_set, show_progress=False)
    expected = reference_nll(model, CHAT_IDS, range(1, len(CHAT_IDS))) / (len(CHAT_IDS) - 1)
    assert result.loss == pytest.approx(expected, rel=1e-6)
    assert compute_perplexity(zero_head_model, eval_set, show_progress=False).perplexity == pytest.approx(64, rel=1e-5)


def test_assistant_only_loss(chat_tokenizer):
    eval_set = tokenize_for_evaluation([{"messages": MESSAGES}], chat_tokenizer, assistant_only_loss=True)
    assert eval_set.loss_mask[0].tolist() == [False] * 6 + [True] * 4


def test_sharegpt_conversations_match_messages(chat_tokenizer):
    turns = [{"from": "human", "value": w(1, 2)}, {"from": "gpt", "value": w(3, 4, 5)}]
    eval_set = tokenize_for_evaluation([{"conversations": turns}], chat_tokenizer)
    assert eval_set.input_ids[0].tolist() == CHAT_IDS


def test_conversational_prompt_completion(model, chat_tokenizer):
    data = Dataset.from_list([{"prompt": MESSAGES[:1], "completion": MESSAGES[1:]}])
    eval_set = tokenize_for_evaluation(data, chat_tokenizer)
    assert eval_set.dataset_format == "conversational_prompt_completion"
    assert eval_set.input_ids[0].tolist() == CHAT_IDS
    assert eval_set.loss_mask[0].tolist() == [False] * 6 + [True] * 4  # after the generation prompt `w59`
    result = compute_perplexity(model, eval_set, show_progress=False)
    assert result.loss == pytest.approx(reference_nll(model, CHAT_IDS, range(6, 10)) / 4, rel=1e-6)


def test_chat_template_argument_overrides_missing_template(tokenizer):
    eval_set = tokenize_for_evaluation([{"messages": MESSAGES}], tokenizer, chat_template=CHAT_TEMPLATE)
    assert eval_set.input_ids[0].tolist() == CHAT_IDS


# --- other inputs ---------------------------------------------------------------------------------
def test_pretokenized_labels_and_completion_mask(tokenizer):
    rows = {"input_ids": [[5, 6, 7, 8]], "labels": [[-100, -100, 7, 8]]}
    assert tokenize_for_evaluation(rows, tokenizer).loss_mask[0].tolist() == [False, False, True, True]
    rows = {"input_ids": [[5, 6, 7, 8]], "completion_mask": [[0, 0, 0, 1]]}
    assert tokenize_for_evaluation(rows, tokenizer).loss_mask[0].tolist() == [False, False, False, True]
    assert tokenize_for_evaluation(rows, tokenizer, completion_only_loss=False).num_tokens == 3


def test_text_column_and_formatting_func(tokenizer):
    data = Dataset.from_dict({"body": [w(1, 2)], "title": [w(3)]})
    assert tokenize_for_evaluation(data, tokenizer, text_column="body").input_ids[0].tolist() == [*ids_of(1, 2), EOS]
    joined = tokenize_for_evaluation(data, tokenizer, formatting_func=lambda row: row["title"] + " " + row["body"])
    assert joined.input_ids[0].tolist() == [*ids_of(3, 1, 2), EOS]


def test_sorted_by_length_and_batches_cached(tokenizer):
    texts = random_texts(9, seed=4)
    eval_set = tokenize_for_evaluation(texts, tokenizer)
    lengths = [len(ids) for ids in eval_set.input_ids]
    assert lengths == sorted(lengths, reverse=True)
    assert sorted(eval_set.example_indices) == list(range(9))
    assert eval_set.batches(4) is eval_set.batches(4) and len(eval_set.batches(4)) == 3
    batch = eval_set.batches(4, padding_side="left")[-1]
    assert (batch.labels == -100).sum() == (~batch.loss_mask).sum()
    assert "num_sequences=9" in repr(eval_set)


def test_empty_examples_are_skipped(tokenizer, caplog):
    with caplog.at_level(logging.WARNING):
        eval_set = tokenize_for_evaluation(["", w(1, 2)], tokenizer)
    assert len(eval_set) == 1 and eval_set.num_skipped == 1 and eval_set.example_indices == [1]
    assert "no token to score" in caplog.text


# --- truncation -----------------------------------------------------------------------------------
def test_truncation_warns(tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="dem_hf.evaluation.sets"):
        eval_set = tokenize_for_evaluation([w(*range(10)), w(1, 2)], tokenizer, max_length=4)
    assert "1 of 2 evaluation sequences were longer than max_length=4" in caplog.text
    assert eval_set.num_truncated == 1 and eval_set.max_sequence_length == 4
    assert eval_set.input_ids[0].tolist() == ids_of(0, 1, 2, 3)  # keeps the start


def test_default_max_length_is_model_limit(model, tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="dem_hf.evaluation.sets"):
        result = compute_perplexity(model, [w(*[i % 60 for i in range(200)])], tokenizer, show_progress=False)
    assert result.num_tokens == model.config.max_position_embeddings - 1
    assert "max_length=128" in caplog.text


# --- several sets, model state, progress ----------------------------------------------------------
def test_compute_perplexities_matches_single_calls(model, tokenizer):
    sets = {"a": tokenize_for_evaluation(random_texts(3, 5), tokenizer), "b": random_texts(4, 6)}
    results = compute_perplexities(model, sets, tokenizer, batch_size=2, show_progress=False)
    assert list(results) == ["a", "b"]
    assert results["a"] == compute_perplexity(model, sets["a"], batch_size=2, show_progress=False)
    pooled = compute_perplexity(model, random_texts(3, 5) + random_texts(4, 6), tokenizer, show_progress=False)
    combined = PerplexityResult.combine(results.values())
    assert combined.loss == pytest.approx(pooled.loss, rel=1e-6) and combined.num_tokens == pooled.num_tokens


def test_model_modes_restored(model, tokenizer):
    model.train()
    model.model.layers[0].eval()
    compute_perplexity(model, random_texts(2), tokenizer, show_progress=False)
    assert model.training and model.model.training and not model.model.layers[0].training


def test_progress_bar_respects_disable_progress_bar(model, tokenizer, capsys):
    eval_set = tokenize_for_evaluation(random_texts(2), tokenizer)
    was_enabled = hf_logging.is_progress_bar_enabled()
    try:
        hf_logging.enable_progress_bar()
        compute_perplexity(model, eval_set, desc="ppl-bar")
        assert "ppl-bar" in capsys.readouterr().err
        hf_logging.disable_progress_bar()
        compute_perplexity(model, eval_set, desc="ppl-bar")
        assert "ppl-bar" not in capsys.readouterr().err
    finally:
        (hf_logging.enable_progress_bar if was_enabled else hf_logging.disable_progress_bar)()


# --- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "data, kwargs, match",
    [
        (Dataset.from_dict({"text": []}), {}, "empty"),
        ([], {}, "empty"),
        (
            Dataset.from_dict({"question": ["a"], "answer": ["b"]}),
            {},
            r"Expected columns: 'text'.*found: \['question', 'answer'\]",
        ),
        ({"prompt": [w(1)]}, {}, "prompt-only"),
        (DatasetDict({"validation": Dataset.from_dict({"text": [w(1)]})}), {}, "one split"),
        ("w1 w2", {}, "single string"),
        ([w(1, 2)], {"completion_only_loss": True}, "completion_only_loss=True needs prompt-completion"),
        ([w(1, 2)], {"assistant_only_loss": True}, "assistant_only_loss=True needs conversational"),
        ([{"messages": MESSAGES}], {}, "chat template"),
        ([w(1, 2)], {"max_length": 1}, "max_length must be an integer >= 2"),
        ({"text": [1, 2]}, {}, "must hold strings"),
        (["", ""], {}, "has a token to score"),
    ],
)
def test_bad_inputs_raise(tokenizer, data, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tokenize_for_evaluation(data, tokenizer, **kwargs)


def test_bad_compute_arguments_raise(model, tokenizer):
    eval_set = tokenize_for_evaluation([w(1, 2)], tokenizer)
    with pytest.raises(ValueError, match="no tokenizer"):
        compute_perplexity(model, [w(1, 2)])
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        compute_perplexity(model, eval_set, batch_size=0)
    with pytest.raises(ValueError, match="padding_side"):
        compute_perplexity(model, eval_set, padding_side="middle")
    with pytest.raises(ValueError, match=r"\['max_length', 'text_column'\] have no effect"):
        compute_perplexity(model, eval_set, max_length=8, text_column="body")
    with pytest.raises(ValueError, match="non-empty mapping"):
        compute_perplexities(model, {})
    with pytest.raises(ValueError, match="at least one scored token"):
        PerplexityResult.from_nll(0.0, 0, 0)
    with pytest.raises(ValueError, match="dataset_format"):
        EvaluationSet([], [], [], pad_token_id=0, dataset_format="csv")


# --- evaluate metric module -----------------------------------------------------------------------
def test_evaluate_metric_loads_offline_and_agrees(base_dir, base_model, tokenizer):
    import evaluate

    texts = random_texts(5, seed=7)
    expected = compute_perplexity(base_model, texts, tokenizer, show_progress=False)
    metric = evaluate.load(PERPLEXITY_METRIC_PATH)
    from_path = metric.compute(predictions=texts, model_id=str(base_dir), batch_size=2)
    from_model = metric.compute(predictions=texts, model=base_model, tokenizer=tokenizer)
    for out in (from_path, from_model):
        assert out["perplexity"] == pytest.approx(expected.perplexity, rel=1e-6)
        assert out["num_tokens"] == expected.num_tokens
    with pytest.raises(ValueError, match="exactly one of `model_id`"):
        metric.compute(predictions=texts)

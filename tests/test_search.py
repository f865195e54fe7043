"""Coefficient search: in-place candidate switching, the LoRA adapter path, strategies on a known optimum,
the cache, objectives, gradients, persistence, the CLI and plots, and bad input."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model

from dem_hf import (
    DEMConfig,
    DEMMerger,
    DistributionVector,
    SearchConfig,
    SearchResult,
    compute_perplexity,
)
from dem_hf.commands.cli import main
from dem_hf.evaluation.perplexity import compute_perplexities, tokenize_for_evaluation
from dem_hf.io.tensors import TensorDict, untied_state_dict
from dem_hf.search import candidates as candidates_module
from dem_hf.search import run as search_module
from dem_hf.search.candidates import CandidateModel
from dem_hf.search.plots import plot_search
from dem_hf.search.registry import register_strategy
from dem_hf.search.run import Candidate

from .conftest import VOCAB, make_llama, make_tokenizer, save_model

OPTIMUM = {"math": 0.6, "chat": 1.3}  # the coefficients of the model the validation data is sampled from



def noise_vector(name: str, seed: int, scale: float = 0.15) -> DistributionVector:
    state = untied_state_dict(make_llama(seed=0))
    generator = torch.Generator().manual_seed(seed)
    deltas = {n: torch.randn(t.shape, generator=generator) * scale for n, t in state.items() if t.dtype.is_floating_point}
    return DistributionVector(name, TensorDict(deltas))


def lora_vector(name: str, seed: int, *, tied: bool = True, modules=("q_proj", "v_proj", "gate_proj", "embed_tokens")):
    model = make_llama(seed=0, tie_word_embeddings=tied)
    torch.manual_seed(seed)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=list(modules), init_lora_weights=False)
    return DistributionVector.from_peft(get_peft_model(model, config), name=name)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A base, two full vectors, and validation data sampled from base + 0.6·math + 1.3·chat."""
    tmp = tmp_path_factory.mktemp("search")
    tokenizer = make_tokenizer()
    base = save_model(make_llama(seed=0), tmp / "base", tokenizer)
    vectors = [noise_vector("math", 1), noise_vector("chat", 2)]
    target = make_llama(seed=0)
    with torch.no_grad():
        state = untied_state_dict(target)
        for vector in vectors:
            for name in vector.target_names:
                vector.add_to_(state[name], name, OPTIMUM[vector.name])
    torch.manual_seed(0)
    ids = target.generate(torch.full((64, 1), 2), do_sample=True, top_k=0, max_new_tokens=24, min_new_tokens=24, pad_token_id=0)
    sampled = tokenize_for_evaluation({"input_ids": ids.tolist()}, tokenizer)
    rng = random.Random(0)
    texts = [" ".join(f"w{rng.randrange(60)}" for _ in range(rng.randint(3, 20))) for _ in range(12)]
    return dict(tmp=tmp, tokenizer=tokenizer, base=base, vectors=vectors, sampled=sampled, texts=texts)


def new_merger(world, vectors=None, weighting="sum") -> DEMMerger:
    return DEMMerger.from_pretrained(world["base"], vectors=vectors or world["vectors"], config=DEMConfig(weighting=weighting))


def state_of(model) -> dict[str, torch.Tensor]:
    return {n: t.clone() for n, t in untied_state_dict(model).items()}


# ---------------------------------------------------------------------------------------------- perplexity


def test_compute_perplexity_is_exported_and_exact(tokenizer):
    """Acceptance 1 (full tests in test_evaluation.py): zeroed untied lm_head gives the vocabulary size,
    whatever the padding."""
    model = make_llama(seed=0, tie_word_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    texts = ["w1 w2 w3 w4 w5 w6", "w7", "w8 w9 w10"]
    values = [compute_perplexity(model, texts, tokenizer, batch_size=b, padding_side=s, show_progress=False).perplexity
              for b in (1, 3) for s in ("right", "left")]
    assert values == pytest.approx([len(VOCAB)] * 4, rel=1e-6)


# ---------------------------------------------------------------------------------------------- switching


@pytest.mark.parametrize("cache_deltas", [True, False])
@pytest.mark.parametrize("weighting", ["sum", "average"])
def test_in_place_switches_equal_a_fresh_merge_and_base_is_restored(world, weighting, cache_deltas, monkeypatch):
    """Acceptance 2: any sequence of switches lands on the fresh merge of the last candidate; restore is exact."""
    monkeypatch.setattr(candidates_module, "RESYNC_EVERY", 5)
    vectors = [*world["vectors"], lora_vector("code", 3)]
    merger = new_merger(world, vectors, weighting)
    model = merger.merge({"math": 0.0, "chat": 0.0, "code": 0.0}) if weighting == "sum" else make_llama(seed=0)
    base = state_of(model)
    rng = random.Random(1)
    with CandidateModel(model, merger.base, vectors, lora_mode="update", cache_deltas=cache_deltas) as switcher:
        assert all(not unit.low_rank for unit in switcher.units.values()) == cache_deltas  # cached LoRA is dense
        for step in range(12):
            coefficients = {n: rng.choice([0.0, 0.5, 1.0, -0.7, 1.3]) for n in merger.vector_names}
            coefficients["code"] += 0.1  # never all zero, so 'average' is defined
            if step % 3 == 0:  # sometimes only one coefficient changes, as in a grid
                coefficients = {**coefficients, "math": coefficients["math"] + 0.25}
            weights = list(merger._terms(coefficients))
            switcher.set_weights([w for _, w in weights])
            fresh = untied_state_dict(merger.merge(coefficients))
            for name, tensor in untied_state_dict(model).items():
                torch.testing.assert_close(tensor, fresh[name], rtol=1e-5, atol=1e-6)
    for name, tensor in untied_state_dict(model).items():
        assert torch.equal(tensor, base[name]), name


def test_resync_makes_a_switch_bitwise_equal_to_a_fresh_merge(world, monkeypatch):
    monkeypatch.setattr(candidates_module, "RESYNC_EVERY", 3)
    merger = new_merger(world)
    model = make_llama(seed=0)
    with CandidateModel(model, merger.base, world["vectors"]) as switcher:
        for weights in ([0.3, 0.9], [1.1, -0.2], [0.7, 0.4]):  # the third switch recomputes from the checkpoint
            switcher.set_weights(weights)
        fresh = untied_state_dict(merger.merge({"math": 0.7, "chat": 0.4}))
        assert all(torch.equal(t, fresh[n]) for n, t in untied_state_dict(model).items())


def test_bf16_model_keeps_a_float32_master(world):
    merger = new_merger(world)
    model = make_llama(seed=0).to(torch.bfloat16)
    with CandidateModel(model, merger.base, world["vectors"]) as switcher:
        for weights in ([0.3, 0.9], [1.1, -0.2], [0.6, 1.3]):
            switcher.set_weights(weights)
        expected = merger.merge({"math": 0.6, "chat": 1.3})
        for name, tensor in untied_state_dict(model).items():
            reference = untied_state_dict(expected)[name].to(torch.bfloat16)
            torch.testing.assert_close(tensor.float(), reference.float(), rtol=1e-2, atol=1e-2)
    base = make_llama(seed=0).to(torch.bfloat16)
    assert all(torch.equal(t, untied_state_dict(base)[n]) for n, t in untied_state_dict(model).items())


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("weighting", ["sum", "average"])
def test_lora_adapter_path_equals_dense_merge(world, tmp_path, tokenizer, tied, weighting):
    """LoRA coefficients as adapter scalings give the dense merge's logits, and touch no weight."""
    modules = ("q_proj", "v_proj", "gate_proj", "embed_tokens") + (() if tied else ("lm_head",))
    base_dir = save_model(make_llama(seed=0, tie_word_embeddings=tied), tmp_path / "base", tokenizer)
    vectors = [lora_vector("math", 1, tied=tied, modules=modules), lora_vector("chat", 2, tied=tied, modules=modules)]
    merger = DEMMerger.from_pretrained(base_dir, vectors=vectors, config=DEMConfig(weighting=weighting))
    model = make_llama(seed=0, tie_word_embeddings=tied)
    before = state_of(model)
    ids = torch.tensor([[2, 7, 9, 30, 3, 11], [2, 40, 41, 42, 43, 3]])
    with CandidateModel(model, merger.base, vectors, lora_mode="adapter") as switcher:
        assert switcher.adapter_count == (6 if tied else 8)  # a tied embedding falls back to in-place updates
        for coefficients in ({"math": 0.7, "chat": -0.3}, {"math": 0.0, "chat": 1.5}, {"math": 1.2, "chat": 0.4}):
            switcher.set_weights([w for _, w in merger._terms(coefficients)])
            with torch.no_grad():
                logits = model(ids).logits
                expected = merger.merge(coefficients)(ids).logits
            torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
        if not tied:
            assert all(torch.equal(t, before[n]) for n, t in untied_state_dict(model).items())
    assert all(torch.equal(t, before[n]) for n, t in untied_state_dict(model).items())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, make_llama(seed=0, tie_word_embeddings=tied)(ids).logits, rtol=0, atol=0)


def test_lora_search_scores_agree_across_paths(world):
    """A search over LoRA vectors scores the same candidates alike as adapters, as in-place updates, and as
    the densified (full) vectors; 'auto' picks adapters for the gradient strategy only."""
    lora = [lora_vector("math", 1), lora_vector("chat", 2)]
    dense = [DistributionVector(v.name, TensorDict({n: v.delta(n) for n in v.target_names})) for v in lora]
    sets = {"math": world["sampled"]}
    config = dict(grid_values=[0.0, 0.7, 1.4], metric="log_perplexity")
    objectives = {
        mode: [c.objective for c in new_merger(world, vectors).search(sets, SearchConfig(lora_mode=mode, **config),
                                                                     show_progress=False).candidates]
        for mode, vectors in (("adapter", lora), ("update", lora), ("auto", dense))
    }
    assert objectives["adapter"] == pytest.approx(objectives["update"], rel=1e-5)
    assert objectives["update"] == pytest.approx(objectives["auto"], rel=1e-5)
    assert search_module.resolve_lora_mode(SearchConfig(strategy="gradient")) == "adapter"
    assert search_module.resolve_lora_mode(SearchConfig(strategy="grid")) == "update"
    assert search_module.resolve_lora_mode(SearchConfig(strategy="grid", lora_mode="adapter")) == "adapter"


def test_search_restores_a_given_model_exactly(world):
    merger = new_merger(world)
    model = make_llama(seed=0)
    before = state_of(model)
    merger.search({"math": world["sampled"]}, SearchConfig(grid_values=[0.5, 1.0]), model=model, show_progress=False)
    assert all(torch.equal(t, before[n]) for n, t in untied_state_dict(model).items())
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


# ---------------------------------------------------------------------------------------------- strategies


STRATEGY_CASES = {
    "grid": (dict(grid_values=[0.2, 0.6, 1.0, 1.3, 1.7]), 0.05, 0.002),
    "random": (dict(n_trials=40, seed=1), 0.3, 0.03),
    "bayesian": (dict(n_trials=16, bayesian_sampler="gp"), 0.12, 0.005),
    "gradient": (dict(gradient_steps=15, initial_coefficients={"math": 1.0, "chat": 1.0}), 0.05, 0.002),
}


@pytest.mark.parametrize("strategy", list(STRATEGY_CASES))
def test_strategies_find_the_known_optimum(world, strategy):
    """Acceptance 3: the validation data is sampled from θ + 0.6·Δ_math + 1.3·Δ_chat, so the log-perplexity
    optimum lies at (0.6, 1.3) (up to sampling noise), inside the bounds (0, 2)."""
    options, distance, relative = STRATEGY_CASES[strategy]
    merger = new_merger(world)
    config = SearchConfig(strategy=strategy, metric="log_perplexity", bounds=(0.0, 2.0), **options)
    result = merger.search({"math": world["sampled"]}, config, show_progress=False)
    at_optimum = SearchConfig(strategy="grid", metric="log_perplexity", grid_values=[0.6], bounds=(0.0, 2.0))
    reference = new_merger(world).search({"math": world["sampled"]}, at_optimum, show_progress=False).best_objective
    assert max(abs(result.best_coefficients[n] - OPTIMUM[n]) for n in OPTIMUM) <= distance
    assert result.best_objective <= reference * (1 + relative)
    assert merger.config.coefficients == result.best_coefficients
    if strategy == "gradient":
        assert result.compute == 3 * len(result.candidates) and len(result.candidates) <= 15


def test_grid_is_the_full_product_last_coefficient_fastest(world):
    merger = new_merger(world)
    result = merger.search({"math": world["sampled"]}, SearchConfig(grid_values={"math": [0.0, 1.0], "chat": [0.0, 0.5, 1.0]}),
                           show_progress=False)
    assert [tuple(c.coefficients.values()) for c in result.candidates] == [
        (0.0, 0.0), (0.0, 0.5), (0.0, 1.0), (1.0, 0.0), (1.0, 0.5), (1.0, 1.0)
    ]
    assert result.compute == 6 and result.wall_time_s > 0
    default = SearchConfig(grid_points=3, bounds={"math": (0.0, 1.0), "chat": (1.0, 1.0)})
    result = merger.search({"math": world["sampled"]}, default, show_progress=False)
    assert [tuple(c.coefficients.values()) for c in result.candidates] == [(0.0, 1.0), (0.5, 1.0), (1.0, 1.0)]


@pytest.mark.parametrize("path", ["full", "full-uncached", "lora-adapter", "lora-update", "lora-update-uncached"])
@pytest.mark.parametrize("weighting", ["sum", "average"])
def test_gradient_matches_finite_differences(world, path, weighting):
    vectors = world["vectors"] if path.startswith("full") else [lora_vector("math", 1), lora_vector("chat", 2)]
    merger = new_merger(world, vectors, weighting)
    point, h, seen = {"math": 0.4, "chat": 0.9}, 1e-3, {}

    @register_strategy("finite-differences")
    def probe(problem):
        seen["value"], seen["grad"] = problem.value_and_grad(point)
        seen["fd"] = {
            n: (problem.evaluate({**point, n: point[n] + h}) - problem.evaluate({**point, n: point[n] - h})) / (2 * h)
            for n in point
        }

    lora_mode = "update" if path.startswith("lora-update") else "adapter"
    sets = {"math": world["sampled"], "chat": tokenize_for_evaluation(world["texts"], world["tokenizer"])}
    try:
        config = SearchConfig(strategy="finite-differences", lora_mode=lora_mode, cache_deltas=not path.endswith("uncached"))
        merger.search(sets, config, show_progress=False)
    finally:
        search_module.SEARCH_STRATEGIES.pop("finite-differences")
    for name in point:
        assert seen["grad"][name] == pytest.approx(seen["fd"][name], rel=2e-2, abs=1e-2)


# ---------------------------------------------------------------------------------------------- cache, objective


def test_cache_and_tokenise_once(world, monkeypatch):
    calls = {"tokenize": 0, "forward": 0}
    original_tokenize, original_forward = search_module.tokenize_for_evaluation, compute_perplexities

    def counting_tokenize(*args, **kwargs):
        calls["tokenize"] += 1
        return original_tokenize(*args, **kwargs)

    def counting_forward(*args, **kwargs):
        calls["forward"] += 1
        return original_forward(*args, **kwargs)

    monkeypatch.setattr(search_module, "tokenize_for_evaluation", counting_tokenize)
    monkeypatch.setattr("dem_hf.search.problem.compute_perplexities", counting_forward)

    @register_strategy("repeat")
    def repeat(problem):
        for _ in range(3):
            problem.evaluate({"math": 0.5, "chat": 1.0})
        problem.evaluate({"math": 1.0, "chat": 2.0})

    try:
        merger = new_merger(world, weighting="average")  # (0.5, 1) and (1, 2) are the same model when averaged
        result = merger.search({"math": world["texts"], "chat": world["texts"][:5]}, SearchConfig(strategy="repeat"),
                               show_progress=False)
    finally:
        search_module.SEARCH_STRATEGIES.pop("repeat")
    assert calls == {"tokenize": 2, "forward": 1}
    assert len(result.candidates) == 1 and result.num_cache_hits == 3 and result.compute == 1


@pytest.mark.parametrize(
    "objective, metric, expected",
    [
        ("mean", "perplexity", lambda p, b: (p["math"] + p["chat"]) / 2),
        ("max", "perplexity", lambda p, b: max(p.values())),
        ("mean", "log_perplexity", lambda p, b: (math.log(p["math"]) + math.log(p["chat"])) / 2),
        ("weighted_mean", "perplexity", lambda p, b: (3 * p["math"] + p["chat"]) / 4),
        ("mean", "relative_perplexity", lambda p, b: (p["math"] / b["math"] + p["chat"] / b["chat"]) / 2),
        (lambda results: results["chat"].perplexity, "perplexity", lambda p, b: p["chat"]),
    ],
)
def test_objectives(world, objective, metric, expected):
    merger = new_merger(world)
    sets = {"math": world["sampled"], "chat": tokenize_for_evaluation(world["texts"], world["tokenizer"])}
    weights = {"math": 3.0, "chat": 1.0} if objective == "weighted_mean" else None
    config = SearchConfig(grid_values=[0.5], objective=objective, metric=metric, objective_weights=weights)
    result = merger.search(sets, config, show_progress=False)
    merged = compute_perplexities(merger.merge({"math": 0.5, "chat": 0.5}), sets, show_progress=False)
    base = compute_perplexities(make_llama(seed=0), sets, show_progress=False)
    perplexities = {n: r.perplexity for n, r in merged.items()}
    assert result.best.perplexities == pytest.approx(perplexities, rel=1e-5)
    assert result.best_objective == pytest.approx(expected(perplexities, {n: r.perplexity for n, r in base.items()}), rel=1e-5)
    assert (result.base_perplexities is not None) == (metric == "relative_perplexity")
    assert result.compute == (2 if metric == "relative_perplexity" else 1)
    assert ("callable" in result.objective) == callable(objective)


# ---------------------------------------------------------------------------------------------- persistence, CLI, plots


def test_search_result_saved_in_dem_config_and_restored(world, tmp_path):
    merger = new_merger(world)
    result = merger.search({"math": world["sampled"]}, SearchConfig(grid_values=[0.5, 1.0]), show_progress=False)
    merger.save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "dem_config.json").read_text())
    assert saved["search_result"]["best_coefficients"] == result.best_coefficients
    assert saved["coefficients"] == result.best_coefficients
    restored = DEMMerger.from_pretrained(tmp_path / "out")
    assert SearchResult.from_dict(restored.config.search_result) == SearchResult.from_dict(result.to_dict())
    assert restored.config.coefficients == result.best_coefficients


def cli_search_inputs(world, tmp_path) -> list[str]:
    """`--vector DIR ... --eval NAME=FILE ...` for `dem-hf search`: the world's vectors saved, its texts as JSONL sets."""
    paths = []
    for vector in world["vectors"]:
        vector.save_pretrained(tmp_path / "vec" / vector.name)
        paths += ["--vector", str(tmp_path / "vec" / vector.name)]
    for name in ("math", "chat"):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in world["texts"]))
        paths += ["--eval", f"{name}={tmp_path / f'{name}.jsonl'}"]
    return paths


def test_cli_search_prints_best_coefficients_and_writes_plot(world, tmp_path, capsys):
    paths = cli_search_inputs(world, tmp_path)
    code = main(["search", "--base", str(world["base"]), *paths, "--grid-values", "0", "0.5", "1",
                 "--plot", str(tmp_path / "search.png"), "--output", str(tmp_path / "merged"), "--top", "4"])
    out = capsys.readouterr().out
    assert code == 0
    assert "Best coefficients: math=" in out and "objective" in out and "(5 more candidates not shown)" in out
    assert (tmp_path / "search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "merged" / "dem_config.json").read_text())["search_result"]["strategy"] == "grid"


def test_cli_search_per_layer_prints_and_saves_per_group_coefficients(world, tmp_path, capsys):
    """`dem-hf search --granularity layer`: the summary line shows each vector's mean and range, the merged folder
    restores the per-group coefficients the search found."""
    paths = cli_search_inputs(world, tmp_path)
    code = main(["search", "--base", str(world["base"]), *paths, "--strategy", "gradient", "--granularity", "layer",
                 "--gradient_steps", "2", "--output", str(tmp_path / "merged")])
    out = capsys.readouterr().out
    assert code == 0
    assert "Best coefficients: math≈" in out and "chat≈" in out
    saved = json.loads((tmp_path / "merged" / "dem_config.json").read_text())
    assert saved["coefficients"] == saved["search_result"]["best_coefficients"]
    assert all(isinstance(value, dict) and value for value in saved["coefficients"].values())


def test_cli_search_refuses_an_unknown_strategy_in_one_line(world, tmp_path, capsys):
    code = main(["search", "--base", str(world["base"]), "--vector", "v", "--eval", "math=x.jsonl", "--strategy", "annealing"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "annealing" in err and "'bayesian', 'gradient', 'grid', 'random'" in err


def fake_result(names, strategy, points) -> SearchResult:
    candidates = [
        Candidate(dict(zip(names, p)), sum((x - 0.7) ** 2 for x in p), {"a": 1.0}, {"a": 0.0}, 1.0, 0.1) for p in points
    ]
    best = min(candidates, key=lambda c: c.objective)
    return SearchResult(best.coefficients, best.objective, "mean perplexity over ['a']", strategy, candidates, 1.0, len(points))


@pytest.mark.parametrize(
    "names, strategy, points",
    [
        (["a"], "grid", [(0.0,), (0.5,), (1.0,)]),
        (["a", "b"], "grid", [(x, y) for x in (0.0, 0.5, 1.0) for y in (0.0, 1.0)]),
        (["a", "b"], "gradient", [(1.0, 1.0), (0.8, 0.9), (0.7, 0.75)]),
        (["a", "b", "c"], "random", [(random.random(), random.random(), random.random()) for _ in range(12)]),
    ],
)
def test_plots_are_written(tmp_path, names, strategy, points):
    figure = plot_search(fake_result(names, strategy, points).to_dict(), tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG" and figure.axes


# ---------------------------------------------------------------------------------------------- bad input


def too_long(world):
    return tokenize_for_evaluation([" ".join(["w1"] * 200)], world["tokenizer"])


BAD = {
    "eval set named after no vector": (lambda w: new_merger(w).search({"poetry": w["texts"]}), "match no vector; the vectors are ['math', 'chat']"),
    "no eval sets": (lambda w: new_merger(w).search({}), "non-empty dict"),
    "empty eval dataset": (lambda w: new_merger(w).search({"math": Dataset.from_dict({"text": []})}), "Validation set 'math'"),
    "empty EvaluationSet": (
        lambda w: new_merger(w).search({"math": tokenize_for_evaluation(["w1 w2"], w["tokenizer"]).__class__([], [], [], 0)}),
        "'math' is empty",
    ),
    "tokenised sequences longer than the model allows": (lambda w: new_merger(w).search({"math": too_long(w)}), "more than the model allows (128)"),
    "max_length above the model's limit": (lambda w: new_merger(w).search({"math": w["texts"]}, SearchConfig(max_length=512)), "max_position_embeddings=128"),
    "bounds low > high": (lambda w: SearchConfig(bounds=(1.0, 0.0)), "low > high"),
    "bounds for an unknown vector": (lambda w: new_merger(w).search({"math": w["texts"]}, SearchConfig(bounds={"math": (0, 1), "x": (0, 1)})), "unknown vectors ['x']"),
    "unknown strategy": (lambda w: SearchConfig(strategy="annealing"), "['bayesian', 'gradient', 'grid', 'random']"),
    "unknown objective": (lambda w: SearchConfig(objective="median"), "['mean', 'weighted_mean', 'max']"),
    "unknown metric": (lambda w: SearchConfig(metric="accuracy"), "['perplexity', 'log_perplexity', 'relative_perplexity']"),
    "weighted mean without weights": (lambda w: SearchConfig(objective="weighted_mean"), "needs objective_weights"),
    "callable objective with gradient": (lambda w: SearchConfig(strategy="gradient", objective=len), "differentiable built-in"),
    "empty grid values": (lambda w: SearchConfig(grid_values=[]), "empty"),
    "unknown lora_mode": (lambda w: SearchConfig(lora_mode="fused"), "['auto', 'adapter', 'update']"),
    "model that is not the base": (
        lambda w: new_merger(w).search({"math": w["texts"]}, model=make_llama(seed=5)), "differs from the base checkpoint"
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(world, case):
    call, message = BAD[case]
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        call(world)


def test_raw_sequences_longer_than_the_model_are_truncated_with_a_warning(world, caplog):
    merger = new_merger(world)
    with caplog.at_level("WARNING"):
        result = merger.search({"math": [" ".join(["w1"] * 200)]}, SearchConfig(grid_values=[1.0]), show_progress=False)
    assert result.eval_sets["math"]["num_truncated"] == 1 and "truncated" in caplog.text

"""Per-layer / per-module coefficients (issue 16 item 1): groups, merges, save/load, gradients, the search."""

from __future__ import annotations

import json
import random

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from dem_hf import DEMConfig, DEMMerger, DistributionVector, SearchConfig
from dem_hf.evaluation.perplexity import tokenize_for_evaluation
from dem_hf.io.tensors import TensorDict, untied_state_dict
from dem_hf.merging.groups import coefficient_for, group_names, tensor_group, tensor_groups
from dem_hf.search import run as search_module
from dem_hf.search.layerwise import split_holdout
from dem_hf.search.registry import register_strategy

from .conftest import make_llama, make_tokenizer, save_model

LAYER_GROUPS = ["embeddings", "layer.0", "layer.1", "head"]


@pytest.fixture
def vector_dirs(tmp_path, base_dir, finetuned_dirs):
    return {
        name: DistributionVector.from_models(base_dir, folder, name=name, save_directory=tmp_path / "vectors" / name).path
        for name, folder in finetuned_dirs.items()
    }


def saved_weights(folder) -> dict[str, torch.Tensor]:
    weights = {}
    for file in sorted(folder.glob("model*.safetensors")):
        weights.update(load_file(file))
    return weights


# ------------------------------------------------------------------------------------------------ groups


def test_groups_follow_the_blocks_of_the_model():
    names = list(make_llama().state_dict())
    assert group_names(names, "layer") == LAYER_GROUPS
    assert group_names(names, "module") == [
        "embeddings", "layer.0.attention", "layer.0.mlp", "layer.0.norm",
        "layer.1.attention", "layer.1.mlp", "layer.1.norm", "head",
    ]
    assert tensor_group("model.layers.1.post_attention_layernorm.weight", "module") == "layer.1.norm"
    assert tensor_group("model.norm.weight", "layer") == "head"
    assert tensor_group("lm_head.weight", "module") == "head"
    # GPT-2 names (transformer.h.<i>), and the first index wins as in PEFT (experts of an MoE block)
    assert tensor_group("transformer.h.3.attn.c_attn.weight", "module") == "layer.3.attention"
    assert tensor_group("transformer.h.0.ln_1.weight", "module") == "layer.0.norm"
    assert tensor_group("transformer.wte.weight", "layer") == "embeddings"
    assert tensor_group("model.layers.2.mlp.experts.7.w1.weight", "layer") == "layer.2"


def test_a_model_without_blocks_is_refused_for_layer_granularity():
    with pytest.raises(ValueError, match="needs transformer blocks"):
        tensor_groups(["encoder.weight", "decoder.weight"], "layer")
    assert set(tensor_groups(["encoder.weight"], "vector").values()) == {"all"}


def test_a_tensor_takes_its_module_group_then_its_block_then_the_default():
    value = {"layer.0.mlp": 0.25, "layer.0": 0.5, "*": 0.75}
    assert coefficient_for(value, "model.layers.0.mlp.up_proj.weight") == 0.25
    assert coefficient_for(value, "model.layers.0.self_attn.q_proj.weight") == 0.5
    assert coefficient_for(value, "model.layers.1.self_attn.q_proj.weight") == 0.75
    assert coefficient_for({"layer.1": 2.0}, "lm_head.weight") == 1.0
    assert coefficient_for(0.3, "lm_head.weight") == 0.3


# ------------------------------------------------------------------------------------------------ merging


@pytest.mark.parametrize("weighting", ["sum", "average"])
def test_per_layer_coefficients_equal_to_per_vector_ones_merge_bit_for_bit(tmp_path, base_dir, vector_dirs, weighting):
    """(a) the same arithmetic per tensor: merge() and save_pretrained agree with today's merge exactly."""
    per_vector = {"math": 0.7, "chat": -0.3, "code": 1.3}
    per_layer = {n: {g: w for g in LAYER_GROUPS} for n, w in per_vector.items()}
    per_module = {"math": {"*": 0.7}, "chat": {"layer.0.mlp": -0.3, "*": -0.3}, "code": 1.3}
    merger = DEMMerger.from_pretrained(base_dir, vectors=vector_dirs.values(), config=DEMConfig(weighting=weighting))
    expected = untied_state_dict(merger.merge(per_vector))
    for coefficients in (per_layer, per_module):
        merged = untied_state_dict(merger.merge(coefficients))
        assert merged.keys() == expected.keys()
        for name, tensor in expected.items():
            assert torch.equal(merged[name], tensor), name
    merger.save_pretrained(tmp_path / "flat", per_vector)
    merger.save_pretrained(tmp_path / "grouped", per_layer)
    flat, grouped = saved_weights(tmp_path / "flat"), saved_weights(tmp_path / "grouped")
    assert flat.keys() == grouped.keys()
    for name, tensor in flat.items():
        assert torch.equal(grouped[name], tensor), name


def test_per_layer_coefficients_apply_per_tensor(base_dir, vector_dirs, base_model):
    merger = DEMMerger.from_pretrained(base_dir, vectors=[vector_dirs["math"], vector_dirs["chat"]])
    coefficients = {"math": {"layer.0": 2.0, "layer.1": -1.0, "*": 0.5}, "chat": {"layer.1.mlp": 3.0, "*": 0.0}}
    merged = untied_state_dict(merger.merge(coefficients))
    for name, tensor in untied_state_dict(base_model).items():
        expected = tensor + sum(
            coefficient_for(coefficients[v], name) * merger.vectors[v].delta(name) for v in coefficients
        )
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-6)


def test_average_weighting_normalises_per_group(base_dir, vector_dirs, base_model):
    merger = DEMMerger.from_pretrained(
        base_dir, vectors=[vector_dirs["math"], vector_dirs["chat"]], config=DEMConfig(weighting="average")
    )
    coefficients = {"math": {"layer.0": 1.0, "*": 3.0}, "chat": {"layer.0": 3.0, "*": 1.0}}
    merged = untied_state_dict(merger.merge(coefficients))
    name0, name1 = "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"
    base = untied_state_dict(base_model)
    delta = {v: {n: merger.vectors[v].delta(n) for n in (name0, name1)} for v in coefficients}
    torch.testing.assert_close(merged[name0], base[name0] + 0.25 * delta["math"][name0] + 0.75 * delta["chat"][name0], rtol=0, atol=1e-6)
    torch.testing.assert_close(merged[name1], base[name1] + 0.75 * delta["math"][name1] + 0.25 * delta["chat"][name1], rtol=0, atol=1e-6)


def test_saved_loaded_merged_equals_in_memory(tmp_path, base_dir, vector_dirs):
    """(c) per-group coefficients go into dem_config.json (schema 2) and come back with from_pretrained."""
    merger = DEMMerger.from_pretrained(base_dir, vectors=vector_dirs.values())
    coefficients = {"math": {"layer.0": 0.2, "layer.1.attention": 1.7, "*": 0.9}, "chat": 0.4, "code": {"head": 0.0}}
    in_memory = untied_state_dict(merger.merge(coefficients))
    merger.save_pretrained(tmp_path / "dem")
    saved = json.loads((tmp_path / "dem" / "dem_config.json").read_text())
    assert saved["schema_version"] == 2
    assert saved["coefficients"]["math"] == {"layer.0": 0.2, "layer.1.attention": 1.7, "*": 0.9}
    restored = DEMMerger.from_pretrained(tmp_path / "dem")
    assert restored.config.coefficients == merger.config.coefficients
    again = untied_state_dict(restored.merge())
    on_disk = saved_weights(tmp_path / "dem")
    for name, tensor in in_memory.items():
        assert torch.equal(again[name], tensor), name
        assert torch.equal(on_disk[name], tensor), name


def test_old_configs_without_schema_version_still_load(tmp_path, base_dir, vector_dirs):
    merger = DEMMerger.from_pretrained(base_dir, vectors=vector_dirs.values())
    merger.save_pretrained(tmp_path / "dem", {"math": 0.5, "chat": 1.0, "code": 0.25})
    path = tmp_path / "dem" / "dem_config.json"
    values = json.loads(path.read_text())
    del values["schema_version"]
    path.write_text(json.dumps(values))
    restored = DEMMerger.from_pretrained(tmp_path / "dem")
    assert restored.config.coefficients == {"math": 0.5, "chat": 1.0, "code": 0.25}
    assert restored.config.schema_version == 2
    values["schema_version"] = 3
    path.write_text(json.dumps(values))
    with pytest.raises(ValueError, match="schema_version 3"):
        DEMMerger.from_pretrained(tmp_path / "dem")


def test_lora_vectors_take_per_group_coefficients(base_dir):
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], init_lora_weights=False)
    vector = DistributionVector.from_peft(get_peft_model(make_llama(), config), name="lora")
    merger = DEMMerger.from_pretrained(base_dir, vectors=[vector])
    flat = untied_state_dict(merger.merge({"lora": 0.6}))
    grouped = untied_state_dict(merger.merge({"lora": {"layer.0": 0.6, "layer.1": 0.6}}))
    for name, tensor in flat.items():
        assert torch.equal(grouped[name], tensor), name
    split = untied_state_dict(merger.merge({"lora": {"layer.0": 0.0, "*": 0.6}}))
    name0, name1 = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(split[name1], flat[name1])
    assert not torch.equal(split[name0], flat[name0])


# ------------------------------------------------------------------------------------------------ search

# The validation data is sampled from θ + 1.2·Δ on block 0 and θ + 0.2·Δ on block 1 (Δ unchanged elsewhere):
# the vector helps block 0 and mostly hurts block 1, so no single coefficient is optimal.
LAYER_OPTIMUM = {"embeddings": 1.0, "layer.0": 1.2, "layer.1": 0.2, "head": 1.0}


def noise_vector(name: str, seed: int, scale: float = 0.15) -> DistributionVector:
    state = untied_state_dict(make_llama(seed=0))
    generator = torch.Generator().manual_seed(seed)
    deltas = {n: torch.randn(t.shape, generator=generator) * scale for n, t in state.items() if t.dtype.is_floating_point}
    return DistributionVector(name, TensorDict(deltas))


def lora_vector(name: str, seed: int) -> DistributionVector:
    model = make_llama(seed=0)  # before seeding: make_llama seeds torch itself
    torch.manual_seed(seed)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "gate_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # PEFT's random B is tiny: larger deltas give derivatives well above float32 noise
        for param_name, param in peft_model.named_parameters():
            if "lora_B" in param_name:
                param.mul_(30.0)
    return DistributionVector.from_peft(peft_model, name=name)


@pytest.fixture(scope="module")
def layered(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("per_layer")
    tokenizer = make_tokenizer()
    base = save_model(make_llama(seed=0), tmp / "base", tokenizer)
    vector = noise_vector("math", 1, scale=0.2)
    target = make_llama(seed=0)
    with torch.no_grad():
        state = untied_state_dict(target)
        for name in vector.target_names:
            vector.add_to_(state[name], name, coefficient_for(LAYER_OPTIMUM, name))
    torch.manual_seed(0)
    ids = target.generate(torch.full((160, 1), 2), do_sample=True, top_k=0, max_new_tokens=24, min_new_tokens=24, pad_token_id=0)
    sampled = tokenize_for_evaluation({"input_ids": ids.tolist()}, tokenizer)
    rng = random.Random(0)
    texts = [" ".join(f"w{rng.randrange(60)}" for _ in range(rng.randint(3, 20))) for _ in range(12)]
    return dict(base=base, vector=vector, sampled=sampled, texts=texts, tokenizer=tokenizer)


def test_the_per_layer_gradient_search_finds_a_per_layer_optimum(layered):
    """(b) block 0 wants 1.2 and block 1 wants 0.2; the per-vector optimum lies between, the per-layer fit finds both."""
    merger = DEMMerger.from_pretrained(layered["base"], vectors=[layered["vector"]])
    per_vector = merger.search(
        {"math": layered["sampled"]},
        SearchConfig(strategy="gradient", metric="log_perplexity", bounds=(0.0, 2.0), gradient_steps=12),
        show_progress=False,
    )
    assert 0.3 < per_vector.best_coefficients["math"] < 1.1
    config = SearchConfig(
        strategy="gradient", granularity="layer", metric="log_perplexity", bounds=(0.0, 2.0), gradient_steps=60,
        gradient_lr=0.08, holdout_fraction=0.0, layer_regularization=0.0,
    )
    result = merger.search({"math": layered["sampled"]}, config, show_progress=False)
    best = result.best_coefficients["math"]
    assert set(best) == set(LAYER_OPTIMUM)
    assert best["layer.0"] == pytest.approx(1.2, abs=0.15)
    assert best["layer.1"] == pytest.approx(0.2, abs=0.15)
    assert result.best_objective < per_vector.best_objective
    assert result.granularity == "layer"
    assert merger.config.coefficients == result.best_coefficients  # merge() and save_pretrained() use them
    assert "group" in result.per_group_table() and "layer.1" in result.per_group_table()


@pytest.mark.parametrize("path", ["full", "lora-adapter"])
@pytest.mark.parametrize("granularity,weighting", [("layer", "sum"), ("module", "sum"), ("layer", "average")])
def test_every_per_group_gradient_matches_central_finite_differences(layered, path, granularity, weighting):
    """(d) ∂ℓ/∂ω_{i,g} from one backward pass equals (ℓ(ω + h e) − ℓ(ω − h e)) / 2h for every vector and group."""
    vectors = [noise_vector("math", 1), noise_vector("chat", 2)] if path == "full" else [lora_vector("math", 1), lora_vector("chat", 2)]
    merger = DEMMerger.from_pretrained(layered["base"], vectors=vectors, config=DEMConfig(weighting=weighting))
    h, seen = 1e-2, {}  # float32 losses: a smaller step drowns the difference in rounding

    @register_strategy("per-group-fd")
    def probe(problem):
        rng = random.Random(0)
        point = {n: rng.uniform(0.3, 1.2) for n in problem.parameter_names}
        seen["names"] = problem.parameter_names
        seen["grad"] = problem.value_and_grad(point)[1]
        seen["fd"] = {
            n: (problem.evaluate({**point, n: point[n] + h}) - problem.evaluate({**point, n: point[n] - h})) / (2 * h)
            for n in point
        }

    sets = {"math": layered["sampled"], "chat": tokenize_for_evaluation(layered["texts"], layered["tokenizer"])}
    try:
        config = SearchConfig(strategy="per-group-fd", granularity=granularity, metric="log_perplexity", lora_mode="adapter")
        merger.search(sets, config, show_progress=False)
    finally:
        search_module.SEARCH_STRATEGIES.pop("per-group-fd")
    groups = {n.split(":", 1)[1] for n in seen["names"]}
    expected = {("full", "layer"): 4, ("full", "module"): 8, ("lora-adapter", "layer"): 2, ("lora-adapter", "module"): 4}
    assert len(seen["names"]) == 2 * len(groups) and len(groups) == expected[path, granularity]  # groups the vectors change
    for name in seen["names"]:
        assert seen["grad"][name] == pytest.approx(seen["fd"][name], rel=2e-2, abs=5e-4), name
    assert max(abs(v) for v in seen["grad"].values()) > 3e-3  # a real check, not zeros against zeros


def test_holdout_and_early_stopping_are_recorded(layered):
    """(e) every step records its fit and held-out objective; the best held-out step wins; a fit that starts at the
    optimum with a large step gets worse on the held-out data and stops after `early_stopping_patience` steps."""
    merger = DEMMerger.from_pretrained(layered["base"], vectors=[layered["vector"]])
    config = SearchConfig(
        strategy="gradient", granularity="layer", metric="log_perplexity", gradient_steps=8, gradient_lr=0.05,
        holdout_fraction=0.25, gradient_batch_sequences=16, initial_coefficients={"math": 0.7},
    )
    result = merger.search({"math": layered["sampled"]}, config, show_progress=False)
    steps = result.candidates
    assert all(c.fit_objective is not None and c.holdout_objective is not None for c in steps)
    assert all(c.objective == c.holdout_objective for c in steps)
    assert result.best.holdout_objective == min(c.holdout_objective for c in steps)
    assert result.best_coefficients == result.best.coefficients
    assert steps[0].coefficients["math"] == {g: 0.7 for g in LAYER_OPTIMUM}
    # compute: a gradient on 16 of the 120 fit sequences (3 × its share of the tokens) + the 40 held-out ones (1 ×)
    share = lambda n: n * 25 / (160 * 25)  # noqa: E731 -- every sampled sequence has 25 tokens, 24 scored
    assert result.compute == pytest.approx(len(steps) * (3 * share(16) + share(40)), rel=1e-6)
    table = result.table()
    assert "fit" in table and "held-out" in table and "mean:math" in table

    overfit = SearchConfig(
        strategy="gradient", granularity="layer", metric="log_perplexity", gradient_steps=10, gradient_lr=0.6,
        holdout_fraction=0.25, early_stopping_patience=1, initial_coefficients={"math": LAYER_OPTIMUM},
    )
    stopped = merger.search({"math": layered["sampled"]}, overfit, show_progress=False)
    assert len(stopped.candidates) == 2
    assert stopped.best is stopped.candidates[0]
    assert stopped.candidates[1].holdout_objective > stopped.candidates[0].holdout_objective


def test_the_holdout_split_is_by_sequence_seeded_and_disjoint(layered):
    fit, held = split_holdout({"math": layered["sampled"]}, 0.25, seed=3)
    again, _ = split_holdout({"math": layered["sampled"]}, 0.25, seed=3)
    assert len(held["math"]) == 40 and len(fit["math"]) == 120
    assert not set(fit["math"].example_indices) & set(held["math"].example_indices)
    assert fit["math"].example_indices == again["math"].example_indices
    assert split_holdout({"math": layered["sampled"]}, 0.0, seed=3)[1] == {}


def test_a_per_group_search_result_merges_and_saves(tmp_path, layered):
    merger = DEMMerger.from_pretrained(layered["base"], vectors=[layered["vector"]])
    config = SearchConfig(strategy="gradient", granularity="module", gradient_steps=3, holdout_fraction=0.25)
    result = merger.search({"math": layered["sampled"]}, config, show_progress=False)
    in_memory = untied_state_dict(merger.merge())
    merger.save_pretrained(tmp_path / "dem")
    restored = DEMMerger.from_pretrained(tmp_path / "dem")
    assert restored.config.coefficients == result.best_coefficients
    assert restored.config.search_result["granularity"] == "module"
    on_disk = saved_weights(tmp_path / "dem")
    for name, tensor in in_memory.items():
        assert torch.equal(on_disk[name], tensor), name
    card = (tmp_path / "dem" / "README.md").read_text()
    assert "Per-group coefficients" in card and "`layer.1.mlp`" in card
    assert "coefficients_heatmap.png" in card and (tmp_path / "dem" / "coefficients_heatmap.png").is_file()


def test_a_per_group_search_plots_its_steps(tmp_path, layered):
    from dem_hf.search.plots import plot_search

    merger = DEMMerger.from_pretrained(layered["base"], vectors=[layered["vector"]])
    config = SearchConfig(strategy="gradient", granularity="layer", gradient_steps=3, gradient_batch_sequences=8)
    result = merger.search({"math": layered["sampled"]}, config, show_progress=False)
    plot_search(merger.config.search_result, tmp_path / "steps.png")
    assert (tmp_path / "steps.png").stat().st_size > 0
    assert len(result.candidates) <= 3


def test_a_vector_search_after_a_per_group_one_starts_at_the_group_means(layered):
    merger = DEMMerger.from_pretrained(layered["base"], vectors=[layered["vector"]])
    merger.merge({"math": {"layer.0": 0.4, "layer.1": 0.8}})  # recorded: 0.4, 0.8 and 1.0 for embeddings and head by "*"
    result = merger.search({"math": layered["sampled"]}, SearchConfig(strategy="gradient", gradient_steps=1), show_progress=False)
    assert result.candidates[0].coefficients == {"math": pytest.approx(0.6)}


def test_without_matplotlib_the_card_keeps_the_table_and_says_how_to_get_the_heat_map(tmp_path, base_dir, vector_dirs, monkeypatch):
    monkeypatch.setattr("dem_hf.merging.card.context.has_matplotlib", lambda: False)
    monkeypatch.setattr("dem_hf.merging.card.heatmap.has_matplotlib", lambda: False)
    merger = DEMMerger.from_pretrained(base_dir, vectors=[vector_dirs["math"]])
    merger.save_pretrained(tmp_path / "dem", {"math": {"layer.0": 0.25, "*": 0.5}})
    card = (tmp_path / "dem" / "README.md").read_text()
    assert "| `layer.0` | 0.25 |" in card and "| other groups (`*`) | 0.5 |" in card
    assert 'pip install "dem_hf[plot]"' in card and "coefficients_heatmap.png" not in card
    assert not (tmp_path / "dem" / "coefficients_heatmap.png").exists()
    plain = tmp_path / "plain"
    merger.save_pretrained(plain, {"math": 0.5})
    assert "Per-group coefficients" not in (plain / "README.md").read_text()


def test_per_group_coefficients_on_a_bound_get_one_warning_per_vector():
    from dem_hf.search.run import warn_about_bounds

    messages = warn_about_bounds(
        {"math": {"layer.0": 0.0, "layer.1": 1.0, "head": 2.0}, "chat": {"layer.0": 0.5}}, {"math": (0, 2), "chat": (0, 2)}
    )
    assert len(messages) == 1 and "'math'" in messages[0] and "['head', 'layer.0']" in messages[0]

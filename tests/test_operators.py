"""Interference-aware merge operators (issue 16 item 2): each operator against a hand computation and against
`peft.utils.merge_utils` (mergekit's definition for breadcrumbs), NumPy against torch bit for bit, DARE's draws
independent of block sizes and threads, and whole merges through `save_pretrained` and `merge()`."""

from __future__ import annotations

import json
from contextlib import nullcontext

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.utils import merge_utils
from transformers import AutoModelForCausalLM

import dem_hf.merging.arithmetic
from dem_hf import DEMConfig, DEMMerger, DistributionVector
from dem_hf.io.tensors import untied_state_dict
from dem_hf.merging.card.render import build_model_card
from dem_hf.merging.operators import (
    MERGE_METHODS,
    MergeOperator,
    dare_keep_mask,
    largest_mask,
    largest_mask_torch,
)

from .conftest import make_llama

F32 = np.float32
SPARSE_METHODS = [m for m in MERGE_METHODS if m != "task_arithmetic"]
PARAMETERS = {
    "task_arithmetic": {},
    "ties": {"density": 0.3},
    "dare_linear": {"density": 0.6, "seed": 3},
    "dare_ties": {"density": 0.6, "seed": 3},
    "breadcrumbs": {"density": 0.5, "gamma": 0.1},
}


def arrays(*rows) -> list[np.ndarray]:
    return [np.array(row, dtype=F32) for row in rows]


def masks(*rows) -> list[np.ndarray]:
    return [np.array(row, dtype=bool) for row in rows]


def both_engines(op: MergeOperator, deltas, weights, keep=None) -> np.ndarray:
    """op on NumPy and on torch, asserted bitwise equal; returns the NumPy result."""
    result = op.combine(deltas, weights, keep)
    torch_keep = None if keep is None else [torch.from_numpy(m) for m in keep]
    other = op.combine_torch([torch.from_numpy(d) for d in deltas], weights, torch_keep).numpy()
    assert result.dtype == other.dtype == F32
    np.testing.assert_array_equal(result.view(np.uint32), other.view(np.uint32))
    return result


# ----------------------------------------------------------------------------------------- hand computations


def test_task_arithmetic_is_the_weighted_sum():
    result = both_engines(MergeOperator(), arrays([1, 2], [4, -2]), [0.5, 2.0])
    np.testing.assert_array_equal(result, arrays([8.5, -3])[0])


def test_ties_by_hand():
    """density 0.5 keeps 2 of 4 per vector (equal magnitudes: the first in position); signs elected on the unweighted
    trimmed sum (0 counts as +); the disjoint mean divides by the number of agreeing vectors."""
    deltas = arrays([3, -1, 0.5, -4], [-2, 2, 1, 1], [1, -3, -0.25, 2])
    # trimmed: [3, 0, 0, -4], [-2, 2, 0, 0], [0, -3, 0, 2]; sum [1, -1, 0, -2]: signs + - + -
    # agreeing: vector 0 at 0 and 3, vector 2 at 1; nothing at 2
    result = both_engines(MergeOperator("ties", density=0.5), deltas, [1.0, 2.0, 0.5])
    np.testing.assert_array_equal(result, arrays([3, -1.5, 0, -4])[0])


def test_dare_linear_by_hand():
    keep = masks([1, 0, 1, 0], [0, 0, 1, 1])
    result = both_engines(MergeOperator("dare_linear", density=0.5), arrays([1, 2, 3, 4], [10, 20, 30, 40]), [1.0, 0.5], keep)
    # survivors doubled: [2, 0, 6, 0] and [0, 0, 60, 80]; weighted sum
    np.testing.assert_array_equal(result, arrays([2, 0, 36, 40])[0])


def test_dare_ties_by_hand():
    keep = masks([1, 1, 1, 0], [1, 0, 1, 1])
    result = both_engines(MergeOperator("dare_ties", density=0.5), arrays([1, -2, 3, -4], [-3, 1, 1, 4]), [1.0, 0.5], keep)
    # rescaled: [2, -4, 6, 0] and [-6, 0, 2, 8]; sum [-4, -4, 8, 8]: signs - - + +
    # agreeing: [-, 1, 1, -] and [1, -, 1, 1]: [-6·0.5, -4, (6 + 2·0.5)/2, 8·0.5]
    np.testing.assert_array_equal(result, arrays([-3, -4, 3.5, 4])[0])


def test_breadcrumbs_by_hand():
    """density 0.5, gamma 0.2 of 10 entries: the 2 largest magnitudes go, the next 5 stay, the 3 smallest go."""
    delta = arrays([0.1, -0.9, 0.5, 0.3, -0.7, 1.0, -0.2, 0.6, 0.4, -0.8])
    result = both_engines(MergeOperator("breadcrumbs", density=0.5, gamma=0.2), delta, [2.0])
    expected = delta[0] * F32(2) * np.array([0, 0, 1, 0, 1, 0, 0, 1, 1, 1], dtype=F32)
    np.testing.assert_array_equal(result, expected)


def test_zero_weight_vectors_take_no_part_in_a_merge(tmp_path, base_dir, finetuned_dirs):
    """ω = 0 means "absent" for every operator (no vote in the sign election, no count in the mean)."""
    vectors = [DistributionVector.from_models(base_dir, path, name=name) for name, path in finetuned_dirs.items()]
    config = DEMConfig(merge_method="ties", density=0.4)
    with_zero = DEMMerger.from_pretrained(base_dir, vectors=vectors, config=config).merge({"math": 0.7, "chat": 1.2, "code": 0.0})
    without = DEMMerger.from_pretrained(base_dir, vectors=vectors[:2], config=DEMConfig(merge_method="ties", density=0.4))
    assert_same_models(with_zero, without.merge({"math": 0.7, "chat": 1.2}))


# ----------------------------------------------------------------------------------------- against PEFT and mergekit


def random_deltas(count: int = 3, shape=(24, 10), seed: int = 0) -> list[np.ndarray]:
    generator = np.random.default_rng(seed)
    return [generator.standard_normal(shape).astype(F32) for _ in range(count)]


@pytest.mark.parametrize("density", [0.1, 0.37, 1.0])
def test_ties_equals_peft(density):
    deltas, weights = random_deltas(), [0.7, 1.3, 0.4]
    ours = both_engines(MergeOperator("ties", density=density), deltas, weights)
    with pytest.warns(UserWarning) if density >= 1 else nullcontext():
        peft = merge_utils.ties([torch.from_numpy(d) for d in deltas], torch.tensor(weights), density)
    torch.testing.assert_close(torch.from_numpy(ours), peft, rtol=1e-6, atol=1e-7)


def test_task_arithmetic_equals_peft():
    deltas, weights = random_deltas(), [0.7, -1.3, 0.4]
    ours = both_engines(MergeOperator(), deltas, weights)
    peft = merge_utils.task_arithmetic([torch.from_numpy(d) for d in deltas], torch.tensor(weights))
    torch.testing.assert_close(torch.from_numpy(ours), peft, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_equals_peft_given_the_same_draws(method, monkeypatch):
    """PEFT draws its masks with `torch.bernoulli`; handed our masks instead, its dare_linear/dare_ties agree."""
    deltas, weights = random_deltas(), [0.7, 1.3, 0.4]
    op = MergeOperator(method, density=0.4, seed=11)
    keep = op.keep_masks("layer.weight", ["a", "b", "c"], 0, deltas[0].shape)
    handed = iter(torch.from_numpy(m).float() for m in keep)
    monkeypatch.setattr(merge_utils.torch, "bernoulli", lambda probabilities: next(handed))
    peft = getattr(merge_utils, method)([torch.from_numpy(d) for d in deltas], torch.tensor(weights), 0.4)
    ours = both_engines(op, deltas, weights, keep)
    torch.testing.assert_close(torch.from_numpy(ours), peft, rtol=1e-6, atol=1e-7)


def mergekit_breadcrumbs(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """mergekit's `magnitude_outliers` definition: sort |τ| ascending, keep ranks n_bot .. numel − n_top."""
    n = delta.numel()
    n_top, n_bot = int(gamma * n), n - int(density * n) - int(gamma * n)
    order = torch.sort(delta.abs().reshape(-1), stable=True).indices
    mask = torch.zeros(n)
    mask[order[n_bot : n - n_top]] = 1
    return delta * mask.reshape(delta.shape)


@pytest.mark.parametrize(("density", "gamma"), [(0.5, 0.01), (0.2, 0.3), (0.9, 0.1), (1.0, 0.0)])
def test_breadcrumbs_equals_mergekit_definition(density, gamma):
    deltas, weights = random_deltas(), [0.7, 1.3, 0.4]
    ours = both_engines(MergeOperator("breadcrumbs", density=density, gamma=gamma), deltas, weights)
    expected = sum(mergekit_breadcrumbs(torch.from_numpy(d), density, gamma) * w for d, w in zip(deltas, weights))
    torch.testing.assert_close(torch.from_numpy(ours), expected, rtol=1e-6, atol=1e-7)


def test_dare_at_density_one_is_task_arithmetic():
    deltas, weights = random_deltas(), [0.7, 1.3, 0.4]
    op = MergeOperator("dare_linear", density=1.0)
    keep = op.keep_masks("t", ["a", "b", "c"], 0, deltas[0].shape)
    np.testing.assert_array_equal(op.combine(deltas, weights, keep), MergeOperator().combine(deltas, weights))


# ----------------------------------------------------------------------------------------- selection and randomness


def test_largest_mask_breaks_ties_by_position_in_both_engines():
    values = np.array([[1, -3, 3, 2], [3, 0, -1, 3]], dtype=F32)
    for k, expected in [(0, []), (1, [1]), (3, [1, 2, 4]), (5, [1, 2, 3, 4, 7]), (8, list(range(8)))]:
        mask = largest_mask(values, k)
        assert np.flatnonzero(mask).tolist() == expected
        assert torch.equal(largest_mask_torch(torch.from_numpy(values), k), torch.from_numpy(mask))


def test_many_equal_magnitudes_select_the_same_entries_in_numpy_and_torch():
    generator = np.random.default_rng(5)
    deltas = [(generator.integers(-3, 4, (40, 7)) * 0.25).astype(F32) for _ in range(3)]
    for method in ("ties", "breadcrumbs"):
        params = {k: v for k, v in PARAMETERS[method].items()}
        both_engines(MergeOperator(method, **params), deltas, [0.5, 1.0, 2.0])


def test_dare_draws_do_not_depend_on_blocks_and_follow_the_seed():
    whole = dare_keep_mask(7, "model.layers.0.mlp.up_proj.weight", "math", 0, 10_000, 0.3)
    pieces = [dare_keep_mask(7, "model.layers.0.mlp.up_proj.weight", "math", start, stop - start, 0.3)
              for start, stop in [(0, 1), (1, 999), (999, 5000), (5000, 10_000)]]
    np.testing.assert_array_equal(np.concatenate(pieces), whole)
    np.testing.assert_array_equal(dare_keep_mask(7, "model.layers.0.mlp.up_proj.weight", "math", 0, 10_000, 0.3), whole)
    for other in [dare_keep_mask(8, "model.layers.0.mlp.up_proj.weight", "math", 0, 10_000, 0.3),
                  dare_keep_mask(7, "model.layers.1.mlp.up_proj.weight", "math", 0, 10_000, 0.3),
                  dare_keep_mask(7, "model.layers.0.mlp.up_proj.weight", "chat", 0, 10_000, 0.3)]:
        assert (other != whole).mean() > 0.3
    assert abs(whole.mean() - 0.3) < 0.02  # kept with probability density


# ----------------------------------------------------------------------------------------- whole merges


def lora_vector(name: str, seed: int) -> DistributionVector:
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], init_lora_weights=False)
    return DistributionVector.from_peft(get_peft_model(make_llama(), config), name=name)


def assert_same_models(a, b) -> None:
    state_a, state_b = untied_state_dict(a), untied_state_dict(b)
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), name


def oracle(method: str, params: dict, deltas: list[torch.Tensor], weights: list[float], tensor: str, names: list[str]) -> torch.Tensor:
    """The change to one tensor by PEFT's merge_utils (DARE handed our draws), or mergekit's breadcrumbs definition."""
    if method == "breadcrumbs":
        return sum(mergekit_breadcrumbs(d, params["density"], params["gamma"]) * w for d, w in zip(deltas, weights))
    if method == "task_arithmetic":
        return merge_utils.task_arithmetic(deltas, torch.tensor(weights))
    if method == "ties":
        return merge_utils.ties(deltas, torch.tensor(weights), params["density"])
    keep = MergeOperator(method, **params).keep_masks(tensor, names, 0, tuple(deltas[0].shape))
    handed = iter(torch.from_numpy(m).float() for m in keep)
    original = merge_utils.torch.bernoulli
    merge_utils.torch.bernoulli = lambda probabilities: next(handed)
    try:
        return getattr(merge_utils, method)(deltas, torch.tensor(weights), params["density"])
    finally:
        merge_utils.torch.bernoulli = original


@pytest.mark.parametrize("method", MERGE_METHODS)
def test_saved_merge_loads_and_equals_the_oracle_per_tensor(method, tmp_path, base_dir, finetuned_dirs, monkeypatch):
    """Full and LoRA vectors, through save_pretrained with 1 and 3 threads and small or large row blocks (the same
    bytes), loaded with AutoModelForCausalLM: every tensor is base + the oracle's change; merge() is bitwise the same."""
    vectors = [DistributionVector.from_models(base_dir, finetuned_dirs[n], name=n) for n in ("math", "chat")]
    vectors.append(lora_vector("lora", 4))
    weights = {"math": 0.6, "chat": -0.8, "lora": 1.5}
    config = DEMConfig(merge_method=method, **PARAMETERS[method])
    params = {k: getattr(config, k) for k in ("density", "gamma", "seed") if getattr(config, k) is not None}
    outputs, base = {}, untied_state_dict(AutoModelForCausalLM.from_pretrained(base_dir))
    for workers, block_values in [(1, 1 << 18), (3, 1 << 18), (3, 100)]:
        monkeypatch.setattr(dem_hf.merging.arithmetic, "MERGE_WORKERS", workers)
        monkeypatch.setattr(dem_hf.merging.arithmetic, "MERGE_BLOCK_VALUES", block_values)
        merger = DEMMerger.from_pretrained(base_dir, vectors=vectors, config=DEMConfig(**config.to_dict()))
        out = merger.save_pretrained(tmp_path / f"out-{workers}-{block_values}", weights)
        outputs[workers, block_values] = {p.name: p.read_bytes() for p in sorted(out.glob("model*"))}
        loaded = AutoModelForCausalLM.from_pretrained(out)
        assert_same_models(loaded, merger.merge(weights))
        check_against_oracle(method, params, base, untied_state_dict(loaded), vectors, weights)
    assert outputs[1, 1 << 18] == outputs[3, 1 << 18]
    saved = json.loads((out / "dem_config.json").read_text())
    assert {k: saved[k] for k in ("merge_method", "density", "gamma", "seed")} == {
        k: getattr(config, k) for k in ("merge_method", "density", "gamma", "seed")
    }
    restored = DEMMerger.from_pretrained(out)
    assert restored.config.merge_operator == config.merge_operator
    assert_same_models(restored.merge(), loaded)


def check_against_oracle(method, params, base, merged, vectors, weights) -> None:
    changed = 0
    for name, tensor in base.items():
        terms = [(v, weights[v.name]) for v in vectors if v.changes(name)]
        if not terms:
            assert torch.equal(merged[name], tensor), name
            continue
        change = oracle(method, params, [v.delta(name) for v, _ in terms], [w for _, w in terms], name, [v.name for v, _ in terms])
        torch.testing.assert_close(merged[name], tensor + change, rtol=1e-6, atol=1e-6, msg=name)
        changed += 1
    assert changed == len(base)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_merge_bytes_do_not_depend_on_block_size_or_threads(method, tmp_path, base_dir, finetuned_dirs, monkeypatch):
    vectors = [DistributionVector.from_models(base_dir, p, name=n) for n, p in finetuned_dirs.items()]
    outputs = {}
    for workers, block_values in [(1, 1 << 18), (3, 100), (2, 37)]:
        monkeypatch.setattr(dem_hf.merging.arithmetic, "MERGE_WORKERS", workers)
        monkeypatch.setattr(dem_hf.merging.arithmetic, "MERGE_BLOCK_VALUES", block_values)
        merger = DEMMerger.from_pretrained(base_dir, vectors=vectors, config=DEMConfig(merge_method=method, density=0.3, seed=9))
        out = merger.save_pretrained(tmp_path / f"out-{workers}-{block_values}", {"math": 0.5, "chat": 1.0, "code": 0.75})
        outputs[workers, block_values] = {p.name: p.read_bytes() for p in sorted(out.glob("model*"))}
    assert outputs[1, 1 << 18] == outputs[3, 100] == outputs[2, 37]


def test_sparse_merge_changes_the_model_and_the_seed_matters(base_dir, finetuned_dirs):
    vectors = [DistributionVector.from_models(base_dir, p, name=n) for n, p in finetuned_dirs.items()]
    models = {
        seed: untied_state_dict(
            DEMMerger.from_pretrained(base_dir, vectors=vectors, config=DEMConfig(merge_method="dare_ties", density=0.5, seed=seed)).merge()
        )
        for seed in (0, 1)
    }
    plain = untied_state_dict(DEMMerger.from_pretrained(base_dir, vectors=vectors).merge())
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(models[0][name], models[1][name])
    assert not torch.equal(models[0][name], plain[name])


def test_task_arithmetic_keeps_todays_code_path(base_dir, finetuned_dirs, monkeypatch):
    """The default merge never enters the operator code, and naming task_arithmetic changes nothing."""
    monkeypatch.setattr(dem_hf.merging.arithmetic, "operator_blocks", lambda *a, **k: pytest.fail("operator path"))
    vectors = [DistributionVector.from_models(base_dir, p, name=n) for n, p in finetuned_dirs.items()]
    default = DEMMerger.from_pretrained(base_dir, vectors=vectors).merge({"math": 0.5, "chat": 0.25, "code": -1.0})
    named = DEMMerger.from_pretrained(base_dir, vectors=vectors, config=DEMConfig(merge_method="task_arithmetic"))
    assert_same_models(default, named.merge({"math": 0.5, "chat": 0.25, "code": -1.0}))


def test_dare_linear_at_density_one_reproduces_task_arithmetic_bitwise(base_dir, finetuned_dirs):
    vectors = [DistributionVector.from_models(base_dir, p, name=n) for n, p in finetuned_dirs.items()]
    weights = {"math": 0.5, "chat": 0.3, "code": -1.0}
    plain = DEMMerger.from_pretrained(base_dir, vectors=vectors).merge(weights)
    dare = DEMMerger.from_pretrained(base_dir, vectors=vectors, config=DEMConfig(merge_method="dare_linear", density=1.0))
    assert_same_models(plain, dare.merge(weights))


# ----------------------------------------------------------------------------------------- config and card


def test_old_configs_load_as_task_arithmetic(tmp_path):
    DEMConfig().save_pretrained(tmp_path)
    values = json.loads((tmp_path / "dem_config.json").read_text())
    for key in ("merge_method", "density", "gamma", "seed"):
        values.pop(key)
    (tmp_path / "dem_config.json").write_text(json.dumps(values))
    config = DEMConfig.from_pretrained(tmp_path)
    assert config.merge_method == "task_arithmetic" and config.merge_operator == MergeOperator()


def test_defaults_are_filled_in_and_saved(tmp_path):
    assert DEMConfig(merge_method="breadcrumbs", density=0.5).gamma == 0.01
    assert DEMConfig(merge_method="dare_ties", density=0.5).seed == 0
    DEMConfig(merge_method="breadcrumbs", density=0.5).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "dem_config.json").read_text())["gamma"] == 0.01


@pytest.mark.parametrize("method", MERGE_METHODS)
def test_card_names_the_method_and_its_parameters(method, base_dir, finetuned_dirs):
    vectors = [DistributionVector.from_models(base_dir, finetuned_dirs["math"], name="math")]
    merger = DEMMerger.from_pretrained(base_dir, vectors=vectors, config=DEMConfig(merge_method=method, **PARAMETERS[method]))
    card = build_model_card(merger).text
    line = next(line for line in card.splitlines() if line.startswith("Merge method:"))
    assert f"`{merger.config.merge_operator.describe()}`" in line
    for key, value in PARAMETERS[method].items():
        assert f"{key} {value:g}" in line


# ----------------------------------------------------------------------------------------- search


def validation_texts(seed: int, count: int = 8) -> list[str]:
    generator = np.random.default_rng(seed)
    return [" ".join(f"w{i}" for i in generator.integers(0, 60, generator.integers(4, 16))) for _ in range(count)]


def switching_world(method, base_dir, finetuned_dirs):
    """Two full vectors and a LoRA one under `method`: the vectors, the config, the merger, a base model to switch in
    place and a copy of its weights."""
    vectors = [DistributionVector.from_models(base_dir, finetuned_dirs[n], name=n) for n in ("math", "chat")]
    vectors.append(lora_vector("lora", 4))
    config = DEMConfig(merge_method=method, **PARAMETERS[method])
    merger = DEMMerger.from_pretrained(base_dir, vectors=vectors, config=config)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    return vectors, config, merger, model, {n: t.clone() for n, t in untied_state_dict(model).items()}


@pytest.mark.parametrize("method", SPARSE_METHODS)
def test_candidate_switching_equals_the_merge_and_restores_the_base(method, base_dir, finetuned_dirs, monkeypatch):
    """Any sequence of candidates and densities lands on what merge() gives for the last one; restore is exact."""
    import dem_hf.search.candidates
    from dem_hf.search.operator_candidates import OperatorCandidateModel

    monkeypatch.setattr(dem_hf.search.candidates, "RESYNC_EVERY", 3)
    vectors, config, merger, model, base = switching_world(method, base_dir, finetuned_dirs)
    steps = [([0.5, 1.0, 0.0], None), ([0.5, -0.7, 1.2], None), ([0.0, -0.7, 1.2], 0.8), ([1.5, 0.2, 0.3], 0.8), ([1.5, 0.2, 0.9], 0.35)]
    with OperatorCandidateModel(model, merger.base, vectors, config.merge_operator) as switcher:
        for weights, density in steps:
            if density is not None:
                switcher.set_density(density)
                merger.config.density = density
            switcher.set_weights(weights)
            expected = untied_state_dict(merger.merge(dict(zip(["math", "chat", "lora"], weights))))
            for name, tensor in untied_state_dict(model).items():
                torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-6, msg=name)
    for name, tensor in untied_state_dict(model).items():
        assert torch.equal(tensor, base[name]), name


@pytest.mark.parametrize(("method", "strategy"), [("dare_linear", "grid"), ("ties", "bayesian"), ("breadcrumbs", "random")])
def test_density_search_records_and_applies_the_best_density(method, strategy, base_dir, finetuned_dirs):
    from dem_hf import SearchConfig
    from dem_hf.evaluation.perplexity import compute_perplexities

    vectors = [DistributionVector.from_models(base_dir, finetuned_dirs[n], name=n) for n in ("math", "chat")]
    merger = DEMMerger.from_pretrained(base_dir, vectors=vectors, config=DEMConfig(merge_method=method, **PARAMETERS[method]))
    eval_sets = {"math": validation_texts(1), "chat": validation_texts(2)}
    search = SearchConfig(strategy=strategy, grid_points=2, n_trials=5, bounds=(0.0, 1.5), search_density=True,
                          density_bounds=(0.2, 0.9))
    result = merger.search(eval_sets, search, show_progress=False)
    densities = {c.density for c in result.candidates}
    assert len(densities) > 1 and all(0.2 <= d <= 0.9 for d in densities)
    if strategy == "grid":
        assert densities == {0.2, 0.9} and len(result.candidates) == 8
    assert merger.config.density == result.best_density == result.best.density
    from dem_hf.evaluation.perplexity import tokenize_for_evaluation

    sets = {n: tokenize_for_evaluation(texts, merger_tokenizer(base_dir)) for n, texts in eval_sets.items()}
    merged = compute_perplexities(merger.merge(), sets, show_progress=False)
    mean = sum(r.perplexity for r in merged.values()) / len(merged)
    assert mean == pytest.approx(result.best_objective, rel=1e-4)


def merger_tokenizer(base_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_dir)


def test_gradient_of_a_linear_operator_matches_finite_differences(base_dir, finetuned_dirs):
    """dare_linear with fixed draws is linear in ω: ∂L/∂ω_i = ⟨∇θ L, sparsified Δ_i⟩, against central differences."""
    from dem_hf.evaluation.perplexity import compute_perplexities, tokenize_for_evaluation
    from dem_hf.search.operator_candidates import OperatorCandidateModel

    vectors = [DistributionVector.from_models(base_dir, finetuned_dirs[n], name=n) for n in ("math", "chat")]
    operator = MergeOperator("dare_linear", density=0.5, seed=2)
    sets = {"math": tokenize_for_evaluation(validation_texts(3), merger_tokenizer(base_dir))}
    merger = DEMMerger.from_pretrained(base_dir, vectors=vectors)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    weights, step = [0.8, 0.4], 0.05
    with OperatorCandidateModel(model, merger.base, vectors, operator) as switcher:
        switcher.set_weights(weights)
        _, gradients = switcher.loss_gradients(sets, batch_size=4)
        for i in range(2):
            losses = []
            for sign in (1, -1):
                moved = list(weights)
                moved[i] += sign * step
                switcher.set_weights(moved)
                losses.append(compute_perplexities(model, sets, show_progress=False)["math"].loss)
            one_group = gradients["math"][i][0]  # granularity "vector": one group, the whole vector
            assert one_group == pytest.approx((losses[0] - losses[1]) / (2 * step), rel=2e-2, abs=1e-4)


@pytest.mark.parametrize("method", SPARSE_METHODS)
def test_per_layer_switching_with_an_operator_equals_the_merge(method, base_dir, finetuned_dirs, monkeypatch):
    """Per-group weights through an operator: each tensor takes its group's weights, as the streaming merge does."""
    import dem_hf.search.candidates
    from dem_hf.search.operator_candidates import OperatorCandidateModel

    monkeypatch.setattr(dem_hf.search.candidates, "RESYNC_EVERY", 2)
    vectors, config, merger, model, base = switching_world(method, base_dir, finetuned_dirs)
    with OperatorCandidateModel(model, merger.base, vectors, config.merge_operator, granularity="layer") as switcher:
        groups = switcher.groups
        assert len(groups) > 1
        generator = np.random.default_rng(0)
        for _ in range(3):
            matrix = generator.uniform(-0.5, 1.5, size=(len(vectors), len(groups))).round(3).tolist()
            matrix[1][0] = 0.0  # a vector left out of one group only
            switcher.set_weights(matrix)
            coefficients = {v.name: dict(zip(groups, row)) for v, row in zip(vectors, matrix)}
            expected = untied_state_dict(merger.merge(coefficients))
            for name, tensor in untied_state_dict(model).items():
                torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-6, msg=name)
    for name, tensor in untied_state_dict(model).items():
        assert torch.equal(tensor, base[name]), name


def central_difference(switcher, model, sets, weights, i: int, g: int, step: float) -> float:
    """(L(ω + step·e_{i,g}) − L(ω − step·e_{i,g})) / (2·step) on the "math" set, switching the model in place."""
    from dem_hf.evaluation.perplexity import compute_perplexities

    losses = []
    for sign in (1, -1):
        moved = [list(row) for row in weights]
        moved[i][g] += sign * step
        switcher.set_weights(moved)
        losses.append(compute_perplexities(model, sets, show_progress=False)["math"].loss)
    return (losses[0] - losses[1]) / (2 * step)


def test_per_layer_gradient_of_a_linear_operator_matches_finite_differences(base_dir, finetuned_dirs):
    """dare_linear per layer: ∂L/∂ω_{i,g} = Σ_{θ∈g} ⟨∇θ L, sparsified Δ_i⟩, against central differences per group."""
    from dem_hf.evaluation.perplexity import tokenize_for_evaluation
    from dem_hf.search.operator_candidates import OperatorCandidateModel

    vectors = [DistributionVector.from_models(base_dir, finetuned_dirs[n], name=n) for n in ("math", "chat")]
    operator = MergeOperator("dare_linear", density=0.5, seed=2)
    sets = {"math": tokenize_for_evaluation(validation_texts(3), merger_tokenizer(base_dir))}
    merger = DEMMerger.from_pretrained(base_dir, vectors=vectors)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    step = 0.05
    with OperatorCandidateModel(model, merger.base, vectors, operator, granularity="layer") as switcher:
        weights = [[0.8 - 0.1 * g for g in range(len(switcher.groups))], [0.4] * len(switcher.groups)]
        switcher.set_weights(weights)
        _, gradients = switcher.loss_gradients(sets, batch_size=4)
        for i in range(2):
            for g in range(len(switcher.groups)):
                slope = central_difference(switcher, model, sets, weights, i, g, step)
                assert gradients["math"][i][g] == pytest.approx(slope, rel=3e-2, abs=1e-4)


@pytest.mark.parametrize(("method", "strategy"), [("dare_linear", "gradient"), ("breadcrumbs", "gradient"), ("ties", "random"),
                                                ("ties", "gradient"), ("dare_ties", "gradient")])
def test_a_per_layer_search_with_an_operator_merges_to_its_best_objective(method, strategy, base_dir, finetuned_dirs):
    from dem_hf import SearchConfig
    from dem_hf.evaluation.perplexity import compute_perplexities, tokenize_for_evaluation

    vectors = [DistributionVector.from_models(base_dir, finetuned_dirs[n], name=n) for n in ("math", "chat")]
    merger = DEMMerger.from_pretrained(base_dir, vectors=vectors, config=DEMConfig(merge_method=method, **PARAMETERS[method]))
    eval_sets = {"math": validation_texts(1), "chat": validation_texts(2)}
    search = SearchConfig(strategy=strategy, granularity="layer", n_trials=4, gradient_steps=4, bounds=(0.0, 1.5),
                          holdout_fraction=0.0)
    result = merger.search(eval_sets, search, show_progress=False)
    assert result.granularity == "layer" and all(isinstance(c, dict) for c in result.best_coefficients.values())
    assert merger.config.coefficients == result.best_coefficients and merger.config.merge_method == method
    sets = {n: tokenize_for_evaluation(texts, merger_tokenizer(base_dir)) for n, texts in eval_sets.items()}
    merged = compute_perplexities(merger.merge(), sets, show_progress=False)
    mean = sum(r.perplexity for r in merged.values()) / len(merged)
    assert mean == pytest.approx(result.best_objective, rel=1e-4)


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_per_layer_gradient_of_a_sign_electing_operator_matches_finite_differences(method, base_dir, finetuned_dirs):
    """While every weight stays non-zero the election is fixed, so ties is linear in ω:
    ∂L/∂ω_{i,g} = Σ_{θ∈g} ⟨∇θ L, [sign_i agrees] Δ_i / #agreeing⟩, against central differences per group; a vector at
    weight 0 in a group (absent from that group's election) gets gradient 0 there."""
    from dem_hf.evaluation.perplexity import tokenize_for_evaluation
    from dem_hf.search.operator_candidates import OperatorCandidateModel

    vectors = [DistributionVector.from_models(base_dir, finetuned_dirs[n], name=n) for n in ("math", "chat")]
    operator = MergeOperator(method, density=0.5, seed=2 if method == "dare_ties" else None)
    sets = {"math": tokenize_for_evaluation(validation_texts(3), merger_tokenizer(base_dir))}
    merger = DEMMerger.from_pretrained(base_dir, vectors=vectors)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    step = 0.05
    with OperatorCandidateModel(model, merger.base, vectors, operator, granularity="layer") as switcher:
        groups = len(switcher.groups)
        weights = [[0.9 - 0.1 * g for g in range(groups)], [0.5] * (groups - 1) + [0.0]]
        switcher.set_weights(weights)
        _, gradients = switcher.loss_gradients(sets, batch_size=4)
        assert gradients["math"][1][groups - 1] == 0.0
        checked = 0
        for i in range(2):
            for g in range(groups):
                if weights[i][g] == 0.0:
                    continue
                slope = central_difference(switcher, model, sets, weights, i, g, step)
                assert gradients["math"][i][g] == pytest.approx(slope, rel=3e-2, abs=1e-4)
                checked += 1
        assert checked == 2 * groups - 1


def test_elected_directions_are_the_derivative_of_the_ties_merge():
    """Hand computation: merge_sparse_torch(ties) = Σ_i w_i · elected_directions_torch(...)[i] for fixed active vectors."""
    from dem_hf.merging.operators import elected_directions_torch, merge_sparse_torch

    deltas = [torch.tensor([1.0, -2.0, 0.0, 3.0]), torch.tensor([-1.0, -1.0, 2.0, 1.0]), torch.tensor([2.0, 1.0, -4.0, 0.0])]
    # elected sign of [2, -2, -2, 4]: +, -, -, +; agreeing: [v0, v2], [v0, v1], [v2], [v0, v1]
    expected = [torch.tensor([0.5, -1.0, 0.0, 1.5]), torch.tensor([0.0, -0.5, 0.0, 0.5]), torch.tensor([1.0, 0.0, -4.0, 0.0])]
    directions = elected_directions_torch(deltas)
    for got, want in zip(directions, expected):
        torch.testing.assert_close(got, want)
    weights = [0.7, 1.3, 0.2]
    merged = merge_sparse_torch(MergeOperator("ties", density=1.0), deltas, weights)
    torch.testing.assert_close(merged, sum(w * d for w, d in zip(weights, directions)))

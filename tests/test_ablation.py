"""Data-ablation simulation: proxy perplexity of parameter-averaged partition models, checked against merges
and hand-averaged state dicts; ranking, restoring the base, proxy validation with real training, partitions,
the CLI and bad input."""

from __future__ import annotations

import csv
import json
import math
import random

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from trl import SFTConfig

from dem_hf import (
    AblationResult,
    DEMMerger,
    DistributionVector,
    PartitionPool,
    evaluate_mixtures,
    split_partitions,
    validate_proxy,
)
from dem_hf.ablation import pool as ablation_module
from dem_hf.ablation.report import MixtureScore, pearson, rank_scores, spearman
from dem_hf.commands.cli import main
from dem_hf.evaluation.perplexity import compute_perplexities, tokenize_for_evaluation
from dem_hf.io.tensors import untied_state_dict

from .conftest import make_llama, make_tokenizer, perturbed, save_model

PARTITIONS = ["math", "chat", "code"]  # the names of conftest's `finetuned_dirs`, in pool order
RTOL = 1e-5  # in-place switching and a fresh merge differ by float32 rounding only


def random_texts(seed: int, count: int = 10) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(60)}" for _ in range(rng.randint(4, 16))) for _ in range(count)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A saved base, three stand-in partition models (kept in memory) and their full vectors."""
    tmp = tmp_path_factory.mktemp("ablation")
    tokenizer = make_tokenizer()
    base_model = make_llama(seed=0)
    base = save_model(base_model, tmp / "base", tokenizer)
    tuned = {name: perturbed(base_model, seed, scale=0.05) for seed, name in enumerate(PARTITIONS, start=1)}
    vectors = [DistributionVector.from_models(base, model, name=name) for name, model in tuned.items()]
    return dict(tmp=tmp, tokenizer=tokenizer, base=base, tuned=tuned, vectors=vectors)


@pytest.fixture(scope="module")
def pool(world) -> PartitionPool:
    return PartitionPool.from_vectors(world["base"], world["vectors"])


@pytest.fixture(scope="module")
def eval_sets(world) -> dict:
    """Two validation sets, tokenised once (raw datasets are covered by the CLI and validation tests)."""
    return {name: tokenize_for_evaluation(random_texts(seed), world["tokenizer"]) for seed, name in enumerate(["val_a", "val_b"])}


def model_from_state(state: dict[str, torch.Tensor]):
    model = make_llama(seed=0)
    model.load_state_dict(state, strict=False)  # tied lm_head follows the embeddings
    return model


def averaged_state(world, weights: dict[str, float]) -> dict[str, torch.Tensor]:
    states = {name: untied_state_dict(world["tuned"][name]) for name in weights}
    names = next(iter(states.values())).keys()
    return {n: sum(w * states[p][n] for p, w in weights.items()) for n in names}


def perplexities(model, eval_sets) -> dict[str, float]:
    return {n: r.perplexity for n, r in compute_perplexities(model, eval_sets, show_progress=False).items()}


def state_of(model) -> dict[str, torch.Tensor]:
    return {n: t.clone() for n, t in untied_state_dict(model).items()}


def assert_same_state(model, expected: dict[str, torch.Tensor]) -> None:
    for name, tensor in untied_state_dict(model).items():
        assert torch.equal(tensor, expected[name]), name


# ============================================================================================ acceptance 1-3


def test_single_partition_proxy_is_that_partition_models_perplexity(pool, world, eval_sets):
    result = evaluate_mixtures(pool, ["math", "code"], eval_sets, show_progress=False)
    for name in ("math", "code"):
        merged = DEMMerger.from_pretrained(world["base"], vectors=[v for v in world["vectors"] if v.name == name]).merge({name: 1.0})
        expected = perplexities(merged, eval_sets)
        assert result[name].weights == {name: 1.0}
        for set_name, value in expected.items():
            assert result[name].perplexities[set_name] == pytest.approx(value, rel=RTOL)
        # base + 1.0·Δ is the partition model itself
        assert result[name].perplexities == pytest.approx(perplexities(world["tuned"][name], eval_sets), rel=RTOL)


def test_single_lora_partition_proxy_is_that_adapter_merged(world, eval_sets):
    torch.manual_seed(5)
    peft_model = get_peft_model(make_llama(seed=0), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora = DistributionVector.from_peft(peft_model, name="lora")
    lora_pool = PartitionPool.from_vectors(world["base"], [world["vectors"][0], lora])
    result = evaluate_mixtures(lora_pool, ["lora"], eval_sets, show_progress=False)
    merged = DEMMerger.from_pretrained(world["base"], vectors=[lora]).merge({"lora": 1.0})
    assert result["lora"].perplexities == pytest.approx(perplexities(merged, eval_sets), rel=RTOL)


def test_uniform_average_is_the_mean_of_parameters(pool, world, eval_sets, monkeypatch):
    seen = {}
    real = ablation_module.compute_perplexities

    def capture(model, sets, **kwargs):
        seen["state"] = state_of(model)
        return real(model, sets, **kwargs)

    monkeypatch.setattr(ablation_module, "compute_perplexities", capture)
    result = evaluate_mixtures(pool, ["math,chat,code"], eval_sets, show_progress=False)
    mean = averaged_state(world, {name: 1 / 3 for name in PARTITIONS})
    for name, tensor in seen["state"].items():
        torch.testing.assert_close(tensor, mean[name], rtol=0, atol=1e-6)
    score = result["math+chat+code"]
    assert score.weights == pytest.approx({name: 1 / 3 for name in PARTITIONS})
    assert score.perplexities == pytest.approx(perplexities(model_from_state(mean), eval_sets), rel=RTOL)
    assert score.objective == pytest.approx(sum(score.perplexities.values()) / 2)  # default: mean perplexity


def test_weighted_candidates_are_honoured(pool, world, eval_sets):
    result = evaluate_mixtures(pool, {"weighted": {"math": 3, "chat": 1}, "uniform": "math,chat", "text": "math=0.75,chat=0.25"},
                               eval_sets, show_progress=False)
    weighted = result["weighted"]
    assert weighted.weights == {"math": 0.75, "chat": 0.25}
    expected = perplexities(model_from_state(averaged_state(world, {"math": 0.75, "chat": 0.25})), eval_sets)
    assert weighted.perplexities == pytest.approx(expected, rel=RTOL)
    assert result["text"].perplexities == weighted.perplexities  # same weights, written as text
    uniform = perplexities(model_from_state(averaged_state(world, {"math": 0.5, "chat": 0.5})), eval_sets)
    assert result["uniform"].perplexities == pytest.approx(uniform, rel=RTOL)
    assert all(abs(weighted.perplexities[s] - uniform[s]) > 1e3 * RTOL * uniform[s] for s in uniform)
    assert result.compute == 2  # the repeated mixture is evaluated once


# ============================================================================================ acceptance 4-5


def test_ranking_is_deterministic_and_ties_break_by_name(pool, eval_sets):
    candidates = {"z-first": "math", "a-second": {"math": 2.0}, "all": ["code", "chat", "math"], "pair": "chat,code"}
    first = evaluate_mixtures(pool, candidates, eval_sets, show_progress=False)
    second = evaluate_mixtures(pool, candidates, eval_sets, show_progress=False)
    assert first.table() == second.table() and first.rows() == second.rows()
    assert AblationResult.from_dict(json.loads(json.dumps(first.to_dict()))) == first
    # Another order switches the model along another path: the same ranking, values equal up to float32 rounding.
    reordered = evaluate_mixtures(pool, dict(reversed(list(candidates.items()))), eval_sets, show_progress=False)
    assert reordered.ranking == first.ranking
    assert [s.objective for s in reordered.scores] == pytest.approx([s.objective for s in first.scores], rel=RTOL)
    assert [s.rank for s in first.scores] == [1, 2, 3, 4]
    assert [s.objective for s in first.scores] == sorted(s.objective for s in first.scores)
    ranking = first.ranking
    assert first["a-second"].objective == first["z-first"].objective  # the same model: a tie
    assert ranking.index("a-second") == ranking.index("z-first") - 1
    scores = [MixtureScore(n, {}, {}, {}, o) for n, o in [("b", 2.0), ("c", math.nan), ("a", 2.0), ("d", 1.0)]]
    assert [(s.name, s.rank) for s in rank_scores(scores)] == [("d", 1), ("a", 2), ("b", 3), ("c", 4)]


def test_base_is_restored_exactly_after_evaluation_and_on_error(pool, world, eval_sets, monkeypatch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(world["base"])
    before = state_of(model)
    result = evaluate_mixtures(pool, ["math,chat", "code", "chat=0.2,code=0.8"], eval_sets, model=model, show_progress=False)
    assert len(result.scores) == 3
    assert_same_state(model, before)

    real, calls = ablation_module.compute_perplexities, []

    def fail_on_second(model, sets, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated failure mid-way")
        return real(model, sets, **kwargs)

    monkeypatch.setattr(ablation_module, "compute_perplexities", fail_on_second)
    with pytest.raises(RuntimeError, match="mid-way"):
        evaluate_mixtures(pool, ["math,chat", "code", "chat=0.2,code=0.8"], eval_sets, model=model, show_progress=False)
    assert len(calls) == 2
    assert_same_state(model, before)
    assert not model._forward_hooks and all(not m._forward_hooks for m in model.modules())


# ============================================================================================ acceptance 6


def cycle_texts(start: int, count: int = 12) -> list[str]:
    """Texts cycling through w<start> ... w<start+9>: a distribution a tiny model learns in a few steps."""
    return [" ".join(f"w{start + (i + j) % 10}" for j in range(10)) for i in range(count)]


def tiny_sft_config(output_dir) -> SFTConfig:
    return SFTConfig(
        output_dir=str(output_dir), use_cpu=True, bf16=False, report_to=[], max_steps=2, learning_rate=2e-2,
        per_device_train_batch_size=4, save_strategy="no", dataloader_num_workers=0, disable_tqdm=True, seed=0,
        lr_scheduler_type="constant",
    )


def test_validate_proxy_trains_the_mixtures_and_correlates(world, tmp_path):
    corpus = Dataset.from_dict({
        "text": cycle_texts(0) + cycle_texts(20) + cycle_texts(40),
        "source": ["low"] * 12 + ["mid"] * 12 + ["high"] * 12,
    })
    pool = PartitionPool.train(world["base"], corpus, tiny_sft_config(tmp_path / "pool"), output_dir=tmp_path / "pool",
                               partition_by="source")
    assert pool.names == ["high", "low", "mid"] and sorted(pool.partitions) == pool.names
    validation_data = {"val": Dataset.from_dict({"text": [t for s in (0, 20, 40) for t in cycle_texts(s, 4)]})}
    plot = tmp_path / "proxy.png"
    has_matplotlib = importable("matplotlib")
    check = validate_proxy(
        pool, ["low,mid", "mid,high", "low=0.75,high=0.25"], validation_data, sft_config=tiny_sft_config(tmp_path / "mix"),
        output_dir=tmp_path / "mix", plot=plot if has_matplotlib else None, show_progress=False,
    )
    assert -1 <= check.pearson <= 1 and -1 <= check.spearman <= 1
    assert -1 <= check.per_set["val"]["pearson"] <= 1
    assert sorted(check.trained_objectives) == sorted(["low+mid", "mid+high", "low=0.75,high=0.25"])
    # the trained perplexities are those of the saved mixture models
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "mix" / "mixture_high-0.25_low-0.75"  # weights in pool order: one run per mixture
    assert check.runs["low=0.75,high=0.25"] == str(run_dir)
    trained = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    expected = compute_perplexity_of(trained, validation_data["val"], world["tokenizer"])
    assert check.trained_perplexities["low=0.75,high=0.25"]["val"] == pytest.approx(expected, rel=RTOL)
    assert check.trained_objectives["low=0.75,high=0.25"] == pytest.approx(expected, rel=RTOL)
    # compute: 3 partition runs and 3 mixture runs of 2 steps each, recorded by the trainer
    pool_compute, mixture_compute = check.compute["pool"], check.compute["candidates"]
    assert pool_compute["runs"] == 3 and pool_compute["global_step"] == 6 and pool_compute["missing"] == []
    assert mixture_compute["runs"] == 3 and mixture_compute["global_step"] == 6
    assert pool_compute["flops_6nd"] > 0 and mixture_compute["flops_6nd"] > 0
    assert check.compute["candidates_over_pool"]["global_step"] == 1.0
    assert "Pearson r" in check.table() and json.dumps(check.to_dict(), default=str)
    if has_matplotlib:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and check.plot_path == str(plot)
    # a new partition later: only its run is trained, the others are reused as they are
    finished = {name: (tmp_path / "pool" / name / "run_info.json").stat().st_mtime_ns for name in pool.names}
    extra = Dataset.from_dict({"text": cycle_texts(30)})
    grown = PartitionPool.train(world["base"], {**pool.partitions, "extra": extra}, tiny_sft_config(tmp_path / "pool"),
                                output_dir=tmp_path / "pool")
    assert grown.names == [*pool.names, "extra"] and grown.training_compute()["global_step"] == 8
    assert {name: (tmp_path / "pool" / name / "run_info.json").stat().st_mtime_ns for name in pool.names} == finished


def compute_perplexity_of(model, dataset, tokenizer) -> float:
    from dem_hf import compute_perplexity

    return compute_perplexity(model, dataset, tokenizer, show_progress=False).perplexity


def importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_correlations_match_known_values():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert spearman([1, 2, 3, 4], [10, 20, 1000, 30]) == pytest.approx(0.8)  # ranks 1,2,4,3
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(pearson([1, 2.5, 2.5, 4], [1, 2, 3, 4]))
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3])) and math.isnan(pearson([1], [2]))


ANSCOMBE_X = [10, 8, 13, 9, 11, 14, 6, 4, 12, 7, 5]
ANSCOMBE_Y1 = [8.04, 6.95, 7.58, 8.81, 8.33, 9.96, 7.24, 4.26, 10.84, 4.82, 5.68]


def test_correlations_are_scipys_and_match_published_and_hand_values(monkeypatch):
    import scipy.stats

    assert pearson(ANSCOMBE_X, ANSCOMBE_Y1) == pytest.approx(0.81642, abs=5e-6)  # Anscombe (1973), set I: r = 0.816
    # ties: y ranks 1, 2, 3.5, 5, 3.5; by hand r = 8 / sqrt(10 * 9.5)
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(8 / math.sqrt(95), abs=1e-12)
    assert pearson([1, 2, math.inf, 3], [2, 4, 5, math.nan]) == pytest.approx(1.0)  # non-finite pairs dropped
    assert math.isnan(spearman([1, 2, 3], [4, 4, 4])) and math.isnan(spearman([], []))
    with pytest.raises(ValueError, match="one length"):
        pearson([1, 2], [1])

    calls = []
    for function in ("pearsonr", "spearmanr"):
        original = getattr(scipy.stats, function)
        monkeypatch.setattr(scipy.stats, function, lambda *a, _f=original, _n=function, **k: (calls.append(_n), _f(*a, **k))[1])
    pearson([1, 2, 3], [1, 3, 2]), spearman([1, 2, 3], [1, 3, 2])
    assert calls == ["pearsonr", "spearmanr"]


def test_ablation_plots_say_which_way_is_better():
    from dem_hf.ablation.report import AblationResult, ProxyValidation, plot_ablation, plot_proxy_validation

    scores = rank_scores([MixtureScore(n, {"a": 1.0}, {"v": o}, {"v": 0.1}, o) for n, o in [("x", 2.0), ("y", 1.5)]])
    result = AblationResult(scores=scores, objective="mean perplexity", partitions=["a"])
    assert "(lower is better)" in plot_ablation(result).axes[0].get_xlabel()
    check = ProxyValidation(result, {}, {"x": 2.2, "y": 1.4}, pearson=1.0, spearman=1.0, per_set={}, compute={})
    axes = plot_proxy_validation(check).axes[0]
    assert "(lower is better)" in axes.get_xlabel() and "(lower is better)" in axes.get_ylabel()


# ============================================================================================ acceptance 7


def test_split_partitions_by_column_and_into_shards():
    corpus = Dataset.from_dict({"text": [f"w{i}" for i in range(11)], "source": ["web", "code", "web"] * 3 + ["books", "web"]})
    by_source = split_partitions(corpus, by="source")
    assert list(by_source) == ["books", "code", "web"]
    assert {n: len(d) for n, d in by_source.items()} == {"books": 1, "code": 3, "web": 7}
    assert by_source["code"]["text"] == ["w1", "w4", "w7"] and by_source["code"].column_names == ["text"]

    shards = split_partitions(corpus, num_partitions=3, seed=1)
    assert list(shards) == ["part-0", "part-1", "part-2"]
    assert sorted(len(d) for d in shards.values()) == [3, 4, 4]
    assert sorted(t for d in shards.values() for t in d["text"]) == sorted(corpus["text"])  # a partition of the corpus
    again = split_partitions(corpus, num_partitions=3, seed=1)
    assert all(shards[n]["text"] == again[n]["text"] for n in shards)
    other = split_partitions(corpus, num_partitions=3, seed=2)
    assert any(shards[n]["text"] != other[n]["text"] for n in shards)
    assert list(split_partitions(corpus, num_partitions=11)) == [f"part-{i:02d}" for i in range(11)]


# ============================================================================================ acceptance 8


def test_ablate_command_writes_the_csv_and_prints_the_ranking(pool, world, tmp_path, capsys):
    paths = []
    for vector in world["vectors"]:
        vector.save_pretrained(tmp_path / "vectors" / vector.name)
        paths += ["--vector", str(tmp_path / "vectors" / vector.name)]
    texts = random_texts(0)
    (tmp_path / "val.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    plot = ["--plot", str(tmp_path / "ablation.png")] if importable("matplotlib") else []
    code = main(["ablate", "--base", str(world["base"]), *paths, "--candidate", "math,chat", "--candidate",
                 "math=0.75,code=0.25", "--candidate", "code", "--eval", f"val={tmp_path / 'val.jsonl'}",
                 "--output", str(tmp_path / "results.csv"), *plot])
    out = capsys.readouterr().out
    assert code == 0
    expected = evaluate_mixtures(pool, ["math,chat", "math=0.75,code=0.25", "code"], {"val": Dataset.from_dict({"text": texts})},
                                 show_progress=False)
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [r["candidate"] for r in rows] == expected.ranking and [r["rank"] for r in rows] == ["1", "2", "3"]
    for row in rows:
        assert float(row["ppl:val"]) == pytest.approx(expected[row["candidate"]].perplexities["val"], rel=RTOL)
        assert float(row["objective"]) == pytest.approx(expected[row["candidate"]].objective, rel=RTOL)
    assert rows[0]["weight:math"] and {float(r["weight:code"]) for r in rows} == {0.0, 0.25, 1.0}
    assert f"Best mixture: {expected.best.name}" in out and "ppl:val" in out
    assert out.index(expected.ranking[0]) < out.index(expected.ranking[-1], out.index("ppl:val"))
    assert expected.to_pandas()["candidate"].tolist() == expected.ranking
    if plot:
        assert (tmp_path / "ablation.png").read_bytes()[:4] == b"\x89PNG"


def test_ablate_command_errors_are_one_line(world, tmp_path, capsys):
    world["vectors"][0].save_pretrained(tmp_path / "math")
    code = main(["ablate", "--base", str(world["base"]), "--vector", str(tmp_path / "math"), "--candidate", "math,poetry",
                 "--eval", f"val={tmp_path / 'missing.jsonl'}", "--output", str(tmp_path / "out.csv")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "poetry" in err and "Traceback" not in err
    assert not (tmp_path / "out.csv").exists()


# Bad ablation input (unknown partitions, empty candidates, bad weights, ...) is collected with the rest of
# the pipeline's in tests/test_bad_inputs.py.

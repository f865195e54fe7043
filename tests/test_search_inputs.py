"""What a search takes and tells: validation sets as file paths (as training data), a warning when the best
coefficient sits on a bound, and plots that show the bounds, the base point and which way is better."""

from __future__ import annotations

import logging
import random

import pytest
import torch
from datasets import Dataset

from dem_hf import DEMMerger, DistributionVector, SearchConfig
from dem_hf.io.tensors import TensorDict, untied_state_dict
from dem_hf.search import run as search_module
from dem_hf.search.plots import plot_search
from dem_hf.search.run import Candidate, SearchResult, warn_about_bounds

from .conftest import make_llama, make_tokenizer, save_model


def noise_vector(name: str, seed: int, scale: float = 0.15) -> DistributionVector:
    state = untied_state_dict(make_llama(seed=0))
    generator = torch.Generator().manual_seed(seed)
    deltas = {n: torch.randn(t.shape, generator=generator) * scale for n, t in state.items() if t.dtype.is_floating_point}
    return DistributionVector(name, TensorDict(deltas))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("search_inputs")
    base = save_model(make_llama(seed=0), tmp / "base", make_tokenizer())
    rng = random.Random(0)
    texts = {
        name: [" ".join(f"w{rng.randrange(60)}" for _ in range(rng.randint(3, 12))) for _ in range(6)]
        for name in ["math", "chat"]
    }
    return dict(tmp=tmp, base=base, texts=texts, vectors=[noise_vector("math", 1), noise_vector("chat", 2)])


def merger(world) -> DEMMerger:
    return DEMMerger.from_pretrained(world["base"], vectors=world["vectors"])


GRID = SearchConfig(grid_values=[0.0, 0.5])


def write_as(data: Dataset, folder, kind: str):
    """`data` saved as one of the forms training data may take: a data file or a saved dataset folder."""
    path = folder / f"set.{kind}"
    if kind == "jsonl":
        data.to_json(path, lines=True)
    elif kind == "json":
        data.to_json(path, lines=False)
    elif kind == "csv":
        data.to_csv(path, index=False)
    elif kind == "parquet":
        data.to_parquet(path)
    else:
        data.save_to_disk(path)
    return path


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet", "saved"])
def test_validation_sets_given_as_paths_score_exactly_as_the_datasets(world, tmp_path, kind):
    datasets = {name: Dataset.from_dict({"text": texts}) for name, texts in world["texts"].items()}
    paths = {}
    for name, data in datasets.items():
        (tmp_path / name).mkdir()
        paths[name] = write_as(data, tmp_path / name, kind)

    from_paths = merger(world).search(paths, GRID, show_progress=False)
    from_objects = merger(world).search(datasets, GRID, show_progress=False)

    assert [c.perplexities for c in from_paths.candidates] == [c.perplexities for c in from_objects.candidates]
    assert from_paths.eval_sets == from_objects.eval_sets and from_paths.best_coefficients == from_objects.best_coefficients


def test_a_saved_dataset_dict_gives_its_validation_split(world, tmp_path):
    from datasets import DatasetDict

    train = Dataset.from_dict({"text": ["w1 w2"] * 3})
    validation = Dataset.from_dict({"text": world["texts"]["math"]})
    DatasetDict({"train": train, "validation": validation}).save_to_disk(tmp_path / "math")

    result = merger(world).search({"math": tmp_path / "math"}, GRID, show_progress=False)
    assert result.eval_sets["math"]["num_sequences"] == len(world["texts"]["math"])


@pytest.mark.parametrize(
    "path, message",
    [("missing/math.jsonl", "does not exist"), ("math.xml", "expected a file ending in")],
)
def test_a_bad_path_is_refused_before_the_model_is_loaded(world, tmp_path, monkeypatch, path, message):
    loads = []
    monkeypatch.setattr(search_module, "load_search_model", lambda *args, **kwargs: loads.append(1))
    if path.endswith(".xml"):
        (tmp_path / path).write_text("<data/>")
    with pytest.raises(ValueError, match=message) as error:
        merger(world).search({"math": str(tmp_path / path)}, GRID, show_progress=False)
    assert "'math'" in str(error.value) and not loads


def test_a_bad_json_line_is_named(world, tmp_path):
    (tmp_path / "math.jsonl").write_text('{"text": "w1 w2"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match="line 2: invalid JSON"):
        merger(world).search({"math": tmp_path / "math.jsonl"}, GRID, show_progress=False)


# ---------------------------------------------------------------------------------------------- bounds


def test_best_coefficient_on_a_bound_is_warned_about(world, caplog):
    data = {name: texts for name, texts in world["texts"].items()}
    with caplog.at_level(logging.WARNING):
        result = merger(world).search(data, SearchConfig(strategy="grid", bounds=(0.0, 0.05), grid_points=2), show_progress=False)
    on_bound = {n: v for n, v in result.best_coefficients.items() if v in (0.0, 0.05)}
    assert on_bound == result.best_coefficients  # a two-point grid: every best value is on a bound
    for name, value in on_bound.items():
        side, bound = ("lower", "0") if value == 0.0 else ("upper", "0.05")
        assert f"The best coefficient for {name!r} ({value:g}) sits on the {side} bound {bound}" in caplog.text
    assert "Widen the search" in caplog.text


def test_bound_warnings_name_the_coefficient_the_bound_and_a_wider_interval():
    messages = warn_about_bounds({"math": 2.0, "chat": 0.7, "code": -1.0}, {"math": (0.0, 2.0), "chat": (0.0, 2.0), "code": (-1.0, 1.0)})
    assert messages == [
        "The best coefficient for 'math' (2) sits on the upper bound 2 of the searched interval [0, 2]: the optimum may "
        "lie beyond it. Widen the search, e.g. SearchConfig(bounds={'math': (0, 4), ...}), and search again.",
        "The best coefficient for 'code' (-1) sits on the lower bound -1 of the searched interval [-1, 1]: the optimum "
        "may lie beyond it. Widen the search, e.g. SearchConfig(bounds={'code': (-3, 1), ...}), and search again.",
    ]
    assert warn_about_bounds({"math": 1.0}, {"math": (0.0, 2.0)}) == []


def test_a_single_grid_value_is_not_a_bound(world, caplog):
    with caplog.at_level(logging.WARNING):
        merger(world).search({"math": world["texts"]["math"]}, SearchConfig(grid_values=[1.0]), show_progress=False)
    assert "sits on" not in caplog.text


# ---------------------------------------------------------------------------------------------- plots


def result_of(names, strategy, points, bounds=(0.0, 1.0)) -> SearchResult:
    candidates = [Candidate(dict(zip(names, p)), sum((x - 0.7) ** 2 for x in p), {"a": 1.0}, {"a": 0.0}, 1.0, 0.1) for p in points]
    best = min(candidates, key=lambda c: c.objective)
    return SearchResult(best.coefficients, best.objective, "mean perplexity over ['a']", strategy, candidates, 1.0,
                        len(points), search_config={"bounds": bounds, "grid_values": None})


def legend_and_labels(figure) -> tuple[set[str], str]:
    axes = figure.axes[0]
    labels = set(axes.get_legend_handles_labels()[1])
    texts = " ".join([axes.get_xlabel(), axes.get_ylabel(), *(a.get_ylabel() for a in figure.axes[1:]),
                      *(t.get_text() for t in axes.get_xticklabels())])
    return labels, texts


@pytest.mark.parametrize(
    "names, strategy, points",
    [
        (["a"], "grid", [(0.0,), (0.5,), (1.0,)]),
        (["a"], "gradient", [(1.0,), (0.8,), (0.7,)]),
        (["a", "b"], "grid", [(x, y) for x in (0.0, 0.5, 1.0) for y in (0.0, 1.0)]),
        (["a", "b"], "gradient", [(1.0, 1.0), (0.8, 0.9), (0.7, 0.75)]),
        (["a", "b", "c"], "random", [(random.random(), random.random(), random.random()) for _ in range(12)]),
    ],
)
def test_search_plots_show_bounds_base_point_and_which_way_is_better(names, strategy, points):
    labels, texts = legend_and_labels(plot_search(result_of(names, strategy, points)))
    assert "objective (lower is better)" in texts
    assert {"best", "base (ω = 0)"} <= labels
    assert "bounds" in labels or "axis ends: bounds" in labels


def test_search_plot_bounds_are_drawn_where_they_are():
    figure = plot_search(result_of(["a"], "random", [(0.3,), (0.9,)], bounds={"a": (-0.5, 1.5)}))
    edges = sorted(line.get_xdata()[0] for line in figure.axes[0].get_lines() if line.get_linestyle() == "--")
    assert edges == [-0.5, 1.5]

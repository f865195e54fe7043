"""Training data for [`dem_hf.training.trainers`]: loading, validation and weighted mixtures.

Datasets come as `datasets` objects (`Dataset`, `DatasetDict`, `IterableDataset`), local files or folders, or Hub
ids ([`load_training_dataset`], which is [`dem_hf.evaluation.loading.load_dataset_source`]: validation sets load
the same way; JSON files are checked line by line first, so an error names the file and the line). Before any training each one is checked to be in one of the formats TRL's `SFTTrainer` trains on
([`detect_format`]), then every row is checked and the content fingerprinted ([`dem_hf.training.checks`]), and
conversational data is checked to have a chat template ([`check_chat_template`]). [`mix_datasets`] samples the
weighted mixtures of the data-mixing baseline.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..evaluation.loading import load_dataset_source
from ..vectors.config import check_vector_name
from .checks import check_rows

CHAT_FORMATS = ("conversational", "conversational_prompt_completion", "sharegpt")

DatasetSource = Any  # datasets.Dataset | DatasetDict | IterableDataset | str | os.PathLike


@dataclass
class PreparedDataset:
    """A training dataset after loading and validation."""

    name: str
    dataset: Any
    format: str
    num_examples: int | None
    columns: list[str]
    fingerprint: str | None = None
    checked_rows: int | None = None

    def summary(self) -> dict[str, Any]:
        """What `run_info.json` records of the dataset (a re-run compares it, fingerprint included)."""
        summary = {"name": self.name, "num_examples": self.num_examples, "format": self.format, "columns": self.columns,
                   "fingerprint": self.fingerprint}
        if self.num_examples is None:  # a stream: the fingerprint covers its first rows only
            summary["fingerprint_rows"] = self.checked_rows
        return summary


# ============================================================================================ datasets


def named_sources(datasets: Mapping[str, DatasetSource] | Sequence[tuple[str, DatasetSource]]) -> list[tuple[str, DatasetSource]]:
    """`{name: dataset}` or `[(name, dataset), ...]` as a list of pairs, names checked, duplicates refused.

    Names must be safe folder names ([`check_vector_name`]) and unique, also ignoring case (two runs must not
    share a folder on a case-insensitive file system).
    """
    if isinstance(datasets, Mapping):
        pairs = list(datasets.items())
    elif isinstance(datasets, Sequence) and not isinstance(datasets, (str, bytes)) and all(
        isinstance(item, tuple) and len(item) == 2 for item in datasets
    ):
        pairs = list(datasets)
    else:
        raise ValueError(
            f"Expected datasets as {{name: dataset or path}} or a list of (name, dataset) pairs, got {type(datasets).__name__}."
        )
    if not pairs:
        raise ValueError("No datasets given: pass at least one {name: dataset or path}.")
    seen: dict[str, str] = {}
    for name, _ in pairs:
        check_vector_name(name)
        if name.lower() in seen:
            raise ValueError(
                f"Duplicate dataset name {name!r} (already used as {seen[name.lower()]!r}); each dataset needs its "
                "own name, which becomes its run folder and vector name."
            )
        seen[name.lower()] = name
    return pairs


def load_training_dataset(source: DatasetSource, name: str, split: str = "train"):
    """A training dataset from an object, a local file or folder, or a Hub id: see
    [`dem_hf.evaluation.loading.load_dataset_source`]."""
    return load_dataset_source(source, name, split)


def _first_example(dataset, name: str) -> dict[str, Any]:
    import datasets as hf_datasets

    if isinstance(dataset, hf_datasets.Dataset):
        if len(dataset) == 0:
            raise ValueError(f"Dataset {name!r} is empty (0 examples); nothing to train on.")
        return dataset[0]
    example = next(iter(dataset), None)
    if example is None:
        raise ValueError(f"Dataset {name!r} is empty (the stream yields no examples); nothing to train on.")
    return example


def _is_message_list(value: Any, role_key: str = "role") -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and role_key in m for m in value)


def detect_format(example: dict[str, Any], columns: Sequence[str], name: str, text_field: str = "text") -> str:
    """Which of TRL's SFT dataset formats a dataset is in, judged from its columns and first example.

    Returns one of `"tokenized"` (`input_ids`), `"prompt_completion"`, `"conversational_prompt_completion"`,
    `"conversational"` (`messages`), `"sharegpt"` (`conversations` of `from`/`value` turns) and
    `"language_modeling"` (the `text_field` column). Raises `ValueError` naming the dataset otherwise.
    """
    columns = list(columns)
    if "input_ids" in columns:
        return "tokenized"
    if "prompt" in columns or "completion" in columns:
        if not {"prompt", "completion"} <= set(columns):
            raise ValueError(
                f"Dataset {name!r} has {'a prompt' if 'prompt' in columns else 'a completion'} column but no "
                f"{'completion' if 'prompt' in columns else 'prompt'} column; SFT needs both (prompt-only data is "
                "for RL trainers)."
            )
        prompt, completion = example["prompt"], example["completion"]
        if _is_message_list(prompt) and _is_message_list(completion):
            return "conversational_prompt_completion"
        if isinstance(prompt, str) and isinstance(completion, str):
            return "prompt_completion"
        raise ValueError(
            f"Dataset {name!r}: 'prompt' and 'completion' must both be strings or both be lists of "
            f"{{'role', 'content'}} messages; got {type(prompt).__name__} and {type(completion).__name__}."
        )
    if "messages" in columns:
        if not _is_message_list(example["messages"]):
            raise ValueError(f"Dataset {name!r}: 'messages' must be a non-empty list of {{'role', 'content'}} dicts.")
        return "conversational"
    if "conversations" in columns and _is_message_list(example["conversations"], role_key="from"):
        return "sharegpt"
    if text_field in columns:
        if not isinstance(example[text_field], str):
            raise ValueError(f"Dataset {name!r}: column {text_field!r} must hold strings, got {type(example[text_field]).__name__}.")
        return "language_modeling"
    raise ValueError(
        f"Dataset {name!r} has columns {columns}, none of which TRL's SFTTrainer understands. Expected one of: "
        f"{text_field!r} (plain text; set SFTConfig(dataset_text_field=...) for another column), 'messages' (chat), "
        "'prompt' + 'completion', 'conversations' (ShareGPT), or 'input_ids' (pre-tokenized). Rename a column with "
        "dataset.rename_column(...), or pass formatting_func=."
    )


def prepare_dataset(name: str, source: DatasetSource, sft_config, formatting_func: Callable | None = None,
                    split: str = "train") -> PreparedDataset:
    """Load one dataset (a `DatasetDict` gives its `split`), detect its format, check every row and fingerprint its
    content ([`check_rows`])."""
    dataset = load_training_dataset(source, name, split)
    example = _first_example(dataset, name)
    columns = list(dataset.column_names or example.keys())
    if formatting_func is not None:
        data_format = "formatting_func"
    else:
        data_format = detect_format(example, columns, name, sft_config.dataset_text_field)
    num_examples = len(dataset) if hasattr(dataset, "__len__") else None
    report = check_rows(dataset, name, data_format, columns, sft_config)
    return PreparedDataset(name=name, dataset=dataset, format=data_format, num_examples=num_examples, columns=columns,
                           fingerprint=report.fingerprint, checked_rows=report.rows)


def prepare_datasets(datasets, sft_config, formatting_func: Callable | None = None) -> dict[str, PreparedDataset]:
    """Names checked, every dataset loaded and every row checked, all before any training; the main process loads first."""
    pairs = named_sources(datasets)
    with sft_config.main_process_first(desc="loading datasets"):
        return {name: prepare_dataset(name, source, sft_config, formatting_func) for name, source in pairs}


def prepare_eval_datasets(eval_datasets, train: Mapping[str, PreparedDataset], sft_config,
                          formatting_func: Callable | None = None) -> dict[str, PreparedDataset] | None:
    """The validation set of each run, checked against the settings and the training sets before any training.

    `eval_datasets` and `SFTConfig(eval_strategy=...)` go together: sets without evaluation would never be used, and
    evaluation without sets has nothing to score. There is one set per training dataset, under the same name and in
    the same format (a `DatasetDict` gives its `"validation"` split); every row is checked as for training.
    """
    strategy = str(getattr(sft_config.eval_strategy, "value", sft_config.eval_strategy))
    if eval_datasets is None:
        if strategy != "no":
            raise ValueError(
                f"SFTConfig(eval_strategy={strategy!r}) evaluates every run, but no eval_datasets were given: expected "
                f"eval_datasets={{name: validation set}} for the datasets {list(train)}."
            )
        return None
    if strategy == "no":
        raise ValueError(
            "eval_datasets were given, but SFTConfig(eval_strategy='no') never evaluates: expected e.g. "
            "SFTConfig(eval_strategy='steps', eval_steps=..., load_best_model_at_end=True) to keep each run's best "
            "checkpoint, or no eval_datasets."
        )
    pairs = named_sources(eval_datasets)
    names = [name for name, _ in pairs]
    if sorted(names) != sorted(train):
        missing, extra = sorted(set(train) - set(names)), sorted(set(names) - set(train))
        raise ValueError(f"eval_datasets must name exactly the datasets {list(train)}; got {names}"
                         f"{f', missing {missing}' if missing else ''}{f', unknown {extra}' if extra else ''}.")
    with sft_config.main_process_first(desc="loading eval datasets"):
        prepared = {name: prepare_dataset(f"{name} (eval)", source, sft_config, formatting_func, split="validation")
                    for name, source in pairs}
    for name, data in prepared.items():
        if data.num_examples is None:
            raise ValueError(f"Eval dataset {name!r}: expected a map-style dataset (a finite validation set), got a stream.")
        if data.format != train[name].format:
            raise ValueError(f"Eval dataset {name!r} is in the {data.format!r} format; expected its training set's "
                             f"format, {train[name].format!r}.")
    return prepared


def concatenate_eval_datasets(datasets: Mapping[str, PreparedDataset]):
    """The validation sets of all datasets as one (a mixture is judged on all of them), reduced to shared columns."""
    import datasets as hf_datasets

    return hf_datasets.concatenate_datasets(_harmonize({name: d.dataset for name, d in datasets.items()}))


def check_chat_template(datasets: Mapping[str, PreparedDataset], tokenizer, sft_config) -> None:
    """Chat-format datasets need a chat template (the tokenizer's, or `SFTConfig.chat_template_path`)."""
    chat = [d.name for d in datasets.values() if d.format in CHAT_FORMATS]
    if chat and getattr(sft_config, "chat_template_path", None) is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"Datasets {chat} are conversational, but the tokenizer has no chat template. Set "
            "tokenizer.chat_template, or SFTConfig(chat_template_path=...)."
        )


# ============================================================================================ mixtures


def default_mixture_name(weights: Mapping[str, float]) -> str:
    """`mixture_<name>-<weight>_...` when that is a valid folder name, else `mixture-<hash of the weights>`."""
    readable = "mixture_" + "_".join(f"{name}-{weight:g}" for name, weight in weights.items())
    try:
        return check_vector_name(readable)
    except ValueError:
        digest = hashlib.sha256(json.dumps(sorted(weights.items())).encode()).hexdigest()[:10]
        return f"mixture-{digest}"


def mixture_probabilities(datasets: Mapping[str, Any], weights: Mapping[str, float]) -> dict[str, float]:
    """Validated sampling probabilities `{name: p}` (weights normalised to sum to 1; zero weights dropped)."""
    if not isinstance(weights, Mapping):
        raise ValueError(f"Expected weights as {{dataset name: weight}}, got {type(weights).__name__}.")
    missing, extra = sorted(set(datasets) - set(weights)), sorted(set(weights) - set(datasets))
    if missing or extra:
        raise ValueError(
            f"Mixture weights must name exactly the datasets {sorted(datasets)}; "
            f"{f'missing {missing}' if missing else ''}{'; ' if missing and extra else ''}{f'unknown {extra}' if extra else ''}."
        )
    for name, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"Mixture weight for {name!r} must be a finite number >= 0, got {weight!r}.")
    total = float(sum(weights.values()))
    if total <= 0:
        raise ValueError(f"Mixture weights {dict(weights)} sum to 0; at least one must be positive.")
    return {name: weights[name] / total for name in datasets if weights[name] > 0}


def _harmonize(datasets: Mapping[str, Any]) -> list[Any]:
    """Keep the columns all datasets share and give them the first dataset's feature types."""
    import datasets as hf_datasets

    first_name = next(iter(datasets))
    shared = [c for c in datasets[first_name].column_names if all(c in d.column_names for d in datasets.values())]
    if not shared:
        raise ValueError(f"The datasets {sorted(datasets)} share no column, so they cannot be mixed.")
    selected = {name: d.select_columns(shared) for name, d in datasets.items()}
    features = selected[first_name].features
    harmonized = []
    for name, dataset in selected.items():
        if dataset.features != features:
            try:
                dataset = dataset.cast(features)
            except (ValueError, TypeError, hf_datasets.exceptions.DatasetsError) as error:
                raise ValueError(
                    f"Dataset {name!r} cannot be mixed with {first_name!r}: its columns {shared} have types "
                    f"{dataset.features} instead of {features} ({error})."
                ) from error
        harmonized.append(dataset)
    return harmonized


def sample_mixture(
    datasets: Mapping[str, Any], weights: Mapping[str, float], *, num_examples: int | None = None, seed: int = 42
) -> tuple[Any, dict[str, int]]:
    """[`mix_datasets`], also returning how many examples were drawn from each dataset."""
    import datasets as hf_datasets

    for name, dataset in datasets.items():
        if not isinstance(dataset, hf_datasets.Dataset):
            raise ValueError(f"Dataset {name!r}: mixing needs map-style datasets (not {type(dataset).__name__}).")
        if len(dataset) == 0:
            raise ValueError(f"Dataset {name!r} is empty (0 examples); nothing to sample.")
    probabilities = mixture_probabilities(datasets, weights)
    if num_examples is None:
        num_examples = sum(len(d) for d in datasets.values())
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
        raise ValueError(f"num_examples must be a positive integer, got {num_examples!r}.")
    names = list(probabilities)
    sources = _harmonize({name: datasets[name] for name in names})
    rng = np.random.default_rng(seed)
    choices = rng.choice(len(names), size=num_examples, p=np.array([probabilities[n] for n in names]))
    offsets = np.cumsum([0] + [len(d) for d in sources])
    indices = np.empty(num_examples, dtype=np.int64)
    for position, (source, offset) in enumerate(zip(sources, offsets)):
        slots = np.flatnonzero(choices == position)
        epochs = -(-len(slots) // len(source))
        order = np.concatenate([rng.permutation(len(source)) for _ in range(epochs)] or [np.empty(0, dtype=np.int64)])
        indices[slots] = offset + order[: len(slots)]
    mixture = hf_datasets.concatenate_datasets(sources).select(indices)
    counts = {name: int((choices == position).sum()) for position, name in enumerate(names)}
    return mixture, {name: counts.get(name, 0) for name in datasets}


def mix_datasets(
    datasets: Mapping[str, Any], weights: Mapping[str, float], *, num_examples: int | None = None, seed: int = 42
):
    """A weighted mixture of datasets: each example is drawn from dataset `i` with probability `w_i / Σ w`.

    Equivalent to `datasets.interleave_datasets(probabilities=..., stopping_strategy="all_exhausted")`, but with
    a fixed length, so every mixture of a grid trains on the same number of examples. Within a dataset,
    examples are drawn without replacement, in a fresh random order each pass. Datasets are reduced to the
    columns they share, cast to the first one's feature types.

    Args:
        datasets: `{name: datasets.Dataset}`.
        weights: `{name: weight >= 0}` for every dataset; weights need not sum to 1.
        num_examples: length of the mixture; defaults to the total length of all the datasets.
        seed: seed of the sampling.

    Example:
        ```python
        >>> from dem_hf.training.trainers import mix_datasets
        >>> mixture = mix_datasets({"math": math, "chat": chat}, {"math": 0.7, "chat": 0.3}, num_examples=10_000)
        ```
    """
    return sample_mixture(datasets, weights, num_examples=num_examples, seed=seed)[0]

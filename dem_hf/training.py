"""Per-dataset training with TRL, and the data-mixing baseline DEM is measured against.

[`train_distributions`] runs one `trl.SFTTrainer` per dataset, from the same base, with the user's own
`trl.SFTConfig` and (optionally) `peft.LoraConfig`, and returns one [`DistributionVector`] per dataset.
[`train_mixture`] trains one model on a weighted mixture of the same datasets, so a grid of mixtures can be
compared with DEM at measured cost.

Each run lives in `output_dir/<name>/`:

```
<name>/
  checkpoint-<step>/    TRL checkpoints (resumed from when a run was interrupted)
  model/ or adapter/    the final full model, or the final LoRA adapter (with the tokenizer)
  vector/               the saved DistributionVector (train_distributions only)
  run_info.json         dataset, configs, base fingerprint, measured compute; written last, atomically,
                        with "finished": true
```

A run whose `run_info.json` says `"finished": true` is reused, not retrained: calling `train_distributions`
again with one more dataset trains only the new one (add its vector with `DEMMerger.add_vector`). A run folder
without that marker but with checkpoints resumes from its last checkpoint.

Everything that can be checked cheaply is checked before the first run starts: names, duplicates, empty
datasets, columns TRL understands, chat templates, LoRA target modules and dtypes.

Distributed training is TRL's: launch the same script with `accelerate launch` (DDP, FSDP or DeepSpeed); only
the main process writes vectors and `run_info.json`.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers.utils import logging

from . import __version__
from .callbacks import VECTOR_FOLDER, DistributionVectorCallback, is_peft_model, training_compute
from .tensors import fingerprint, open_weights
from .vectors import DistributionVector, check_vector_name

logger = logging.get_logger(__name__)

RUN_INFO_NAME = "run_info.json"
MODEL_FOLDER = "model"
ADAPTER_FOLDER = "adapter"
DATA_FILE_BUILDERS = {
    ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text", ".arrow": "arrow",
}
CHAT_FORMATS = ("conversational", "conversational_prompt_completion", "sharegpt")
SFT_SUMMARY_KEYS = (
    "learning_rate", "lr_scheduler_type", "warmup_steps", "warmup_ratio", "weight_decay", "optim", "max_steps",
    "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "packing",
    "packing_strategy", "padding_free", "completion_only_loss", "assistant_only_loss", "dataset_text_field",
    "loss_type", "seed", "bf16", "fp16", "gradient_checkpointing", "model_init_kwargs", "chat_template_path",
)
PEFT_SUMMARY_KEYS = (
    "peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "modules_to_save",
    "use_rslora", "rank_pattern", "alpha_pattern", "layers_to_transform", "init_lora_weights", "bias",
)

DatasetSource = Any  # datasets.Dataset | DatasetDict | IterableDataset | str | os.PathLike


@dataclass
class PreparedDataset:
    """A training dataset after loading and validation."""

    name: str
    dataset: Any
    format: str
    num_examples: int | None
    columns: list[str]

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "num_examples": self.num_examples, "format": self.format, "columns": self.columns}


@dataclass
class TrainingRun:
    """A finished training run (see [`train_mixture`]).

    Attributes:
        name: the run's name (its folder under `output_dir`).
        run_dir: the run's folder.
        model_dir: the final model (full fine-tune) or adapter (LoRA) folder.
        info: the content of `run_info.json`: configs, data, measured compute.
        reused: True when the run had finished before and was not retrained.
    """

    name: str
    run_dir: Path
    model_dir: Path
    info: dict[str, Any]
    reused: bool = False


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
    """A `datasets.Dataset` (or `IterableDataset`) from an object, a local file or folder, or a Hub id.

    Local files are read with the matching `datasets` builder (JSON/JSONL, CSV, Parquet, Arrow, text); a folder
    saved with `save_to_disk` is loaded with `load_from_disk`; any other folder or a Hub id goes through
    `datasets.load_dataset` (Hub ids need to be online or cached). A `DatasetDict` gives its `split` split, or
    its only split.
    """
    import datasets as hf_datasets

    if isinstance(source, (str, os.PathLike)):
        source = _load_from_path(str(source), name, split)
    if isinstance(source, (hf_datasets.DatasetDict, hf_datasets.IterableDatasetDict)):
        source = _pick_split(source, name, split)
    if not isinstance(source, (hf_datasets.Dataset, hf_datasets.IterableDataset)):
        raise ValueError(
            f"Dataset {name!r}: expected a datasets.Dataset, DatasetDict, IterableDataset, a local data file or "
            f"folder, or a Hub dataset id; got {type(source).__name__}."
        )
    return source


def _load_from_path(path: str, name: str, split: str):
    import datasets as hf_datasets

    local = Path(path).expanduser()
    if local.is_file():
        builder = DATA_FILE_BUILDERS.get(local.suffix.lower())
        if builder is None:
            raise ValueError(
                f"Dataset {name!r}: cannot read {path!r}; expected a file ending in {sorted(DATA_FILE_BUILDERS)}."
            )
        return hf_datasets.load_dataset(builder, data_files=str(local), split="train")
    if local.is_dir() and ((local / "dataset_info.json").is_file() or (local / "dataset_dict.json").is_file()):
        return hf_datasets.load_from_disk(str(local))
    if local.is_dir():
        return hf_datasets.load_dataset(str(local))
    looks_local = local.suffix.lower() in DATA_FILE_BUILDERS or path.startswith((".", "/", "~")) or path.count("/") > 1
    if looks_local:
        raise ValueError(f"Dataset {name!r}: {path!r} does not exist (not a file, a folder or a Hub dataset id).")
    return hf_datasets.load_dataset(path)  # a Hub id ("name" or "org/name"): needs the network or the cache


def _pick_split(dataset_dict, name: str, split: str):
    if split in dataset_dict:
        return dataset_dict[split]
    if len(dataset_dict) == 1:
        return next(iter(dataset_dict.values()))
    raise ValueError(f"Dataset {name!r} has splits {sorted(dataset_dict)} and no {split!r} split; pass the Dataset itself.")


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


def prepare_dataset(name: str, source: DatasetSource, sft_config, formatting_func: Callable | None = None) -> PreparedDataset:
    """Load one dataset and check it is non-empty and in a format TRL's `SFTTrainer` trains on."""
    dataset = load_training_dataset(source, name)
    example = _first_example(dataset, name)
    columns = list(dataset.column_names or example.keys())
    if formatting_func is not None:
        data_format = "formatting_func"
    else:
        data_format = detect_format(example, columns, name, sft_config.dataset_text_field)
    num_examples = len(dataset) if hasattr(dataset, "__len__") else None
    return PreparedDataset(name=name, dataset=dataset, format=data_format, num_examples=num_examples, columns=columns)


def prepare_datasets(datasets, sft_config, formatting_func: Callable | None = None) -> dict[str, PreparedDataset]:
    """Names checked, every dataset loaded and validated; the main process loads first (shared caches)."""
    pairs = named_sources(datasets)
    with sft_config.main_process_first(desc="loading datasets"):
        return {name: prepare_dataset(name, source, sft_config, formatting_func) for name, source in pairs}


# ============================================================================================ mixtures


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
        >>> from dem_hf.training import mix_datasets
        >>> mixture = mix_datasets({"math": math, "chat": chat}, {"math": 0.7, "chat": 0.3}, num_examples=10_000)
        ```
    """
    return sample_mixture(datasets, weights, num_examples=num_examples, seed=seed)[0]


# ============================================================================================ checks


def load_processing_class(base, processing_class=None):
    """The tokenizer to train with: `processing_class`, else the one saved with the base model."""
    if processing_class is not None:
        return processing_class
    from transformers import AutoTokenizer

    if isinstance(base, torch.nn.Module):
        source = getattr(getattr(base, "config", None), "_name_or_path", "") or ""
        if not source or not Path(source).is_dir():
            raise ValueError(
                "The base model is an in-memory model without a local folder to load its tokenizer from; "
                "pass processing_class=<tokenizer>."
            )
        return AutoTokenizer.from_pretrained(source)
    return AutoTokenizer.from_pretrained(str(base))


def check_chat_template(datasets: Mapping[str, PreparedDataset], tokenizer, sft_config) -> None:
    """Chat-format datasets need a chat template (the tokenizer's, or `SFTConfig.chat_template_path`)."""
    chat = [d.name for d in datasets.values() if d.format in CHAT_FORMATS]
    if chat and getattr(sft_config, "chat_template_path", None) is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"Datasets {chat} are conversational, but the tokenizer has no chat template. Set "
            "tokenizer.chat_template, or SFTConfig(chat_template_path=...)."
        )


def _base_structure(base) -> tuple[torch.nn.Module, str | None]:
    """The base model's module tree (on the meta device for a folder or Hub id: no weights are read)."""
    if isinstance(base, torch.nn.Module):
        return base, getattr(getattr(base, "config", None), "model_type", None)
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(base))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return model, config.model_type


def _target_matches(target: str, module_name: str) -> bool:
    return module_name == target or module_name.endswith("." + target)


def check_peft_config(peft_config, base) -> None:
    """Refuse, before training, a PEFT config that cannot become a distribution vector or matches no module.

    Only LoRA is turned into vectors (DoRA, LoRA biases and the like are refused, see [`dem_hf.lora`]). Every
    listed target module (and `modules_to_save` entry) must exist in the base; a regex must match at least one
    module; adapters on the output layer are refused (TRL computes the loss from `lm_head.weight` directly).
    """
    from peft import LoraConfig
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    from .lora import _check_supported

    if not isinstance(peft_config, LoraConfig):
        raise ValueError(
            f"peft_config must be a peft.LoraConfig (distribution vectors are built from LoRA factors), got "
            f"{type(peft_config).__name__}."
        )
    _check_supported(peft_config.to_dict())
    model, model_type = _base_structure(base)
    names = [name for name, _ in model.named_modules() if name]
    targets = peft_config.target_modules
    if targets is None:
        targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
        if targets is None:
            raise ValueError(f"LoraConfig has no target_modules and PEFT has no default for model type {model_type!r}; set target_modules.")
    _check_targets(targets, names, "target_modules")
    _check_targets(peft_config.modules_to_save or [], names, "modules_to_save")
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = next((n for n, m in model.named_modules() if output is not None and m is output), None)
    if head and isinstance(targets, (list, set, tuple)) and any(_target_matches(t, head) for t in targets):
        raise ValueError(f"LoRA on the output layer {head!r} is not supported by TRL's SFTTrainer; remove it from target_modules.")


def _check_targets(targets, names: list[str], what: str) -> None:
    if isinstance(targets, str):
        if targets.lower() == "all-linear" or any(re.fullmatch(targets, n) for n in names):
            return
        raise ValueError(f"LoraConfig {what} regex {targets!r} matches no module of the base model; {_module_hint(names)}")
    absent = sorted(t for t in targets if not any(_target_matches(t, n) for n in names))
    if absent:
        raise ValueError(f"LoraConfig {what} {absent} do not exist in the base model; {_module_hint(names)}")


def _module_hint(names: list[str]) -> str:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names if not any(m.startswith(n + ".") for m in names)} - {""})
    leaves = [leaf for leaf in leaves if not leaf.isdigit()]
    return f"its leaf modules are {leaves[:12]}{' ...' if len(leaves) > 12 else ''}."


def check_output_root(output_dir: str | os.PathLike) -> Path:
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"output_dir {str(output_dir)!r} exists and is a file; expected a folder.")
    return output_dir


# ============================================================================================ configs


def default_sft_config(output_dir: str | os.PathLike):
    """An `SFTConfig` with TRL's defaults, bf16 only where the hardware has it, logging to the console only."""
    from trl import SFTConfig

    return SFTConfig(output_dir=str(output_dir), use_cpu=not torch.cuda.is_available(), bf16=bf16_available(), report_to="none")


def bf16_available() -> bool:
    """Whether bf16 mixed precision runs natively here (a CUDA GPU that supports it)."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def hardware_overrides(sft_config) -> dict[str, Any]:
    """Settings that must change for the hardware: on CPU, no bf16 autocast and no gradient checkpointing."""
    if sft_config.device.type != "cpu":
        return {}
    overrides: dict[str, Any] = {}
    if sft_config.bf16:
        overrides["bf16"] = False
    if sft_config.gradient_checkpointing:
        overrides["gradient_checkpointing"] = False
        if any(f.name == "activation_checkpointing" for f in dataclasses.fields(sft_config)):
            overrides["activation_checkpointing"] = False
    if overrides:
        logger.info(f"Training on CPU: turning off {sorted(k for k in overrides if k != 'activation_checkpointing')}.")
    return overrides


def run_config(sft_config, run_dir: Path, name: str):
    """The user's `SFTConfig` for one run: its own `output_dir` and run name, token counting on, hardware fixes."""
    overrides = {"output_dir": str(run_dir), **hardware_overrides(sft_config)}
    if sft_config.include_num_input_tokens_seen in ("no", False):
        overrides["include_num_input_tokens_seen"] = "non_padding"
    if sft_config.run_name in (None, sft_config.output_dir):
        overrides["run_name"] = name
    return dataclasses.replace(sft_config, **overrides)


def _jsonable(value: Any) -> Any:
    """Round-trip through JSON so stored and fresh summaries compare equal (sets sorted, enums as values)."""

    def default(obj):
        if isinstance(obj, (set, frozenset)):
            return sorted(obj, key=str)
        return getattr(obj, "value", str(obj))

    return json.loads(json.dumps(value, default=default))


def sft_config_summary(sft_config) -> dict[str, Any]:
    """The training settings that decide what a run learns (for `run_info.json`, metadata and re-run checks)."""
    values = sft_config.to_dict()
    summary = {key: values[key] for key in SFT_SUMMARY_KEYS if key in values}
    summary["world_size"] = sft_config.world_size
    summary["total_train_batch_size"] = (
        sft_config.per_device_train_batch_size * sft_config.gradient_accumulation_steps * sft_config.world_size
    )
    return _jsonable(summary)


def peft_config_summary(peft_config) -> dict[str, Any] | None:
    if peft_config is None:
        return None
    values = peft_config.to_dict()
    return _jsonable({key: values[key] for key in PEFT_SUMMARY_KEYS if key in values})


def base_identity(base) -> tuple[str | None, dict[str, Any]]:
    """The base's name or path and its fingerprint (which is what identifies it: folders move)."""
    source, name, _ = open_weights(base)
    return name, fingerprint(source)


# ============================================================================================ run folders


def read_finished_run(run_dir: Path, needs_vector: bool = True) -> dict[str, Any] | None:
    """The `run_info.json` of a finished run in `run_dir`, or None if the run has not finished."""
    info_file = run_dir / RUN_INFO_NAME
    if not info_file.is_file():
        return None
    try:
        info = json.loads(info_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        logger.warning(f"{str(info_file)!r} is unreadable ({error}); the run is treated as unfinished.")
        return None
    if not isinstance(info, dict) or info.get("finished") is not True:
        return None
    if needs_vector and not (run_dir / VECTOR_FOLDER / "vector_config.json").is_file():
        logger.warning(f"Run {run_dir.name!r} is marked finished but its vector is missing; it is trained again.")
        return None
    return info


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in sorted(set(old) | set(new), key=str):
            found += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return found
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def warn_if_changed(name: str, run_dir: Path, info: dict[str, Any], setup: dict[str, Any]) -> None:
    """Warn when a finished run being reused was trained with other data, base or settings than asked now."""
    changes = _differences({k: info.get(k) for k in setup}, setup)
    if changes:
        logger.warning(
            f"Run {name!r} in {str(run_dir)!r} finished earlier with a different setup ({'; '.join(changes[:6])}"
            f"{' ...' if len(changes) > 6 else ''}); reusing it as it is. Delete the folder to train it again."
        )


def write_json_atomic(path: Path, content: dict[str, Any]) -> None:
    """Write a JSON file under a temporary name and rename it into place (complete or absent)."""
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w") as handle:
            handle.write(json.dumps(content, indent=2) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _versions() -> dict[str, str]:
    import datasets
    import peft
    import transformers
    import trl

    return {"dem_hf": __version__, "transformers": transformers.__version__, "trl": trl.__version__,
            "peft": peft.__version__, "datasets": datasets.__version__, "torch": torch.__version__}


# ============================================================================================ training


def _build_trainer(base, dataset, config, peft_config, tokenizer, formatting_func, callbacks):
    from trl import SFTTrainer

    model = copy.deepcopy(base) if isinstance(base, torch.nn.Module) else str(base)
    return SFTTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=copy.deepcopy(peft_config),
        formatting_func=formatting_func,
        callbacks=list(callbacks),
    )


def _train(trainer, run_dir: Path, name: str) -> None:
    from transformers.trainer_utils import get_last_checkpoint

    checkpoint = get_last_checkpoint(str(run_dir)) if run_dir.is_dir() else None
    if checkpoint:
        logger.info(f"Run {name!r}: resuming from {checkpoint}.")
    else:
        logger.info(f"Run {name!r}: training from the base model.")
    trainer.train(resume_from_checkpoint=checkpoint)


def _release(trainer) -> None:
    """Drop the trainer's model and optimizer so the next run does not hold two models in memory."""
    trainer.accelerator.free_memory()
    trainer.model = trainer.model_wrapped = trainer.optimizer = trainer.lr_scheduler = None
    trainer.callback_handler.model = trainer.callback_handler.optimizer = trainer.callback_handler.lr_scheduler = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class _Plan:
    """What is shared by the runs of one call: validated data, tokenizer, configs."""

    base: Any
    datasets: dict[str, PreparedDataset]
    sft_config: Any
    peft_config: Any
    output_dir: Path
    tokenizer: Any
    formatting_func: Callable | None
    callbacks: list
    base_name: str | None
    base_fingerprint: dict[str, Any]

    def setup(self, config, data: dict[str, Any]) -> dict[str, Any]:
        """The part of `run_info.json` a re-run compares to decide whether a reused run matches."""
        return {
            "data": _jsonable(data),
            "base_fingerprint": self.base_fingerprint,
            "sft_config": sft_config_summary(config),
            "peft_config": peft_config_summary(self.peft_config),
        }


def _plan(base, datasets, sft_config, peft_config, output_dir, processing_class, formatting_func, callbacks) -> _Plan:
    """Validate everything before any training: output folder, datasets, tokenizer, LoRA targets, dtypes."""
    if sft_config is None:
        if output_dir is None:
            raise ValueError("Pass output_dir= (or an SFTConfig with an output_dir).")
        sft_config = default_sft_config(output_dir)
    output_dir = check_output_root(output_dir if output_dir is not None else sft_config.output_dir)
    if isinstance(base, os.PathLike):
        base = str(base)
    if not isinstance(base, (str, torch.nn.Module)):
        raise ValueError(f"base must be a model folder, a Hub id or a PreTrainedModel, got {type(base).__name__}.")
    if isinstance(base, torch.nn.Module) and is_peft_model(base):
        raise ValueError("base is a PeftModel; pass the plain base model (merge and unload the adapter first).")
    prepared = prepare_datasets(datasets, sft_config, formatting_func)
    tokenizer = load_processing_class(base, processing_class)
    check_chat_template(prepared, tokenizer, sft_config)
    if peft_config is not None:
        check_peft_config(peft_config, base)
    return _Plan(base, prepared, sft_config, peft_config, output_dir, tokenizer, formatting_func,
                 list(callbacks or []), *base_identity(base))


def train_distributions(
    base,
    datasets: Mapping[str, DatasetSource] | Sequence[tuple[str, DatasetSource]],
    sft_config=None,
    peft_config=None,
    output_dir: str | os.PathLike | None = None,
    *,
    processing_class=None,
    formatting_func: Callable | None = None,
    callbacks: Sequence | None = None,
    checkpoint_vectors: bool = False,
) -> list[DistributionVector]:
    """Fine-tune the base once per dataset with TRL's `SFTTrainer`; return one distribution vector per dataset.

    Every run starts from the same base, with the same `sft_config` (its `output_dir` replaced by
    `output_dir/<name>`), and is saved under `output_dir/<name>/` (see the module docs for the layout). The vector
    is θ_run − θ_base for a full fine-tune and the LoRA factors (kept low-rank) with a `LoraConfig`; its
    `metadata` records the dataset, the settings and the measured compute (tokens seen, `total_flos`,
    6·N·tokens). Finished runs found in `output_dir` are reused; interrupted ones resume from their last
    checkpoint. All datasets and settings are validated before the first run starts.

    On CPU, bf16 and gradient checkpointing are turned off; on GPUs the config is used as given (TRL's
    defaults: bf16 and gradient checkpointing on). Run the same script with `accelerate launch` to train
    each run on several GPUs.

    Args:
        base (`str`, `os.PathLike` or `PreTrainedModel`):
            The base model: a folder or Hub id (loaded by TRL, honouring `sft_config.model_init_kwargs`), or an
            in-memory model (copied for each run, never modified). Vectors are computed against its weights.
        datasets (`dict[str, Dataset | DatasetDict | str]` or list of `(name, dataset)` pairs):
            One entry per distribution. Values are `datasets` objects (a `DatasetDict` gives its `"train"` split),
            local files (`.json`, `.jsonl`, `.csv`, `.parquet`, `.arrow`, `.txt`), folders, or Hub ids. Plain text,
            prompt/completion, chat messages (the chat template is applied by TRL), ShareGPT and pre-tokenized
            datasets work as in TRL. Names become folder and vector names.
        sft_config (`trl.SFTConfig`, *optional*):
            Training settings for every run; TRL's defaults if omitted.
        peft_config (`peft.LoraConfig`, *optional*):
            Train LoRA adapters instead of full fine-tunes.
        output_dir (`str` or `os.PathLike`, *optional*):
            Where the runs go; defaults to `sft_config.output_dir`.
        processing_class (`PreTrainedTokenizerBase`, *optional*):
            The tokenizer; by default the one saved with the base.
        formatting_func (`Callable`, *optional*):
            Passed to `SFTTrainer` (turns an example into its text); column checks are then skipped.
        callbacks (`list[TrainerCallback]`, *optional*):
            Extra callbacks, added to every run's trainer.
        checkpoint_vectors (`bool`, *optional*, defaults to `False`):
            Also save a vector inside every checkpoint ([`DistributionVectorCallback`]).

    Returns:
        `list[DistributionVector]`: one per dataset, in the given order, read from `output_dir/<name>/vector`.

    Example:
        ```python
        >>> from peft import LoraConfig
        >>> from trl import SFTConfig
        >>> from dem_hf import DEMMerger, train_distributions
        >>> vectors = train_distributions(
        ...     "HuggingFaceTB/SmolLM2-135M",
        ...     datasets={"math": "data/math.jsonl", "chat": "data/chat.jsonl"},
        ...     sft_config=SFTConfig(max_steps=200, learning_rate=2e-4, save_steps=50),
        ...     peft_config=LoraConfig(r=16, target_modules="all-linear"),
        ...     output_dir="runs",
        ... )
        >>> merger = DEMMerger.from_pretrained("HuggingFaceTB/SmolLM2-135M", vectors=vectors)
        >>> # later, one more dataset: only "code" is trained
        >>> *_, code = train_distributions(..., datasets={"math": ..., "chat": ..., "code": "data/code.jsonl"}, ...)
        >>> merger.add_vector(code)
        ```
    """
    plan = _plan(base, datasets, sft_config, peft_config, output_dir, processing_class, formatting_func, callbacks)
    vectors = []
    for position, (name, data) in enumerate(plan.datasets.items(), start=1):
        run_dir = plan.output_dir / name
        config = run_config(plan.sft_config, run_dir, name)
        setup = plan.setup(config, data.summary())
        info = read_finished_run(run_dir)
        if info is not None:
            warn_if_changed(name, run_dir, info, setup)
            logger.info(f"Run {name!r} ({position}/{len(plan.datasets)}) finished earlier; reusing {run_dir}.")
            vectors.append(DistributionVector.from_pretrained(run_dir / VECTOR_FOLDER))
            continue
        logger.info(f"Run {name!r} ({position}/{len(plan.datasets)}): {data.num_examples} examples -> {run_dir}")
        vectors.append(_train_distribution(plan, name, data, config, setup, checkpoint_vectors))
    return vectors


def _train_distribution(
    plan: _Plan, name: str, data: PreparedDataset, config, setup: dict[str, Any], checkpoint_vectors: bool
) -> DistributionVector:
    run_dir = Path(config.output_dir)
    metadata = {"dataset": name, "num_examples": data.num_examples, "format": data.format,
                "sft_config": setup["sft_config"], "peft_config": setup["peft_config"],
                "base_model": plan.base_name}
    callback = DistributionVectorCallback(name, base=plan.base, save_on_checkpoint=checkpoint_vectors, metadata=metadata)
    trainer = _build_trainer(plan.base, data.dataset, config, plan.peft_config, plan.tokenizer, plan.formatting_func,
                             [callback, *plan.callbacks])
    _train(trainer, run_dir, name)
    model_dir = run_dir / (ADAPTER_FOLDER if plan.peft_config is not None else MODEL_FOLDER)
    trainer.save_model(str(model_dir))
    compute = training_compute(trainer.state, trainer.args, trainer.model)
    vector_dir = run_dir / VECTOR_FOLDER
    if trainer.is_world_process_zero():
        if vector_dir not in callback.saved:  # sharded training (ZeRO-3, FSDP): from the gathered, saved model
            _vector_from_saved(plan, name, model_dir, vector_dir, {**metadata, "step": compute["global_step"], "compute": compute})
        info = {"name": name, "kind": "distribution", "base_model": plan.base_name, **setup, "vector_type": "lora" if plan.peft_config else "full",
                "compute": compute, "model_dir": model_dir.name, "vector_dir": VECTOR_FOLDER,
                "versions": _versions(), "finished": True}
        write_json_atomic(run_dir / RUN_INFO_NAME, info)
    trainer.accelerator.wait_for_everyone()
    _release(trainer)
    return DistributionVector.from_pretrained(vector_dir)


def _vector_from_saved(plan: _Plan, name: str, model_dir: Path, vector_dir: Path, metadata: dict[str, Any]) -> None:
    if plan.peft_config is not None:
        vector = DistributionVector.from_peft(model_dir, name=name, base=plan.base, metadata=metadata)
        vector.save_pretrained(vector_dir, overwrite=True)
    else:
        DistributionVector.from_models(plan.base, model_dir, name=name, save_directory=vector_dir, overwrite=True, metadata=metadata)


def default_mixture_name(weights: Mapping[str, float]) -> str:
    """`mixture_<name>-<weight>_...` when that is a valid folder name, else `mixture-<hash of the weights>`."""
    readable = "mixture_" + "_".join(f"{name}-{weight:g}" for name, weight in weights.items())
    try:
        return check_vector_name(readable)
    except ValueError:
        import hashlib

        digest = hashlib.sha256(json.dumps(sorted(weights.items())).encode()).hexdigest()[:10]
        return f"mixture-{digest}"


def train_mixture(
    base,
    datasets: Mapping[str, DatasetSource] | Sequence[tuple[str, DatasetSource]],
    weights: Mapping[str, float],
    sft_config=None,
    peft_config=None,
    output_dir: str | os.PathLike | None = None,
    *,
    name: str | None = None,
    num_examples: int | None = None,
    seed: int | None = None,
    processing_class=None,
    formatting_func: Callable | None = None,
    callbacks: Sequence | None = None,
) -> TrainingRun:
    """The data-mixing baseline: train one model on a weighted mixture of the datasets, with measured compute.

    The mixture is sampled by the weights ([`mix_datasets`]: each example comes from dataset `i` with
    probability `w_i / Σ w`) and trained with one `SFTTrainer` run, with the same `sft_config` / `peft_config`
    conventions as [`train_distributions`]. The run folder `output_dir/<name>/` holds the checkpoints, the final
    `model/` (or `adapter/`) and `run_info.json` with the weights, the examples drawn per dataset and the
    compute (tokens seen, FLOPs), so a grid of mixtures can be compared with DEM at measured cost. A finished
    run is reused and an interrupted one resumes, as in [`train_distributions`].

    Args:
        base, datasets, sft_config, peft_config, output_dir, processing_class, formatting_func, callbacks:
            as in [`train_distributions`]. The datasets must share their format (e.g. all chat `messages`).
        weights (`dict[str, float]`):
            A weight `>= 0` for every dataset; they need not sum to 1 (zero leaves a dataset out).
        name (`str`, *optional*):
            The run's name; by default built from the weights (`mixture_math-0.7_chat-0.3`).
        num_examples (`int`, *optional*):
            Length of the mixture; by default the total length of all the datasets, so every mixture of a grid
            trains on as many examples (set `max_steps` in `sft_config` to fix the compute exactly).
        seed (`int`, *optional*):
            Seed of the sampling; defaults to `sft_config.seed`.

    Returns:
        [`TrainingRun`]: the run's folder, its model (or adapter) folder and its `run_info.json` content.

    Example:
        ```python
        >>> from trl import SFTConfig
        >>> from dem_hf import train_mixture
        >>> for w in (0.25, 0.5, 0.75):
        ...     run = train_mixture(
        ...         "HuggingFaceTB/SmolLM2-135M", {"math": "data/math.jsonl", "chat": "data/chat.jsonl"},
        ...         weights={"math": w, "chat": 1 - w}, sft_config=SFTConfig(max_steps=600), output_dir="mixtures",
        ...     )
        ...     print(run.name, run.info["compute"]["flops_6nd"])
        ```
    """
    plan = _plan(base, datasets, sft_config, peft_config, output_dir, processing_class, formatting_func, callbacks)
    formats = {data.format for data in plan.datasets.values()}
    if len(formats) > 1:
        raise ValueError(
            "A mixture needs datasets in one format; got "
            f"{ {data.name: data.format for data in plan.datasets.values()} }. Convert them to one format first."
        )
    mixture_probabilities(plan.datasets, weights)  # validate before sampling
    name = check_vector_name(name) if name is not None else default_mixture_name(dict(weights))
    seed = plan.sft_config.seed if seed is None else seed
    mixture, counts = sample_mixture({n: d.dataset for n, d in plan.datasets.items()}, weights, num_examples=num_examples, seed=seed)
    run_dir = plan.output_dir / name
    config = run_config(plan.sft_config, run_dir, name)
    data = {"datasets": {n: d.summary() for n, d in plan.datasets.items()}, "weights": dict(weights),
            "num_examples": len(mixture), "seed": seed}
    setup = plan.setup(config, data)
    model_dir = run_dir / (ADAPTER_FOLDER if peft_config is not None else MODEL_FOLDER)
    info = read_finished_run(run_dir, needs_vector=False)
    if info is not None:
        warn_if_changed(name, run_dir, info, setup)
        logger.info(f"Mixture run {name!r} finished earlier; reusing {run_dir}.")
        return TrainingRun(name, run_dir, model_dir, info, reused=True)
    logger.info(f"Mixture run {name!r}: {len(mixture)} examples drawn as {counts} -> {run_dir}")
    trainer = _build_trainer(plan.base, mixture, config, plan.peft_config, plan.tokenizer, plan.formatting_func, plan.callbacks)
    _train(trainer, run_dir, name)
    trainer.save_model(str(model_dir))
    info = {"name": name, "kind": "mixture", "base_model": plan.base_name, **setup, "probabilities": mixture_probabilities(plan.datasets, weights),
            "examples_per_dataset": counts, "compute": training_compute(trainer.state, trainer.args, trainer.model),
            "model_dir": model_dir.name, "versions": _versions(), "finished": True}
    if trainer.is_world_process_zero():
        write_json_atomic(run_dir / RUN_INFO_NAME, info)
    trainer.accelerator.wait_for_everyone()
    _release(trainer)
    return TrainingRun(name, run_dir, model_dir, info)

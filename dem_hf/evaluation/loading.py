"""Datasets given as objects or paths: one loader for training data and validation sets.

[`load_dataset_source`] accepts a `datasets` object (`Dataset`, `DatasetDict`, `IterableDataset`), a local file
(JSON/JSONL, CSV, Parquet, Arrow, text), a folder written by `save_to_disk` or holding data files, or a Hub dataset
id. JSON files are checked line by line first ([`check_json_file`]), so an error names the file and the line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["DATA_FILE_BUILDERS", "check_json_file", "load_dataset_source"]

DATA_FILE_BUILDERS = {
    ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text", ".arrow": "arrow",
}


def load_dataset_source(source: Any, name: str, split: str = "train"):
    """A `datasets.Dataset` (or `IterableDataset`) from an object, a local file or folder, or a Hub id.

    Training data ([`dem_hf.training`]) and validation sets ([`DEMMerger.search`]) are loaded by this one function.

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
        if builder == "json":
            check_json_file(local, name)
        try:
            return hf_datasets.load_dataset(builder, data_files=str(local), split="train")
        except hf_datasets.exceptions.DatasetGenerationError as error:
            cause = error.__cause__ or error
            raise ValueError(f"Dataset {name!r}: cannot read {str(local)!r}: {' '.join(str(cause).split())[:300]}") from error
    if local.is_dir() and ((local / "dataset_info.json").is_file() or (local / "dataset_dict.json").is_file()):
        return hf_datasets.load_from_disk(str(local))
    if local.is_dir():
        return hf_datasets.load_dataset(str(local))
    looks_local = local.suffix.lower() in DATA_FILE_BUILDERS or path.startswith((".", "/", "~")) or path.count("/") > 1
    if looks_local:
        raise ValueError(f"Dataset {name!r}: {path!r} does not exist (not a file, a folder or a Hub dataset id).")
    return hf_datasets.load_dataset(path)  # a Hub id ("name" or "org/name"): needs the network or the cache


def check_json_file(path: Path, name: str) -> None:
    """Check a `.json`/`.jsonl` file the way the `datasets` JSON builder reads it, naming the line of the first error.

    A file holding one JSON document (a list of objects, or an object of columns) is accepted as a whole; otherwise
    every non-blank line must be one JSON object. Raises `ValueError` naming the dataset, the file and the line.
    """
    if path.suffix.lower() == ".json":
        try:
            with open(path, encoding="utf-8") as handle:
                json.load(handle)
            return
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass  # not one document: JSON lines, checked below
    rows = 0
    with open(path, encoding="utf-8", errors="strict") as handle:
        for number, line in enumerate(_lines(handle, path, name), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"Dataset {name!r}: {path}, line {number}: invalid JSON ({error.msg} at column {error.colno}); "
                    "expected one JSON object per line."
                ) from None
            if not isinstance(row, dict):
                raise ValueError(
                    f"Dataset {name!r}: {path}, line {number}: expected a JSON object per line, got {type(row).__name__}."
                )
            rows += 1
    if rows == 0:
        raise ValueError(f"Dataset {name!r}: {path} has no rows (only blank lines); nothing to read.")


def _lines(handle, path: Path, name: str):
    try:
        yield from handle
    except UnicodeDecodeError as error:
        raise ValueError(f"Dataset {name!r}: {str(path)!r} is not UTF-8 text ({error.reason} at byte {error.start}).") from None


def _pick_split(dataset_dict, name: str, split: str):
    if split in dataset_dict:
        return dataset_dict[split]
    if len(dataset_dict) == 1:
        return next(iter(dataset_dict.values()))
    raise ValueError(f"Dataset {name!r} has splits {sorted(dataset_dict)} and no {split!r} split; pass the Dataset itself.")

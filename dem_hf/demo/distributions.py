"""Cached train/validation/test splits of the demo distributions, and helpers for their records.

[`prepare_distributions`] gathers a distribution's raw records ([`dem_hf.demo.sources`],
[`dem_hf.demo.gsm`]), drops those over the length cap, splits them ([`dem_hf.demo.splitting`]) and
caches the splits as JSON Lines; [`to_prompt_completion`] and [`record_token_counts`] work on the
returned records.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, Features, Value

from dem_hf.demo.debian import DebianPackage, check_debian_tools, fetch_debian_package
from dem_hf.demo.files import _move_into_place, _read_jsonl, _temp_folder, _write_jsonl
from dem_hf.demo.gsm import _GSM_TIME_LIMIT_S, _math_items
from dem_hf.demo.packages import (
    _DISTRIBUTION_PACKAGES,
    DEFAULT_DISTRIBUTIONS,
    TEXT_GROUP,
    _check_names,
    _package_version,
    _require,
)
from dem_hf.demo.sources import (
    _FORMAT_VERSION,
    _MIN_CODE_CHARS,
    _champ_items,
    _chat_items,
    _code_items,
    _Item,
    _record_chars,
)
from dem_hf.demo.splitting import _split_items
from dem_hf.demo.texts import DEBIAN_PACKAGES, TEXT_ITEMS

from .. import logging as hf_logging

logger = hf_logging.get_logger(__name__)

DEFAULT_MAX_CHARS: dict[str, int] = {
    "math": 700,
    "chat": 800,
    "champ": 550,
    "code": 800,
    "bible": 1000,
    "pydocs": 800,
    "jargon": 1000,
    "fortunes": 800,
}
"""Longest record kept, in characters (prompt + completion, or text), per distribution; for the
chunked text distributions (`"code"` and [`TEXT_GROUP`]) also the chunk size.

Calibrated on the SmolLM2 tokenizer so that records fit 256-token training: its characters per
token are about 3.0 on GSM text, 4-5 on English chat, 2.1-2.6 on competition math (formulas, digits),
3.5 on Python source, 4.2 on the King James Bible, 3.7 on the Python docs' reStructuredText, 4.0 on the
Jargon File and 3.9 on fortunes (5% of chunks under 3.0-3.8)."""

_SPLITS = ("train", "validation", "test")
_PROMPT_COMPLETION_FEATURES = Features({"prompt": Value("string"), "completion": Value("string")})
_TEXT_FEATURES = Features({"text": Value("string")})


def _source_tag(name: str, debian: Mapping[str, DebianPackage] | None = None) -> str:
    """What the records come from, with its version, for the cache folder's name: a new version is a new folder."""
    if name == "code":
        return "py{}.{}.{}".format(*sys.version_info[:3])
    if name in TEXT_GROUP:
        # As the .deb file names write them (an epoch's `:` as `%3a`).
        return "+".join(f"{p.name}_{p.version.replace(':', '%3a')}" for p in (debian or {}).values())
    return {"math": "gsm", "chat": "sharegpt", "champ": "champ"}[name] + _package_version(
        _DISTRIBUTION_PACKAGES[name] or ""
    )


def _is_text(name: str) -> bool:
    return name == "code" or name in TEXT_GROUP


def _features(name: str) -> Features:
    return _TEXT_FEATURES if _is_text(name) else _PROMPT_COMPLETION_FEATURES


def _fetch_debian(name: str, cache_dir: Path) -> dict[str, DebianPackage]:
    """The Debian packages a distribution of [`TEXT_GROUP`] is read from, fetched once into the cache."""
    return {package: fetch_debian_package(cache_dir, package) for package in DEBIAN_PACKAGES.get(name, ())}


def _load_split_folder(folder: Path, name: str) -> DatasetDict:
    features = _features(name)
    result = DatasetDict()
    for split in _SPLITS:
        rows = _read_jsonl(folder / f"{split}.jsonl")
        if rows:
            result[split] = Dataset.from_list(rows, features=features)
        else:
            result[split] = Dataset.from_dict({column: [] for column in features}, features=features)
    return result


def _check_size(value: Any, argument: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"`{argument}` must be a non-negative integer, got {value!r}.")
    return value


def _max_chars_for(name: str, max_chars: int | Mapping[str, int] | None) -> int:
    if max_chars is None:
        value = DEFAULT_MAX_CHARS[name]
    elif isinstance(max_chars, Mapping):
        value = max_chars.get(name, DEFAULT_MAX_CHARS[name])
    else:
        value = max_chars
    if isinstance(value, bool) or not isinstance(value, int) or value < _MIN_CODE_CHARS:
        raise ValueError(f"`max_chars` for {name!r} must be an integer of at least {_MIN_CODE_CHARS}, got {value!r}.")
    return value


def _raw_items(
    name: str,
    cache_dir: Path,
    max_chars: int,
    gsm_time_limit: float | None,
    force: bool,
    debian: Mapping[str, DebianPackage],
) -> list[_Item]:
    if name in TEXT_ITEMS:
        return TEXT_ITEMS[name]({package: info.root for package, info in debian.items()}, max_chars)
    if name == "math":
        return _math_items(cache_dir, gsm_time_limit, force)
    if name == "chat":
        return _chat_items()
    if name == "champ":
        return _champ_items()
    return _code_items(max_chars)


def prepare_distributions(
    cache_dir: str | os.PathLike[str],
    names: Sequence[str] | str = DEFAULT_DISTRIBUTIONS,
    n_train: int = 400,
    n_val: int = 32,
    n_test: int = 64,
    seed: int = 0,
    *,
    max_chars: int | Mapping[str, int] | None = None,
    group_disjoint: bool = True,
    gsm_time_limit: float | None = _GSM_TIME_LIMIT_S,
    force: bool = False,
) -> dict[str, DatasetDict]:
    """Build (or load from the cache) train/validation/test splits of real, offline data distributions.

    See [`dem_hf.demo`] for the sources and record formats: `"math"`, `"chat"` and `"champ"` give
    `prompt`/`completion` strings, `"code"` and the plain-text group ([`TEXT_GROUP`]: `"bible"`,
    `"pydocs"`, `"jargon"`, `"fortunes"`) give `text`. Splits never share a record nor a group of
    related records (GSM template, ShareGPT conversation, CHAMP problem, standard-library file, Bible
    book, documentation page, Jargon File entry, fortune file), and the same arguments give the same
    records on every call and machine (for `"code"`: with the same Python version, whose standard
    library is the source; for the plain-text group: with the same Debian package versions).

    Each distribution's splits are cached as JSON Lines in
    `cache_dir/distributions/<name>-<source>-n<train>-<val>-<test>-seed<seed>-max<chars>-v<format>/`,
    written to a temporary folder first and renamed into place when complete; a second call only reads
    them (well under a second). Generated GSM questions are cached separately under `cache_dir/pools/`
    and reused by every seed and size, as generating them is the slow step (~20 s). The Debian packages of
    the plain-text group are fetched once into `cache_dir/debian/<package>/` (`apt-get download`, no root;
    see [`dem_hf.demo.debian`]) and their versions are part of `<source>`.

    Args:
        cache_dir (`str` or `os.PathLike`):
            Folder for the cached files.
        names (`Sequence[str]` or `str`, *optional*, defaults to `("math", "chat", "champ", "code")`):
            The distributions to prepare, in the order of the returned dict; any of [`DISTRIBUTIONS`].
        n_train (`int`, *optional*, defaults to 400):
            Number of training records per distribution.
        n_val (`int`, *optional*, defaults to 32):
            Number of validation records per distribution (used by the coefficient search).
        n_test (`int`, *optional*, defaults to 64):
            Number of held-out test records per distribution.
        seed (`int`, *optional*, defaults to 0):
            Seed of the choice of records and of their split.
        max_chars (`int` or `Mapping[str, int]`, *optional*):
            Longest record kept, in characters of prompt + completion (or text); one value for all, or
            a value per distribution name. Defaults to [`DEFAULT_MAX_CHARS`], which keeps records under
            about 256 SmolLM2 tokens. For `"code"` and the plain-text group it is also the chunk size.
        group_disjoint (`bool`, *optional*, defaults to `True`):
            Keep related records (same GSM template, CHAMP problem, ShareGPT conversation or source
            file) in one split, so that held-out perplexity measures unseen problem types and files. With
            `False`, records are split independently (still never the same record twice): an i.i.d.
            split in which, e.g., a test question may come from a template seen in training.
        gsm_time_limit (`float`, *optional*, defaults to 10.0):
            Seconds allowed to one GSM template before it is skipped (`None` for no limit). Templates
            known to be slow are always skipped, so this only guards against new ones. The limit uses
            `SIGALRM` and applies in the main thread on POSIX systems only.
        force (`bool`, *optional*, defaults to `False`):
            Rebuild even if cached files exist.

    Returns:
        `dict[str, datasets.DatasetDict]`: for each name, a `DatasetDict` with `"train"`, `"validation"`
        and `"test"` splits of exactly `n_train`, `n_val` and `n_test` rows.

    Raises:
        `ValueError`: for an unknown name, a negative size, a too small `max_chars`, or when a
            distribution has fewer records than requested.
        `ImportError`: when the package a distribution comes from is missing; the message gives the
            `pip install` command.
        `RuntimeError`: when a Debian package cannot be fetched (`apt-get`/`dpkg-deb` missing: the message
            gives the commands to run by hand; a failed download: the command and its stderr).
    """
    names = _check_names(names)
    sizes = {
        "train": _check_size(n_train, "n_train"),
        "validation": _check_size(n_val, "n_val"),
        "test": _check_size(n_test, "n_test"),
    }
    if sum(sizes.values()) == 0:
        raise ValueError("At least one of `n_train`, `n_val` and `n_test` must be positive.")
    _check_size(seed, "seed")
    caps = {name: _max_chars_for(name, max_chars) for name in names}
    cache_dir = Path(cache_dir).expanduser()
    for name in names:  # fail before any slow work when a package is missing
        if _DISTRIBUTION_PACKAGES[name] is not None:
            _require(_DISTRIBUTION_PACKAGES[name])
        if name in DEBIAN_PACKAGES:
            check_debian_tools(cache_dir, DEBIAN_PACKAGES[name], f'the "{name}" distribution')

    result: dict[str, DatasetDict] = {}
    for name in names:
        start = time.perf_counter()
        debian = _fetch_debian(name, cache_dir)
        source = _source_tag(name, debian)
        key = (
            f"{name}-{source}-n{sizes['train']}-{sizes['validation']}-{sizes['test']}"
            f"-seed{seed}-max{caps[name]}{'' if group_disjoint else '-iid'}-v{_FORMAT_VERSION}"
        )
        folder = cache_dir / "distributions" / key
        if not force and (folder / "meta.json").is_file():
            result[name] = _load_split_folder(folder, name)
            logger.info("Loaded %r from %s in %.2f s", name, folder, time.perf_counter() - start)
            continue

        items = _raw_items(name, cache_dir, caps[name], gsm_time_limit, force, debian)
        items = [(group, record) for group, record in items if _record_chars(record) <= caps[name]]
        if not group_disjoint:
            items = [(f"{group}#{index}", record) for index, (group, record) in enumerate(items)]
        split = _split_items(items, sizes, seed, name)

        with _temp_folder(folder) as tmp:
            for split_name in _SPLITS:
                _write_jsonl(tmp / f"{split_name}.jsonl", split["splits"][split_name])
            meta = {
                "name": name,
                "format": "text" if _is_text(name) else "prompt-completion",
                "columns": list(_features(name)),
                "source": source,
                "seed": seed,
                "sizes": sizes,
                "max_chars": caps[name],
                "group_disjoint": group_disjoint,
                "groups": split["groups"],
                "available_records": split["available"],
                "available_groups": split["available_groups"],
                "format_version": _FORMAT_VERSION,
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
            _move_into_place(tmp, folder, replace=force)
        result[name] = _load_split_folder(folder, name)
        logger.info(
            "Prepared %r (%d records in %d groups available) in %.1f s",
            name,
            split["available"],
            split["available_groups"],
            time.perf_counter() - start,
        )
    return result


# ------------------------------------------------------------------------------------------------
# Helpers for users of the records
# ------------------------------------------------------------------------------------------------


def to_prompt_completion(dataset: Dataset | DatasetDict) -> Dataset | DatasetDict:
    """Rewrite a `{"text"}` dataset as `{"prompt": "", "completion": text}`; pass prompt-completion through.

    With an empty prompt every token is trained on and scored, exactly as for `text`, so this only
    changes the columns: it lets the `"code"` splits be concatenated with the prompt-completion
    distributions (e.g. `datasets.concatenate_datasets` for a data-mixing baseline) while the others
    keep their prompt masking.

    Args:
        dataset (`datasets.Dataset` or `datasets.DatasetDict`): records with `text` or with
            `prompt` and `completion` columns.

    Returns:
        The same kind of object, with exactly the columns `prompt` and `completion`.

    Raises:
        `ValueError`: if the dataset has neither format.
    """
    if isinstance(dataset, DatasetDict):
        return DatasetDict({split: to_prompt_completion(part) for split, part in dataset.items()})
    columns = set(dataset.column_names)
    if {"prompt", "completion"} <= columns:
        extra = sorted(columns - {"prompt", "completion"})
        return dataset.remove_columns(extra) if extra else dataset
    if "text" in columns:
        return dataset.map(
            lambda row: {"prompt": "", "completion": row["text"]},
            remove_columns=dataset.column_names,
            features=_PROMPT_COMPLETION_FEATURES,
        )
    raise ValueError(f"Expected `text` or `prompt`/`completion` columns, got {sorted(columns)}.")


def record_token_counts(dataset: Dataset, tokenizer: Any) -> list[int]:
    """Number of tokens of each record: prompt + completion, or text, as `SFTTrainer` tokenises it.

    The EOS token that `SFTTrainer` appends is not counted (add 1 per record for it).

    Args:
        dataset (`datasets.Dataset`): records in one of the formats of this module.
        tokenizer (`PreTrainedTokenizerBase`): the tokenizer to count with.

    Returns:
        `list[int]`: one count per record, in dataset order.
    """
    columns = set(dataset.column_names)
    if {"prompt", "completion"} <= columns:
        texts = [prompt + completion for prompt, completion in zip(dataset["prompt"], dataset["completion"])]
    elif "text" in columns:
        texts = list(dataset["text"])
    else:
        raise ValueError(f"Expected `text` or `prompt`/`completion` columns, got {sorted(columns)}.")
    if not texts:
        return []
    return [len(ids) for ids in tokenizer(texts)["input_ids"]]

"""The data side of a data-ablation simulation: corpus partitions and candidate mixtures.

[`split_partitions`] cuts a corpus into the partitions a [`~dem_hf.ablation.pool.PartitionPool`] trains one model
each on: by a column's values, or into N equal random shards. [`check_mixtures`] turns candidates as users write
them (`["a", "b"]`, `"a,b"`, `{"a": 0.7, "c": 0.3}`, `"a=0.7,c=0.3"`) into validated [`Mixture`]s whose weights
sum to 1, raising a `ValueError` that names the offending candidate before any model is loaded.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..merging.arithmetic import effective_weights
from ..vectors.config import check_vector_name

__all__ = [
    "Mixture",
    "check_eval_datasets",
    "check_mixtures",
    "check_training_partitions",
    "parse_candidate",
    "split_partitions",
]

CandidateSpec = str | Collection[str] | Mapping[str, float]


# ---------------------------------------------------------------------------------------------- partitions


def split_partitions(
    dataset, by: str | None = None, num_partitions: int | None = None, seed: int = 0
) -> dict[str, Any]:
    """Split a `datasets.Dataset` into named partitions: by a column's values, or into N equal random shards.

    Args:
        dataset: a map-style `datasets.Dataset`.
        by: a column; each distinct value becomes a partition named after it (sorted by name) and the column is
            dropped. Values must be valid partition names (letters, digits, `.`, `_`, `-`).
        num_partitions: shuffle with `seed` and cut into this many contiguous shards, named `part-0`, `part-1`,
            ... (zero-padded); sizes differ by at most one.
        seed: shuffling seed for `num_partitions`.

    Returns:
        `dict[str, datasets.Dataset]`.

    Example:
        ```python
        >>> split_partitions(corpus, by="source")          # {"books": ..., "code": ..., "web": ...}
        >>> split_partitions(corpus, num_partitions=4, seed=0)  # {"part-0": ..., ..., "part-3": ...}
        ```
    """
    import datasets as hf_datasets

    if not isinstance(dataset, hf_datasets.Dataset):
        raise ValueError(f"split_partitions needs a map-style datasets.Dataset, got {type(dataset).__name__}.")
    if (by is None) == (num_partitions is None):
        raise ValueError("Pass exactly one of by= (a column) or num_partitions= (a number of random shards).")
    if len(dataset) == 0:
        raise ValueError("The corpus is empty; there is nothing to partition.")
    if by is not None:
        return _split_by_column(dataset, by)
    if isinstance(num_partitions, bool) or not isinstance(num_partitions, int) or not 1 <= num_partitions <= len(dataset):
        raise ValueError(
            f"num_partitions must be an integer from 1 to the corpus size {len(dataset)}, got {num_partitions!r}."
        )
    shuffled = dataset.shuffle(seed=seed)
    width = len(str(num_partitions - 1))
    return {f"part-{i:0{width}d}": shuffled.shard(num_partitions, i, contiguous=True).flatten_indices()
            for i in range(num_partitions)}


def _split_by_column(dataset, column: str) -> dict[str, Any]:
    if column not in dataset.column_names:
        raise ValueError(f"Partition column {column!r} is not in the corpus; its columns are {dataset.column_names}.")
    groups: dict[str, list[int]] = {}
    for index, value in enumerate(dataset[column]):
        if value is None:
            raise ValueError(f"Partition column {column!r} has a missing value at row {index}.")
        groups.setdefault(str(value), []).append(index)
    for name in groups:
        try:
            check_vector_name(name)
        except ValueError as error:
            raise ValueError(f"Partition column {column!r}: value {name!r} cannot name a partition. {error}") from None
    return {name: dataset.select(groups[name]).remove_columns(column) for name in sorted(groups)}


# ---------------------------------------------------------------------------------------------- candidates


@dataclass(frozen=True)
class Mixture:
    """A validated candidate: its name and `{partition: weight}` normalised to sum to 1, in pool order."""

    name: str
    weights: dict[str, float]

    def vector_weights(self, partitions: Sequence[str]) -> list[float]:
        return [self.weights.get(name, 0.0) for name in partitions]


def parse_candidate(text: str, label: str) -> list[str] | dict[str, float]:
    """`"a,b"` -> `["a", "b"]`; `"a=0.7,b=0.3"` -> `{"a": 0.7, "b": 0.3}`."""
    items = [item.strip() for item in text.split(",")]
    if not text.strip() or any(not item for item in items):
        raise ValueError(f"Candidate {label} has an empty item; expected 'a,b' or 'a=0.7,b=0.3'.")
    if not any("=" in item for item in items):
        return items
    weights = {}
    for item in items:
        name, sep, weight = item.partition("=")
        if not sep:
            raise ValueError(f"Candidate {label}: {item!r} has no weight; give every partition one ('a=0.7,b=0.3').")
        if name.strip() in weights:
            raise ValueError(f"Candidate {label} repeats a partition: {name.strip()!r}; name each partition once.")
        try:
            weights[name.strip()] = float(weight)
        except ValueError:
            raise ValueError(f"Candidate {label}: {item!r} is not NAME=WEIGHT with a number as WEIGHT.") from None
    return weights


def _mixture(spec: Any, name: str | None, label: str, partitions: list[str]) -> Mixture:
    if isinstance(spec, str):
        spec = parse_candidate(spec, label)
    if isinstance(spec, Mapping):
        weights = dict(spec)
    elif isinstance(spec, Collection) and all(isinstance(n, str) for n in spec):
        names = list(spec)
        if len(set(names)) != len(names):
            raise ValueError(f"Candidate {label} repeats a partition: {names}; name each partition once.")
        weights = {n: 1.0 for n in names}
    else:
        raise ValueError(f"Candidate {label} must be partition names or {{partition: weight}}, got {spec!r}.")
    if not weights:
        raise ValueError(f"Candidate {label} is empty; name at least one of the partitions {partitions}.")
    if unknown := [n for n in weights if n not in partitions]:
        raise ValueError(
            f"Candidate {label} names unknown partitions {unknown}; the pool's partitions are {partitions}."
        )
    for part, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"Candidate {label}: the weight of {part!r} must be a finite number >= 0, got {weight!r}.")
    if not any(weights.values()):
        raise ValueError(f"Candidate {label}: all weights are 0 ({weights}); at least one must be positive.")
    if name is None:  # as written (pool order for a set): "a+b" for a uniform average, else "a=0.7,c=0.3"
        written = [n for n in partitions if n in weights] if isinstance(spec, (set, frozenset)) else list(weights)
        name = ",".join(f"{n}={weights[n]:g}" for n in written) if isinstance(spec, Mapping) else "+".join(written)
    return Mixture(name, effective_weights({n: float(weights[n]) for n in partitions if n in weights}, "average"))


def check_mixtures(candidates: Any, partitions: Sequence[str]) -> list[Mixture]:
    """Validate candidates against the pool's partitions; a `ValueError` names the offending candidate.

    `candidates` is a list of candidates (named automatically: `a+b`, `a=0.7,c=0.3`) or a dict `{name: candidate}`.
    """
    partitions = list(partitions)
    if isinstance(candidates, Mapping):
        entries = [(str(name), spec, repr(str(name))) for name, spec in candidates.items()]
    elif isinstance(candidates, Sequence) and not isinstance(candidates, (str, bytes)):
        entries = [(None, spec, f"#{i} ({spec!r})") for i, spec in enumerate(candidates)]
    else:
        raise ValueError(f"candidates must be a list of candidates or a dict {{name: candidate}}, got {candidates!r}.")
    if not entries:
        raise ValueError(f"No candidates given; pass at least one mixture of the partitions {partitions}.")
    mixtures, seen = [], {}
    for name, spec, label in entries:
        mixture = _mixture(spec, name, label, partitions)
        if mixture.name in seen:
            raise ValueError(
                f"Duplicate candidate name {mixture.name!r} (candidates {seen[mixture.name]} and {label}); "
                "give each candidate its own name with a dict {name: candidate}."
            )
        seen[mixture.name] = label
        mixtures.append(mixture)
    return mixtures


def check_eval_datasets(eval_datasets: Any) -> None:
    if not isinstance(eval_datasets, Mapping) or not eval_datasets:
        got = "an empty dict" if isinstance(eval_datasets, Mapping) else type(eval_datasets).__name__
        raise ValueError(f"eval_datasets must be a non-empty dict {{set name: dataset or EvaluationSet}}, got {got}.")
    if bad := [n for n in eval_datasets if not isinstance(n, str)]:
        raise ValueError(f"Validation set names must be strings, got {bad}.")


def check_training_partitions(partitions: Mapping[str, Any] | None, mixtures: Sequence[Mixture],
                              pool_names: Sequence[str]) -> dict[str, Any]:
    """The training data of every partition a candidate uses (with a positive weight), or a `ValueError`."""
    if partitions is None:
        raise ValueError(
            "validate_proxy needs each partition's training data: pass corpus_partitions={partition: dataset} "
            "(a pool built with PartitionPool.train remembers them)."
        )
    needed = [n for n in pool_names if any(m.weights.get(n, 0) > 0 for m in mixtures)]
    if missing := [n for n in needed if n not in partitions]:
        raise ValueError(
            f"corpus_partitions lacks the training data of partitions {missing}; it has {list(partitions)}."
        )
    return dict(partitions)

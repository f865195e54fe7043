"""Deterministic, group-disjoint train/validation/test splits of `(group, record)` items.

With at least `n_train + n_val + n_test` groups each split takes one record per group; otherwise each
held-out split gets groups in proportion to its size but at least a tenth of them, training gets the
rest, and each split takes records from its groups round-robin.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from typing import Any

from dem_hf.demo.sources import _Item

_HELD_OUT_FIRST = ("test", "validation", "train")  # the order in which splits receive groups


def _split_items(items: Sequence[_Item], sizes: Mapping[str, int], seed: int, name: str) -> dict[str, Any]:
    """Deterministic group-disjoint splits; see the module docstring for the rule."""
    groups: dict[str, list[dict[str, str]]] = {}
    for group, record in items:
        groups.setdefault(group, []).append(record)
    rng = random.Random(f"dem_hf.demo:{name}:{seed}")
    order = sorted(groups)
    rng.shuffle(order)
    for group in order:
        rng.shuffle(groups[group])

    total = sum(sizes.values())
    if len(order) >= total:
        group_counts = dict(sizes)
    else:
        group_counts = {}
        for split in ("test", "validation"):
            n = sizes[split]
            # In proportion to the split sizes, but at least a tenth of the groups, so that a small
            # held-out split still covers many templates/problems/files.
            share = max(1, round(len(order) * n / total), math.ceil(len(order) / 10))
            group_counts[split] = 0 if n == 0 else min(n, share)
        group_counts["train"] = len(order) - group_counts["test"] - group_counts["validation"]
        if sizes["train"] > 0 and group_counts["train"] < 1:
            raise ValueError(f"{name!r} has only {len(order)} groups, too few to split three ways; lower n_val/n_test.")

    splits: dict[str, list[dict[str, str]]] = {}
    group_totals: dict[str, int] = {}
    offset = 0
    for split in _HELD_OUT_FIRST:
        split_groups = order[offset : offset + group_counts[split]]
        offset += group_counts[split]
        wanted = sizes[split]
        chosen: list[tuple[str, dict[str, str]]] = []
        depth = 0
        while len(chosen) < wanted:  # round-robin: the k-th record of every group before any (k+1)-th
            layer = [(g, groups[g][depth]) for g in split_groups if depth < len(groups[g])]
            if not layer:
                available = sum(len(groups[g]) for g in split_groups)
                raise ValueError(
                    f"{name!r} has {available} records (at most the length cap) in the {len(split_groups)} "
                    f"groups given to its {split} split, fewer than the {wanted} requested; request fewer "
                    f"records or raise `max_chars` (the whole distribution has {len(items)} records in "
                    f"{len(order)} groups)."
                )
            chosen.extend(layer[: wanted - len(chosen)])
            depth += 1
        rng.shuffle(chosen)
        splits[split] = [record for _, record in chosen]
        group_totals[split] = len({group for group, _ in chosen})
    return {"splits": splits, "groups": group_totals, "available": len(items), "available_groups": len(order)}

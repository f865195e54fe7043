"""Groups of a model's tensors (per transformer block, per module type) and per-group coefficients.

A coefficient ω_i can be one number per vector (granularity `"vector"`, the DEM paper's), one per vector and
transformer block (`"layer"`) or one per vector and module type inside each block (`"module"`). The groups come
from the base's tensor names alone ([`tensor_group`], pure string work):

- the block index is found as PEFT finds it for `layers_to_transform` / `layers_pattern`
  (`peft.tuners.tuners_utils.check_target_module_exists`): the first `<pattern>.<index>.` in the name, with the
  block list commonly named `layers`, `h`, `blocks` or `layer` ([`BLOCK_PATTERNS`]);
- `"layer"`: one group per block, `"layer.<index>"`, plus `"embeddings"` (tensors outside the blocks whose name
  says embedding: `embed`, `wte`, `wpe`) and `"head"` (everything else outside the blocks: the final norm,
  `lm_head`);
- `"module"`: each block split into `"layer.<index>.attention"`, `"layer.<index>.mlp"`, `"layer.<index>.norm"`
  (and `"layer.<index>.other"` for anything else), with `"embeddings"` and `"head"` as above.

A per-group coefficient is a dict `{group: ω}` ([`coefficient_for`]): a tensor takes its module group's value,
else its block's (`"layer.3"` covers every module of block 3), else the dict's `"*"` entry, else
[`DEFAULT_COEFFICIENT`] (1.0, the weight of a vector added without a coefficient). So `{"layer.0": 0.5, "*": 0.8}`
merges block 0 at 0.5 and everything else at 0.8.

Example:
    ```python
    >>> tensor_group("model.layers.3.self_attn.q_proj.weight", "module")
    'layer.3.attention'
    >>> tensor_group("model.embed_tokens.weight", "layer")
    'embeddings'
    >>> coefficient_for({"layer.3": 0.5, "*": 0.8}, "model.layers.3.mlp.up_proj.weight")
    0.5
    ```
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

GRANULARITIES = ("vector", "layer", "module")
# Names of the ModuleList holding the transformer blocks, in the order they are tried (PEFT's common layers_pattern).
BLOCK_PATTERNS = ("layers", "h", "blocks", "layer")
# PEFT's layer-index regex (tuners_utils.check_target_module_exists): the FIRST numbered segment after the pattern,
# so nested indices (experts of an MoE block) do not count.
_BLOCK_REGEXES = tuple(re.compile(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.") for pattern in BLOCK_PATTERNS)
EMBEDDING_MARKERS = ("embed", "wte", "wpe")
MODULE_KINDS = ("attention", "mlp", "norm", "other")
ALL_GROUPS = "*"  # the key of a per-group coefficient that covers every group not named
VECTOR_GROUP = "all"  # the one group of granularity "vector"
DEFAULT_COEFFICIENT = 1.0

Coefficient = float | dict[str, float]


def block_index(name: str) -> tuple[int, str] | None:
    """`(index, rest)` of a tensor inside a transformer block (rest: the name after `<pattern>.<index>.`), or
    `None` for a tensor outside the blocks."""
    for regex in _BLOCK_REGEXES:
        match = regex.match(name)
        if match is not None:
            return int(match.group("idx")), name[match.end():]
    return None


def module_kind(rest: str) -> str:
    """The module type of a tensor inside a block, from the first segment of its name after the block index:
    `"norm"` (…norm…, ln_1), `"attention"` (…attn…, …attention…), `"mlp"` (mlp, ffn, feed_forward, experts,
    moe), else `"other"`. Norms are tested first: Llama's `post_attention_layernorm` is a norm."""
    segment = rest.split(".", 1)[0].lower()
    if "norm" in segment or re.fullmatch(r"ln(_?\w*)?", segment):
        return "norm"
    if "attn" in segment or "attention" in segment:
        return "attention"
    if any(marker in segment for marker in ("mlp", "ffn", "feed_forward", "experts", "moe")):
        return "mlp"
    return "other"


def tensor_group(name: str, granularity: str) -> str:
    """The group of tensor `name` at `granularity` (`"vector"`: the single group `"all"`); see the module doc."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"Unknown granularity {granularity!r}; expected one of {list(GRANULARITIES)}.")
    if granularity == "vector":
        return VECTOR_GROUP
    found = block_index(name)
    if found is None:
        return "embeddings" if any(marker in name.lower() for marker in EMBEDDING_MARKERS) else "head"
    index, rest = found
    return f"layer.{index}" if granularity == "layer" else f"layer.{index}.{module_kind(rest)}"


def _group_order(group: str) -> tuple:
    if group == "embeddings":
        return (0,)
    parts = group.split(".")
    if parts[0] == "layer" and len(parts) in (2, 3) and parts[1].isdigit():
        kind = MODULE_KINDS.index(parts[2]) if len(parts) > 2 and parts[2] in MODULE_KINDS else -1
        return (1, int(parts[1]), kind)
    return (2, group)


def tensor_groups(names: Iterable[str], granularity: str) -> dict[str, str]:
    """`{tensor name: group}` for every name, refusing a model with no transformer block for `"layer"`/`"module"`."""
    names = list(names)
    groups = {name: tensor_group(name, granularity) for name in names}
    if granularity != "vector" and not any(block_index(name) for name in names):
        raise ValueError(
            f"granularity={granularity!r} needs transformer blocks, but no tensor name has a block index "
            f"'<{'|'.join(BLOCK_PATTERNS)}>.<index>.' (e.g. 'model.layers.0.mlp.up_proj.weight'); the names start "
            f"with {sorted(names)[:5]}. Use granularity='vector'."
        )
    return groups


def group_names(names: Iterable[str], granularity: str) -> list[str]:
    """The groups of `names` at `granularity`, in model order: embeddings, blocks by index, head."""
    return sorted(set(tensor_groups(names, granularity).values()), key=_group_order)


def known_group_keys(names: Iterable[str]) -> list[str]:
    """Every key a per-group coefficient may use for a model with these tensor names: its layer and module groups
    and `"*"` (empty when the model has no transformer block)."""
    names = list(names)
    if not any(block_index(name) for name in names):
        return []
    keys = set(group_names(names, "layer")) | set(group_names(names, "module"))
    return [ALL_GROUPS, *sorted(keys, key=_group_order)]


def coefficient_for(value: Coefficient, name: str) -> float:
    """The weight of one vector on tensor `name`: `value` itself if a number, else the per-group dict's value for
    the tensor's module group ([`value_for_group`])."""
    if not isinstance(value, Mapping):
        return value
    return value_for_group(value, tensor_group(name, "module"))


def value_for_group(value: Coefficient, group: str) -> float:
    """A coefficient's value on a group: a number as it is; from a `{group: ω}` dict the entry of `group`, else of
    its block (`"layer.3"` for `"layer.3.mlp"`), else `"*"`, else `DEFAULT_COEFFICIENT`."""
    if not isinstance(value, Mapping):
        return value
    parts = group.split(".")
    for key in (group, ".".join(parts[:2]) if len(parts) > 2 else None, ALL_GROUPS):
        if key is not None and key in value:
            return value[key]
    return DEFAULT_COEFFICIENT


def sort_groups(groups: Iterable[str]) -> list[str]:
    """Group keys in model order (embeddings, blocks by index, head), `"*"` last."""
    groups = set(groups)
    return sorted(groups - {ALL_GROUPS}, key=_group_order) + ([ALL_GROUPS] if ALL_GROUPS in groups else [])


def is_per_group(coefficients: Mapping[str, Any]) -> bool:
    """Whether any vector's coefficient is a `{group: ω}` dict."""
    return any(isinstance(value, Mapping) for value in coefficients.values())


def mean_coefficient(value: Coefficient) -> float:
    """One number summarising a coefficient: itself, or the mean of a per-group dict's values."""
    if not isinstance(value, Mapping):
        return float(value)
    return sum(value.values()) / len(value) if value else DEFAULT_COEFFICIENT


def coefficient_summary(coefficients: Mapping[str, Coefficient]) -> str:
    """`name=0.62` per vector; a per-group coefficient as its mean and range over the groups."""
    parts = []
    for name, value in coefficients.items():
        if isinstance(value, dict):
            values = list(value.values())
            parts.append(f"{name}≈{sum(values) / len(values):.3g} [{min(values):.3g}, {max(values):.3g}]")
        else:
            parts.append(f"{name}={value:.3g}")
    return ", ".join(parts)

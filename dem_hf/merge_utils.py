"""Pure tensor math of a DEM merge: θ + Σ ω_i Δ_i, one tensor at a time.

Nothing here touches files or models; [`dem_hf.merger`] streams tensors through these functions.
Accumulation is always in float32 and the result is rounded once to the base tensor's dtype, so a bf16
merge is within one bf16 rounding of the exact (float32) merge.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from .config import WEIGHTINGS

if TYPE_CHECKING:
    from .vectors import DistributionVector

Terms = Sequence[tuple["DistributionVector", float]]


def effective_weights(coefficients: dict[str, float], weighting: str = "sum") -> dict[str, float]:
    """The weights actually applied to each vector under a weighting convention.

    - `"sum"`: DEM's free weights, θ + Σ ω_i Δ_i (task arithmetic); returned unchanged.
    - `"average"`: weights divided by their sum, so θ + Σ (ω_i/Σω) Δ_i = Σ (ω_i/Σω) θ_i is the weighted
      parameter average of the fine-tuned models (the data-ablation convention).

    Example:
        ```python
        >>> effective_weights({"a": 1.0, "b": 3.0}, "average")
        {'a': 0.25, 'b': 0.75}
        ```
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"Unknown weighting {weighting!r}; expected one of {list(WEIGHTINGS)}.")
    if weighting == "sum":
        return dict(coefficients)
    total = sum(coefficients.values())
    if abs(total) < 1e-12:
        raise ValueError(f"The 'average' weighting divides by the sum of the coefficients, which is 0: {coefficients}.")
    return {name: weight / total for name, weight in coefficients.items()}


def merge_tensor(base: torch.Tensor, name: str, terms: Terms) -> torch.Tensor:
    """`base + Σ w · Δ[name]` over the vectors in `terms`, accumulated in float32, rounded once.

    Returns a new tensor in `base`'s dtype and device; `base` is left unchanged. Vectors that do not
    change `name` are skipped, and non-float tensors are returned as they are.
    """
    if not base.dtype.is_floating_point:
        return base
    accumulator = base.to(torch.float32, copy=True)
    for vector, weight in terms:
        if weight != 0.0:
            vector.add_to_(accumulator, name, weight)
    return accumulator.to(base.dtype)


def terms_for(name: str, terms: Terms) -> list[tuple["DistributionVector", float]]:
    """The subset of `terms` whose vector changes tensor `name`."""
    return [(vector, weight) for vector, weight in terms if vector.changes(name)]

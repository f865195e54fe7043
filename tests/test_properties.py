"""Property-based checks of the merge arithmetic (Hypothesis)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dem_hf.io.tensors import TensorDict
from dem_hf.merging.arithmetic import effective_weights, merge_tensor
from dem_hf.vectors.vector import DistributionVector

coefficient = st.floats(min_value=-3.0, max_value=3.0, allow_nan=False, allow_infinity=False)


def vector(name: str, delta: torch.Tensor) -> DistributionVector:
    return DistributionVector(name, TensorDict({"w": delta}))


@settings(max_examples=60, deadline=None)
@given(a=coefficient, b=coefficient, seed=st.integers(0, 2**16), rows=st.integers(1, 6), cols=st.integers(1, 6))
def test_merge_is_linear(a, b, seed, rows, cols):
    """merge(a·u + b·v) = a·merge(u) + b·merge(v) − (a + b − 1)·base."""
    generator = torch.Generator().manual_seed(seed)
    base, du, dv = (torch.randn(rows, cols, generator=generator) for _ in range(3))
    u, v = vector("u", du), vector("v", dv)
    combined = merge_tensor(base, "w", [(u, a), (v, b)])
    by_parts = a * merge_tensor(base, "w", [(u, 1.0)]) + b * merge_tensor(base, "w", [(v, 1.0)]) - (a + b - 1) * base
    torch.testing.assert_close(combined, by_parts, rtol=1e-5, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(weights=st.lists(st.floats(min_value=0.01, max_value=5.0), min_size=1, max_size=4), seed=st.integers(0, 2**16))
def test_average_weighting_is_a_convex_combination_of_the_finetuned_tensors(weights, seed):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(3, 4, generator=generator)
    tuned = [base + torch.randn(3, 4, generator=generator) for _ in weights]
    vectors = [vector(f"v{i}", t - base) for i, t in enumerate(tuned)]
    normalised = effective_weights({v.name: w for v, w in zip(vectors, weights)}, "average")
    merged = merge_tensor(base, "w", [(v, normalised[v.name]) for v in vectors])
    expected = sum(w * t for w, t in zip(weights, tuned)) / sum(weights)
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-5)

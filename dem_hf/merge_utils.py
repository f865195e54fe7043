"""Pure tensor math of a DEM merge: θ + Σ ω_i Δ_i, one tensor at a time.

Nothing here opens files or builds models: [`merged_blocks`] reads through a tensor source (a
`CheckpointReader` reads rows straight from disk) and [`dem_hf.merger`] streams its blocks to the writer.
Accumulation is always in float32, the weighted deltas first and the base last, and the result is rounded
once to the base tensor's dtype, so a bf16 merge is within one bf16 rounding of the exact (float32) merge.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from .config import WEIGHTINGS
from .io import BufferPool, TensorBlocks, read_rows
from .tensors import untied_state_dict

if TYPE_CHECKING:
    from .vectors import DistributionVector

Terms = Sequence[tuple["DistributionVector", float]]

# Values per block of a streaming merge: a 1 MiB float32 accumulator stays in cache while every vector is added
# to it, and reads and writes of this size are cheap; larger blocks were slower on the 2-core benchmark machine.
MERGE_BLOCK_VALUES = 1 << 18


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
    accumulator = torch.zeros(base.shape, dtype=torch.float32, device=base.device)
    for vector, weight in terms:
        if weight != 0.0:
            vector.add_to_(accumulator, name, weight, check_finite=False)
    check_merged(accumulator, name, terms)
    accumulator.add_(base)  # last: Σ w·Δ is summed at the deltas' small scale, so only this addition rounds at the base's
    return accumulator.to(base.dtype)


def all_finite(tensor: torch.Tensor) -> bool:
    """True when no value is NaN or ±inf; one pass, no tensor-sized temporary (unlike `isfinite().all()`)."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor.reshape(-1))  # NaN propagates to both
    return math.isfinite(low.item()) and math.isfinite(high.item())


def check_merged(accumulator: torch.Tensor, name: str, terms: Terms, rows: tuple[int, int] | None = None) -> None:
    """Raise `ValueError` naming the vector if a non-finite delta went into `accumulator` (Σ w · Δ).

    A NaN or inf in any delta added with a non-zero weight leaves a NaN or inf in the sum, so one cheap check
    of the sum replaces a check of every delta; only when it fails are the deltas examined to name the
    culprit (an overflow of finite deltas passes). The base is not checked: a non-finite base value is passed
    through, as before.
    """
    if all_finite(accumulator):
        return
    for vector, weight in terms:
        if weight != 0.0:
            vector.check_delta_finite(name, rows)


def merged_blocks(source, name: str, terms: Terms, pool: BufferPool, block_values: int = MERGE_BLOCK_VALUES) -> TensorBlocks:
    """Tensor `name` of `source` plus Σ w · Δ[name], as [`TensorBlocks`] of about `block_values` values.

    Every block is read from disk into `pool`'s buffers, summed in float32 and rounded once to the base dtype,
    exactly as [`merge_tensor`] does for the whole tensor. Tensors that no vector changes, and non-float
    tensors, are copied block by block. Each block reuses the previous block's memory.
    """
    shape, dtype = tuple(source.shape(name)), source.dtype(name)
    active = [(vector, weight) for vector, weight in terms if weight != 0.0] if dtype.is_floating_point else []

    def blocks() -> Iterator[torch.Tensor]:
        for start, stop in row_blocks(shape, block_values):
            block_shape = (stop - start, *shape[1:]) if shape else ()
            count = math.prod(block_shape)
            if not active:
                yield read_rows(source, name, start, stop, pool.take("base", dtype, count))
                continue
            accumulator = pool.take("accumulator", torch.float32, count).view(block_shape).zero_()
            for vector, weight in active:
                vector.add_to_(accumulator, name, weight, rows=(start, stop), pool=pool, check_finite=False)
            check_merged(accumulator, name, active, (start, stop))
            accumulator.add_(read_rows(source, name, start, stop, pool.take("base", dtype, count)))  # as in merge_tensor
            if dtype == torch.float32:
                yield accumulator
            else:
                yield pool.take("out", dtype, count).view(block_shape).copy_(accumulator)

    return TensorBlocks(shape, dtype, blocks())


def row_blocks(shape: tuple[int, ...], block_values: int) -> Iterator[tuple[int, int]]:
    """`(start, stop)` row ranges along dim 0 of about `block_values` values each (at least one row)."""
    rows, row_values = (shape[0], math.prod(shape[1:])) if shape else (1, 1)
    step = max(1, block_values // max(1, row_values))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


@contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch's CPU ops on one thread for a while (restored afterwards).

    A streaming merge is memory- and I/O-bound on small blocks: a second intra-op thread gains nothing, and
    when the cores are busy with other work the threads' synchronisation made the adds many times slower
    (measured: 10 s instead of 0.3 s for a 265M-parameter merge on a loaded 2-core machine).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def terms_for(name: str, terms: Terms) -> list[tuple["DistributionVector", float]]:
    """The subset of `terms` whose vector changes tensor `name`."""
    return [(vector, weight) for vector, weight in terms if vector.changes(name)]


def apply_vectors_(model: torch.nn.Module, terms: Terms) -> torch.nn.Module:
    """Add Σ w·Δ to an in-memory model's parameters, in place (float32 accumulation, one rounding).

    Tied parameters are updated once. Tensors whose names no vector changes are left untouched.
    """
    state = untied_state_dict(model)
    with torch.no_grad():
        for name, tensor in state.items():
            relevant = terms_for(name, terms)
            if relevant:
                tensor.copy_(merge_tensor(tensor, name, relevant))
    return model

"""Pure tensor math of a DEM merge: θ + Σ ω_i Δ_i, one tensor (or one block of rows) at a time.

Nothing here opens files or builds models. Two engines compute the same sum:

- [`merged_blocks`], on NumPy arrays, block by block: the streaming merge of `DEMMerger.save_pretrained`
  (which needs no torch for saved vectors, full or LoRA) and the in-memory `DEMMerger.merge`, so that a saved
  folder and the in-memory model are bitwise identical;
- [`merge_tensor`], on torch tensors on any device: the exact re-anchoring of a coefficient search on GPU.

A merge's weights are either one float per vector (`Terms`) or per tensor ([`TensorTerms`]: per-layer / per-module
coefficients, looked up for each tensor by its group); [`terms_for`] gives the `(vector, weight)` pairs of one
tensor either way, so the per-tensor arithmetic is the same and equal weights give bit-identical merges.

Both do the same float32 operations in the same order, so they agree bit for bit on dense deltas: the weighted
deltas are summed first (`w·Δ` rounded to float32, then added), the base is added last, and the result is rounded
once to the base tensor's dtype, so a bf16 merge is within one bf16 rounding of the exact (float32) merge. A LoRA
delta's block is a float32 matrix product, `(w·s·B[rows]) @ A` by NumPy's BLAS here and `addmm_` by torch's there
([`dem_hf.vectors.factors`]): the two sum the rank's products in their own order, so they agree to float32 rounding
(tests/test_lora_numpy.py bounds both against a float64 computation), not bit for bit.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np

from ..io.blocks import for_each_on_threads, row_blocks
from ..io.dtypes import FLOAT_DTYPES, STORAGE_DTYPES, all_finite, from_float32, to_float32
from ..io.reader import BufferPool, CheckpointReader, to_torch
from ..io.shards import ShardedWriter, TensorBlocks
from ..io.tensors import TensorDict, untied_state_dict
from .config import WEIGHTINGS
from .groups import Coefficient, coefficient_for
from .operators import MergeOperator

if TYPE_CHECKING:
    import torch

    from ..vectors.vector import DistributionVector

Terms = Sequence[tuple["DistributionVector", float]]

# Values per block of a streaming merge: a 1 MiB float32 accumulator stays in cache while every vector is added
# to it, and reads and writes of this size are cheap; larger blocks were slower on the 2-core benchmark machine.
MERGE_BLOCK_VALUES = 1 << 18
# Threads of a streaming merge: reads, adds and writes of different tensors overlap (each releases the GIL).
MERGE_WORKERS = min(4, os.cpu_count() or 1)


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


class TensorTerms:
    """Weights that differ per tensor: each vector's coefficient is a number or a `{group: ω}` dict, resolved for
    a tensor with `dem_hf.merging.groups.coefficient_for` and then weighted per tensor (so `"average"` normalises
    over the vectors' coefficients of that tensor's group).

    Args:
        vectors: the vectors, in merge order.
        coefficients: one coefficient per vector, in the same order.
        weighting: `"sum"` or `"average"` (see [`effective_weights`]).
    """

    def __init__(self, vectors: Sequence[DistributionVector], coefficients: Sequence[Coefficient], weighting: str) -> None:
        self.vectors, self.coefficients, self.weighting = list(vectors), list(coefficients), weighting

    def weights(self, name: str) -> list[tuple[DistributionVector, float]]:
        """`(vector, effective weight)` of every vector on tensor `name`."""
        raw = {vector.name: coefficient_for(value, name) for vector, value in zip(self.vectors, self.coefficients)}
        weights = effective_weights(raw, self.weighting)
        return [(vector, weights[vector.name]) for vector in self.vectors]

    def __iter__(self):
        """`(vector, coefficient)` pairs, as a plain `Terms` list iterates (coefficients may be dicts)."""
        return iter(zip(self.vectors, self.coefficients))


def merge_tensor(base: torch.Tensor, name: str, terms: Terms) -> torch.Tensor:
    """`base + Σ w · Δ[name]` over the vectors in `terms`, with torch on `base`'s device, accumulated in
    float32, rounded once.

    Returns a new tensor in `base`'s dtype and device; `base` is left unchanged. Vectors that do not
    change `name` are skipped, and non-float tensors are returned as they are.
    """
    import torch

    if not base.dtype.is_floating_point:
        return base
    accumulator = torch.zeros(base.shape, dtype=torch.float32, device=base.device)
    for vector, weight in terms:
        if weight != 0.0:
            vector.add_to_(accumulator, name, weight, check_finite=False)
    if accumulator.numel():
        low, high = torch.aminmax(accumulator.reshape(-1))  # one pass; NaN propagates to both
        if not (math.isfinite(low.item()) and math.isfinite(high.item())):
            raise_for_non_finite(name, terms)
    accumulator.add_(base)  # last: Σ w·Δ is summed at the deltas' small scale, so only this addition rounds at the base's
    return accumulator.to(base.dtype)


def raise_for_non_finite(name: str, terms: Terms, rows: tuple[int, int] | None = None) -> None:
    """Called when Σ w · Δ has NaN or inf: raise `ValueError` naming the vector with a non-finite delta.

    A NaN or inf in any delta added with a non-zero weight leaves a NaN or inf in the sum, so one cheap check
    of the sum replaces a check of every delta; only when it fails are the deltas examined (an overflow of
    finite deltas passes). The base is not checked: a non-finite base value is passed through.
    """
    for vector, weight in terms:
        if weight != 0.0:
            vector.check_delta_finite(name, rows)


def raise_for_non_finite_result(name: str, terms: Terms, rows: tuple[int, int], dtype: str, base: np.ndarray) -> None:
    """Raise the `ValueError` for a merged block with NaN or inf: the tensor, its rows, the weights, and why."""
    weights = {vector.name: weight for vector, weight in terms}
    cause = (
        "the base model's own values there are not finite" if not bool(np.isfinite(base).all())
        else f"the sum overflows {dtype}; use smaller coefficients (or a base in a wider dtype)"
    )
    raise ValueError(
        f"Merged tensor {name!r} (rows {rows[0]}:{rows[1]}) has NaN or infinite values with the weights {weights}: "
        f"{cause}. Nothing was saved."
    )


def merged_blocks(
    source, name: str, terms: Terms, pool: BufferPool, block_values: int | None = None, operator: MergeOperator | None = None
) -> TensorBlocks:
    """Tensor `name` of `source` plus Σ w · Δ[name], as [`TensorBlocks`] of NumPy arrays of about `block_values`
    values (rows `row_blocks(shape, block_values)`; default `MERGE_BLOCK_VALUES`), in the base's storage dtype.
    With another `operator` than task arithmetic, plus op(Δ[name], w) instead ([`operator_blocks`]).

    Every block is read into `pool`'s buffers, the weighted deltas summed in float32, checked for NaN/inf, the
    base added last, and the block rounded once to the base dtype and checked again (a coefficient too large
    for the dtype overflows to inf there: `ValueError` naming the tensor and the weights). Tensors that no vector changes, and non-float
    tensors, are copied block by block. Each block reuses the previous block's memory.
    """
    shape, dtype = tuple(source.shape(name)), source.dtype_name(name)
    storage, block_values = STORAGE_DTYPES[dtype], block_values or MERGE_BLOCK_VALUES
    active = [(vector, weight) for vector, weight in terms if weight != 0.0] if dtype in FLOAT_DTYPES else []
    if operator is not None and not operator.is_task_arithmetic and active:
        return operator_blocks(source, name, active, pool, block_values, operator)

    def blocks() -> Iterator[np.ndarray]:
        for start, stop in row_blocks(shape, block_values):
            block_shape = (stop - start, *shape[1:]) if shape else ()
            count = math.prod(block_shape)
            base = source.read_array(name, start, stop, pool.take("base", storage, count))
            if not active:
                yield base
                continue
            accumulator = pool.take("accumulator", np.float32, count).reshape(block_shape)
            accumulator.fill(0.0)
            for vector, weight in active:
                vector.add_rows_to(accumulator, name, weight, (start, stop), pool)
            if not math.isfinite(float(accumulator.sum(dtype=np.float32))):  # any NaN/inf makes the sum one
                raise_for_non_finite(name, active, (start, stop))
            if dtype == "BF16":  # NumPy has no bfloat16: widen the bit patterns exactly
                base = to_float32(base, dtype, out=pool.take("base32", np.float32, count).reshape(block_shape))
            np.add(accumulator, base, out=accumulator, casting="same_kind")  # as in merge_tensor: the base last
            merged = from_float32(accumulator, dtype, out=pool.take("out", storage, count).reshape(block_shape))
            if not all_finite(merged, dtype, pool):  # an overflow of the base's dtype, or a non-finite base value
                raise_for_non_finite_result(name, active, (start, stop), dtype, base)
            yield merged

    return TensorBlocks(shape, dtype, blocks())


def operator_blocks(source, name: str, active: Terms, pool: BufferPool, block_values: int, operator: MergeOperator) -> TensorBlocks:
    """Tensor `name` of `source` plus op(Δ[name], w) for a merge `operator` (see [`dem_hf.merging.operators`]), as
    [`TensorBlocks`] like [`merged_blocks`]: `active` holds the vectors that change `name` with their (non-zero)
    weights for this tensor, wherever those came from.

    DARE works block by block (each block's keep masks are those entries' draws, whatever the block size). TIES and
    breadcrumbs rank each delta's magnitudes over the whole tensor: every vector's delta of this one tensor is read
    whole first (LoRA ones formed as B·A·scaling for this module only), so memory peaks at about (vectors + 2) ×
    this tensor in float32 per merge thread. Each raw delta is checked for NaN/inf; the base is added last and the
    sum rounded once to the base dtype, as in task arithmetic.
    """
    shape, dtype = tuple(source.shape(name)), source.dtype_name(name)
    storage, weights = STORAGE_DTYPES[dtype], [weight for _, weight in active]
    row_values = math.prod(shape[1:]) if shape else 1
    whole = None
    if operator.whole_tensor:
        rows = (0, shape[0] if shape else 1)
        whole = operator.combine([delta_rows(vector, name, rows, np.zeros(shape, np.float32), pool) for vector, _ in active], weights)

    def blocks() -> Iterator[np.ndarray]:
        for start, stop in row_blocks(shape, block_values):
            block_shape = (stop - start, *shape[1:]) if shape else ()
            count = math.prod(block_shape)
            if whole is not None:
                combined = whole[start:stop] if shape else whole
            else:
                deltas = [
                    delta_rows(vector, name, (start, stop), pool.take(f"operand{i}", np.float32, count).reshape(block_shape), pool)
                    for i, (vector, _) in enumerate(active)
                ]
                masks = operator.keep_masks(name, [vector.name for vector, _ in active], start * row_values, block_shape)
                combined = operator.combine(deltas, weights, masks)
            base = source.read_array(name, start, stop, pool.take("base", storage, count))
            if dtype == "BF16":
                base = to_float32(base, dtype, out=pool.take("base32", np.float32, count).reshape(block_shape))
            accumulator = np.add(combined, base, out=pool.take("accumulator", np.float32, count).reshape(block_shape), casting="same_kind")
            merged = from_float32(accumulator, dtype, out=pool.take("out", storage, count).reshape(block_shape))
            if not all_finite(merged, dtype, pool):
                raise_for_non_finite_result(name, active, (start, stop), dtype, base)
            yield merged

    return TensorBlocks(shape, dtype, blocks())


def delta_rows(vector: DistributionVector, name: str, rows: tuple[int, int], out: np.ndarray, pool: BufferPool) -> np.ndarray:
    """Rows `rows` of `vector`'s delta for `name` as float32 in `out` (shaped like them): a LoRA block is formed as
    B·A·scaling. Raises `ValueError` naming the vector when the delta has NaN or inf."""
    out.fill(0.0)
    vector.add_rows_to(out, name, 1.0, rows, pool)
    if not np.isfinite(out).all():
        vector.check_delta_finite(name, rows)
        raise ValueError(f"Vector {vector.name!r} has NaN or infinite values in {name!r} (rows {rows[0]}:{rows[1]}); refusing to merge it.")
    return out


@contextmanager
def single_threaded() -> Iterator[None]:
    """Run NumPy's BLAS (the matrix products of LoRA blocks) and, if torch is loaded, torch's CPU ops on one thread
    for a while (both restored afterwards); BLAS through `threadpoolctl`.

    A streaming merge is memory- and I/O-bound on small blocks and runs its own worker threads: library threads on
    top gain nothing, and when the cores are busy their synchronisation made the merge many times slower (measured
    on a loaded 2-core machine: torch's intra-op threads, 10 s instead of 0.3 s for a 265M-parameter full-vector
    merge; OpenBLAS's threads, 58 s instead of 5.6 s for 4 rank-16 LoRA vectors on a 135M base).
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        if "torch" not in sys.modules:
            yield
            return
        import torch

        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(previous)


def terms_for(name: str, terms: Terms | TensorTerms) -> list[tuple[DistributionVector, float]]:
    """The `(vector, weight)` pairs for tensor `name`: those of `terms` whose vector changes it (for
    [`TensorTerms`], with each vector's weight on that tensor)."""
    pairs = terms.weights(name) if isinstance(terms, TensorTerms) else terms
    return [(vector, weight) for vector, weight in pairs if vector.changes(name)]


def apply_vectors_(
    model: torch.nn.Module, terms: Terms | TensorTerms, operator: MergeOperator | None = None
) -> torch.nn.Module:
    """Add Σ w·Δ (or op(Δ, w) for a merge `operator`) to an in-memory model's parameters, in place, with the
    streaming merge's arithmetic ([`merged_blocks`]), so the result is bitwise what `DEMMerger.save_pretrained` writes.

    Tied parameters are updated once. Tensors whose names no vector changes are left untouched.
    """
    import torch

    state = untied_state_dict(model)
    source, pool = TensorDict(state), BufferPool()
    with torch.no_grad(), single_threaded():
        for name, tensor in state.items():
            relevant = terms_for(name, terms)
            if not relevant:
                continue
            block_values = MERGE_BLOCK_VALUES  # read once: the blocks and their row ranges must agree
            merged = merged_blocks(source, name, relevant, pool, block_values, operator)
            for (start, stop), block in zip(row_blocks(merged.shape, block_values), merged.blocks):
                rows = tensor if tensor.dim() == 0 else tensor[start:stop]
                rows.copy_(to_torch(block, merged.dtype))  # the base rows were read before this block was formed
    return model


def write_merged(
    base: CheckpointReader,
    terms: Terms | TensorTerms,
    writer: ShardedWriter,
    workers: int | None = None,
    operator: MergeOperator | None = None,
) -> None:
    """Stream θ + Σ w·Δ (or θ + op(Δ, w) for a merge `operator`, see [`operator_blocks`]) into `writer` (planned
    with the base's layout), tensor by tensor and block by block, on `workers` threads (default `MERGE_WORKERS`),
    largest tensors first; each tensor's weights come from `terms` (per vector, or per group with [`TensorTerms`]).

    Memory holds a few block buffers per thread, never a tensor or a shard. The first error stops the merge:
    tensors not yet started are cancelled, and the error is raised once the running ones end.
    """
    def merge_one(name: str, pool: BufferPool) -> None:
        writer.add(name, merged_blocks(base, name, terms_for(name, terms), pool, operator=operator))

    names = sorted(base.keys(), key=lambda name: -math.prod(base.shape(name)))
    with single_threaded():
        try:
            for_each_on_threads(merge_one, names, workers or MERGE_WORKERS, thread_name_prefix="dem_hf-merge")
        finally:
            for source in [base, *(vector.tensors for vector, _ in terms)]:
                if isinstance(source, CheckpointReader):
                    source.close()  # the threads' file descriptors

"""LoRA factors in NumPy: the streaming merge's rows of `s·B·A` without torch.

A LoRA vector keeps each module's delta as factors `A` (rank × in) and `B` (out × rank) with a scaling `s`; the
streaming merge ([`dem_hf.merging.arithmetic.merged_blocks`]) needs the delta one block of rows at a time, so it forms
`(ω·s·B[rows]) @ A` per block (or `(ω·s·A[:, rows].T) @ B.T` for a transposed module: embeddings, `fan_in_fan_out`)
with NumPy's matrix product in float32: only the block's rows of `B` take part, and the dense delta of a whole module
(let alone of the model) is never formed. Factors stored as bfloat16 or float16 are widened exactly with
[`dem_hf.io.dtypes.to_float32`], as the dense deltas are.

Each merge thread keeps the float32 factors of the module it is working on ([`FactorCache`]), so the factors are read
and checked once per module rather than once per block. Nothing here imports torch: `dem-hf merge` of LoRA vectors
starts as fast as a merge of full vectors.
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING

import numpy as np

from ..io.dtypes import to_float32
from .config import LORA_A, LORA_B

# Values of the scratch product per matrix multiplication: one streaming-merge block (see MERGE_BLOCK_VALUES), so
# a block is one product, and a whole tensor asked for at once is formed in pieces of this size.
PRODUCT_VALUES = 1 << 18

if TYPE_CHECKING:
    from ..io.reader import BufferPool
    from ..io.tensors import TensorSource


def read_factor(tensors: TensorSource, name: str) -> np.ndarray:
    """The whole 2-D factor `name` of `tensors` as a new float32 array (exact for float16/bfloat16 storage)."""
    rows = tensors.shape(name)[0]
    dtype = tensors.dtype_name(name)
    values = to_float32(tensors.read_array(name, 0, rows), dtype)
    return values.copy() if dtype == "F32" else values  # float32 storage may be a view of memory the caller owns


def non_finite_factor(a: np.ndarray, b: np.ndarray) -> str | None:
    """`".lora_A"` or `".lora_B"` for the first factor with NaN or inf, else `None`."""
    for suffix, factor in ((LORA_A, a), (LORA_B, b)):
        if not np.isfinite(factor).all():
            return suffix
    return None


class FactorCache:
    """The float32 factors `(A, B)` of the last LoRA module each thread read, for one merge.

    An entry is valid for the merge whose per-thread [`BufferPool`] asked for it (held by a weak reference, so a later
    merge re-reads factors that may have changed in memory meanwhile); each thread holds at most one module's
    factors, released with the thread.
    """

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self, name: str, pool: BufferPool) -> tuple[np.ndarray, np.ndarray] | None:
        entry = getattr(self._local, "entry", None)
        if entry is not None and entry[0] == name and entry[1]() is pool:
            return entry[2], entry[3]
        return None

    def put(self, name: str, pool: BufferPool, a: np.ndarray, b: np.ndarray) -> None:
        self._local.entry = (name, weakref.ref(pool), a, b)


def add_lora_rows(
    accumulator: np.ndarray, a: np.ndarray, b: np.ndarray, alpha: float, rows: tuple[int, int], transpose: bool, pool: BufferPool
) -> np.ndarray:
    """`accumulator += alpha · (B @ A)[rows]` (or `(B @ A).T[rows]` if `transpose`) in float32, in place.

    The scale is applied to the rank-sized operand (`alpha` rounded to float32 first, as a BLAS `sgemm` rounds its
    `alpha`), the product goes into a pooled buffer of at most `PRODUCT_VALUES` values (more rows are formed in pieces)
    and is then added: one rounding for the scaled factor, the matrix product's own, and one for the addition.

    Args:
        accumulator: float32 block of the delta's rows `rows`, shaped `(stop - start, columns)`.
        a: the float32 factor A, `(rank, in)`.
        b: the float32 factor B, `(out, rank)`.
        alpha: the vector's weight times the module's scaling.
        rows: `(start, stop)` rows of the delta (rows of B, or columns of A when transposed).
        transpose: the delta is `(B @ A).T` (embeddings, `fan_in_fan_out` layers).
        pool: the thread's buffers.

    Returns:
        `accumulator`.

    Example:
        ```python
        >>> from dem_hf.io.reader import BufferPool
        >>> a, b = np.ones((2, 3), np.float32), np.ones((4, 2), np.float32)
        >>> add_lora_rows(np.zeros((2, 3), np.float32), a, b, 0.5, (1, 3), False, BufferPool())
        array([[1., 1., 1.],
               [1., 1., 1.]], dtype=float32)
        ```
    """
    start, stop = rows
    left, right = (a[:, start:stop].T, b.T) if transpose else (b[start:stop], a)
    scaled = np.multiply(left, np.float32(alpha), out=pool.take("lora_left", np.float32, left.size).reshape(left.shape))
    columns = right.shape[1]
    step = max(1, PRODUCT_VALUES // max(1, columns))  # a whole tensor (TIES reads deltas whole) in bounded scratch
    for first in range(0, stop - start, step):
        chunk = scaled[first : first + step]
        product = np.matmul(chunk, right, out=pool.take("lora_product", np.float32, chunk.shape[0] * columns).reshape(-1, columns))
        accumulator[first : first + step] += product
    return accumulator

"""Extracting a full distribution vector, Δ = θ_ft − θ, from a fine-tuned model and its base.

Two paths, which give the same deltas bit for bit (float32 subtraction, then one rounding to the fine-tuned tensor's
dtype; tensors the fine-tune left unchanged are not stored):

- [`write_delta_folder`], what `DistributionVector.from_models(..., save_directory=...)` and `dem-hf extract` use:
  a streaming pass in NumPy, without torch for two saved checkpoints, like the merge. It first finds which tensors
  changed ([`changed_tensors`]: usually the first block of rows of each tells), plans the vector's shards from
  that, then computes every tensor block by block on worker threads and writes each block in place
  ([`~dem_hf.io.shards.ShardedWriter`] with a layout, ordered inside each shard as safetensors orders them, so the
  files are those a buffered write gives). Memory holds a few block buffers per thread, whatever the model's size.
- [`delta_tensors`], for a vector kept in memory (`from_models` without `save_directory`): whole torch tensors,
  one at a time.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..io.blocks import for_each_on_threads, row_blocks
from ..io.dtypes import FLOAT_DTYPES, STORAGE_DTYPES, all_finite, from_float32, to_float32
from ..io.reader import BufferPool, CheckpointReader
from ..io.shards import DEFAULT_MAX_SHARD_SIZE, ShardedWriter, TensorBlocks
from ..io.tensors import TensorSource
from .folder import VECTOR_STEM, staged_vector_folder

if TYPE_CHECKING:
    import torch

# Values per block of rows: as the merge's blocks (`dem_hf.merging.arithmetic.MERGE_BLOCK_VALUES`), a few 1 MiB
# buffers per thread that stay in cache.
EXTRACT_BLOCK_VALUES = 1 << 18
# Threads of a streaming extraction: reads, subtractions and writes of different tensors overlap.
EXTRACT_WORKERS = min(4, os.cpu_count() or 1)


def write_delta_folder(
    base: TensorSource,
    tuned: TensorSource,
    save_directory: str | os.PathLike,
    config: dict[str, Any],
    *,
    overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Stream θ_ft − θ of every changed float tensor into a vector folder (tensors, `vector_config.json` and card),
    atomically, in NumPy.

    `base` and `tuned` must have the same tensor names and shapes, float where the other is float
    ([`~dem_hf.io.tensors.check_same_tensors`]). Raises `ValueError` when a non-float tensor differs or a delta has
    NaN or inf; nothing is then left behind.

    Args:
        base: the base model's tensors θ (a [`CheckpointReader`] for a saved model).
        tuned: the fine-tuned model's tensors θ_ft.
        save_directory: the vector folder (written under a temporary name, moved into place when complete).
        config: the vector's `vector_config.json`.
        overwrite: replace an existing, non-empty folder.
        max_shard_size: cap per shard.

    Returns:
        `Path`: the folder.

    Example:
        ```python
        >>> base, tuned = CheckpointReader("base"), CheckpointReader("base-sft-math")
        >>> write_delta_folder(base, tuned, "vectors/math", vector.config_dict())
        ```
    """
    pool = BufferPool()
    names = changed_tensors(base, tuned, pool)
    layout = [(name, tuple(tuned.shape(name)), tuned.dtype_name(name)) for name in names]
    with staged_vector_folder(save_directory, config, overwrite=overwrite) as staging:
        with ShardedWriter(staging, VECTOR_STEM, max_shard_size, layout=layout, order="safetensors") as writer:
            write_deltas(base, tuned, names, writer)
            writer.close()
    return Path(save_directory)


def changed_tensors(base: TensorSource, tuned: TensorSource, pool: BufferPool) -> list[str]:
    """The float tensors (in the base's order) where θ_ft − θ, taken in float32, is not all zeros.

    A tensor's blocks are read until one differs, so a changed tensor usually costs one block and only unchanged
    ones are read whole. Raises `ValueError` for a non-float tensor that differs and for a NaN or inf delta
    met on the way (the rest are found while writing).
    """
    changed = []
    for name in base.keys():
        if base.dtype_name(name) not in FLOAT_DTYPES:
            check_equal_non_float(base, tuned, name, pool)
        elif any(delta.any() for delta in _float32_deltas(base, tuned, name, pool)):  # NaN counts as a change
            changed.append(name)
    return changed


def check_equal_non_float(base: TensorSource, tuned: TensorSource, name: str, pool: BufferPool) -> None:
    """Raise `ValueError` unless non-float tensor `name` holds the same values in both models."""
    shape = tuple(base.shape(name))
    for start, stop in row_blocks(shape, EXTRACT_BLOCK_VALUES):
        count = math.prod((stop - start, *shape[1:])) if shape else 1
        ours = base.read_array(name, start, stop, pool.take("base", STORAGE_DTYPES[base.dtype_name(name)], count))
        theirs = tuned.read_array(name, start, stop, pool.take("tuned", STORAGE_DTYPES[tuned.dtype_name(name)], count))
        if not np.array_equal(ours, theirs):
            raise ValueError(f"Non-float tensor {name!r} differs between base and fine-tuned model.")


def _float32_deltas(base: TensorSource, tuned: TensorSource, name: str, pool: BufferPool) -> Iterator[np.ndarray]:
    """Blocks of rows of θ_ft − θ for float tensor `name`, in float32 (each in the buffer of the previous one),
    checked for NaN and inf (`ValueError` naming the tensor)."""
    shape, block_values = tuple(base.shape(name)), EXTRACT_BLOCK_VALUES
    base_dtype, tuned_dtype = base.dtype_name(name), tuned.dtype_name(name)
    for start, stop in row_blocks(shape, block_values):
        block_shape = (stop - start, *shape[1:]) if shape else ()
        count = math.prod(block_shape)
        ours = base.read_array(name, start, stop, pool.take("base", STORAGE_DTYPES[base_dtype], count))
        theirs = tuned.read_array(name, start, stop, pool.take("tuned", STORAGE_DTYPES[tuned_dtype], count))
        ours = to_float32(ours, base_dtype, out=pool.take("base32", np.float32, count).reshape(block_shape))
        theirs = to_float32(theirs, tuned_dtype, out=pool.take("tuned32", np.float32, count).reshape(block_shape))
        delta = np.subtract(theirs, ours, out=pool.take("delta32", np.float32, count).reshape(block_shape))
        if not math.isfinite(float(delta.sum(dtype=np.float32))) and not np.isfinite(delta).all():  # the sum: one cheap pass
            raise ValueError(f"Fine-tuned tensor {name!r} has NaN or infinite values.")
        yield delta


def delta_blocks(base: TensorSource, tuned: TensorSource, name: str, pool: BufferPool) -> TensorBlocks:
    """θ_ft − θ for float tensor `name` as [`TensorBlocks`] in the fine-tuned tensor's dtype: each block subtracted
    in float32 and rounded once (bfloat16 as torch rounds it, [`dem_hf.io.dtypes.from_float32`])."""
    shape, dtype = tuple(tuned.shape(name)), tuned.dtype_name(name)

    def blocks() -> Iterator[np.ndarray]:
        for delta in _float32_deltas(base, tuned, name, pool):
            rounded = from_float32(delta, dtype, out=pool.take("out", STORAGE_DTYPES[dtype], delta.size).reshape(delta.shape))
            if not all_finite(rounded, dtype, pool):  # finite in float32: the delta overflows the tensor's dtype
                raise_overflow(name, dtype)
            yield rounded

    return TensorBlocks(shape, dtype, blocks())


def write_deltas(base: TensorSource, tuned: TensorSource, names: list[str], writer: ShardedWriter, workers: int | None = None) -> None:
    """Write θ_ft − θ of tensors `names` into `writer` (planned with their layout), block by block, on `workers`
    threads (default `EXTRACT_WORKERS`), largest tensors first. The first error stops the pass."""
    ordered = sorted(names, key=lambda name: -math.prod(base.shape(name)))
    try:
        for_each_on_threads(
            lambda name, pool: writer.add(name, delta_blocks(base, tuned, name, pool)), ordered,
            workers or EXTRACT_WORKERS, thread_name_prefix="dem_hf-extract",
        )
    finally:
        for source in (base, tuned):
            if isinstance(source, CheckpointReader):
                source.close()  # the threads' file descriptors


def delta_tensors(base: TensorSource, tuned: TensorSource) -> Iterator[tuple[str, torch.Tensor]]:
    """`(name, θ_ft − θ)` of every changed float tensor as whole torch tensors in the fine-tuned tensor's dtype,
    one at a time (for a vector kept in memory). Raises `ValueError` as [`write_delta_folder`] does."""
    import torch

    for name in base.keys():
        base_tensor = base.get(name).detach().to("cpu")
        tuned_tensor = tuned.get(name).detach().to("cpu")
        if base.dtype_name(name) not in FLOAT_DTYPES:
            if not torch.equal(base_tensor, tuned_tensor):
                raise ValueError(f"Non-float tensor {name!r} differs between base and fine-tuned model.")
            continue
        delta = tuned_tensor.to(torch.float32) - base_tensor.to(torch.float32)
        if not torch.isfinite(delta).all():
            raise ValueError(f"Fine-tuned tensor {name!r} has NaN or infinite values.")
        if delta.any():
            rounded = delta.to(tuned_tensor.dtype)
            if not torch.isfinite(rounded).all():
                raise_overflow(name, tuned.dtype_name(name))
            yield name, rounded


def raise_overflow(name: str, dtype: str) -> None:
    """The `ValueError` for a delta too large for the fine-tuned tensor's dtype (a float16 delta beyond ±65504)."""
    raise ValueError(
        f"The delta of tensor {name!r} (fine-tuned − base) does not fit the fine-tuned tensor's dtype {dtype}: some "
        "entries would be stored as infinite. Are the base and the fine-tuned model related? Otherwise save the "
        "fine-tuned model in float32 or bfloat16 before extracting."
    )

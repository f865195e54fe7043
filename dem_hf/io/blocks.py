"""The loop shapes of dem_hf's streaming passes over checkpoints: row blocks of a tensor, and tensors spread over
worker threads.

A streaming pass (the merge of [`dem_hf.merging.arithmetic.write_merged`], the extraction of
[`dem_hf.vectors.extraction.write_deltas`]) reads one block of rows of one tensor at a time into reused buffers
([`~dem_hf.io.reader.BufferPool`]) and hands each finished block to a planned-shard writer
([`~dem_hf.io.shards.ShardedWriter`]), on a few threads so that reads, arithmetic and writes of different tensors
overlap (each releases the GIL).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

from .reader import BufferPool


def row_blocks(shape: tuple[int, ...], block_values: int) -> Iterator[tuple[int, int]]:
    """`(start, stop)` row ranges along dim 0 of about `block_values` values each (at least one row).

    A 0-d tensor is one block of one row; a tensor with no rows has no blocks.

    Example:
        ```python
        >>> list(row_blocks((5, 4), 8))
        [(0, 2), (2, 4), (4, 5)]
        ```
    """
    rows, row_values = (shape[0], math.prod(shape[1:])) if shape else (1, 1)
    step = max(1, block_values // max(1, row_values))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def for_each_on_threads(
    work: Callable[[str, BufferPool], None], names: Iterable[str], workers: int, *, thread_name_prefix: str = "dem_hf"
) -> None:
    """Call `work(name, pool)` for every name, on `workers` threads, each thread with its own [`BufferPool`].

    Names are started in the order given. The first error stops the pass: names not yet started are cancelled, and
    the error is raised once the running ones end. With `workers <= 1` everything runs on the calling thread.

    Args:
        work: what to do with one name; `pool` is the calling thread's buffers.
        names: the items, e.g. tensor names, largest first.
        workers: how many threads.
        thread_name_prefix: names the threads (what a profiler or `py-spy` shows).
    """
    if workers <= 1:
        pool = BufferPool()
        for name in names:
            work(name, pool)
        return
    local = threading.local()

    def run(name: str) -> None:
        if not hasattr(local, "pool"):
            local.pool = BufferPool()
        work(name, local.pool)

    executor = ThreadPoolExecutor(workers, thread_name_prefix=thread_name_prefix)
    try:
        for future in [executor.submit(run, name) for name in names]:
            future.result()
    finally:
        executor.shutdown(wait=True, cancel_futures=True)

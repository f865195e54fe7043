"""Reading checkpoints one tensor, or one block of rows, at a time.

Everything heavy in dem_hf reads through [`CheckpointReader`]: lazy access to a folder of safetensors files
(single file or sharded with an index). Only headers are read up front; [`~CheckpointReader.read_array`]
reads rows of one tensor straight from the file into a reused NumPy buffer ([`BufferPool`]), which is what
the streaming merge uses, without importing torch. [`~CheckpointReader.get`] and friends return torch
tensors for the rest of the package. Writing is in [`dem_hf.io.shards`]; every output folder is built by
[`dem_hf.io.outputs.atomic_directory`].
"""

from __future__ import annotations

import json
import math
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from safetensors import SafetensorError, safe_open

from .dtypes import STORAGE_DTYPES, TORCH_NAMES, to_float32

if TYPE_CHECKING:
    import torch


class CheckpointReader:
    """Lazy, tensor-at-a-time view of a safetensors checkpoint folder.

    Works with `<stem>.safetensors` or with shards listed in `<stem>.safetensors.index.json`, the layout
    Transformers writes. Only headers are read up front. Reads are positioned ([`read_at`]) on a descriptor per
    thread, so one reader can serve several threads at once.

    Args:
        folder: the checkpoint folder.
        stem: file stem, `"model"` for Transformers checkpoints, `"vector"` for distribution vectors.

    Example:
        ```python
        >>> reader = CheckpointReader("path/to/model")
        >>> for name in reader.keys():
        ...     tensor = reader.get(name)  # torch; reader.read_array(name, 0, 8) reads rows as NumPy
        ```
    """

    def __init__(self, folder: str | os.PathLike, stem: str = "model") -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"Checkpoint folder {str(self.folder)!r} does not exist.")
        self._file_of: dict[str, Path] = {}
        self._shape: dict[str, tuple[int, ...]] = {}
        self._dtype: dict[str, str] = {}  # safetensors dtype names ("F32", "BF16", ...)
        self._offset: dict[str, int] = {}  # where each tensor's bytes start in its file
        # Files opened by `read_array`, kept open until `close`: one descriptor per file and thread, so that the
        # kernel's readahead follows each thread's sequential reads instead of seeing them interleaved.
        self._descriptors: dict[tuple[int, Path], int] = {}
        self._lock = threading.Lock()
        for file in self._files(stem):
            self._read_header(file)

    def _files(self, stem: str) -> list[Path]:
        single = self.folder / f"{stem}.safetensors"
        index = self.folder / f"{stem}.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as error:
                raise ValueError(f"Index file {str(index)!r} is not a valid safetensors index: {error}") from error
            files = [self.folder / name for name in dict.fromkeys(weight_map.values())]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise FileNotFoundError(f"Shards listed in {str(index)!r} are missing: {missing[:5]}")
            return files
        if single.is_file():
            return [single]
        found = sorted(p.name for p in self.folder.iterdir())[:10]
        raise FileNotFoundError(
            f"No {stem}.safetensors or {stem}.safetensors.index.json in {str(self.folder)!r} (found {found}). "
            "dem_hf reads safetensors checkpoints only; re-save the model with `save_pretrained`."
        )

    def _read_header(self, file: Path) -> None:
        try:
            with safe_open(file, framework="numpy") as handle:  # validates the header against the file's size
                for name in handle.keys():
                    view = handle.get_slice(name)
                    dtype = view.get_dtype()
                    if dtype not in STORAGE_DTYPES:
                        raise ValueError(f"Tensor {name!r} in {str(file)!r} has unsupported dtype {dtype}.")
                    self._file_of[name] = file
                    self._shape[name] = tuple(view.get_shape())
                    self._dtype[name] = dtype
        except SafetensorError as error:
            raise ValueError(f"{str(file)!r} is not a readable safetensors file (truncated or corrupted?): {error}") from error
        with open(file, "rb") as handle:  # safe_open validated the header; it does not expose the data offsets
            length = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(length))
        for name, info in header.items():
            if name != "__metadata__":
                self._offset[name] = 8 + length + info["data_offsets"][0]

    def keys(self) -> list[str]:
        """Tensor names in checkpoint order."""
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shape[name]

    def dtype_name(self, name: str) -> str:
        """The tensor's safetensors dtype name, e.g. `"BF16"`."""
        return self._dtype[name]

    def dtype(self, name: str) -> torch.dtype:
        """The tensor's `torch.dtype` (imports torch)."""
        import torch

        return getattr(torch, TORCH_NAMES[self._dtype[name]])

    def read_array(self, name: str, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows `start:stop` (along dim 0) of a tensor as a NumPy array, read straight from the file into `out`.

        The array has the tensor's storage dtype (`uint16` bit patterns for bfloat16, see [`dem_hf.io.dtypes`]).
        `out` is a flat buffer of that dtype with at least that many values, typically a [`BufferPool`]
        buffer reused block after block (fresh pages cost far more than the copy); without it a new array
        is allocated. A 0-d tensor has a single row. Returns a view of `out` shaped like the rows.
        """
        shape, dtype = self._shape[name], STORAGE_DTYPES[self._dtype[name]]
        rows, row_values = (shape[0], math.prod(shape[1:])) if shape else (1, 1)
        if not 0 <= start <= stop <= rows:
            raise IndexError(f"Rows {start}:{stop} are out of range for {name!r} of shape {list(shape)}.")
        count = (stop - start) * row_values
        out = np.empty(count, dtype=dtype) if out is None else _flat_prefix(out, dtype, count)
        if count:
            target = memoryview(out).cast("B")
            descriptor = self._descriptor(self._file_of[name])
            position = self._offset[name] + start * row_values * dtype.itemsize
            done = 0
            while done < len(target):
                got = read_at(descriptor, target[done:], position + done)
                if not got:
                    raise ValueError(f"{str(self._file_of[name])!r} ended inside tensor {name!r} (truncated?).")
                done += got
        return out.reshape((stop - start, *shape[1:]) if shape else ())

    def head_float32(self, name: str, count: int) -> np.ndarray:
        """The first `count` values of a float tensor (flattened) as float32, reading only the rows that hold them."""
        shape = self._shape[name]
        row_values = max(1, math.prod(shape[1:])) if len(shape) > 1 else 1
        rows = min(shape[0], -(-count // row_values)) if shape else 1
        values = self.read_array(name, 0, rows).reshape(-1)[:count]
        return to_float32(values, self._dtype[name])

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor as a torch tensor (a fresh copy, safe to modify in place)."""
        if name not in self._file_of:
            raise KeyError(f"Tensor {name!r} is not in checkpoint {str(self.folder)!r}.")
        with safe_open(self._file_of[name], framework="pt") as handle:
            return handle.get_tensor(name)

    def head(self, name: str, count: int) -> torch.Tensor:
        """The first `count` values of a tensor (flattened) as a torch tensor, reading only the rows that hold them."""
        with safe_open(self._file_of[name], framework="pt") as handle:
            view = handle.get_slice(name)
            shape = self._shape[name]
            if len(shape) < 2:
                return view[:count].reshape(-1) if shape else view[...].reshape(-1)
            row_size = max(1, math.prod(shape[1:]))
            return view[: -(-count // row_size)].reshape(-1)[:count]

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows `start:stop` of a tensor as a torch tensor of its dtype (see [`~CheckpointReader.read_array`])."""
        return to_torch(self.read_array(name, start, stop), self._dtype[name])

    def _descriptor(self, file: Path) -> int:
        key = (threading.get_ident(), file)
        with self._lock:
            if key not in self._descriptors:
                self._descriptors[key] = os.open(file, os.O_RDONLY | BINARY)
            return self._descriptors[key]

    def close(self) -> None:
        """Close the files `read_array` keeps open (reopened on demand)."""
        with self._lock:
            descriptors, self._descriptors = list(self._descriptors.values()), {}
        for descriptor in descriptors:
            os.close(descriptor)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


BINARY = getattr(os, "O_BINARY", 0)  # Windows opens descriptors in text mode without it


def read_at(descriptor: int, target: memoryview, position: int) -> int:
    """Read into `target` from `position` of a file; returns the bytes read (0 at the end of the file).

    A positioned read (`os.preadv`) where the platform has one; elsewhere (Windows) a seek and a read, so the
    descriptor must then belong to one thread, as [`CheckpointReader`]'s do.
    """
    if hasattr(os, "preadv"):
        return os.preadv(descriptor, [target], position)
    os.lseek(descriptor, position, os.SEEK_SET)
    data = os.read(descriptor, len(target))
    target[: len(data)] = data
    return len(data)


def _flat_prefix(buffer: np.ndarray, dtype: np.dtype, count: int) -> np.ndarray:
    if buffer.dtype != dtype or not buffer.flags.c_contiguous or buffer.size < count:
        raise ValueError(f"Expected a contiguous {dtype} buffer of at least {count} values, got {buffer.dtype} {list(buffer.shape)}.")
    return buffer.reshape(-1)[:count]


def to_torch(array: np.ndarray, dtype_name: str) -> torch.Tensor:
    """A torch tensor sharing `array`'s memory, with the dtype `dtype_name` (bfloat16 from its bit patterns)."""
    import torch

    if dtype_name == "BF16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A CPU NumPy view (or copy, from another device) of a torch tensor's values in their storage dtype
    (bfloat16 as its bit patterns), contiguous."""
    import torch

    tensor = tensor.detach().to("cpu").contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()


def read_rows(source, name: str, start: int, stop: int) -> torch.Tensor:
    """Rows `start:stop` of tensor `name` from any tensor source as a torch tensor: a positioned read from a
    [`CheckpointReader`], a view for tensors already in memory."""
    if isinstance(source, CheckpointReader):
        return source.read_rows(name, start, stop)
    tensor = source.get(name)
    return tensor if tensor.dim() == 0 else tensor[start:stop]


class BufferPool:
    """Reusable flat NumPy buffers, one per (role, dtype), grown on demand.

    Streaming loops take the same buffers for every block instead of allocating new arrays: peak memory
    then follows the block size, not the largest tensor, and no time goes into faulting in fresh pages.
    A pool serves one thread.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, np.dtype], np.ndarray] = {}

    def take(self, role: str, dtype, count: int) -> np.ndarray:
        """A contiguous 1-d array of `count` values, valid until the next `take` of the same role and dtype."""
        dtype = np.dtype(dtype)
        buffer = self._buffers.get((role, dtype))
        if buffer is None or buffer.size < count:
            buffer = np.empty(max(count, 1), dtype=dtype)
            self._buffers[(role, dtype)] = buffer
        return buffer[:count]

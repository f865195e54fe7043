"""Writing checkpoints as size-capped safetensors shards plus the Transformers index.

[`ShardedWriter`] has two modes. Given a *layout* (every tensor's name, shape and dtype), the shards and
their headers are planned before anything is computed, each tensor's place in its file is known, and a
tensor goes to disk as soon as it is added, block by block ([`TensorBlocks`]), with positioned writes:
tensors may then be added in any order and from several threads at once, and memory holds no shard at
all. This is how a merge is written. Without a layout (the set of tensors is not known in advance),
tensors are queued and a shard is written whenever the next tensor would push it past the cap.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .dtypes import STORAGE_DTYPES, dtype_name_of_torch, itemsize
from .reader import BINARY

if TYPE_CHECKING:
    import torch

DEFAULT_MAX_SHARD_SIZE = "2GB"
# Where safetensors' own `save_file` puts each tensor in a file: sorted by dtype, in this order (its `Dtype` enum,
# widest first), then by name. A planned writer with `order="safetensors"` follows it, so that it writes the bytes
# a queued writer (which calls `save_file`) writes for the same tensors.
SAFETENSORS_DTYPE_ORDER = ("I64", "F64", "F32", "I32", "BF16", "F16", "I16", "I8", "U8", "BOOL")
LAYOUT_ORDERS = ("layout", "safetensors")


@dataclass
class TensorBlocks:
    """A tensor handed over as consecutive blocks of rows, so a writer can stream it without ever holding it
    whole. `blocks` yields NumPy arrays of the storage dtype of `dtype` (a safetensors dtype name) whose rows,
    concatenated, make a tensor of `shape`; each block may reuse the memory of the previous one, so it is
    consumed before the next is asked for."""

    shape: tuple[int, ...]
    dtype: str
    blocks: Iterable[np.ndarray]


def parse_size(size: int | str) -> int:
    """Parse `"2GB"`, `"500MB"`, `"1GiB"` or an int into bytes."""
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"Expected a positive shard size, got {size}.")
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)\s*", str(size).upper())
    if match is None:
        raise ValueError(f"Expected a size such as '2GB', '500MB' or a number of bytes, got {size!r}.")
    number, unit = float(match.group(1)), match.group(2)
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return int(number * base**power)


@dataclass
class _Shard:
    path: Path
    header: bytes
    data_bytes: int
    descriptor: int | None = None


@dataclass
class _Slot:
    shard: _Shard
    position: int  # where the tensor's bytes start in the shard file
    shape: tuple[int, ...]
    dtype: str
    size: int


class ShardedWriter:
    """Write tensors into size-capped safetensors shards plus an index.

    With a single shard the file is `<stem>.safetensors`; otherwise `<stem>-0000i-of-0000N.safetensors` and
    `<stem>.safetensors.index.json`, as Transformers writes them.

    Args:
        folder: where to write (normally the temporary folder of [`~dem_hf.io.outputs.atomic_directory`]).
        stem: file stem (`"model"` or `"vector"`).
        max_shard_size: cap per shard, e.g. `"2GB"`.
        metadata: string metadata stored in every shard's header.
        layout: `(name, shape, dtype)` of every tensor (dtype as a safetensors name such as `"BF16"`, or a
            `torch.dtype`) to stream instead of buffering; shards follow the layout's order.
        order: where tensors go inside each planned shard: `"layout"` (the layout's order) or `"safetensors"` (as
            safetensors' `save_file` orders them, by dtype then name: the files are then byte for byte those the
            queued mode writes for the same tensors). Which tensors share a shard follows the layout's order either way.

    Example:
        ```python
        >>> layout = [(name, reader.shape(name), reader.dtype_name(name)) for name in reader.keys()]
        >>> with ShardedWriter(staging, "model", "2GB", layout=layout) as writer:
        ...     for name in reversed(reader.keys()):  # any order, or from several threads
        ...         writer.add(name, reader.read_array(name, 0, reader.shape(name)[0]))
        ...     files = writer.close()  # the shards (and the index when there are several)
        ```

    Used as a context manager, the writer's open files are closed however the block ends (an error while writing
    leaves no descriptor behind; the unfinished files are the caller's staging folder's to remove).
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        stem: str = "model",
        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
        metadata: dict[str, str] | None = None,
        layout: Iterable[tuple[str, tuple[int, ...], Any]] | None = None,
        order: str = "layout",
    ) -> None:
        if order not in LAYOUT_ORDERS:
            raise ValueError(f"Expected order to be one of {list(LAYOUT_ORDERS)}, got {order!r}.")
        self.folder = Path(folder)
        self.stem = stem
        self.max_bytes = parse_size(max_shard_size)
        self.metadata = {"format": "pt", **(metadata or {})}
        self.total_size = 0
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._queued_shards: list[tuple[Path, list[str]]] = []
        self._shards: list[_Shard] | None = None
        self._slots: dict[str, _Slot] = {}
        self._started: set[str] = set()  # tensors whose writing began (a second `add` is an error)
        self._written: set[str] = set()  # tensors written whole
        self._lock = threading.Lock()
        if layout is not None:
            self._plan(list(layout), order)

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self._close_files()

    def add(self, name: str, tensor: torch.Tensor | np.ndarray | TensorBlocks) -> None:
        """Add one tensor. With a layout it is written now, at its planned place (thread-safe, any order);
        otherwise it is queued, a full shard being written to disk before the queue grows past the cap."""
        if self._shards is not None:
            self._write_planned(name, tensor)
            return
        if isinstance(tensor, TensorBlocks):
            from .reader import to_torch

            parts = [np.array(block).reshape(-1) for block in tensor.blocks]
            flat = np.concatenate(parts) if parts else np.empty(0, STORAGE_DTYPES[tensor.dtype])
            tensor = to_torch(flat.reshape(tensor.shape), tensor.dtype)
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += size
        self.total_size += size

    def _flush(self) -> None:
        from safetensors import SafetensorError
        from safetensors.torch import save_file

        from .outputs import file_mode

        path = self.folder / f"{self.stem}-{len(self._queued_shards) + 1:05d}.safetensors.part"
        try:
            save_file(self._pending, str(path), metadata=self.metadata)
        except SafetensorError as error:  # a full disk, a quota: an OSError like any other write's
            os_error = _os_error_of(error, path)
            if os_error is None:
                raise
            raise os_error from error
        os.chmod(path, file_mode())  # safetensors writes 0600 files; a plain open() would follow the umask
        self._queued_shards.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    # ------------------------------------------------------------------------------------ streaming mode

    def _plan(self, layout: list[tuple[str, tuple[int, ...], Any]], order: str = "layout") -> None:
        groups: list[list[tuple[str, tuple[int, ...], str, int]]] = [[]]
        group_bytes = 0
        for name, shape, dtype in layout:
            dtype = dtype if isinstance(dtype, str) else dtype_name_of_torch(dtype)
            if dtype not in STORAGE_DTYPES:
                raise ValueError(f"Tensor {name!r} has dtype {dtype}, which dem_hf cannot store.")
            size = math.prod(shape) * itemsize(dtype)
            if groups[-1] and group_bytes + size > self.max_bytes:
                groups.append([])
                group_bytes = 0
            groups[-1].append((name, tuple(shape), dtype, size))
            group_bytes += size
        names = [entry[0] for group in groups for entry in group]
        if len(set(names)) != len(names):
            raise ValueError("The layout names a tensor twice.")
        if order == "safetensors":
            groups = [sorted(group, key=lambda entry: (SAFETENSORS_DTYPE_ORDER.index(entry[2]), entry[0])) for group in groups]
        self._shards = []
        for number, group in enumerate(groups, start=1):
            file = f"{self.stem}.safetensors" if len(groups) == 1 else f"{self.stem}-{number:05d}-of-{len(groups):05d}.safetensors"
            header: dict[str, object] = {"__metadata__": self.metadata}
            offset = 0
            for name, shape, dtype, size in group:
                header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
                offset += size
            encoded = json.dumps(header, separators=(",", ":")).encode()
            encoded += b" " * (-len(encoded) % 8)  # safetensors pads its header to 8 bytes with spaces
            shard = _Shard(self.folder / file, len(encoded).to_bytes(8, "little") + encoded, offset)
            self._shards.append(shard)
            start = len(shard.header)
            for name, shape, dtype, size in group:
                self._slots[name] = _Slot(shard, start, shape, dtype, size)
                start += size

    def _write_planned(self, name: str, tensor) -> None:
        slot = self._slots.get(name)
        if slot is None:
            raise ValueError(f"Tensor {name!r} is not in the writer's layout.")
        shape, dtype = tuple(tensor.shape), _dtype_name(tensor)
        if shape != slot.shape or dtype != slot.dtype:
            raise ValueError(f"Tensor {name!r} is {dtype} {list(shape)}; the layout says {slot.dtype} {list(slot.shape)}.")
        with self._lock:
            if name in self._started:
                raise ValueError(f"Tensor {name!r} was added twice.")
            self._started.add(name)
            descriptor = self._open(slot.shard)
        position, end = slot.position, slot.position + slot.size
        for block in tensor.blocks if isinstance(tensor, TensorBlocks) else [tensor]:
            if _dtype_name(block) != dtype:
                raise ValueError(f"A block of {name!r} is {_dtype_name(block)}, expected {dtype}.")
            data = memoryview(_as_array(block)).cast("B")
            if position + len(data) > end:
                raise ValueError(f"Tensor {name!r} came as more than its {slot.size} bytes.")
            while data:
                written = self._write_at(descriptor, data, position)
                data, position = data[written:], position + written
        if position != end:
            raise ValueError(f"Tensor {name!r} came as {position - slot.position} bytes, expected {slot.size}.")
        with self._lock:
            self._written.add(name)
            self.total_size += slot.size

    def _open(self, shard: _Shard) -> int:
        """The shard's file descriptor; the first call creates the file at its full size with its header."""
        if shard.descriptor is None:
            descriptor = os.open(shard.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | BINARY, 0o666)
            os.write(descriptor, shard.header)  # at 0: nothing else has this descriptor yet
            os.ftruncate(descriptor, len(shard.header) + shard.data_bytes)
            shard.descriptor = descriptor
        return shard.descriptor

    def _write_at(self, descriptor: int, data: memoryview, position: int) -> int:
        """Write `data` at `position` (all of it or a prefix); returns the bytes written.

        A positioned write (`os.pwrite`) where the platform has one; elsewhere (Windows) a seek and a write under
        the writer's lock, since the shard's descriptor is shared by the merge threads.
        """
        if hasattr(os, "pwrite"):
            return os.pwrite(descriptor, data, position)
        with self._lock:
            os.lseek(descriptor, position, os.SEEK_SET)
            return os.write(descriptor, data)

    def _close_files(self) -> None:
        for shard in self._shards or []:
            if shard.descriptor is not None:
                os.close(shard.descriptor)
                shard.descriptor = None

    def _close_planned(self) -> list[Path]:
        missing = [name for name in self._slots if name not in self._written]
        if missing:
            self._close_files()
            raise ValueError(f"{len(missing)} tensors of the layout were never added: {missing[:5]}")
        for shard in self._shards:
            self._open(shard)  # an empty layout: one file with only a header
        self._close_files()
        files = [shard.path for shard in self._shards]
        if len(files) == 1:
            return files
        weight_map = {name: slot.shard.path.name for name, slot in self._slots.items()}
        return files + [self._write_index(weight_map)]

    def _write_index(self, weight_map: dict[str, str]) -> Path:
        index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
        index_path = self.folder / f"{self.stem}.safetensors.index.json"
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return index_path

    def close(self) -> list[Path]:
        """Write the last shard, give shards their final names and write the index. Returns the files."""
        if self._shards is not None:
            return self._close_planned()
        if self._pending or not self._queued_shards:
            self._flush()
        count = len(self._queued_shards)
        if count == 1:
            final = self.folder / f"{self.stem}.safetensors"
            os.replace(self._queued_shards[0][0], final)
            return [final]
        weight_map, files = {}, []
        for number, (path, names) in enumerate(self._queued_shards, start=1):
            final = self.folder / f"{self.stem}-{number:05d}-of-{count:05d}.safetensors"
            os.replace(path, final)
            files.append(final)
            weight_map.update({name: final.name for name in names})
        return files + [self._write_index(weight_map)]


def _os_error_of(error: Exception, path: Path) -> OSError | None:
    """safetensors' `SafetensorError` for an I/O failure (`... (os error 28)`) as the `OSError` it stands for."""
    match = re.search(r"\(os error (\d+)\)", str(error))
    if match is None:
        return None
    number = int(match.group(1))
    return OSError(number, f"{os.strerror(number)} (writing {path.name})", str(path))


def _dtype_name(tensor) -> str:
    """Safetensors dtype name of a `TensorBlocks`, NumPy array (`uint16` read as bfloat16) or torch tensor."""
    if isinstance(tensor, TensorBlocks):
        return tensor.dtype
    if isinstance(tensor, np.ndarray):
        for name, storage in STORAGE_DTYPES.items():
            if storage == tensor.dtype:
                return name
        raise ValueError(f"Unsupported array dtype {tensor.dtype}.")
    return dtype_name_of_torch(tensor.dtype)


def _as_array(block) -> np.ndarray:
    """A C-contiguous NumPy view (or copy) of a block's bytes."""
    if not isinstance(block, np.ndarray):
        from .reader import to_numpy

        block = to_numpy(block)
    return np.ascontiguousarray(block)

"""Reading and writing checkpoints one tensor at a time.

Everything heavy in dem_hf goes through three pieces:

- [`CheckpointReader`]: lazy access to a folder of safetensors files (single file or sharded with an
  index), reading one tensor at a time, so memory never holds a whole model.
- [`ShardedWriter`]: the mirror image, writing tensors into size-capped shards plus the Transformers
  index file.
- [`dem_hf.outputs.atomic_directory`] (its own module): every output folder is built under a temporary name beside its target and
  renamed into place only when complete, so a crash, a full disk or Ctrl-C never leaves half a result
  and never destroys the previous one.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

SAFETENSORS_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}

DEFAULT_MAX_SHARD_SIZE = "2GB"


class CheckpointReader:
    """Lazy, tensor-at-a-time view of a safetensors checkpoint folder.

    Works with `<stem>.safetensors` or with shards listed in `<stem>.safetensors.index.json`, the layout
    Transformers writes. Only headers are read up front; `get` reads one tensor, and file handles are
    opened per call so no memory map outlives the tensor it served.

    Args:
        folder: the checkpoint folder.
        stem: file stem, `"model"` for Transformers checkpoints, `"vector"` for distribution vectors.

    Example:
        ```python
        >>> reader = CheckpointReader("path/to/model")
        >>> for name in reader.keys():
        ...     tensor = reader.get(name)
        ```
    """

    def __init__(self, folder: str | os.PathLike, stem: str = "model") -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"Checkpoint folder {str(self.folder)!r} does not exist.")
        self._file_of: dict[str, Path] = {}
        self._shape: dict[str, tuple[int, ...]] = {}
        self._dtype: dict[str, torch.dtype] = {}
        self._offset: dict[str, int] = {}  # where each tensor's bytes start in its file
        self._handle: tuple[Path, object] | None = None  # the last file read by `read_rows`, kept open
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
            with safe_open(file, framework="pt") as handle:
                for name in handle.keys():
                    view = handle.get_slice(name)
                    dtype = view.get_dtype()
                    if dtype not in SAFETENSORS_DTYPES:
                        raise ValueError(f"Tensor {name!r} in {str(file)!r} has unsupported dtype {dtype}.")
                    self._file_of[name] = file
                    self._shape[name] = tuple(view.get_shape())
                    self._dtype[name] = SAFETENSORS_DTYPES[dtype]
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

    def dtype(self, name: str) -> torch.dtype:
        return self._dtype[name]

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (a fresh copy, safe to modify in place)."""
        if name not in self._file_of:
            raise KeyError(f"Tensor {name!r} is not in checkpoint {str(self.folder)!r}.")
        with safe_open(self._file_of[name], framework="pt") as handle:
            return handle.get_tensor(name)

    def head(self, name: str, count: int) -> torch.Tensor:
        """The first `count` values of a tensor (flattened), reading only the rows that hold them."""
        with safe_open(self._file_of[name], framework="pt") as handle:
            view = handle.get_slice(name)
            shape = self._shape[name]
            if len(shape) < 2:
                return view[:count].reshape(-1) if shape else view[...].reshape(-1)
            row_size = max(1, _numel(shape[1:]))
            return view[: -(-count // row_size)].reshape(-1)[:count]

    def read_rows(self, name: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows `start:stop` (along dim 0) of a tensor, read straight from the file into `out`.

        `out` is a contiguous tensor of the tensor's dtype with at least that many values, typically a
        [`BufferPool`] buffer reused block after block (fresh pages cost far more than the copy); without it
        a new tensor is allocated. A 0-d tensor has a single row. Returns a view of `out` shaped like the rows.
        """
        shape, dtype = self._shape[name], self._dtype[name]
        rows, row_numel = (shape[0], _numel(shape[1:])) if shape else (1, 1)
        if not 0 <= start <= stop <= rows:
            raise IndexError(f"Rows {start}:{stop} are out of range for {name!r} of shape {list(shape)}.")
        count = (stop - start) * row_numel
        out = torch.empty(count, dtype=dtype) if out is None else _flat_prefix(out, dtype, count)
        if count:
            itemsize = out.element_size()
            target = memoryview(out.view(torch.uint8).numpy()).cast("B")
            handle = self._open(self._file_of[name])
            handle.seek(self._offset[name] + start * row_numel * itemsize)
            done = 0
            while done < len(target):
                got = handle.readinto(target[done:])
                if not got:
                    raise ValueError(f"{str(self._file_of[name])!r} ended inside tensor {name!r} (truncated?).")
                done += got
        return out.view((stop - start, *shape[1:]) if shape else ())

    def _open(self, file: Path):
        if self._handle is None or self._handle[0] != file:
            self.close()
            self._handle = (file, open(file, "rb", buffering=0))
        return self._handle[1]

    def close(self) -> None:
        """Close the file `read_rows` keeps open (reopened on demand)."""
        if self._handle is not None:
            self._handle[1].close()
            self._handle = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _flat_prefix(buffer: torch.Tensor, dtype: torch.dtype, count: int) -> torch.Tensor:
    if buffer.dtype != dtype or not buffer.is_contiguous() or buffer.numel() < count:
        raise ValueError(f"Expected a contiguous {dtype} buffer of at least {count} values, got {buffer.dtype} {list(buffer.shape)}.")
    return buffer.reshape(-1)[:count]


def read_rows(source, name: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows `start:stop` of tensor `name` from any tensor source: a positioned read from a
    [`CheckpointReader`], a view (or a copy into `out`) for tensors already in memory."""
    if isinstance(source, CheckpointReader):
        return source.read_rows(name, start, stop, out)
    tensor = source.get(name)
    rows = tensor if tensor.dim() == 0 else tensor[start:stop]
    if out is None:
        return rows
    return _flat_prefix(out, rows.dtype, rows.numel()).view(rows.shape).copy_(rows)


class BufferPool:
    """Reusable flat buffers, one per (role, dtype), grown on demand.

    Streaming loops take the same buffers for every block instead of allocating new tensors: peak memory
    then follows the block size, not the largest tensor, and no time goes into faulting in fresh pages.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def take(self, role: str, dtype: torch.dtype, count: int) -> torch.Tensor:
        """A contiguous 1-d tensor of `count` values, valid until the next `take` of the same role and dtype."""
        buffer = self._buffers.get((role, dtype))
        if buffer is None or buffer.numel() < count:
            buffer = torch.empty(max(count, 1), dtype=dtype)
            self._buffers[(role, dtype)] = buffer
        return buffer[:count]


@dataclass
class TensorBlocks:
    """A tensor handed over as consecutive blocks of rows, so a writer can stream it without ever holding it
    whole. `blocks` yields tensors of `dtype` whose rows, concatenated, make a tensor of `shape`; each block
    may reuse the memory of the previous one, so it is consumed before the next is asked for."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    blocks: Iterable[torch.Tensor]

    def materialize(self) -> torch.Tensor:
        parts = [block.reshape(-1).clone() for block in self.blocks]
        flat = torch.cat(parts) if parts else torch.empty(0, dtype=self.dtype)
        return flat.reshape(self.shape)


def _numel(shape: tuple[int, ...]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


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


class ShardedWriter:
    """Write tensors one at a time into size-capped safetensors shards plus an index.

    With a single shard the file is `<stem>.safetensors`; otherwise `<stem>-0000i-of-0000N.safetensors` and
    `<stem>.safetensors.index.json`, as Transformers writes them.

    Two modes:
    - without `layout`, memory holds at most one shard's worth of tensors (the set of tensors is not known
      in advance, so a shard's header can only be written once it is full);
    - with `layout` (every tensor's name, shape and dtype, in the order they will be added), the shards and
      their headers are planned up front and each tensor goes to disk as soon as it is added, block by block
      if it comes as [`TensorBlocks`]: memory holds no shard at all.

    Args:
        folder: where to write (normally the temporary folder of [`atomic_directory`]).
        stem: file stem (`"model"` or `"vector"`).
        max_shard_size: cap per shard, e.g. `"2GB"`.
        metadata: string metadata stored in every shard's header.
        layout: `(name, shape, dtype)` of every tensor, in order, to stream instead of buffering.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        stem: str = "model",
        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
        metadata: dict[str, str] | None = None,
        layout: Iterable[tuple[str, tuple[int, ...], torch.dtype]] | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.stem = stem
        self.max_bytes = parse_size(max_shard_size)
        self.metadata = {"format": "pt", **(metadata or {})}
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_size = 0
        self._plan: list[_Planned] | None = None
        if layout is not None:
            self._plan_shards(list(layout))

    def add(self, name: str, tensor: torch.Tensor | TensorBlocks) -> None:
        """Add one tensor: streamed to its shard now (with a layout), else queued, a full shard being written
        to disk before the queue grows past the cap."""
        if self._plan is not None:
            self._stream(name, tensor)
            return
        if isinstance(tensor, TensorBlocks):
            tensor = tensor.materialize()
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += size
        self.total_size += size

    def _flush(self) -> None:
        path = self.folder / f"{self.stem}-{len(self._shards) + 1:05d}.safetensors.part"
        save_file(self._pending, str(path), metadata=self.metadata)
        self._shards.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    # ------------------------------------------------------------------------------------ streaming mode

    def _plan_shards(self, layout: list[tuple[str, tuple[int, ...], torch.dtype]]) -> None:
        groups: list[list[tuple[str, tuple[int, ...], torch.dtype, int]]] = [[]]
        group_bytes = 0
        for name, shape, dtype in layout:
            if dtype not in SAFETENSORS_NAMES:
                raise ValueError(f"Tensor {name!r} has dtype {dtype}, which safetensors cannot store.")
            size = _numel(tuple(shape)) * torch.empty((), dtype=dtype).element_size()
            if groups[-1] and group_bytes + size > self.max_bytes:
                groups.append([])
                group_bytes = 0
            groups[-1].append((name, tuple(shape), dtype, size))
            group_bytes += size
        names = [entry[0] for group in groups for entry in group]
        if len(set(names)) != len(names):
            raise ValueError("The layout names a tensor twice.")
        count = len(groups)
        self._plan = []
        for number, group in enumerate(groups, start=1):
            file = f"{self.stem}.safetensors" if count == 1 else f"{self.stem}-{number:05d}-of-{count:05d}.safetensors"
            header: dict[str, object] = {"__metadata__": self.metadata}
            offset = 0
            for name, shape, dtype, size in group:
                header[name] = {"dtype": SAFETENSORS_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
                offset += size
            encoded = json.dumps(header, separators=(",", ":")).encode()
            encoded += b" " * (-len(encoded) % 8)  # safetensors pads its header to 8 bytes with spaces
            self._plan.append(_Planned(self.folder / file, len(encoded).to_bytes(8, "little") + encoded, group))
        self._next = 0  # index of the next tensor over all planned shards
        self._order = [(shard, entry) for shard in self._plan for entry in shard.tensors]
        self._file = None
        self._file_shard: _Planned | None = None

    def _stream(self, name: str, tensor: torch.Tensor | TensorBlocks) -> None:
        if self._next >= len(self._order):
            raise ValueError(f"Tensor {name!r} is not in the writer's layout (all planned tensors are written).")
        shard, (expected, shape, dtype, size) = self._order[self._next]
        if name != expected:
            raise ValueError(f"Expected tensor {expected!r} next (the layout's order), got {name!r}.")
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(
                f"Tensor {name!r} is {tensor.dtype} {list(tensor.shape)}; the layout says {dtype} {list(shape)}."
            )
        if self._file_shard is not shard:
            self._close_file()
            self._file = open(shard.path, "wb")
            self._file_shard = shard
            self._file.write(shard.header)
        written = 0
        for block in tensor.blocks if isinstance(tensor, TensorBlocks) else [tensor]:
            if block.dtype != dtype:
                raise ValueError(f"A block of {name!r} is {block.dtype}, expected {dtype}.")
            flat = block.detach().cpu().contiguous().reshape(-1)
            if flat.numel():
                self._file.write(memoryview(flat.view(torch.uint8).numpy()).cast("B"))
                written += flat.numel() * flat.element_size()
        if written != size:
            raise ValueError(f"Tensor {name!r} came as {written} bytes, expected {size}.")
        self.total_size += size
        self._next += 1

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file, self._file_shard = None, None

    def _close_planned(self) -> list[Path]:
        if self._next != len(self._order):
            missing = [entry[0] for _, entry in self._order[self._next:]]
            self._close_file()
            raise ValueError(f"{len(missing)} tensors of the layout were never added: {missing[:5]}")
        self._close_file()
        for shard in self._plan:
            if not shard.tensors:  # an empty layout: one file with only a header
                shard.path.write_bytes(shard.header)
        files = [shard.path for shard in self._plan]
        if len(files) == 1:
            return files
        weight_map = {entry[0]: shard.path.name for shard in self._plan for entry in shard.tensors}
        index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
        index_path = self.folder / f"{self.stem}.safetensors.index.json"
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return files + [index_path]

    def close(self) -> list[Path]:
        """Write the last shard, give shards their final names and write the index. Returns the files."""
        if self._plan is not None:
            return self._close_planned()
        if self._pending or not self._shards:
            self._flush()
        count = len(self._shards)
        if count == 1:
            final = self.folder / f"{self.stem}.safetensors"
            os.replace(self._shards[0][0], final)
            return [final]
        weight_map, files = {}, []
        for number, (path, names) in enumerate(self._shards, start=1):
            final = self.folder / f"{self.stem}-{number:05d}-of-{count:05d}.safetensors"
            os.replace(path, final)
            files.append(final)
            weight_map.update({name: final.name for name in names})
        index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
        index_path = self.folder / f"{self.stem}.safetensors.index.json"
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return files + [index_path]


@dataclass
class _Planned:
    path: Path
    header: bytes
    tensors: list[tuple[str, tuple[int, ...], torch.dtype, int]]

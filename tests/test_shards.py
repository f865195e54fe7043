"""ShardedWriter with a layout: tensors written at planned places, in any order, from several threads."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dem_hf.io.dtypes import STORAGE_DTYPES
from dem_hf.io.reader import BufferPool, CheckpointReader
from dem_hf.io.shards import ShardedWriter, TensorBlocks


def tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(40, 30, generator=generator),
        "b": torch.randn(7, 5, generator=generator).to(torch.bfloat16),
        "c": torch.arange(12, dtype=torch.int64).reshape(3, 4),
        "d": torch.tensor(3.5, dtype=torch.float16),
        "e": torch.randn(64, generator=generator),
    }


def blocks_of(reader: CheckpointReader, name: str, rows_per_block: int) -> TensorBlocks:
    shape = reader.shape(name)
    rows = shape[0] if shape else 1
    pool = BufferPool()  # one buffer reused block after block, as a merge does
    count = rows_per_block * (int(np.prod(shape[1:])) if shape else 1)
    buffer = pool.take(name, STORAGE_DTYPES[reader.dtype_name(name)], count)
    blocks = (reader.read_array(name, start, min(rows, start + rows_per_block), buffer) for start in range(0, rows, rows_per_block))
    return TensorBlocks(tuple(shape), reader.dtype_name(name), blocks)


def test_tensors_added_in_any_order_from_threads_land_in_their_planned_shards(tmp_path):
    source = tensors()
    (tmp_path / "src").mkdir()
    plain = ShardedWriter(tmp_path / "src", "model")
    for name, tensor in source.items():
        plain.add(name, tensor)
    plain.close()
    reader = CheckpointReader(tmp_path / "src")

    out = tmp_path / "out"
    out.mkdir()
    layout = [(name, tuple(t.shape), reader.dtype_name(name)) for name, t in source.items()]
    writer = ShardedWriter(out, "model", max_shard_size=2000, layout=layout)
    with ThreadPoolExecutor(3) as executor:
        list(executor.map(lambda name: writer.add(name, blocks_of(reader, name, 3)), reversed(list(source))))
    files = writer.close()

    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len({f.name for f in files if f.suffix == ".safetensors"}) > 1
    assert list(index["weight_map"]) == sorted(source) and index["metadata"]["total_size"] == writer.total_size
    loaded = {}
    for shard in sorted(set(index["weight_map"].values())):
        loaded.update(load_file(out / shard))
    assert loaded.keys() == source.keys()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in source.items())


def test_a_planned_writer_refuses_what_the_layout_does_not_say(tmp_path):
    writer = ShardedWriter(tmp_path, "model", layout=[("a", (2, 3), "F32"), ("b", (4,), "BF16")])
    with pytest.raises(ValueError, match="not in the writer's layout"):
        writer.add("z", np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match=r"F64 \[2, 3\]; the layout says F32 \[2, 3\]"):
        writer.add("a", np.zeros((2, 3), np.float64))
    writer.add("a", np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match="added twice"):
        writer.add("a", np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match="came as 4 bytes, expected 8"):
        writer.add("b", TensorBlocks((4,), "BF16", [np.zeros(2, np.uint16)]))
    with pytest.raises(ValueError, match="never added"):
        writer.close()


def test_platforms_without_positioned_io_get_the_same_bytes(tmp_path, base_dir, finetuned_dirs, monkeypatch):
    """Where `os.preadv` / `os.pwrite` do not exist (Windows), reads seek on per-thread descriptors and writes seek
    under the writer's lock: a threaded merge writes the same files."""
    import dem_hf.merging.arithmetic
    from dem_hf import DEMMerger, DistributionVector

    vectors = [
        DistributionVector.from_models(base_dir, folder, name=name, save_directory=tmp_path / "vectors" / name)
        for name, folder in finetuned_dirs.items()
    ]
    weights = {name: 0.3 * (i + 1) for i, name in enumerate(finetuned_dirs)}
    monkeypatch.setattr(dem_hf.merging.arithmetic, "MERGE_WORKERS", 3)
    monkeypatch.setattr(dem_hf.merging.arithmetic, "MERGE_BLOCK_VALUES", 500)
    outputs = []
    for positioned in (True, False):
        if not positioned:
            monkeypatch.delattr("os.preadv")
            monkeypatch.delattr("os.pwrite")
        out = DEMMerger.from_pretrained(base_dir, vectors=vectors).save_pretrained(
            tmp_path / str(positioned), weights, max_shard_size=40_000
        )
        outputs.append({p.name: p.read_bytes() for p in sorted(out.glob("model*"))})
    assert len(outputs[0]) > 2 and outputs[0] == outputs[1]


def test_planned_shards_in_safetensors_order_are_the_bytes_save_file_writes(tmp_path):
    """With `order="safetensors"` the planned writer places each shard's tensors as safetensors' `save_file` does (by
    dtype, then name), so its files equal, byte for byte, those of the queued writer; every dtype dem_hf stores."""
    generator = torch.Generator().manual_seed(0)
    source = {
        name: (torch.randn(shape, generator=generator) * 10).to(dtype)
        for name, shape, dtype in [
            ("z.f64", (3, 2), torch.float64), ("y.f32", (5,), torch.float32), ("x.bf16", (4, 4), torch.bfloat16),
            ("w.f16", (2, 3), torch.float16), ("v.i64", (3,), torch.int64), ("u.i32", (2, 2), torch.int32),
            ("t.i16", (7,), torch.int16), ("s.i8", (5,), torch.int8), ("r.u8", (6,), torch.uint8),
            ("q.bool", (9,), torch.bool), ("p.f32", (), torch.float32), ("a.f32", (3, 3), torch.float32),
        ]
    }
    layout = [(name, tuple(tensor.shape), tensor.dtype) for name, tensor in source.items()]
    outputs = {}
    for mode in ("queued", "planned"):
        (tmp_path / mode).mkdir()
        writer = ShardedWriter(tmp_path / mode, "model", max_shard_size=60, **({"layout": layout, "order": "safetensors"} if mode == "planned" else {}))
        for name, tensor in reversed(list(source.items())) if mode == "planned" else source.items():
            writer.add(name, tensor)
        writer.close()
        outputs[mode] = {path.name: path.read_bytes() for path in sorted((tmp_path / mode).iterdir())}
    assert len(outputs["queued"]) > 4 and outputs["planned"] == outputs["queued"]
    with pytest.raises(ValueError, match=r"Expected order to be one of \['layout', 'safetensors'\], got 'sorted'"):
        ShardedWriter(tmp_path, "model", layout=layout, order="sorted")

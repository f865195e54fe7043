"""Streaming extraction (issue 17): `from_models(save_directory=...)` / `dem-hf extract` write, block by block and
without torch, exactly the files the buffered extraction wrote before, in bounded memory."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file

import dem_hf.vectors.extraction as extraction
from dem_hf import DistributionVector
from dem_hf.io.dtypes import FLOAT_DTYPES
from dem_hf.io.outputs import atomic_directory
from dem_hf.io.shards import ShardedWriter
from dem_hf.io.tensors import TensorDict, fingerprint, open_weights
from dem_hf.vectors.folder import VECTOR_CONFIG_NAME, save_vector_card

from .conftest import perturbed


def extract_as_before(base, finetuned, name: str, save_directory: Path, max_shard_size: int | str = "2GB") -> Path:
    """The oracle: `from_models(save_directory=...)` as it was before streaming (dem_hf 166c405), verbatim but for
    the names: whole torch tensors, a delta per tensor, shards queued and written by safetensors' `save_file`."""
    base_source, base_id, _ = open_weights(base)
    tuned_source, _, _ = open_weights(finetuned)

    def deltas():
        for tensor_name in base_source.keys():
            base_tensor = base_source.get(tensor_name).detach().to("cpu")
            tuned = tuned_source.get(tensor_name).detach().to("cpu")
            if base_source.dtype_name(tensor_name) not in FLOAT_DTYPES:
                if not torch.equal(base_tensor, tuned):
                    raise ValueError(f"Non-float tensor {tensor_name!r} differs between base and fine-tuned model.")
                continue
            delta = tuned.to(torch.float32) - base_tensor.to(torch.float32)
            if not torch.isfinite(delta).all():
                raise ValueError(f"Fine-tuned tensor {tensor_name!r} has NaN or infinite values.")
            if delta.any():
                yield tensor_name, delta.to(tuned.dtype)

    config = DistributionVector(
        name, TensorDict({}), base_fingerprint=fingerprint(base_source), base_model_name_or_path=base_id
    ).config_dict()
    with atomic_directory(save_directory) as staging:
        writer = ShardedWriter(staging, stem="vector", max_shard_size=max_shard_size)
        for tensor_name, tensor in deltas():
            writer.add(tensor_name, tensor)
        writer.close()
        (staging / VECTOR_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        save_vector_card(staging, config)
    return save_directory


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def write_checkpoint(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return folder


def mixed_pair(base_dtype: torch.dtype, tuned_dtype: torch.dtype) -> tuple[dict, dict]:
    """A base and a fine-tune of many shapes: matrices, a 3-d tensor, a 0-d one, an empty one, a non-float buffer,
    a tensor left unchanged, one changed only from 0.0 to -0.0 (no change) and one changed only in its last row."""
    generator = torch.Generator().manual_seed(0)
    base = {
        "embed.weight": torch.randn(300, 7, generator=generator),
        "layers.0.proj.weight": torch.randn(16, 24, generator=generator),
        "layers.0.conv": torch.randn(4, 3, 2, generator=generator),
        "layers.0.scale": torch.tensor(1.5),
        "layers.0.norm.weight": 1 + torch.randn(24, generator=generator),
        "layers.1.signed_zeros": torch.zeros(9, 5),
        "layers.1.last_row": torch.randn(50, 6, generator=generator),
        "layers.1.empty": torch.zeros(0, 4),
        "position_ids": torch.arange(12, dtype=torch.int64),
    }
    tuned = {name: tensor.clone() for name, tensor in base.items()}
    for name in ("embed.weight", "layers.0.proj.weight", "layers.0.conv", "layers.0.scale"):
        tuned[name] = tuned[name] + 0.01 * torch.randn(tuned[name].shape, generator=generator)
    tuned["layers.1.signed_zeros"] = -tuned["layers.1.signed_zeros"]
    tuned["layers.1.last_row"][-1, 2] += 0.125
    cast = lambda tensors, dtype: {n: t.to(dtype) if t.is_floating_point() else t for n, t in tensors.items()}  # noqa: E731
    return cast(base, base_dtype), cast(tuned, tuned_dtype)


DTYPES = {
    "fp32": (torch.float32, torch.float32),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "fp32 base, bf16 fine-tune": (torch.float32, torch.bfloat16),
    "fp16 base, fp32 fine-tune": (torch.float16, torch.float32),
    "fp64 base, fp16 fine-tune": (torch.float64, torch.float16),
}


@pytest.mark.parametrize("dtypes", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("block_values, workers, shard_size", [(1 << 18, 1, "2GB"), (40, 3, 2000), (7, 2, 500)])
def test_streamed_extraction_writes_the_files_the_buffered_one_wrote(dtypes, block_values, workers, shard_size, tmp_path, monkeypatch):
    """Bit for bit, every file: shards, index, config and card, across dtypes, block sizes, threads and shard caps
    (several tensors per shard, mixed dtypes within a shard, tensors across many blocks)."""
    base, tuned = mixed_pair(*DTYPES[dtypes])
    base_dir, tuned_dir = write_checkpoint(tmp_path / "base", base), write_checkpoint(tmp_path / "tuned", tuned)
    monkeypatch.setattr(extraction, "EXTRACT_BLOCK_VALUES", block_values)
    monkeypatch.setattr(extraction, "EXTRACT_WORKERS", workers)

    expected = folder_bytes(extract_as_before(base_dir, tuned_dir, "v", tmp_path / "old", shard_size))
    vector = DistributionVector.from_models(base_dir, tuned_dir, name="v", save_directory=tmp_path / "new", max_shard_size=shard_size)
    assert folder_bytes(tmp_path / "new") == expected
    assert (len(expected) > 4) == (shard_size != "2GB")  # several shards and an index when capped
    if DTYPES[dtypes][0] != DTYPES[dtypes][1]:
        return  # a dtype change alone changes every tensor: rounding
    # the hand-made oracle: the unchanged, sign-of-zero-only and empty tensors are left out; the last row counts
    assert sorted(vector.target_names) == ["embed.weight", "layers.0.conv", "layers.0.proj.weight", "layers.0.scale", "layers.1.last_row"]
    assert vector.delta("layers.1.last_row").count_nonzero() == 1


def test_streamed_extraction_of_a_model_folder_and_of_in_memory_models(tmp_path, base_dir, base_model, finetuned_dirs):
    """A Transformers checkpoint (tied embeddings), and in-memory models streamed to a folder: the same files."""
    expected = folder_bytes(extract_as_before(base_dir, finetuned_dirs["math"], "math", tmp_path / "old", 20_000))
    DistributionVector.from_models(base_dir, finetuned_dirs["math"], name="math", save_directory=tmp_path / "new", max_shard_size=20_000)
    assert folder_bytes(tmp_path / "new") == expected and len(expected) > 4

    tuned = perturbed(base_model, seed=1)
    expected = folder_bytes(extract_as_before(base_model, tuned, "math", tmp_path / "old_memory"))
    DistributionVector.from_models(base_model, tuned, name="math", save_directory=tmp_path / "new_memory")
    assert folder_bytes(tmp_path / "new_memory") == expected


def test_a_fine_tune_that_changed_nothing_gives_an_empty_vector(tmp_path):
    base, _ = mixed_pair(torch.float32, torch.float32)
    base_dir, tuned_dir = write_checkpoint(tmp_path / "base", base), write_checkpoint(tmp_path / "tuned", base)
    expected = folder_bytes(extract_as_before(base_dir, tuned_dir, "v", tmp_path / "old"))
    vector = DistributionVector.from_models(base_dir, tuned_dir, name="v", save_directory=tmp_path / "new")
    assert folder_bytes(tmp_path / "new") == expected and vector.target_names == []


@pytest.mark.parametrize("damage", ["NaN in the last block", "inf in the first block", "a non-float tensor differs"])
def test_a_bad_fine_tune_stops_the_extraction_without_output(damage, tmp_path, monkeypatch):
    base, tuned = mixed_pair(torch.float32, torch.bfloat16)
    if damage == "NaN in the last block":
        tuned["embed.weight"][-1, 0], message = float("nan"), "Fine-tuned tensor 'embed.weight' has NaN or infinite values"
    elif damage == "inf in the first block":
        tuned["layers.0.proj.weight"][0, 0], message = float("inf"), "Fine-tuned tensor 'layers.0.proj.weight' has NaN"
    else:
        tuned["position_ids"][3], message = 99, "Non-float tensor 'position_ids' differs"
    base_dir, tuned_dir = write_checkpoint(tmp_path / "base", base), write_checkpoint(tmp_path / "tuned", tuned)
    monkeypatch.setattr(extraction, "EXTRACT_BLOCK_VALUES", 64)
    with pytest.raises(ValueError, match=message):
        DistributionVector.from_models(base_dir, tuned_dir, name="v", save_directory=tmp_path / "v")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "tuned"]


@pytest.mark.parametrize("in_memory", [False, True])
def test_a_delta_that_overflows_float16_is_refused(in_memory, tmp_path):
    """A float32 base and a float16 fine-tune 70,000 apart: the delta is finite in float32 but not in float16 (the
    vector's dtype); before, it was stored as inf and only the merge refused it."""
    base, tuned = mixed_pair(torch.float32, torch.float16)
    base["layers.0.proj.weight"][2, 3] = -60000.0
    tuned["layers.0.proj.weight"][2, 3] = 10000.0
    base_dir, tuned_dir = write_checkpoint(tmp_path / "base", base), write_checkpoint(tmp_path / "tuned", tuned)
    with pytest.raises(ValueError, match="'layers.0.proj.weight' .* does not fit the fine-tuned tensor's dtype F16"):
        if in_memory:
            DistributionVector.from_models(base_dir, tuned_dir, name="v")
        else:
            DistributionVector.from_models(base_dir, tuned_dir, name="v", save_directory=tmp_path / "v")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "tuned"]


def test_the_extract_command_imports_no_torch(tmp_path, base_dir, finetuned_dirs):
    """`dem-hf extract` of two saved checkpoints runs on NumPy, as the merge does: torch (about 2 s of start-up),
    transformers and the Hub client are never imported; the vector is the one the library call writes."""
    absent = ("torch", "transformers", "peft", "trl", "huggingface_hub.hf_api", "huggingface_hub.file_download")
    code = (
        "import sys; from dem_hf.commands.cli import main; "
        f"code = main(['extract', '--base', {str(base_dir)!r}, '--finetuned', {str(finetuned_dirs['math'])!r}, "
        f"'--name', 'math', '--output', {str(tmp_path / 'cli')!r}]); "
        f"print(code, sorted(m for m in {absent!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "0 []"
    extract_as_before(base_dir, finetuned_dirs["math"], "math", tmp_path / "old")
    assert folder_bytes(tmp_path / "cli") == folder_bytes(tmp_path / "old")


def test_extraction_memory_does_not_grow_with_the_tensors(tmp_path):
    """Peak RSS of the extracting process grows by a few block buffers, not by the 32 MB tensors it subtracts (the
    buffered extraction held a base tensor, a fine-tuned one and their delta: about 100 MB more)."""
    rows, columns = 4096, 2048  # 8M float32 values, 32 MB per tensor
    generator = np.random.default_rng(0)
    base = {"big.weight": generator.standard_normal((rows, columns), dtype=np.float32), "small": np.ones(3, np.float32)}
    tuned = {name: value + np.float32(0.001) for name, value in base.items()}
    small = {name: {"small": tensors["small"]} for name, tensors in (("base", base), ("tuned", tuned))}
    for folder, tensors in (("base", base), ("tuned", tuned), ("small_base", small["base"]), ("small_tuned", small["tuned"])):
        (tmp_path / folder).mkdir()
        save_numpy(tensors, tmp_path / folder / "model.safetensors")
    del base, tuned
    code = (  # a first, tiny extraction imports everything the big one needs
        "import resource, sys; from dem_hf.vectors.vector import DistributionVector; "
        f"DistributionVector.from_models({str(tmp_path / 'small_base')!r}, {str(tmp_path / 'small_tuned')!r}, name='small', "
        f"save_directory={str(tmp_path / 'small_vector')!r}); "
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
        f"DistributionVector.from_models({str(tmp_path / 'base')!r}, {str(tmp_path / 'tuned')!r}, name='big', "
        f"save_directory={str(tmp_path / 'vector')!r}); "
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    growth = int(out.strip().splitlines()[-1])
    assert growth < 16 * 2**20, f"peak RSS grew by {growth / 2**20:.0f} MiB"
    vector = DistributionVector.from_pretrained(tmp_path / "vector")
    assert vector.tensors.shape("big.weight") == (rows, columns) and math.prod(vector.tensors.shape("small")) == 3

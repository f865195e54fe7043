"""Random-weight checkpoints for the merge and extraction benchmarks (`bench_merge.py`), written tensor by tensor.

A Llama base from the names and shapes of a `LlamaForCausalLM` built on the `meta` device (so even a 3B checkpoint
never sits in memory whole), "fine-tuned" copies (base + small seeded noise) and distribution vectors written
directly (the noise alone). Every tensor is a pure function of its index and a stream number, so a checkpoint can be
regenerated identically. No download.
"""

from __future__ import annotations

import math
from pathlib import Path

BASE_STD, NOISE_STD = 0.02, 1e-3


def meta_specs(config_kwargs: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes of the checkpoint `LlamaForCausalLM(config).save_pretrained` would write."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**config_kwargs)
    if config.tie_word_embeddings:
        raise ValueError("the generated models keep lm_head.weight: use tie_word_embeddings=False")
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    # Not dem_hf.io.tensors.untied_state_dict: every meta tensor has data_ptr 0, so equal shapes look tied.
    return [(name, tuple(tensor.shape)) for name, tensor in model.state_dict().items()]


def _seeded(index: int, stream: int):
    import torch

    return torch.Generator().manual_seed(1_000_003 * stream + index)


def base_tensor(index: int, name: str, shape, dtype):
    import torch

    if len(shape) == 1:  # RMSNorm weights: ones plus a little noise
        return (1.0 + BASE_STD * torch.randn(shape, generator=_seeded(index, 0))).to(dtype)
    return (BASE_STD * torch.randn(shape, generator=_seeded(index, 0))).to(dtype)


def noise_tensor(index: int, shape, stream: int):
    import torch

    return NOISE_STD * torch.randn(shape, generator=_seeded(index, stream))


def write_checkpoint(folder: Path, config_kwargs: dict, dtype_name: str, tensors) -> None:
    """A Transformers folder (config.json + safetensors shards) from `(name, tensor)` pairs, atomically."""
    from transformers import LlamaConfig

    from dem_hf.io.outputs import atomic_directory
    from dem_hf.io.shards import ShardedWriter

    with atomic_directory(folder, overwrite=True) as staging:
        config = LlamaConfig(**config_kwargs)
        config.dtype = dtype_name
        config.architectures = ["LlamaForCausalLM"]
        config.save_pretrained(staging)
        writer = ShardedWriter(staging, "model", "2GB")
        for name, tensor in tensors:
            writer.add(name, tensor)
        writer.close()


def write_vector_directly(base: Path, target: Path, name: str, specs, stream: int, dtype) -> None:
    """A saved full distribution vector (random deltas) for `base`, without a fine-tuned model on disk."""
    from dem_hf.io.reader import CheckpointReader
    from dem_hf.io.tensors import TensorDict, fingerprint
    from dem_hf.vectors.vector import DistributionVector, write_vector_folder

    config = DistributionVector(
        name, TensorDict({}), base_fingerprint=fingerprint(CheckpointReader(base)), base_model_name_or_path=str(base)
    ).config_dict()
    items = ((n, noise_tensor(i, s, stream).to(dtype)) for i, (n, s) in enumerate(specs))
    write_vector_folder(target, items, config, overwrite=True)


def numel(shape) -> int:
    return math.prod(shape)

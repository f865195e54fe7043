"""Random-weight checkpoints for the merge and extraction benchmarks (`bench_merge.py`), written tensor by tensor.

A Llama base from the names and shapes of a `LlamaForCausalLM` built on the `meta` device (so even a 3B checkpoint
never sits in memory whole), "fine-tuned" copies (base + small seeded noise) and distribution vectors written
directly (the noise alone), and PEFT-format LoRA adapters (random factors for every linear layer). Every tensor is a pure function of its index and a stream number, so a checkpoint can be
regenerated identically. No download.
"""

from __future__ import annotations

import math
from pathlib import Path

BASE_STD, NOISE_STD = 0.02, 1e-3
LORA_STD = 0.02  # both factors: B·A·(alpha/r) entries of ~5e-3 at rank 16, alpha 32
# PEFT's "all-linear" on a Llama: every linear layer of the blocks (not lm_head).
LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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


def write_lora_adapter(folder: Path, base: Path, specs, stream: int, rank: int = 16, alpha: int = 32) -> None:
    """A PEFT LoRA adapter folder for `base` (`adapter_config.json` written by PEFT's `LoraConfig`, and
    `adapter_model.safetensors`) with random float32 factors for every linear layer of the blocks, atomically.

    Module `m` of shape (out, in) gets `lora_A` (rank x in) and `lora_B` (out x rank), seeded by the tensor's index
    and `stream`, so the same call writes the same adapter.
    """
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    from dem_hf.io.outputs import atomic_directory

    factors = {}
    for index, (name, shape) in enumerate(specs):
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] not in LINEAR_MODULES:
            continue
        generator = _seeded(index, stream)
        factors[f"base_model.model.{module}.lora_A.weight"] = LORA_STD * torch.randn((rank, shape[1]), generator=generator)
        factors[f"base_model.model.{module}.lora_B.weight"] = LORA_STD * torch.randn((shape[0], rank), generator=generator)
    with atomic_directory(folder, overwrite=True) as staging:
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(LINEAR_MODULES), base_model_name_or_path=str(base))
        config.save_pretrained(staging)
        save_file(factors, Path(staging) / "adapter_model.safetensors", metadata={"format": "pt"})


def numel(shape) -> int:
    return math.prod(shape)


def checkpoint_bytes(specs, dtype_name: str) -> int:
    """Bytes of the tensors of one checkpoint (or full vector) with these shapes in this dtype (headers aside)."""
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[dtype_name]
    return sum(numel(shape) for _, shape in specs) * itemsize

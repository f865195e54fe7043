"""Reading and writing checkpoints without torch: lazy positioned reads of safetensors, the planned-shard writer, the
row blocks and worker threads of streaming passes, exact dtype conversions, atomic output folders and files, tensor
sources and the base fingerprint.
"""


from ..lazy import lazy_exports

_EXPORTS = {
    "for_each_on_threads": "blocks",
    "row_blocks": "blocks",
    "FLOAT_DTYPES": "dtypes",
    "STORAGE_DTYPES": "dtypes",
    "from_float32": "dtypes",
    "to_float32": "dtypes",
    "torch_dtype_label": "dtypes",
    "atomic_directory": "outputs",
    "check_not_inside": "outputs",
    "check_output_directory": "outputs",
    "is_weight_file": "outputs",
    "write_file_atomic": "outputs",
    "BufferPool": "reader",
    "CheckpointReader": "reader",
    "read_rows": "reader",
    "to_numpy": "reader",
    "to_torch": "reader",
    "DEFAULT_MAX_SHARD_SIZE": "shards",
    "ShardedWriter": "shards",
    "TensorBlocks": "shards",
    "TensorDict": "tensors",
    "TensorSource": "tensors",
    "check_same_architecture": "tensors",
    "check_same_tensors": "tensors",
    "fingerprint": "tensors",
    "fingerprint_mismatch": "tensors",
    "open_weights": "tensors",
    "untied_state_dict": "tensors",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

"""Distribution vectors: a fine-tune minus its base (dense deltas), or a LoRA adapter's factors kept low-rank, read
with PEFT's own loading and saved as safetensors beside `vector_config.json`.
"""


from ..lazy import lazy_exports

_EXPORTS = {
    "DistributionVector": "vector",
    "VECTOR_CONFIG_NAME": "folder",
    "render_vector_card": "folder",
    "check_vector_name": "config",
    "read_vector_config": "config",
    "VECTOR_TYPES": "config",
    "write_vector_folder": "folder",
    "staged_vector_folder": "folder",
    "write_delta_folder": "extraction",
    "LORA_A": "config",
    "LORA_B": "config",
    "LoraModule": "config",
    "check_supported_adapter": "lora",
    "vector_parts_from_peft": "lora",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

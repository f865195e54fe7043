"""Merging: the pure merge arithmetic (weights, the streaming NumPy engine, the torch merge for the search),
`DEMConfig`, `DEMMerger` and the model card it writes.
"""


from ..lazy import lazy_exports

_EXPORTS = {
    "apply_vectors_": "arithmetic",
    "effective_weights": "arithmetic",
    "merge_tensor": "arithmetic",
    "write_merged": "arithmetic",
    "DEMConfig": "config",
    "JsonConfigMixin": "config",
    "WEIGHTINGS": "config",
    "check_coefficients": "config",
    "MERGE_METHODS": "operators",
    "MergeOperator": "operators",
    "DEMMerger": "merger",
    "DEFAULT_PUSH_MESSAGE": "push",
    "STALE_REMOTE_PATTERNS": "push",
    "VECTORS_FOLDER": "merger",
    "CARD_NAME": "card",
    "build_model_card": "card",
    "card_for_folder": "card",
    "render_model_card": "card",
    "write_model_card": "card",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

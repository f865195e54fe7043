"""The model card of a merged model: facts gathered offline, template variables, rendering with Jinja from
`templates/dem_card.md.j2` (the same text as `huggingface_hub.ModelCard.from_template`).
"""


from ...lazy import lazy_exports

_EXPORTS = {
    "CARD_NAME": "render",
    "CARD_TAGS": "render",
    "build_model_card": "render",
    "card_for_folder": "render",
    "framework_versions": "render",
    "hub_id_of": "render",
    "is_hub_dataset_id": "render",
    "render_model_card": "render",
    "save_card_text": "render",
    "write_model_card": "render",
    "card_metadata": "facts",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

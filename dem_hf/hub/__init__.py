"""The Hugging Face Hub: resolving ids to local folders (cache first, only the files needed), pushing a folder
in one commit, and model cards rendered from templates offline.
"""


from ..lazy import lazy_exports

_EXPORTS = {
    "render_card_template": "card",
    "save_card_text": "card",
    "HUB_ARGUMENTS": "download",
    "MODEL_FILES": "download",
    "hub_id_of": "download",
    "hub_origin": "download",
    "resolve_checkpoint": "download",
    "resolve_pretrained": "download",
    "HubPushError": "push",
    "check_push_target": "push",
    "prepare_repo": "push",
    "push_folder": "push",
    "validate_repo_id": "push",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

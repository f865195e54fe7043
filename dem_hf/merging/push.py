"""Pushing a merged model to the Hub: [`MergerPushMixin.push_to_hub`], the part of [`DEMMerger`] that talks to the Hub.

The model is saved with `DEMMerger.save_pretrained` into a temporary folder and goes up in one commit
(`huggingface_hub.ModelHubMixin.push_to_hub`'s pattern, without inheriting it: its own `config.json` would collide
with the model's).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from ..hub.push import check_push_target, prepare_repo, push_folder
from .card.render import CARD_NAME
from .sources import VECTORS_FOLDER

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo

# Remote files an earlier push may have left that this push does not rewrite: weight shards of another sharding,
# and vectors no longer in the merger (or not pushed this time). Deleted in the same commit.
STALE_REMOTE_PATTERNS = (
    "model*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
    f"{VECTORS_FOLDER}/*",
)
DEFAULT_PUSH_MESSAGE = "Upload DEM model with dem_hf"


class MergerPushMixin:
    """`push_to_hub` for [`DEMMerger`] (which provides `save_pretrained` and `resolve_coefficients`)."""

    def push_to_hub(
        self,
        repo_id: str,
        coefficients: dict[str, float] | None = None,
        *,
        private: bool | None = None,
        token: str | bool | None = None,
        commit_message: str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        push_vectors: bool = False,
        regenerate_card: bool = False,
        max_shard_size: int | str | None = None,
        model_card_kwargs: dict | None = None,
    ) -> CommitInfo:
        """Merge, and push the merged model with its model card to the Hub in one commit.

        Follows `huggingface_hub.ModelHubMixin.push_to_hub`: the model is saved with [`~DEMMerger.save_pretrained`]
        into a temporary folder (streamed, bounded memory), the repo is created with `create_repo(exist_ok=True)`
        (checked before the merge, so a missing token fails fast) and the folder goes up in one commit. Weight
        shards and vectors left by an earlier push that this one does not rewrite are deleted in the same commit,
        so the repo always matches its `dem_config.json`. Nothing local is written outside the temporary folder.

        The model card is generated for `repo_id` ([`~dem_hf.merging.card.render.build_model_card`]). A `README.md` the repo
        already has is kept unless `regenerate_card=True` (a warning says so): a card edited on the Hub is never
        overwritten silently, but a kept card may describe an earlier merge.

        Args:
            repo_id (`str`):
                `"namespace/name"`, or `"name"` for your own namespace.
            coefficients (`dict[str, float]`, *optional*):
                `{vector name: ω}` (default: the recorded ones: those of the last [`~DEMMerger.merge`],
                [`~DEMMerger.search`] or save, so a push after `merge(c)` pushes that model); they become the
                recorded ones.
            private (`bool`, *optional*):
                Visibility of a newly created repo (an existing repo keeps its own).
            token (`str` or `bool`, *optional*):
                Hub token with write access (default: `HF_TOKEN` or the saved login).
            commit_message (`str`, *optional*):
                Defaults to `"Upload DEM model with dem_hf"`.
            revision (`str`, *optional*):
                Branch to push to (created from `main` if missing).
            create_pr (`bool`, *optional*, defaults to `False`):
                Open a pull request instead of committing to `main`.
            push_vectors (`bool`, *optional*, defaults to `False`):
                Also push the distribution vectors (`vectors/<name>`), so that others can restore the merger with
                `DEMMerger.from_pretrained(repo_id)` and merge again with other coefficients.
            regenerate_card (`bool`, *optional*, defaults to `False`):
                Replace a `README.md` the repo already has with the generated card.
            max_shard_size (`int` or `str`, *optional*):
                Cap per weight shard (default `config.max_shard_size`).
            model_card_kwargs (`dict`, *optional*):
                Passed to [`~dem_hf.merging.card.render.build_model_card`], e.g. `{"base_model": "org/base", "license": "mit"}`.

        Returns:
            `huggingface_hub.CommitInfo`: the commit (a `str` subclass holding its URL; `.oid`, `.pr_url`).

        Raises:
            `ValueError`: bad `repo_id`, coefficients, or `revision` with `create_pr`, before any request.
            `PermissionError`: no token, or the Hub rejected it (before the merge).
            [`~dem_hf.hub.push.HubPushError`]: the Hub or the network failed; push again to retry.

        Example:
            ```python
            >>> merger.search({"math": math_val, "chat": chat_val})
            >>> merger.push_to_hub("my-org/dem-smollm", private=True, push_vectors=True)
            CommitInfo(commit_url='https://huggingface.co/my-org/dem-smollm/commit/...', ...)
            ```
        """
        check_push_target(repo_id, revision=revision, create_pr=create_pr)
        self.resolve_coefficients(coefficients)
        full_id = prepare_repo(repo_id, token=token, private=private, revision=revision, create_pr=create_pr)
        card_kwargs = {"model_id": full_id, "vectors_included": push_vectors, **(model_card_kwargs or {})}
        with tempfile.TemporaryDirectory(prefix="dem_hf-push-") as tmp:
            folder = self.save_pretrained(
                Path(tmp) / full_id.rsplit("/", 1)[-1], coefficients, max_shard_size=max_shard_size,
                save_vectors=push_vectors, model_card_kwargs=card_kwargs,
            )
            return push_folder(
                folder, full_id, token=token, private=private, commit_message=commit_message or DEFAULT_PUSH_MESSAGE,
                revision=revision, create_pr=create_pr, delete_patterns=STALE_REMOTE_PATTERNS,
                keep_existing=None if regenerate_card else CARD_NAME,
            )

"""`dem-hf push`: push a saved model folder to the Hub in one commit, with a model card generated for the repo.

    dem-hf push --model dem-model --repo_id org/dem-model --push_vectors

A folder saved by `DEMMerger.save_pretrained` (it has a `dem_config.json`) is pushed as it is: nothing is merged
again and the base model is not needed. Only the card changes: the folder's `README.md` was generated for a local
folder, so the push carries a card regenerated for the repo id from `dem_config.json` (`--local_card` pushes the
folder's own `README.md` instead). A `README.md` already in the repo is kept unless `--regenerate_card`.
Distribution vectors go up only with `--push_vectors`, from the folder's `vectors/` or, failing that, from where
`dem_config.json` says they were; weight shards and vectors an earlier push left behind are deleted in the same
commit, exactly as `DEMMerger.push_to_hub` does. Any other folder (a plain Transformers checkpoint) is pushed
unchanged.

The folder is only read: the commit is assembled in a temporary folder of symbolic links.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from huggingface_hub import CommitInfo
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

from ..hub.push import HubPushError, check_push_target, prepare_repo, push_folder
from ..merging.card.render import CARD_NAME, card_for_folder
from ..merging.config import DEMConfig
from ..merging.push import DEFAULT_PUSH_MESSAGE, STALE_REMOTE_PATTERNS
from ..merging.sources import VECTORS_FOLDER
from ..vectors.vector import VECTOR_CONFIG_NAME
from .options import add_command, add_option, add_switch


def register(subparsers) -> None:
    parser = add_command(subparsers, "push", __doc__)
    add_option(parser, "model", required=True, help="Folder saved by `dem-hf merge` / save_pretrained.")
    add_option(parser, "repo_id", required=True, help="Hub repo id, 'namespace/name' (or 'name' for your own).")
    add_switch(parser, "private", help="Create the repo as private (if it is created).")
    add_option(parser, "token", help="Hub token with write access (default: HF_TOKEN or the saved login).")
    add_option(parser, "revision", help="Branch to push to (created from main if missing).")
    add_switch(parser, "create_pr", help="Open a pull request instead of committing to main.")
    add_switch(parser, "push_vectors", help="Also push the distribution vectors (vectors/).")
    add_option(parser, "commit_message", help=f"Commit message (default: {DEFAULT_PUSH_MESSAGE!r}).")
    add_switch(parser, "regenerate_card", help="Replace a README.md the repo already has with the new card.")
    add_switch(parser, "local_card", help="Push the folder's own README.md instead of a card for REPO_ID.")
    parser.set_defaults(run=run)


def run(args) -> int:
    try:
        commit = push_saved_folder(
            args.model, args.repo_id, token=args.token, private=args.private or None,
            commit_message=args.commit_message, revision=args.revision, create_pr=args.create_pr,
            push_vectors=args.push_vectors, regenerate_card=args.regenerate_card, local_card=args.local_card,
        )
    except (HubPushError, ConnectionError) as error:  # the Hub's or the network's fault: status 1, not 2
        if args.debug:
            raise
        print(f"dem-hf push: error: {error}", file=sys.stderr)
        return 1
    print(f"Pushed {args.model} to {commit.pr_url or commit.commit_url}")
    return 0


def push_saved_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | bool | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    push_vectors: bool = False,
    regenerate_card: bool = False,
    local_card: bool = False,
) -> CommitInfo:
    """Push a saved folder to the Hub in one commit; a DEM folder gets a card generated for `repo_id`.

    Args:
        folder (`str` or `os.PathLike`):
            A folder saved by `DEMMerger.save_pretrained` (or any model folder, pushed unchanged).
        repo_id (`str`):
            `"namespace/name"`, or `"name"` for your own namespace.
        token, private, commit_message, revision, create_pr:
            As for [`~dem_hf.hub.push.push_folder`].
        push_vectors (`bool`, *optional*, defaults to `False`):
            Also push the DEM folder's vectors (from `vectors/`, else from their recorded sources).
        regenerate_card (`bool`, *optional*, defaults to `False`):
            Replace a `README.md` the repo already has.
        local_card (`bool`, *optional*, defaults to `False`):
            Push the folder's own `README.md` rather than a card generated for `repo_id`.

    Returns:
        `huggingface_hub.CommitInfo` of the commit.

    Raises:
        `FileNotFoundError` / `NotADirectoryError`: `folder` is missing or not a folder.
        `ValueError`: bad repo id or arguments, or `push_vectors` with vectors that cannot be found; all before any
            request.
        `PermissionError` / [`~dem_hf.hub.push.HubPushError`]: as for [`~dem_hf.hub.push.push_folder`].
    """
    folder = Path(folder)
    check_push_target(repo_id, revision=revision, create_pr=create_pr)
    if not folder.is_dir():
        raise (NotADirectoryError if folder.exists() else FileNotFoundError)(
            f"Cannot push {str(folder)!r}: expected a saved model folder."
        )
    push_kwargs = dict(token=token, private=private, revision=revision, create_pr=create_pr)
    message = commit_message or DEFAULT_PUSH_MESSAGE
    if not (folder / DEMConfig.config_name).is_file():
        if push_vectors:
            raise ValueError(f"--push_vectors needs a DEM folder; {str(folder)!r} has no {DEMConfig.config_name}.")
        return push_folder(folder, repo_id, commit_message=message, **push_kwargs)

    vector_folders = _vector_folders(folder, DEMConfig.from_pretrained(folder)) if push_vectors else {}
    full_id = prepare_repo(repo_id, **push_kwargs)
    with tempfile.TemporaryDirectory(prefix="dem_hf-push-") as tmp:
        staging = Path(tmp)
        _link_tree(folder, staging, skip=lambda path: path == CARD_NAME or path.startswith(f"{VECTORS_FOLDER}/"))
        for name, source in vector_folders.items():
            _link_tree(source, staging / VECTORS_FOLDER / name)
        if local_card and (folder / CARD_NAME).is_file():
            _link(folder / CARD_NAME, staging / CARD_NAME)
        elif not local_card:
            card_for_folder(folder, model_id=full_id, vectors_included=bool(vector_folders)).save(staging / CARD_NAME)
        return push_folder(
            staging, full_id, commit_message=message, delete_patterns=STALE_REMOTE_PATTERNS,
            keep_existing=None if regenerate_card else CARD_NAME, **push_kwargs,
        )


def _vector_folders(folder: Path, config: DEMConfig) -> dict[str, Path]:
    """Where each recorded vector is on disk: the folder's `vectors/<name>`, else its recorded source."""
    found, missing = {}, []
    for name, info in config.vectors.items():
        places = [folder / VECTORS_FOLDER / name, info.get("source")]
        place = next((Path(p) for p in places if p and (Path(p) / VECTOR_CONFIG_NAME).is_file()), None)
        if place is None:
            missing.append(name)
        else:
            found[name] = place
    if missing:
        raise ValueError(
            f"Cannot push the vectors {missing}: they are neither in {str(folder / VECTORS_FOLDER)!r} nor at the "
            "sources dem_config.json records. Save the model with save_vectors=True (--save_vectors), or push "
            "without --push_vectors."
        )
    return found


def _link_tree(source: Path, target: Path, skip=lambda path: False) -> None:
    """Mirror the files of `source` under `target` as symbolic links (copies where links are not possible)."""
    paths = sorted(p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file())
    for path in filter_repo_objects(paths, ignore_patterns=DEFAULT_IGNORE_PATTERNS):
        if not skip(path):
            _link(source / path, target / path)


def _link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        target.symlink_to(source.resolve())
    except OSError:
        shutil.copy2(source, target)

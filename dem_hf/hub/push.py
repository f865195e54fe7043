"""Hub plumbing: check repo ids and push a saved folder in one commit (turning a repo id or a path into a local
folder is [`dem_hf.hub.download.resolve_pretrained`]).

A push follows `huggingface_hub.ModelHubMixin.push_to_hub` (which we do not inherit: its own `config.json`
collides with the model's): the caller saves a folder, [`push_folder`] runs `create_repo(exist_ok=True)` and makes
exactly one commit with `HfApi.create_commit` (as Transformers' own `push_to_hub` does). `upload_folder` is not used:
with `hf_xet` installed it may split a folder into several commits, and a DEM push must be all or nothing.
Every failure is translated into an error that says what to do: `ValueError` for a bad repo id (raised before any
request), `PermissionError` for a missing or rejected token, [`HubPushError`] (an `OSError`) when the Hub or the
network fails. The local folder is only ever read.

Everything goes through the real `huggingface_hub` client, so `HF_ENDPOINT`, `HF_TOKEN`, `HF_HUB_OFFLINE` and
`HF_HUB_CACHE` behave as they do for Transformers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

# Only the light parts of huggingface_hub at import time: `hf_api`, `errors` and the HTTP client they pull in
# (about 0.4 s) are imported by the functions that talk to the Hub, so `dem-hf merge` of local folders skips them.
from huggingface_hub import constants
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

from .. import logging

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo, CommitOperationAdd, CommitOperationDelete

logger = logging.get_logger(__name__)

REPO_TYPES = ("model", "dataset", "space")
REPO_ID_RULES = (
    "expected 'namespace/name' (or 'name' for your own namespace), each part made of letters, digits, '-', '_' "
    "and '.', at most 96 characters, not starting or ending with '-' or '.', without '--' or '..', and not "
    "ending with '.git'"
)
DEFAULT_COMMIT_MESSAGE = "Upload folder using huggingface_hub"
NEVER_DELETED = ".gitattributes"
LOGIN_HINT = "Log in with `hf auth login`, set the `HF_TOKEN` environment variable, or pass `token=` explicitly."


class HubPushError(OSError):
    """A push to the Hub failed on the Hub's or the network's side; the local folder is left as it was."""


def validate_repo_id(repo_id: str) -> None:
    """Check that `repo_id` is a well-formed Hub repository id, without any network call.

    Uses `huggingface_hub`'s own validator, so the rules are exactly the client's.

    Args:
        repo_id (`str`):
            The id to check, such as `"my-org/my-dem-model"`.

    Raises:
        `ValueError`: naming the bad id and the expected form.

    Example:

    ```python
    >>> validate_repo_id("my-org/my-dem-model")
    >>> validate_repo_id("my org/model")
    Traceback (most recent call last):
    ValueError: Invalid Hub repo id 'my org/model': expected 'namespace/name' ...
    ```
    """
    # heavy: huggingface_hub.errors pulls in httpx; only an actual id needs the validator
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id as _hf_validate_repo_id

    if not isinstance(repo_id, str):
        raise ValueError(f"Invalid Hub repo id {repo_id!r} (a {type(repo_id).__name__}): {REPO_ID_RULES}.")
    try:
        _hf_validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"Invalid Hub repo id {repo_id!r}: {REPO_ID_RULES}. ({error})") from error


def check_push_target(
    repo_id: str, *, repo_type: str = "model", revision: str | None = None, create_pr: bool = False
) -> None:
    """Check the arguments of a push without any network call, so that mistakes surface before expensive work.

    Args:
        repo_id (`str`):
            `"namespace/name"`, or `"name"` for the user's own namespace.
        repo_type (`str`, *optional*, defaults to `"model"`):
            One of `"model"`, `"dataset"`, `"space"`.
        revision (`str`, *optional*):
            Branch to commit to.
        create_pr (`bool`, *optional*, defaults to `False`):
            Whether the push opens a pull request (against `main`, so `revision` must not name another branch).

    Raises:
        `ValueError`: naming the bad argument and what is expected.
    """
    validate_repo_id(repo_id)
    if repo_type not in REPO_TYPES:
        raise ValueError(f"Invalid repo_type {repo_type!r}: expected one of {', '.join(REPO_TYPES)}.")
    if create_pr and revision not in (None, constants.DEFAULT_REVISION):
        raise ValueError(
            f"create_pr=True opens a pull request against 'main'; it cannot be combined with revision={revision!r}."
        )


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | bool | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    repo_type: str = "model",
    delete_patterns: str | Sequence[str] | None = None,
    keep_existing: str | Sequence[str] | None = None,
) -> CommitInfo:
    """Upload every file of `folder` to the Hub repo `repo_id` in one commit, creating the repo if needed.

    The repo is created with `create_repo(exist_ok=True)`, then the whole folder goes up in exactly one
    `HfApi.create_commit` (large files through the client's LFS/Xet upload first, as Transformers does), so a push
    is all or nothing, whatever the number of files. Files identical to the remote ones are skipped by the client,
    and when nothing changed no commit is made (the latest commit is returned). `.git/` and `.cache/huggingface/`
    folders are never uploaded.

    Args:
        folder (`str` or `os.PathLike`):
            A saved folder, e.g. the output of `DEMMerger.save_pretrained`. It is only read (symbolic links to files
            are followed).
        repo_id (`str`):
            `"namespace/name"`, or `"name"` for the user's own namespace.
        token (`str` or `bool`, *optional*):
            A Hub token with write access. Defaults to the `HF_TOKEN` variable or the token saved by `hf auth login`.
        private (`bool`, *optional*):
            Visibility of a newly created repo (an existing repo keeps its own). Defaults to the Hub's default.
        commit_message (`str`, *optional*):
            Defaults to `"Upload folder using huggingface_hub"`.
        revision (`str`, *optional*):
            Branch to commit to; created from `main` if missing. Defaults to `main`.
        create_pr (`bool`, *optional*, defaults to `False`):
            Open a pull request against `main` with the commit instead of committing to it.
        repo_type (`str`, *optional*, defaults to `"model"`):
            One of `"model"`, `"dataset"`, `"space"`.
        delete_patterns (`str` or `list[str]`, *optional*):
            Remote files matching these patterns and absent from `folder` are deleted in the same commit (e.g.
            `"model*.safetensors"` so that shards of an earlier, differently sharded push do not linger). Patterns
            match whole repo paths and `*` crosses `/` (`huggingface_hub.utils.filter_repo_objects`).
            `.gitattributes` is never deleted.
        keep_existing (`str` or `list[str]`, *optional*):
            Paths (relative to `folder`, e.g. `"README.md"`) that are not uploaded when the repo already has them, so
            the remote version is kept (a hand-written model card, for instance); they are uploaded when missing.

    Returns:
        `huggingface_hub.CommitInfo`: the commit (`.oid`, `.commit_url`, `.pr_url`).

    Raises:
        `ValueError`: bad `repo_id`, `repo_type`, an empty `folder`, or `revision` together with `create_pr`;
            all checked before any request.
        `FileNotFoundError` / `NotADirectoryError`: `folder` is missing or not a directory.
        `PermissionError`: no token, or the Hub rejected it.
        [`HubPushError`]: the Hub or the network failed (the local folder is unchanged; push again to retry).

    Example:

    ```python
    >>> merger.save_pretrained("out/dem-model")
    >>> info = push_folder("out/dem-model", "my-org/dem-model", private=True)
    >>> info.commit_url
    'https://huggingface.co/my-org/dem-model/commit/...'
    ```
    """
    folder = Path(folder)
    check_push_target(repo_id, repo_type=repo_type, revision=revision, create_pr=create_pr)
    if not folder.exists():
        raise FileNotFoundError(f"Cannot push {str(folder)!r}: no such folder.")
    if not folder.is_dir():
        raise NotADirectoryError(f"Cannot push {str(folder)!r}: it is a file, expected a folder.")
    local_paths = _local_files(folder)
    if not local_paths:
        raise ValueError(f"Cannot push {str(folder)!r}: the folder holds no files.")

    repo_id = prepare_repo(
        repo_id, token=token, private=private, repo_type=repo_type, revision=revision, create_pr=create_pr
    )
    # heavy: the Hub client and httpx (about 0.4 s); only pushes need it
    from huggingface_hub import HfApi

    api = HfApi(library_name="dem_hf")
    try:
        remote = None
        if delete_patterns or keep_existing:
            base_revision = constants.DEFAULT_REVISION if create_pr else revision
            remote = set(api.list_repo_files(repo_id, revision=base_revision, repo_type=repo_type, token=token))
        operations = _commit_operations(folder, local_paths, remote, delete_patterns, keep_existing)
        commit = api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message or DEFAULT_COMMIT_MESSAGE,
            token=token,
            repo_type=repo_type,
            revision=revision,
            create_pr=create_pr,
        )
    except _push_failures() as error:
        raise _push_error(error, folder, repo_id, token) from error
    logger.info(f"Pushed {folder} to {repo_id}: {commit.commit_url}")
    return commit


def prepare_repo(
    repo_id: str,
    *,
    token: str | bool | None = None,
    private: bool | None = None,
    repo_type: str = "model",
    revision: str | None = None,
    create_pr: bool = False,
) -> str:
    """Make sure the repo (and the branch `revision`) exists, and return the repo's full `namespace/name` id.

    This is the first half of [`push_folder`], usable on its own to find a missing or rejected token before
    expensive work (a merge) rather than after it, and to learn the namespace of a bare `"name"`.

    Args:
        repo_id (`str`):
            `"namespace/name"`, or `"name"` for the user's own namespace.
        token (`str` or `bool`, *optional*):
            A Hub token with write access. Defaults to the saved token.
        private (`bool`, *optional*):
            Visibility of a newly created repo (an existing repo keeps its own).
        repo_type (`str`, *optional*, defaults to `"model"`):
            One of `"model"`, `"dataset"`, `"space"`.
        revision (`str`, *optional*):
            A branch to create from `main` if missing (not for pull requests).
        create_pr (`bool`, *optional*, defaults to `False`):
            Whether the push will open a pull request (then no branch is created).

    Returns:
        `str`: the full repo id, e.g. `"my-user/name"` for `"name"`.

    Raises:
        `ValueError`: bad arguments, before any request. `PermissionError`: no token or a rejected one.
        [`HubPushError`]: the Hub or the network failed.
    """
    check_push_target(repo_id, repo_type=repo_type, revision=revision, create_pr=create_pr)
    # heavy: the Hub client and httpx (about 0.4 s); only pushes need it
    from huggingface_hub import HfApi

    api = HfApi(library_name="dem_hf")
    try:
        full_id = api.create_repo(repo_id, token=token, private=private, repo_type=repo_type, exist_ok=True).repo_id
        if revision is not None and not create_pr and not revision.startswith("refs/pr/"):
            api.create_branch(full_id, branch=revision, token=token, repo_type=repo_type, exist_ok=True)
    except _push_failures() as error:
        raise _push_error(error, None, repo_id, token) from error
    return full_id


def _local_files(folder: Path) -> list[str]:
    """Repo paths of the files under `folder` (symbolic links to files included), minus `.git/` and the like."""
    paths = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
    return list(filter_repo_objects(paths, ignore_patterns=DEFAULT_IGNORE_PATTERNS))


def _commit_operations(
    folder: Path,
    local_paths: list[str],
    remote: set[str] | None,
    delete_patterns: str | Sequence[str] | None,
    keep_existing: str | Sequence[str] | None,
) -> list[CommitOperationAdd | CommitOperationDelete]:
    """The additions and deletions of one commit: every local file, minus those kept remotely, plus stale deletes."""
    # heavy: part of the Hub client; only pushes need it
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    kept = sorted(set(_as_list(keep_existing) or []) & set(local_paths) & (remote or set()))
    if kept:
        logger.warning(f"Kept the repo's own {', '.join(kept)} (not overwritten by the push).")
    additions = [
        CommitOperationAdd(path_in_repo=path, path_or_fileobj=folder / path) for path in local_paths if path not in kept
    ]
    stale = []
    if delete_patterns and remote:
        candidates = sorted(remote - set(local_paths) - {NEVER_DELETED})
        stale = list(filter_repo_objects(candidates, allow_patterns=_as_list(delete_patterns)))
    return [*(CommitOperationDelete(path_in_repo=path) for path in stale), *additions]


def _as_list(patterns: str | Sequence[str] | None) -> list[str] | None:
    if patterns is None:
        return None
    return [patterns] if isinstance(patterns, str) else list(patterns)


def _push_failures() -> tuple[type[Exception], ...]:
    """The client errors that [`_push_error`] translates: no token, an HTTP error from the Hub, a network failure.

    Imported on demand (`huggingface_hub.errors` pulls in httpx); an `except` clause only evaluates this when an
    exception reaches it.
    """
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError
    from huggingface_hub.utils import httpx  # huggingface_hub's own HTTP library

    return (LocalTokenNotFoundError, HfHubHTTPError, httpx.TransportError)


def _push_error(error: Exception, folder: Path | None, repo_id: str, token: str | bool | None) -> Exception:
    """The error to raise for a failed push: `PermissionError` for auth problems, [`HubPushError`] otherwise."""
    # heavy: huggingface_hub.errors pulls in httpx; only a failed push gets here
    from huggingface_hub import get_token
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    status = error.response.status_code if isinstance(error, HfHubHTTPError) and error.response is not None else None
    target = f"{repo_id!r} on {constants.ENDPOINT}"
    if isinstance(error, LocalTokenNotFoundError) or status == 401:
        sent_token = token if isinstance(token, str) else (get_token() if token is not False else None)
        problem = "No Hugging Face token was found" if sent_token is None else "The Hub rejected the token"
        return PermissionError(f"Cannot push to {target}: {problem}. {LOGIN_HINT} The local folder is unchanged.")
    if status == 403:
        return PermissionError(
            f"Cannot push to {target}: the token has no write access to this repo or namespace "
            f"({_first_line(error)}). Use a token with write access. {LOGIN_HINT}"
        )
    what = f"Pushing {str(folder)!r}" if folder is not None else "Preparing the push"
    return HubPushError(
        f"{what} to {target} failed: {_first_line(error)}. The local folder is intact and "
        "nothing in it was changed; run the push again to retry (files already on the Hub are skipped)."
    )


def _first_line(error: Exception) -> str:
    """The gist of a client error: its first line, plus what the server said, if anything."""
    text = str(error).strip()
    gist = text.splitlines()[0] if text else type(error).__name__
    server_message = getattr(error, "server_message", None)
    if server_message and server_message.strip() not in gist:
        gist = f"{gist} (the Hub said: {server_message.strip()})"
    return gist

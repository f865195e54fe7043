"""Where a model or vector lives: a local folder, or a Hub repo fetched into (or found in) the cache.

[`resolve_pretrained`] turns a `from_pretrained` argument into a local folder, downloading only the files a
caller needs (`allow_patterns`), and explains clearly when it cannot (offline and not cached, a gated or
missing repo). [`resolve_checkpoint`] does it for a checkpoint: its config (and tokenizer) files and its safetensors
weights, a single file or the index and exactly the shards it lists, never the other files of the repo (PyTorch
`.bin` copies, `consolidated.safetensors`, `original/`, datasets kept beside the model). [`hub_origin`] tells which
repo, commit and subfolder a folder of the Hugging Face cache holds, so that a saved DEM folder can record Hub sources
as ids with their revision rather than as cache paths; [`hub_id_of`] names the Hub id behind a reference. Pushing is
in [`dem_hf.hub.push`].

Every `from_pretrained` of dem_hf takes the Hub arguments of Transformers' (`revision`, `token`, `cache_dir`,
`local_files_only`, `force_download`, `subfolder`) and passes them here.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# `snapshot_download` and the client's errors (they pull in httpx, about 0.4 s with the rest of the client) are
# imported by [`_download_snapshot`]: a local folder needs neither.
from huggingface_hub import constants

from .push import LOGIN_HINT, REPO_ID_RULES, _as_list, _first_line, validate_repo_id

__all__ = [
    "HUB_ARGUMENTS", "MODEL_FILES", "HubOrigin", "hub_id_of", "hub_origin", "resolve_checkpoint", "resolve_pretrained",
]

# The Hub arguments every dem_hf `from_pretrained` takes, with Transformers' names and meanings.
HUB_ARGUMENTS = ("subfolder", "revision", "token", "cache_dir", "local_files_only", "force_download")

# What loading a causal LM needs besides its weights: configs, tokenizer files (every format Transformers reads),
# chat templates, and the model card (for the license a merged model's card states). Nothing else is downloaded.
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "*.tiktoken",
    "chat_template.jinja",
    "chat_template.json",
    "README.md",
)

# `.../models--{namespace}--{name}/snapshots/{commit}[/{subfolder}]`: the layout of the Hugging Face cache (repo ids
# cannot contain `--`, so the separator is unambiguous).
HUB_CACHE_SNAPSHOT = re.compile(
    r"(?:^|/)models--(?P<repo>[^/]+)/snapshots/(?P<revision>[^/]+)(?:/(?P<subfolder>.+?))?/?$"
)


@dataclass(frozen=True)
class HubOrigin:
    """Where a folder of the Hugging Face cache comes from: a model repo, the commit it was downloaded at, and the
    folder inside the repo (`None` for the repo's root)."""

    repo_id: str
    revision: str
    subfolder: str | None = None


def hub_origin(folder: str | os.PathLike) -> HubOrigin | None:
    """The Hub repo, commit and subfolder behind a folder of the Hugging Face cache, or `None` for any other folder.

    Example:

    ```python
    >>> hub_origin("/root/.cache/huggingface/hub/models--org--dem/snapshots/0123abcd/vectors/math")
    HubOrigin(repo_id='org/dem', revision='0123abcd', subfolder='vectors/math')
    >>> hub_origin("vectors/math") is None
    True
    ```
    """
    match = HUB_CACHE_SNAPSHOT.search(Path(folder).as_posix())
    if match is None:
        return None
    return HubOrigin(match["repo"].replace("--", "/"), match["revision"], match["subfolder"] or None)


def hub_id_of(path_or_id: str | os.PathLike | None) -> str | None:
    """The Hub id behind a model reference: the id itself, the repo of a Hugging Face cache snapshot (its root, not a
    subfolder), or `None` for a local folder, a path-like name or nothing.

    Example:

    ```python
    >>> hub_id_of("org/name"), hub_id_of("/c/hub/models--a--b/snapshots/123abc"), hub_id_of("./relative")
    ('org/name', 'a/b', None)
    ```
    """
    if path_or_id is None:
        return None
    text = str(path_or_id)
    origin = hub_origin(text)
    if origin is not None:
        return origin.repo_id if origin.subfolder is None else None
    if Path(text).expanduser().exists() or text.startswith((".", "/", "~")):
        return None
    try:
        validate_repo_id(text)
    except ValueError:
        return None
    return text


def resolve_checkpoint(
    path_or_repo_id: str | os.PathLike,
    *,
    stem: str = "model",
    files: Sequence[str] = MODEL_FILES,
    **hub_kwargs,
) -> Path:
    """Return a local folder holding a safetensors checkpoint, downloading only what loading it needs.

    From the Hub come the `files` (glob patterns; by default a causal LM's config and tokenizer files,
    [`MODEL_FILES`]) and the weights: `{stem}.safetensors`, or `{stem}.safetensors.index.json` and exactly the shards
    its `weight_map` lists (fetched at the commit of the first download). Anything else in the repo stays there. A
    local folder is used as it is.

    Args:
        path_or_repo_id (`str` or `os.PathLike`):
            A local folder or a Hub repo id.
        stem (`str`, *optional*, defaults to `"model"`):
            The weights' file stem (`"vector"` for a saved distribution vector).
        files (`Sequence[str]`, *optional*, defaults to [`MODEL_FILES`]):
            The other files to fetch, as glob patterns relative to the folder.
        hub_kwargs:
            `subfolder`, `revision`, `token`, `cache_dir`, `local_files_only`, `force_download`: as for
            [`resolve_pretrained`].

    Returns:
        `pathlib.Path`: a local folder.

    Example:

    ```python
    >>> resolve_checkpoint("HuggingFaceTB/SmolLM2-135M")  # config, tokenizer, model.safetensors; no .bin, no ONNX
    PosixPath('/root/.cache/huggingface/hub/models--HuggingFaceTB--SmolLM2-135M/snapshots/...')
    ```
    """
    index_name = f"{stem}.safetensors.index.json"
    patterns = [*files, f"{stem}.safetensors", index_name]
    folder = resolve_pretrained(path_or_repo_id, allow_patterns=patterns, **hub_kwargs)
    origin = hub_origin(folder)
    index = folder / index_name
    if origin is None or not index.is_file():
        return folder
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError):
        return folder  # a malformed index: the checkpoint reader says what is wrong with it
    missing = [shard for shard in shards if isinstance(shard, str) and not (folder / shard).is_file()]
    if missing:
        pinned = {**hub_kwargs, "revision": origin.revision}  # the shards of the index just downloaded
        folder = resolve_pretrained(path_or_repo_id, allow_patterns=missing, **pinned)
    return folder


def resolve_pretrained(
    path_or_repo_id: str | os.PathLike,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
    allow_patterns: str | Sequence[str] | None = None,
) -> Path:
    """Return a local folder for a local path or a Hub repo id, downloading the repo into the cache if needed.

    A local directory is used as is. Anything else must be a Hub repo id: its snapshot is fetched with
    `huggingface_hub.snapshot_download` (honouring `HF_HUB_OFFLINE`, `HF_HUB_CACHE` and the cache it already holds)
    and the path inside the cache is returned.

    Args:
        path_or_repo_id (`str` or `os.PathLike`):
            A local folder, or a repo id such as `"my-org/dem-model"`.
        subfolder (`str`, *optional*):
            A folder inside it; only that folder is downloaded and its path is returned.
        revision (`str`, *optional*):
            Branch, tag or commit of the repo. Defaults to `main`.
        token (`str` or `bool`, *optional*):
            For private or gated repos. Defaults to the saved token.
        cache_dir (`str` or `os.PathLike`, *optional*):
            Defaults to the Hugging Face cache (`HF_HUB_CACHE`).
        local_files_only (`bool`, *optional*, defaults to `False`):
            Only look in the cache.
        force_download (`bool`, *optional*, defaults to `False`):
            Download the files again even when they are cached.
        allow_patterns (`str` or `list[str]`, *optional*):
            Download only the files matching these glob patterns (relative to `subfolder` when given).

    Returns:
        `pathlib.Path`: a local folder.

    Raises:
        `FileNotFoundError`: not a local folder and not a valid repo id; the repo, revision or subfolder does not
            exist; or the repo is not cached while downloads are disabled.
        `PermissionError`: the repo is private or gated and the token is missing or rejected.
        `ConnectionError`: the Hub cannot be reached and nothing is cached.

    Example:

    ```python
    >>> resolve_pretrained("out/dem-model")          # a local folder, returned as is
    PosixPath('out/dem-model')
    >>> resolve_pretrained("my-org/dem-model")       # downloaded once, then read from the cache
    PosixPath('/root/.cache/huggingface/hub/models--my-org--dem-model/snapshots/...')
    ```
    """
    subfolder = subfolder.strip("/") if subfolder else None
    local = Path(path_or_repo_id).expanduser()
    if local.is_dir():
        return _subfolder_of(local, subfolder, str(local))
    if local.exists():
        raise NotADirectoryError(f"{str(path_or_repo_id)!r} is a file; expected a folder or a Hub repo id.")
    repo_id = str(path_or_repo_id)
    try:
        validate_repo_id(repo_id)
    except ValueError as error:
        raise FileNotFoundError(
            f"{repo_id!r} is not a local folder, and not a Hub repo id either ({REPO_ID_RULES})."
        ) from error

    snapshot = _download_snapshot(
        repo_id,
        revision=revision,
        token=token,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        force_download=force_download,
        allow_patterns=_patterns_under(subfolder, allow_patterns),
    )
    return _subfolder_of(Path(snapshot), subfolder, f"the Hub repo {repo_id!r}")


def _download_snapshot(
    repo_id: str,
    *,
    revision: str | None,
    token: str | bool | None,
    cache_dir: str | os.PathLike | None,
    local_files_only: bool,
    force_download: bool,
    allow_patterns: list[str] | None,
) -> str:
    """`huggingface_hub.snapshot_download`, with its errors turned into ones that say what to do (see
    [`resolve_pretrained`])."""
    # heavy: the download client and its errors pull in httpx; only a Hub id needs them
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return snapshot_download(
            repo_id,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            force_download=force_download,
            allow_patterns=allow_patterns,
        )
    except LocalEntryNotFoundError as error:
        raise _not_cached_error(repo_id, revision, cache_dir, local_files_only) from error
    except GatedRepoError as error:
        raise PermissionError(
            f"{repo_id!r} is gated: request access on the Hub, then use a token. {LOGIN_HINT}"
        ) from error
    except RepositoryNotFoundError as error:
        raise FileNotFoundError(
            f"{repo_id!r} is not a local folder, and the Hub at {constants.ENDPOINT} has no such repo (if it is "
            f"private, you need a token: {LOGIN_HINT})"
        ) from error
    except RevisionNotFoundError as error:
        raise FileNotFoundError(f"Revision {revision!r} does not exist in the Hub repo {repo_id!r}.") from error
    except HfHubHTTPError as error:
        if error.response is not None and error.response.status_code in (401, 403):
            raise PermissionError(
                f"The Hub refused access to {repo_id!r}: {_first_line(error)}. {LOGIN_HINT}"
            ) from error
        raise


def _subfolder_of(root: Path, subfolder: str | None, origin: str) -> Path:
    if subfolder is None:
        return root
    target = root / subfolder
    if not target.is_dir():
        raise FileNotFoundError(f"{origin} has no subfolder {subfolder!r}.")
    return target


def _patterns_under(subfolder: str | None, allow_patterns: str | Sequence[str] | None) -> list[str] | None:
    """Glob patterns relative to `subfolder`, made relative to the repo root."""
    patterns = _as_list(allow_patterns)
    if subfolder is None:
        return patterns
    return [f"{subfolder}/{pattern}" for pattern in (patterns or ["*"])]


def _not_cached_error(
    repo_id: str, revision: str | None, cache_dir: str | os.PathLike | None, local_files_only: bool
) -> OSError:
    where = f"{repo_id!r}" + (f" (revision {revision!r})" if revision else "")
    cache = cache_dir or constants.HF_HUB_CACHE
    if local_files_only or constants.is_offline_mode():
        switch = "local_files_only=True" if local_files_only else "HF_HUB_OFFLINE=1"
        return FileNotFoundError(
            f"{where} is not a local folder and is not in the Hugging Face cache ({cache}), and downloads are "
            f"disabled ({switch}). Download it once while online, or pass the path of a local copy."
        )
    return ConnectionError(
        f"Could not reach the Hub at {constants.ENDPOINT} to download {where}, and it is not in the Hugging Face "
        f"cache ({cache}). Check the connection (and HF_ENDPOINT), or pass the path of a local copy."
    )

"""A saved vector's folder: `vector.safetensors` (sharded when large), `vector_config.json` and a generated
`README.md` card, written atomically ([`write_vector_folder`]); and [`VectorFolderMixin`], which gives
[`DistributionVector`] its `save_pretrained`, `from_pretrained` (a folder or a Hub repo, downloading only the config
and the tensors) and `push_to_hub` (one commit).

The card ([`render_vector_card`]) says what the vector is: its base, its training data, dense or LoRA (with the
rank), how many base tensors and parameters it changes and how many numbers it stores, and how to load and merge it
with dem_hf. Its YAML header holds `base_model` (a Hub id), `datasets` (Hub dataset ids), `library_name: dem_hf` and
`tags`. It is rendered offline from `templates/vector_card.md.j2`, as `huggingface_hub.ModelCard.from_template`
renders it ([`dem_hf.hub.card`]); the text depends only on the vector (no dates, no absolute paths).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..hub.card import CARD_NAME, render_card_template, save_card_text
from ..hub.download import hub_id_of
from ..io.outputs import atomic_directory, check_not_inside, local_folder
from ..io.reader import CheckpointReader
from ..io.shards import DEFAULT_MAX_SHARD_SIZE, ShardedWriter
from .config import LORA_A, LORA_B, LoraModule, check_lora_factors, read_vector_config

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo

    from ..io.tensors import TensorSource
    from .vector import DistributionVector

__all__ = [
    "VECTOR_CARD_TEMPLATE", "VECTOR_CONFIG_NAME", "VECTOR_STEM", "VECTOR_TAGS", "VectorFolderMixin",
    "render_vector_card", "save_vector_card", "staged_vector_folder", "write_vector_folder",
]

VECTOR_CONFIG_NAME = "vector_config.json"
VECTOR_STEM = "vector"
VECTOR_TAGS = ("dem", "dem_hf", "distribution-vector")
VECTOR_CARD_TEMPLATE = Path(__file__).resolve().parent / "templates" / "vector_card.md.j2"
# Remote files a push rewrites: tensors of an earlier, differently sharded push are deleted in the same commit.
STALE_VECTOR_FILES = (f"{VECTOR_STEM}*.safetensors", f"{VECTOR_STEM}.safetensors.index.json")
DATA_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".parquet", ".arrow", ".txt", ".gz", ".zip", ".zst")


def write_vector_folder(
    save_directory: str | os.PathLike,
    items: Iterable[tuple[str, Any]],
    config: dict[str, Any],
    *,
    overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    model_card_kwargs: Mapping[str, Any] | None = None,
) -> Path:
    """Write `(name, tensor)` pairs, one at a time, the vector config and its card into a folder, atomically.

    `model_card_kwargs` go to [`render_vector_card`]."""
    with staged_vector_folder(save_directory, config, overwrite=overwrite, model_card_kwargs=model_card_kwargs) as staging:
        with ShardedWriter(staging, stem=VECTOR_STEM, max_shard_size=max_shard_size) as writer:
            for name, tensor in items:
                writer.add(name, tensor)
            writer.close()
    return Path(save_directory)


@contextmanager
def staged_vector_folder(
    save_directory: str | os.PathLike,
    config: dict[str, Any],
    *,
    overwrite: bool = False,
    model_card_kwargs: Mapping[str, Any] | None = None,
) -> Iterator[Path]:
    """A vector folder built under a temporary name ([`~dem_hf.io.outputs.atomic_directory`]): the block writes the
    tensors (`vector*.safetensors`) into the folder it is given; then `vector_config.json` and the card are added and
    the folder is moved into place. An error in the block leaves nothing behind.

    Example:
        ```python
        >>> with staged_vector_folder("vectors/math", vector.config_dict()) as staging:
        ...     ShardedWriter(staging, VECTOR_STEM, layout=[]).close()
        ```
    """
    with atomic_directory(save_directory, overwrite=overwrite) as staging:
        yield staging
        (staging / VECTOR_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        save_vector_card(staging, config, **(model_card_kwargs or {}))


def save_vector_card(folder: str | os.PathLike, config: Mapping[str, Any], **card_kwargs: Any) -> Path:
    """Write the card of the vector whose tensors are in `folder` (headers only are read) as `folder/README.md`."""
    tensors = CheckpointReader(folder, stem=VECTOR_STEM)
    return save_card_text(render_vector_card(config, tensors, **card_kwargs), Path(folder) / CARD_NAME)


def render_vector_card(
    config: Mapping[str, Any], tensors: TensorSource, *, model_id: str | None = None, base_model: str | None = None
) -> str:
    """The `README.md` of a saved vector, offline.

    Args:
        config (`Mapping`):
            The vector's `vector_config.json` ([`DistributionVector.config_dict`]).
        tensors ([`TensorSource`]):
            Its tensors (only names and shapes are read).
        model_id (`str`, *optional*):
            What the card's snippet loads: the Hub repo id the card goes to. Defaults to the vector's name (a card
            that does not depend on where its folder is, so a copied vector keeps its card byte for byte).
        base_model (`str`, *optional*):
            Hub id of the base for the YAML `base_model` field; defaults to the recorded base when it is a Hub id.

    Returns:
        `str`: the card, YAML header included, ending with a newline.

    Example:

    ```python
    >>> print(render_vector_card(vector.config_dict(), vector.tensors, model_id="my-org/smollm2-math-vector"))
    ```
    """
    from huggingface_hub.repocard_data import ModelCardData

    name = config["name"]
    reference = config.get("base_model_name_or_path")
    base_hub_id = base_model or hub_id_of(reference)
    dataset = (config.get("metadata") or {}).get("dataset")
    hub_dataset = dataset if _is_hub_dataset_id(dataset) else None
    lora = set(config.get("lora_modules") or {})
    card_data = ModelCardData(
        base_model=base_hub_id,
        datasets=[hub_dataset] if hub_dataset else None,
        library_name="dem_hf",
        tags=[*VECTOR_TAGS, *(["lora"] if lora else [])],
    )
    return render_card_template(
        VECTOR_CARD_TEMPLATE,
        card_data,
        name=name,
        model_id=model_id or name,
        base_display=f"[`{base_hub_id}`](https://huggingface.co/{base_hub_id})" if base_hub_id else _local_name(reference),
        base_reference=base_hub_id or (f"path/to/{Path(str(reference)).name}" if reference else "path/to/base"),
        data_display=(
            f"[`{hub_dataset}`](https://huggingface.co/datasets/{hub_dataset})" if hub_dataset
            else f"`{Path(str(dataset)).name}`" if dataset else f"the `{name}` data"
        ),
        training=_training_summary(config.get("metadata") or {}),
        **_size_facts(tensors, lora),
    )


def _size_facts(tensors: TensorSource, lora: set[str]) -> dict[str, Any]:
    """Vector type, LoRA rank(s), base tensors and parameters changed, numbers stored."""
    factors = {module + suffix for module in lora for suffix in (LORA_A, LORA_B)}
    dense = [n for n in tensors.keys() if n not in factors]
    stored = sum(math.prod(tensors.shape(n)) for n in tensors.keys())
    changed = sum(math.prod(tensors.shape(n)) for n in dense)
    changed += sum(tensors.shape(m + LORA_B)[0] * tensors.shape(m + LORA_A)[1] for m in lora if m not in dense)
    ranks = sorted({tensors.shape(m + LORA_A)[0] for m in lora})
    return {
        "vector_type": "LoRA (low-rank factors)" if lora else "full (dense deltas)",
        "kind_explanation": (
            "kept as the LoRA factors B and A of each module (Δ = scaling · B·A is formed one module at a time when a "
            "merge needs it)." if lora else "stored as a dense delta per base tensor the fine-tune changed."
        ),
        "storage_explanation": (
            "the factors, as `<module>.lora_A` and `<module>.lora_B`" + (", and dense deltas" if dense else "")
            if lora else "one delta per base tensor, under the base tensor's name"
        ),
        "lora_rank": (str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]} to {ranks[-1]}") if ranks else None,
        "num_targets": f"{len(set(dense) | lora):,}",
        "num_changed": f"{changed:,}",
        "num_stored": f"{stored:,}",
    }


def _training_summary(metadata: Mapping[str, Any]) -> str | None:
    parts = []
    if isinstance(metadata.get("num_examples"), int):
        parts.append(f"{metadata['num_examples']:,} examples")
    if isinstance(metadata.get("step"), int):
        parts.append(f"{metadata['step']:,} optimizer steps")
    tokens = (metadata.get("compute") or {}).get("num_input_tokens_seen") if isinstance(metadata.get("compute"), dict) else None
    if isinstance(tokens, int) and tokens > 0:
        parts.append(f"{tokens:,} tokens seen")
    return ", ".join(parts) or None


def _is_hub_dataset_id(name: Any) -> bool:
    """A Hub dataset id (`namespace/name`), not a local name or data file."""
    return (
        isinstance(name, str) and name.count("/") == 1 and not name.lower().endswith(DATA_FILE_SUFFIXES)
        and hub_id_of(name) == name
    )


def _local_name(reference: Any) -> str:
    return f"`{Path(str(reference)).name}` (a local folder)" if reference else "(not recorded)"


class VectorFolderMixin:
    """`save_pretrained`, `from_pretrained` and `push_to_hub` of [`DistributionVector`]: a vector as a folder, locally
    or in a Hub repo (what `PushToHubMixin` is to a Transformers model)."""

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        overwrite: bool = False,
        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
        model_card_kwargs: dict[str, Any] | None = None,
    ) -> Path:
        """Save as `vector.safetensors` (+ shards), `vector_config.json` and a `README.md` card, atomically.

        Never onto or inside the vector's own folder or its base model's (`ValueError`). `model_card_kwargs` go to
        [`~dem_hf.vectors.folder.render_vector_card`] (`model_id`: what its snippet loads, default the vector's name;
        `base_model`: the base's Hub id). Returns the folder."""
        check_not_inside(save_directory, {"vector": self.path, "base model": local_folder(self.base_model_name_or_path)})
        items = ((name, self.tensors.get(name)) for name in self.tensors.keys())
        return write_vector_folder(
            save_directory, items, self.config_dict(), overwrite=overwrite, max_shard_size=max_shard_size,
            model_card_kwargs=model_card_kwargs,
        )

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | bool | None = None,
        commit_message: str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        regenerate_card: bool = False,
        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
        model_card_kwargs: dict[str, Any] | None = None,
    ) -> CommitInfo:
        """Push the vector (tensors, `vector_config.json` and its card) to the Hub in one commit.

        As [`DEMMerger.push_to_hub`]: the repo is created with `create_repo(exist_ok=True)` (a bad id or a missing
        token fails before anything is written), the vector is saved into a temporary folder and goes up in one
        commit; tensor files of an earlier push that this one does not rewrite are deleted in the same commit. A
        `README.md` the repo already has is kept unless `regenerate_card=True`. Load it back with
        `DistributionVector.from_pretrained(repo_id)`.

        Args:
            repo_id (`str`):
                `"namespace/name"`, or `"name"` for your own namespace.
            private (`bool`, *optional*):
                Visibility of a newly created repo (an existing repo keeps its own).
            token (`str` or `bool`, *optional*):
                Hub token with write access (default: `HF_TOKEN` or the saved login).
            commit_message (`str`, *optional*):
                Defaults to `"Upload distribution vector '<name>' with dem_hf"`.
            revision (`str`, *optional*):
                Branch to push to (created from `main` if missing).
            create_pr (`bool`, *optional*, defaults to `False`):
                Open a pull request instead of committing to `main`.
            regenerate_card (`bool`, *optional*, defaults to `False`):
                Replace a `README.md` the repo already has with the generated card.
            max_shard_size (`int` or `str`, *optional*, defaults to `"2GB"`):
                Cap per tensor file.
            model_card_kwargs (`dict`, *optional*):
                Passed to [`render_vector_card`], e.g. `{"base_model": "org/base"}` (`model_id` is `repo_id`).

        Returns:
            `huggingface_hub.CommitInfo`: the commit (`.oid`, `.commit_url`, `.pr_url`).

        Raises:
            `ValueError`: a bad `repo_id`, or `revision` with `create_pr`, before any request. `PermissionError`: no
            token, or the Hub refused it. [`~dem_hf.hub.push.HubPushError`]: the Hub or the network failed.

        Example:
            ```python
            >>> math.push_to_hub("my-org/smollm2-math-vector", private=True)
            >>> DistributionVector.from_pretrained("my-org/smollm2-math-vector").name
            'math'
            ```
        """
        from ..hub.push import check_push_target, prepare_repo, push_folder

        check_push_target(repo_id, revision=revision, create_pr=create_pr)
        full_id = prepare_repo(repo_id, token=token, private=private, revision=revision, create_pr=create_pr)
        with tempfile.TemporaryDirectory(prefix="dem_hf-push-") as tmp:
            folder = self.save_pretrained(
                Path(tmp) / full_id.rsplit("/", 1)[-1], max_shard_size=max_shard_size,
                model_card_kwargs={"model_id": full_id, **(model_card_kwargs or {})},
            )
            return push_folder(
                folder, full_id, token=token, private=private,
                commit_message=commit_message or f"Upload distribution vector {self.name!r} with dem_hf",
                revision=revision, create_pr=create_pr, delete_patterns=STALE_VECTOR_FILES,
                keep_existing=None if regenerate_card else CARD_NAME,
            )

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        name: str | None = None,
        subfolder: str | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        force_download: bool = False,
    ) -> DistributionVector:
        """Load a vector saved by [`~DistributionVector.save_pretrained`] from a folder or a Hub repo.

        From the Hub only `vector_config.json` and the tensors (`vector.safetensors`, or its index and shards) are
        downloaded (and `adapter_config.json`, to say so when the repo is a PEFT adapter). Tensors stay on disk and are read one at a time when a merge needs them.

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`):
                A saved vector's folder, or a Hub repo id (e.g. one written by [`~DistributionVector.push_to_hub`]).
            name (`str`, *optional*):
                Call the vector this instead of the name it was saved with.
            subfolder (`str`, *optional*):
                The vector's folder inside the repo or folder (e.g. `"vectors/math"` of a pushed DEM model).
            revision (`str`, *optional*):
                Branch, tag or commit of the Hub repo. Defaults to `main`.
            token (`str` or `bool`, *optional*):
                For private or gated repos. Defaults to the saved token.
            cache_dir (`str` or `os.PathLike`, *optional*):
                Defaults to the Hugging Face cache.
            local_files_only (`bool`, *optional*, defaults to `False`):
                Only look in the cache.
            force_download (`bool`, *optional*, defaults to `False`):
                Download the files again even when cached.

        Example:
            ```python
            >>> math = DistributionVector.from_pretrained("my-org/smollm2-math-vector", revision="v1")
            >>> DistributionVector.from_pretrained("my-org/dem-model", subfolder="vectors/math").vector_type
            'lora'
            ```
        """
        from ..hub.download import resolve_checkpoint

        folder = Path(resolve_checkpoint(
            pretrained_model_name_or_path, stem=VECTOR_STEM, files=[VECTOR_CONFIG_NAME, "adapter_config.json"], subfolder=subfolder,
            revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only,
            force_download=force_download,
        ))
        config_file = folder / VECTOR_CONFIG_NAME
        if not config_file.is_file():
            hint = " It looks like a PEFT adapter: use DistributionVector.from_peft." if (folder / "adapter_config.json").is_file() else ""
            raise FileNotFoundError(f"{str(folder)!r} has no {VECTOR_CONFIG_NAME}; it is not a saved distribution vector.{hint}")
        config = read_vector_config(config_file)
        tensors = CheckpointReader(folder, stem=VECTOR_STEM)
        check_lora_factors(config_file, config.lora_modules, tensors)
        return cls(
            name or config.name,
            tensors,
            lora_modules={n: LoraModule(scaling, transpose) for n, (scaling, transpose) in config.lora_modules.items()},
            base_fingerprint=config.base_fingerprint,
            base_model_name_or_path=config.base_model_name_or_path,
            metadata=config.metadata,
            path=folder,
        )

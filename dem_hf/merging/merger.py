"""`DEMMerger`: the object users hold. A base model, named distribution vectors, and coefficients.

The merger keeps the base on disk and validates every vector against it when added (fingerprint, names,
shapes), so mistakes surface before any heavy work. Two ways to merge:

- [`~DEMMerger.merge`] returns an in-memory `PreTrainedModel` (θ + Σ ω_i Δ_i, applied parameter by
  parameter to the loaded base);
- [`~DEMMerger.save_pretrained`] streams: one base tensor and the matching slices of each vector at a time
  are read, summed in float32 and written to size-capped shards, so peak memory does not grow with the
  model or the number of vectors. The folder is a plain Transformers checkpoint plus `dem_config.json`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from .. import logging
from ..hub.download import resolve_checkpoint, resolve_pretrained
from ..io.outputs import atomic_directory, check_not_inside, check_output_directory
from ..io.reader import CheckpointReader
from ..io.shards import ShardedWriter
from ..io.tensors import fingerprint
from ..vectors.vector import DistributionVector
from .arithmetic import TensorTerms, apply_vectors_, effective_weights, write_merged
from .card.heatmap import HEATMAP_NAME, save_heatmap
from .card.render import card_text_for_save, place_card
from .config import DEMConfig, check_any_coefficients, check_coefficients
from .groups import is_per_group, known_group_keys
from .push import MergerPushMixin
from .sources import (
    VECTORS_FOLDER,
    base_reference,
    copy_base_files,
    find_vector,
    save_vector_folders,
    vector_source,
)

if TYPE_CHECKING:
    import torch

logger = logging.get_logger(__name__)

NOT_COPIED_FROM_BASE = {"README.md", DEMConfig.config_name}

VectorLike = DistributionVector | str | os.PathLike


class DEMMerger(MergerPushMixin):
    """Merge distribution vectors into a base model: θ_DEM = θ + Σ ω_i Δ_i.

    Args:
        base_model_name_or_path: Hub id or folder of the base model θ (a safetensors checkpoint).
        config: a [`DEMConfig`]; a default one (`weighting="sum"`) if omitted.
        dtype, device_map: how [`~DEMMerger.merge`] loads the base (Transformers' arguments).
        hub_kwargs: `subfolder`, `revision`, `token`, `cache_dir`, `local_files_only`, `force_download` for resolving
            a Hub id (only the config, tokenizer files and safetensors weights are downloaded).

    Example:
        ```python
        >>> from dem_hf import DEMMerger, DistributionVector
        >>> merger = DEMMerger.from_pretrained("HuggingFaceTB/SmolLM2-135M", vectors=["vectors/math", "vectors/chat"])
        >>> merger.add_vector(DistributionVector.from_peft("adapters/code", name="code"))  # incremental
        >>> model = merger.merge(coefficients={"math": 0.7, "chat": 0.5, "code": 0.3})
        >>> merger.save_pretrained("dem-model")  # streams; loads with AutoModelForCausalLM.from_pretrained
        ```
    """

    config_class = DEMConfig

    def __init__(
        self,
        base_model_name_or_path: str | os.PathLike,
        config: DEMConfig | None = None,
        *,
        dtype: str | torch.dtype = "auto",
        device_map: str | dict | None = None,
        **hub_kwargs,
    ) -> None:
        self.config = config or DEMConfig()
        self.base_folder = Path(resolve_checkpoint(base_model_name_or_path, **hub_kwargs))
        self.config.base_model_name_or_path, self.config.base_revision = base_reference(
            base_model_name_or_path, self.base_folder
        )
        self.base = CheckpointReader(self.base_folder)
        self.base_fingerprint = fingerprint(self.base)
        self.vectors: dict[str, DistributionVector] = {}
        # How `merge()` loads the base (Transformers' own arguments); its own keyword arguments override them.
        self.model_kwargs = {"dtype": dtype, **({"device_map": device_map} if device_map is not None else {})}

    # ----------------------------------------------------------------------------------------- building

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        vectors: Iterable[VectorLike] | None = None,
        *,
        config: DEMConfig | None = None,
        base_model_name_or_path: str | os.PathLike | None = None,
        subfolder: str | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        force_download: bool = False,
        dtype: str | torch.dtype = "auto",
        device_map: str | dict | None = None,
    ) -> DEMMerger:
        """A merger over a base model, or restored from a folder saved by [`~DEMMerger.save_pretrained`].

        Given a plain model (folder or Hub id), it becomes the base. Given a saved DEM folder (it has a
        `dem_config.json`), the base (its recorded absolute path, or Hub id at the recorded commit), the vectors
        (from the folder's `vectors/`, else their recorded source: an absolute path, or a Hub id at the recorded
        commit) and the coefficients are restored, from any working directory; `base_model_name_or_path`
        overrides a base that moved. Relative paths in configs written by older versions are read relative to the
        working directory, as they were written. From the Hub only what is needed is downloaded: for a base its
        config, tokenizer files and safetensors weights; for a saved DEM model `dem_config.json` and `vectors/`.

        Args:
            pretrained_model_name_or_path: base model, or saved DEM model, as a folder or Hub id.
            vectors: distribution vectors to add, as objects or saved-vector folders.
            config: config for a new merger (not allowed when restoring; edit `merger.config` instead).
            base_model_name_or_path: the base's new location when restoring.
            subfolder, revision, token, cache_dir, local_files_only, force_download: as in Transformers'
                `from_pretrained` (when restoring, `subfolder` and `revision` name the DEM repo's, whose base is
                fetched at its recorded commit; the others apply to the base and the vectors too).
            dtype, device_map: how [`~DEMMerger.merge`] loads the base (default `dtype="auto"`: the checkpoint's).
        """
        hub_kwargs = dict(subfolder=subfolder, revision=revision, token=token, cache_dir=cache_dir,
                          local_files_only=local_files_only, force_download=force_download)
        model_kwargs = dict(dtype=dtype, device_map=device_map)
        # From the Hub, fetch only what a restore needs (not the merged weights); a plain base is fetched by `cls`.
        restore_files = None if Path(pretrained_model_name_or_path).is_dir() else [DEMConfig.config_name, f"{VECTORS_FOLDER}/**"]
        folder = Path(resolve_pretrained(pretrained_model_name_or_path, allow_patterns=restore_files, **hub_kwargs))
        if not (folder / DEMConfig.config_name).is_file():
            merger = cls(pretrained_model_name_or_path, config=config, **model_kwargs, **hub_kwargs)
        else:
            if config is not None:
                raise ValueError(f"{str(pretrained_model_name_or_path)!r} is a saved DEM model with its own config; do not pass config=.")
            merger = cls._restore(folder, base_model_name_or_path, hub_kwargs, model_kwargs)
        for vector in vectors or []:
            merger.add_vector(vector)
        return merger

    @classmethod
    def _restore(cls, folder: Path, base_override, hub_kwargs: dict, model_kwargs: dict) -> DEMMerger:
        config = DEMConfig.from_pretrained(folder)
        base = base_override or config.base_model_name_or_path
        if base is None:
            raise ValueError(f"{str(folder / DEMConfig.config_name)!r} names no base model; pass base_model_name_or_path=.")
        # The revision and subfolder name the DEM repo, not its base; credentials and cache apply to both.
        access = {k: v for k, v in hub_kwargs.items() if k in ("token", "cache_dir", "local_files_only", "force_download")}
        base_revision = None if base_override else config.base_revision
        merger = cls(base, config=config, **model_kwargs, **access, **({"revision": base_revision} if base_revision else {}))
        for name, info in config.vectors.items():
            found = find_vector(folder, name, info, access)
            if found is not None:
                merger.add_vector(DistributionVector.from_pretrained(found, name=name))
        return merger

    def add_vector(self, vector: VectorLike, *, coefficient: float | None = None) -> DistributionVector:
        """Add one distribution vector (incremental DEM: nothing else is retrained or recomputed).

        The vector is checked against the base now (fingerprint, tensor names, shapes, and NaN/inf for
        vectors held in memory; vectors on disk are checked tensor by tensor as a merge reads them, which
        then fails without leaving any output). Its coefficient is
        `coefficient`, else the one already recorded for its name, else 1.0.
        """
        if isinstance(vector, (str, os.PathLike)):
            vector = DistributionVector.from_pretrained(vector)
        if not isinstance(vector, DistributionVector):
            raise ValueError(f"Expected a DistributionVector or a saved vector folder, got {type(vector).__name__}.")
        if vector.name in self.vectors:
            raise ValueError(f"A vector named {vector.name!r} is already in the merger; vectors are {self.vector_names}.")
        vector.check_base(self.base, self.base_fingerprint)
        if vector.path is None:
            vector.check_finite()  # cheap in memory; vectors on disk are checked tensor by tensor while merging
        self.vectors[vector.name] = vector
        if coefficient is not None:
            self.config.coefficients[vector.name] = check_coefficients({vector.name: coefficient})[vector.name]
        self.config.coefficients.setdefault(vector.name, 1.0)
        self.config.vectors[vector.name] = {
            "vector_type": vector.vector_type,
            **vector_source(vector.path),
            "base_model_name_or_path": vector.base_model_name_or_path,
            "metadata": vector.metadata,
        }
        return vector

    @property
    def vector_names(self) -> list[str]:
        """Names of the vectors the merger knows (including recorded ones not yet re-added)."""
        return list(self.config.vectors)

    # ----------------------------------------------------------------------------------------- merging

    def resolve_coefficients(self, coefficients: dict | None = None) -> dict[str, float | dict[str, float]]:
        """Validated coefficients for every vector: `coefficients` over the recorded ones.

        A vector's coefficient is a number, or `{group: ω}` per transformer block / module group of the base
        (keys from `group_keys`; groups not named take the `"*"` entry, else 1.0: see `dem_hf.merging.groups`).
        """
        if not self.config.vectors:
            raise ValueError("The merger has no distribution vectors; add some with add_vector(...).")
        chosen = dict(self.config.coefficients)
        if coefficients is not None:
            groups = self.group_keys if is_per_group(coefficients) else None
            chosen.update(check_any_coefficients(coefficients, known=self.vector_names, groups=groups))
        missing = [name for name in self.vector_names if name not in self.vectors]
        if missing:
            raise ValueError(f"Vectors {missing} are recorded but not loaded; add them with add_vector(...) first.")
        chosen = {name: chosen.get(name, 1.0) for name in self.vector_names}
        if is_per_group(chosen):  # recorded ones too: a config may come from another base
            check_any_coefficients(chosen, groups=self.group_keys)
        return chosen

    @property
    def group_keys(self) -> list[str]:
        """The keys a per-group coefficient may use for this base: `"*"`, its blocks (`"layer.0"`, ...), their module
        groups (`"layer.0.attention"`, ...), `"embeddings"` and `"head"` (see `dem_hf.merging.groups`)."""
        if not hasattr(self, "_group_keys"):
            self._group_keys = known_group_keys(self.base.keys())
        return self._group_keys

    def _terms(self, coefficients: dict | None) -> list[tuple[DistributionVector, float]] | TensorTerms:
        resolved = self.resolve_coefficients(coefficients)
        if not is_per_group(resolved):
            weights = effective_weights(resolved, self.config.weighting)
            return [(self.vectors[name], weight) for name, weight in weights.items()]
        terms = TensorTerms([self.vectors[n] for n in resolved], list(resolved.values()), self.config.weighting)
        for name in self.base.keys():  # every tensor's weights now: an undefined 'average' fails before any work
            terms.weights(name)
        return terms

    def merge(self, coefficients: dict[str, float] | None = None, **model_kwargs):
        """Load the base and return θ + Σ ω_i Δ_i as an in-memory `PreTrainedModel`.

        One rule for what gets saved: the merger's recorded coefficients (`config.coefficients`) are always those of
        the last model it produced. A successful `merge` records the coefficients it merged with (as `search`
        records its best and `save_pretrained` the ones it saved), so `save_pretrained()` and `push_to_hub()`
        without coefficients then write exactly the model `merge` returned, and `DEMMerger.from_pretrained` of that
        folder restores them. A refused call records nothing.

        Args:
            coefficients: `{vector name: ω or {group: ω}}`; unnamed vectors keep their recorded coefficient.
            model_kwargs: passed to `AutoModelForCausalLM.from_pretrained` (e.g. `device_map`), over the `dtype` and
                `device_map` given to [`~DEMMerger.from_pretrained`].

        Example:
            ```python
            >>> model = merger.merge(coefficients={"math": 0.7, "chat": 0.5})
            >>> merger.config.coefficients
            {'math': 0.7, 'chat': 0.5}
            >>> merger.save_pretrained("dem-model")  # the same weights as `model`
            ```
        """
        from transformers import AutoModelForCausalLM

        chosen = self.resolve_coefficients(coefficients)
        terms, operator = self._terms(chosen), self.config.merge_operator
        model = AutoModelForCausalLM.from_pretrained(self.base_folder, **{**self.model_kwargs, **model_kwargs})
        apply_vectors_(model, terms, operator)
        self.config.coefficients = chosen
        return model

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        coefficients: dict[str, float] | None = None,
        *,
        overwrite: bool = False,
        max_shard_size: int | str | None = None,
        save_vectors: bool = True,
        card: bool = True,
        regenerate_card: bool = False,
        model_card_kwargs: dict | None = None,
    ) -> Path:
        """Stream the merge into a standard Transformers folder, plus `dem_config.json` and a model card.

        The folder holds the base's config, generation config and tokenizer files, the merged weights as
        size-capped safetensors shards with an index, `dem_config.json`, `coefficients_heatmap.png` when coefficients
        are per group (and matplotlib is installed) and `README.md` (the model card of
        [`dem_hf.merging.card.render.build_model_card`]). It is built under a temporary name and moved into place only when
        complete.

        Args:
            save_directory: output folder; must be empty or absent unless `overwrite=True`.
            coefficients: `{vector name: ω}` (default: the recorded ones, i.e. those of the last `merge`, `search` or
                save); they become the recorded ones.
            overwrite: replace an existing, non-empty folder (only once the new one is complete).
            max_shard_size: cap per shard (default `config.max_shard_size`).
            save_vectors: copy the vectors into `vectors/<name>` (the default), so the folder restores on its own
                wherever it goes. With `False` only `dem_config.json` says where they are (absolute paths, or Hub
                ids with their commit), the model card says so too, and vectors held only in memory are lost
                (a warning names them).
            card: write a generated model card as `README.md`.
            regenerate_card: when overwriting a folder that already has a `README.md`, replace it with the
                generated card; by default the existing card is kept (it may have been written by hand).
            model_card_kwargs: passed to [`~dem_hf.merging.card.render.build_model_card`] (`model_id` defaults to the
                folder's name, e.g. `base_model="org/base"` names the Hub id of a base loaded from a folder).
        """
        if not isinstance(save_vectors, bool):
            raise ValueError(f"save_vectors must be True or False, got {save_vectors!r}.")
        terms, operator = self._terms(coefficients), self.config.merge_operator
        self.config.coefficients = self.resolve_coefficients(coefficients)  # the merger now describes this folder
        check_output_directory(save_directory, overwrite)
        check_not_inside(
            save_directory,
            {"base model": self.base_folder, **{f"vector {v.name!r}": v.path for v, _ in terms}},
        )
        card_text = None
        if card:  # built before the merge, so that a bad card argument fails early
            card_text = card_text_for_save(self, save_directory, save_vectors, regenerate_card, model_card_kwargs)
        with atomic_directory(save_directory, overwrite=overwrite) as staging:
            copy_base_files(self.base_folder, staging, skip=NOT_COPIED_FROM_BASE)
            layout = [(name, self.base.shape(name), self.base.dtype_name(name)) for name in self.base.keys()]
            with ShardedWriter(staging, "model", max_shard_size or self.config.max_shard_size, layout=layout) as writer:
                write_merged(self.base, terms, writer, operator=operator)
                writer.close()
            save_vector_folders(self.vectors, staging, save_vectors)
            self.config.save_pretrained(staging)
            if card:
                place_card(staging, Path(save_directory), card_text)
            save_heatmap(self.config.coefficients, staging / HEATMAP_NAME)  # per-group coefficients only
        return Path(save_directory)

    def search(
        self,
        eval_datasets: dict,
        search_config=None,
        *,
        tokenizer=None,
        model: torch.nn.Module | None = None,
        show_progress: bool | None = None,
        **tokenize_kwargs,
    ):
        """Choose the coefficients ω by validation perplexity, switching one model in place between candidates.

        The best coefficients become `config.coefficients` (so `merge()` and `save_pretrained()` use them) and
        the [`SearchResult`] is recorded in `config.search_result` (saved in `dem_config.json`).

        Args:
            eval_datasets: `{set name: validation data}`, each a `datasets.Dataset` (or list of dicts / texts)
                in any format TRL's `SFTTrainer` accepts, or an `EvaluationSet` from `tokenize_for_evaluation`.
                Name each set after the vector trained on its distribution (see
                `SearchConfig.allow_extra_eval_sets`).
            search_config: a [`SearchConfig`] (strategy, objective, bounds, ...); `SearchConfig()` if omitted.
            tokenizer: tokenizer for raw datasets (default: the one in the base model's folder).
            model: the base model already loaded (e.g. on a GPU); it is switched in place and its weights
                are restored exactly at the end. Default: the base is loaded on `search_config.device`.
            show_progress: show a progress bar (default: follows `transformers` logging settings).
            tokenize_kwargs: passed to `tokenize_for_evaluation` (`completion_only_loss`, `text_column`, ...).

        Example:
            ```python
            >>> from dem_hf import SearchConfig
            >>> result = merger.search({"math": math_val, "chat": chat_val}, SearchConfig(strategy="gradient"))
            >>> result.best_coefficients
            {'math': 0.62, 'chat': 1.13}
            >>> merger.save_pretrained("dem-model")  # merged with the best coefficients, search recorded
            ```
        """
        from ..search.run import run_search

        result = run_search(
            self, eval_datasets, search_config, tokenizer=tokenizer, model=model, show_progress=show_progress,
            **tokenize_kwargs,
        )
        self.config.coefficients = dict(result.best_coefficients)
        if result.best_density is not None:  # the density was searched too
            self.config.density = result.best_density
        self.config.search_result = result.to_dict()
        return result

    def __repr__(self) -> str:
        return (
            f"DEMMerger(base={self.config.base_model_name_or_path!r}, weighting={self.config.weighting!r}, "
            f"coefficients={self.config.coefficients})"
        )

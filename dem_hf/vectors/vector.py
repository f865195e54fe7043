"""Distribution vectors: what fine-tuning on one dataset did to the base model.

A [`DistributionVector`] holds, per base tensor it changes, either a dense delta (θ_ft − θ) or LoRA
factors (A, B, scaling) kept low-rank: the delta B·A·scaling is formed one module at a time, only when a
merge needs it. A vector remembers a fingerprint of the base it was computed against, so it is never
silently applied to another model.

On disk a vector is a folder with `vector.safetensors` (sharded when large), `vector_config.json` and a generated
`README.md` card ([`dem_hf.vectors.folder`], which also pushes it to the Hub).
Dense deltas are stored under the base tensor's own name, LoRA factors under `<name>.lora_A` and
`<name>.lora_B`.

torch is imported where tensors are handled, not with the module: a streaming merge of saved vectors
(`dem-hf merge`) reads and adds them as NumPy arrays and never needs it.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import __version__, logging
from ..io.dtypes import FLOAT_DTYPES, STORAGE_DTYPES, to_float32, torch_dtype_label
from ..io.outputs import check_not_inside, check_output_directory, local_folder
from ..io.reader import BufferPool, read_rows
from ..io.shards import DEFAULT_MAX_SHARD_SIZE, parse_size
from ..io.tensors import (
    TensorDict,
    TensorSource,
    check_same_architecture,
    check_same_tensors,
    fingerprint,
    fingerprint_mismatch,
    open_weights,
)
from .config import LORA_A, LORA_B, LoraModule, check_vector_name
from .extraction import delta_tensors, write_delta_folder
from .factors import FactorCache, add_lora_rows, non_finite_factor, read_factor
from .folder import (  # noqa: F401 (re-exported)
    VECTOR_CONFIG_NAME,
    VECTOR_STEM,
    VectorFolderMixin,
    write_vector_folder,
)

if TYPE_CHECKING:
    import torch

logger = logging.get_logger(__name__)


class DistributionVector(VectorFolderMixin):
    """The change fine-tuning on one distribution made to a base model: θ_i − θ, dense or low-rank.

    Build one with [`~DistributionVector.from_models`] (full fine-tunes) or
    [`~DistributionVector.from_peft`] (LoRA adapters, kept as factors), save it with
    [`~DistributionVector.save_pretrained`] and load it with [`~DistributionVector.from_pretrained`].

    Example:
        ```python
        >>> from dem_hf import DistributionVector
        >>> math = DistributionVector.from_models("base", "base-sft-math", name="math")
        >>> chat = DistributionVector.from_peft("adapters/chat", name="chat")
        >>> math.save_pretrained("vectors/math")
        >>> DistributionVector.from_pretrained("vectors/math").vector_type
        'full'
        ```
    """

    def __init__(
        self,
        name: str,
        tensors: TensorSource,
        *,
        lora_modules: dict[str, LoraModule] | None = None,
        base_fingerprint: dict | None = None,
        base_model_name_or_path: str | None = None,
        metadata: dict[str, Any] | None = None,
        path: str | os.PathLike | None = None,
    ) -> None:
        self.name = check_vector_name(name)
        self.tensors = tensors
        self.lora_modules = dict(lora_modules or {})
        self.base_fingerprint = base_fingerprint
        self.base_model_name_or_path = base_model_name_or_path
        self.metadata = dict(metadata or {})
        self.path = Path(path) if path is not None else None
        for module_name, module in self.lora_modules.items():
            scaling = module.scaling
            if not isinstance(scaling, (int, float)) or isinstance(scaling, bool) or not np.isfinite(scaling):
                raise ValueError(f"Vector {name!r} gives LoRA module {module_name!r} the scaling {scaling!r}; expected a finite number.")
        factor_names = {m + suffix for m in self.lora_modules for suffix in (LORA_A, LORA_B)}
        missing = sorted(factor_names - set(tensors.keys()))
        if missing:
            raise ValueError(f"Vector {name!r} lacks LoRA factors {missing[:5]}.")
        self.dense_names = [n for n in tensors.keys() if n not in factor_names]
        self._dense = frozenset(self.dense_names)
        self._targets = self._dense | frozenset(self.lora_modules)
        self._factors_cache: tuple | None = None  # the last LoRA factors a block-wise torch merge read
        self._numpy_factor_cache = FactorCache()  # the streaming merge's, per thread

    # ----------------------------------------------------------------------------------------- inspection

    @property
    def vector_type(self) -> str:
        """`"lora"` when the vector carries low-rank factors, else `"full"`."""
        return "lora" if self.lora_modules else "full"

    @property
    def target_names(self) -> list[str]:
        """Names of the base tensors this vector changes."""
        return self.dense_names + [n for n in self.lora_modules if n not in self._dense]

    def changes(self, name: str) -> bool:
        """Whether this vector has a delta for base tensor `name`."""
        return name in self._targets

    def delta_shape(self, name: str) -> tuple[int, ...]:
        if name in self.lora_modules:
            rows, cols = self.tensors.shape(name + LORA_B)[0], self.tensors.shape(name + LORA_A)[1]
            return (cols, rows) if self.lora_modules[name].transpose else (rows, cols)
        return self.tensors.shape(name)

    def __repr__(self) -> str:
        return f"DistributionVector(name={self.name!r}, vector_type={self.vector_type!r}, tensors={len(self.target_names)})"

    # ----------------------------------------------------------------------------------------- arithmetic

    def add_to_(
        self,
        target: torch.Tensor,
        name: str,
        weight: float = 1.0,
        *,
        rows: tuple[int, int] | None = None,
        check_finite: bool = True,
    ) -> torch.Tensor:
        """Add `weight` times this vector's delta for base tensor `name` to the torch tensor `target`, in place.

        LoRA deltas are formed by one `addmm_`, never stored dense. `target` should be float32 for exact
        accumulation; it may live on any device. Raises `ValueError` on a non-finite delta.

        Args:
            rows: `(start, stop)` to add only those rows (along dim 0) of the delta, `target` holding just them.
            check_finite: check the delta for NaN/inf.
        """
        if name in self._dense:
            delta = self.tensors.get(name) if rows is None else read_rows(self.tensors, name, rows[0], rows[1])
            if delta.device != target.device:
                delta = delta.to(target.device)
            if check_finite:
                self._check_finite(delta, name)
            # w·Δ rounded to float32, then added: the NumPy engine's arithmetic (`add_(alpha=)` may fuse the two)
            target.add_(delta if weight == 1.0 else delta.to(target.dtype) * weight)
        if name in self.lora_modules:
            self._add_lora_(target, name, weight, rows)
        return target

    def add_rows_to(self, accumulator: np.ndarray, name: str, weight: float, rows: tuple[int, int], pool: BufferPool) -> None:
        """Add `weight` times rows `rows` of the delta for `name` to a float32 NumPy `accumulator`, in place.

        This is the streaming merge's arithmetic, in NumPy (torch is not imported): a dense delta is read into
        `pool`'s buffers and added as `accumulator += weight * delta`; a LoRA block is formed as
        `(weight·scaling·B[rows]) @ A` in float32 ([`dem_hf.vectors.factors.add_lora_rows`]), the factors read once per
        module and thread. Only LoRA factors are checked for NaN/inf here (`ValueError` naming the factor); dense
        deltas are not (see [`~dem_hf.merging.arithmetic.raise_for_non_finite`]).
        """
        if name in self._dense:
            count, dtype = accumulator.size, self.tensors.dtype_name(name)
            delta = self.tensors.read_array(name, *rows, out=pool.take("delta", STORAGE_DTYPES[dtype], count))
            delta = to_float32(delta.reshape(accumulator.shape), dtype, out=pool.take("delta32", np.float32, count).reshape(accumulator.shape))
            if weight != 1.0:
                delta = np.multiply(delta, np.float32(weight), out=pool.take("scaled", np.float32, count).reshape(accumulator.shape))
            accumulator += delta
        if name in self.lora_modules:
            module = self.lora_modules[name]
            a, b = self._numpy_factors(name, pool)
            add_lora_rows(accumulator, a, b, weight * module.scaling, rows, module.transpose, pool)

    def _add_lora_(self, target: torch.Tensor, name: str, weight: float, rows: tuple[int, int] | None) -> None:
        module = self.lora_modules[name]
        a, b = self._lora_factors(name, target.dtype, target.device, cache=rows is not None)
        alpha = weight * module.scaling
        start, stop = rows if rows is not None else (0, None)
        if module.transpose:
            target.addmm_(a[:, start:stop].T, b.T, alpha=alpha)
        else:
            target.addmm_(b[start:stop], a, alpha=alpha)

    def _lora_factors(self, name: str, dtype: torch.dtype, device, cache: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        key = (name, dtype, device)
        cached = self._factors_cache  # read once: merge threads may replace it meanwhile
        if cache and cached is not None and cached[0] == key:
            return cached[1], cached[2]
        a = self.tensors.get(name + LORA_A).to(device=device, dtype=dtype)
        b = self.tensors.get(name + LORA_B).to(device=device, dtype=dtype)
        self._check_finite(a, name + LORA_A)
        self._check_finite(b, name + LORA_B)
        self._factors_cache = (key, a, b) if cache else None
        return a, b

    def _numpy_factors(self, name: str, pool: BufferPool | None) -> tuple[np.ndarray, np.ndarray]:
        """Module `name`'s factors `(A, B)` as float32 NumPy arrays, checked for NaN/inf; kept per thread for the
        merge that owns `pool` (read afresh when `pool` is None)."""
        cached = self._numpy_factor_cache.get(name, pool) if pool is not None else None
        if cached is not None:
            return cached
        a, b = read_factor(self.tensors, name + LORA_A), read_factor(self.tensors, name + LORA_B)
        bad = non_finite_factor(a, b)
        if bad is not None:
            raise ValueError(f"Vector {self.name!r} has NaN or infinite values in {name + bad!r}; refusing to merge it.")
        if pool is not None:
            self._numpy_factor_cache.put(name, pool, a, b)
        return a, b

    def check_delta_finite(self, name: str, rows: tuple[int, int] | None = None) -> None:
        """Raise `ValueError` if this vector's delta for `name` (or those rows of it) has NaN or inf values."""
        if name in self._dense:
            delta = self.tensors.get(name) if rows is None else read_rows(self.tensors, name, rows[0], rows[1])
            self._check_finite(delta, name)
        if name in self.lora_modules:
            self._numpy_factors(name, None)

    def delta(self, name: str) -> torch.Tensor:
        """The dense float32 delta for one base tensor (formed from factors for LoRA modules)."""
        import torch

        return self.add_to_(torch.zeros(self.delta_shape(name), dtype=torch.float32), name)

    def _check_finite(self, tensor: torch.Tensor, name: str) -> None:
        import torch

        if not torch.isfinite(tensor).all():
            raise ValueError(f"Vector {self.name!r} has NaN or infinite values in {name!r}; refusing to merge it.")

    def check_finite(self) -> None:
        """Read every tensor and raise `ValueError` naming the first one with NaN or inf."""
        for name in self.tensors.keys():
            self._check_finite(self.tensors.get(name), name)

    # ----------------------------------------------------------------------------------------- validation

    def check_base(self, base: TensorSource, base_fingerprint: dict | None = None) -> None:
        """Raise `ValueError` unless this vector fits `base`: same fingerprint, names present, shapes equal."""
        if self.base_fingerprint is not None:
            actual = base_fingerprint or fingerprint(base)
            problem = fingerprint_mismatch(self.base_fingerprint, actual)
            if problem:
                raise ValueError(
                    f"Vector {self.name!r} was computed against another base model ({problem}); it was made "
                    f"from {self.base_model_name_or_path or 'an unnamed model'!r}."
                )
        absent = [n for n in self.target_names if n not in base]
        if absent:
            kind = "LoRA target modules" if any(n in self.lora_modules for n in absent) else "tensors"
            raise ValueError(
                f"Vector {self.name!r} changes {kind} that do not exist in the base model: {absent[:5]}"
                f"{' ...' if len(absent) > 5 else ''} (tied to the input embeddings, or another architecture?)."
            )
        for name in self.target_names:
            if tuple(base.shape(name)) != tuple(self.delta_shape(name)):
                raise ValueError(
                    f"Vector {self.name!r} has shape {list(self.delta_shape(name))} for {name!r}, "
                    f"the base has {list(base.shape(name))}."
                )
            if base.dtype_name(name) not in FLOAT_DTYPES:
                raise ValueError(
                    f"Vector {self.name!r} changes {name!r}, a {torch_dtype_label(base.dtype_name(name))} tensor; only "
                    "float tensors can be merged."
                )
            if name in self._dense and self.tensors.dtype_name(name) not in FLOAT_DTYPES:
                raise ValueError(
                    f"Vector {self.name!r} stores a {torch_dtype_label(self.tensors.dtype_name(name))} delta for {name!r}; "
                    "deltas must be float."
                )

    # ----------------------------------------------------------------------------------------- persistence

    def config_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "vector_type": self.vector_type,
            "base_model_name_or_path": self.base_model_name_or_path,
            "base_fingerprint": self.base_fingerprint,
            "lora_modules": {n: asdict(m) for n, m in self.lora_modules.items()},
            "metadata": self.metadata,
            "dem_hf_version": __version__,
        }

    # ----------------------------------------------------------------------------------------- construction

    @classmethod
    def from_models(
        cls,
        base,
        finetuned,
        *,
        name: str,
        save_directory: str | os.PathLike | None = None,
        overwrite: bool = False,
        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
        metadata: dict[str, Any] | None = None,
    ) -> DistributionVector:
        """The full vector θ_ft − θ of a fine-tuned model.

        `base` and `finetuned` are folders, Hub ids or in-memory `PreTrainedModel`s. Deltas are computed in float32
        and stored in the fine-tuned model's dtype; tensors fine-tuning left unchanged are not stored.

        With `save_directory` the vector is streamed to that folder and the returned vector reads from it: NumPy, block
        by block, into planned shards (no torch for two saved checkpoints, memory bounded by a few block buffers per
        thread whatever the model's size; [`dem_hf.vectors.extraction.write_delta_folder`]). Without it the deltas
        are whole torch tensors kept in memory.

        Args:
            base: the base model θ.
            finetuned: the model fine-tuned from it on one distribution.
            name: the vector's name (usually the dataset's).
            save_directory: if given, the vector is streamed to this folder (bounded memory) and the
                returned vector reads from it; otherwise it is kept in memory.
            overwrite: replace an existing, non-empty `save_directory`.
            max_shard_size: cap per shard when saving.
            metadata: free-form JSON-able information (datasets, training compute, ...).
        """
        check_vector_name(name)
        if save_directory is not None:
            check_output_directory(save_directory, overwrite)
            check_not_inside(save_directory, {"base model": local_folder(base), "fine-tuned model": local_folder(finetuned)})
            parse_size(max_shard_size)
        base_source, base_id, base_config = open_weights(base)
        tuned_source, _, tuned_config = open_weights(finetuned)
        check_same_architecture(base_config, tuned_config)
        check_same_tensors(base_source, tuned_source)
        kwargs = dict(base_fingerprint=fingerprint(base_source), base_model_name_or_path=base_id, metadata=metadata)
        if save_directory is None:
            return cls(name, TensorDict(dict(delta_tensors(base_source, tuned_source))), **kwargs)
        config = cls(name, TensorDict({}), **kwargs).config_dict()
        write_delta_folder(base_source, tuned_source, save_directory, config, overwrite=overwrite, max_shard_size=max_shard_size)
        return cls.from_pretrained(save_directory)

    @classmethod
    def from_peft(
        cls,
        adapter,
        *,
        name: str | None = None,
        base=None,
        adapter_name: str = "default",
        metadata: dict[str, Any] | None = None,
        **hub_kwargs,
    ) -> DistributionVector:
        """A LoRA vector from a PEFT adapter folder, Hub repo or in-memory `PeftModel`, kept low-rank.

        The result merges to the model PEFT's `merge_and_unload()` gives. Scalings honour `lora_alpha`,
        `alpha_pattern`, `rank_pattern` and rsLoRA (matched by PEFT's own helpers); `modules_to_save` and trained
        biases (`bias="lora_only"`/`"all"`) become dense deltas against the base. The base is `base` if given,
        else the `PeftModel`'s own base weights (not for trained biases, which it no longer holds), else the
        adapter config's `base_model_name_or_path` when it can be found locally. What PEFT's merge would untie
        on a base with tied embeddings is refused. See [`dem_hf.vectors.lora`] for the details.
        """
        from .lora import vector_parts_from_peft

        parts = vector_parts_from_peft(adapter, base=base, adapter_name=adapter_name, **hub_kwargs)
        vector_name = name or parts.default_name
        if vector_name is None:
            raise ValueError("Pass name=... for a vector made from an in-memory PEFT model.")
        return cls(
            vector_name,
            TensorDict(parts.tensors),
            lora_modules=parts.lora_modules,
            base_fingerprint=parts.base_fingerprint,
            base_model_name_or_path=parts.base_model_name_or_path,
            metadata=metadata,
        )

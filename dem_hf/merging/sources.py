"""Where a saved DEM folder's base and vectors are: how `dem_config.json` names them, and how a restore finds them.

Local sources are recorded as absolute paths and Hub sources as repo ids with the commit that was downloaded (and
the subfolder), so a saved folder restores from any working directory and, through the Hub, on any machine.
[`DEMMerger.save_pretrained`] copies the vectors into the folder's `vectors/` by default ([`copy_vector_folder`]).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .. import logging
from ..hub.download import hub_origin, resolve_pretrained
from ..io.outputs import is_weight_file
from ..vectors.folder import save_vector_card
from ..vectors.vector import VECTOR_CONFIG_NAME, VECTOR_STEM, DistributionVector

logger = logging.get_logger(__name__)

VECTORS_FOLDER = "vectors"


def base_reference(base_model_name_or_path: str | os.PathLike, folder: Path) -> tuple[str, str | None]:
    """How `dem_config.json` names the base: the absolute path of a local folder, or the Hub id and the commit that
    was downloaded (the snapshot folder of the Hugging Face cache is named after it)."""
    local = Path(base_model_name_or_path).expanduser()
    if local.is_dir():
        return os.path.abspath(local), None
    origin = hub_origin(folder)
    return str(base_model_name_or_path), origin.revision if origin is not None else None


def vector_source(path: Path | None) -> dict[str, str | None]:
    """How `dem_config.json` names a vector's source: a Hub id with its commit and subfolder for a folder of the
    Hugging Face cache, the absolute path of any other folder, `None` for a vector held in memory."""
    if path is None:
        return {"source": None}
    origin = hub_origin(path)
    if origin is not None:
        return {"source": origin.repo_id, "revision": origin.revision, "subfolder": origin.subfolder}
    return {"source": os.path.abspath(path)}


def find_vector(folder: Path, name: str, info: dict, access: dict) -> Path | None:
    """A saved DEM folder's vector: in its `vectors/<name>`, else at the recorded path, else in the recorded Hub repo
    at the recorded commit (cache first); `None`, with a warning, when it is nowhere."""
    places = [folder / VECTORS_FOLDER / name]
    source = info.get("source")
    if source:
        places.append(Path(source).expanduser())  # absolute, or relative to the working directory (older configs)
    found = next((place for place in places if (place / VECTOR_CONFIG_NAME).is_file()), None)
    if found is None and source and info.get("revision"):
        places.append(f"{source}@{info['revision']}" + (f" ({info['subfolder']})" if info.get("subfolder") else ""))
        try:
            found = resolve_pretrained(
                source, revision=info["revision"], subfolder=info.get("subfolder"),
                allow_patterns=[f"{VECTOR_STEM}*"], **access,
            )
        except OSError as error:  # not cached while offline, gone from the Hub, no access
            logger.info(f"Vector {name!r} could not be fetched from the Hub: {error}")
    if found is None or not (Path(found) / VECTOR_CONFIG_NAME).is_file():
        logger.warning(
            f"Vector {name!r} is not available (looked in {[str(p) for p in places]}); its name and coefficient are "
            "kept, add it again with add_vector(...) before merging."
        )
        return None
    return Path(found)


def copy_vector_folder(vector: DistributionVector, target: Path) -> None:
    """Copy a saved vector's weight files (shards and index, as its folder holds them) and write its config and card
    under its name in this merger."""
    source = Path(vector.path)
    index = source / f"{VECTOR_STEM}.safetensors.index.json"
    if index.is_file():
        shards = json.loads(index.read_text())["weight_map"].values()
        files = [index, *(source / shard for shard in dict.fromkeys(shards))]
    else:
        files = [source / f"{VECTOR_STEM}.safetensors"]
    target.mkdir(parents=True)
    for file in files:
        shutil.copy2(file, target / file.name)
    (target / VECTOR_CONFIG_NAME).write_text(json.dumps(vector.config_dict(), indent=2) + "\n")
    save_vector_card(target, vector.config_dict())


def copy_base_files(base_folder: Path, staging: Path, skip: set[str]) -> None:
    """Copy the base's config, generation config and tokenizer files (not its weights, nor the names in `skip`).

    Contents only (`shutil.copyfile`): the copies take the process umask's modes, not the base's.
    """
    for item in base_folder.iterdir():
        if item.is_file() and not is_weight_file(item.name) and item.name not in skip:
            shutil.copyfile(item, staging / item.name)


def save_vector_folders(vectors: dict[str, DistributionVector], staging: Path, save_vectors: bool) -> None:
    """Put every vector under `staging/vectors/<name>` (saved, or copied file by file when it is on disk: no torch);
    with `save_vectors=False`, warn about the vectors that exist only in memory, since they are then lost."""
    if not save_vectors:
        unsaved = [name for name, vector in vectors.items() if vector.path is None]
        if unsaved:
            logger.warning(
                f"Vectors {unsaved} exist only in memory and are not saved with the model, so it cannot be "
                "restored with them: save them with vector.save_pretrained(...) first, or include the vectors "
                "(save_vectors=True, push_vectors=True)."
            )
        return
    for name, vector in vectors.items():
        target = staging / VECTORS_FOLDER / name
        if vector.path is None:
            vector.save_pretrained(target)
        else:
            copy_vector_folder(vector, target)

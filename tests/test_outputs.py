"""Output folders and files (`dem_hf.io.outputs`): locks beside the target, stale temporaries, modes that follow the umask."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from dem_hf import DEMMerger, DistributionVector
from dem_hf.io.outputs import (
    OutputInUseError,
    atomic_directory,
    output_lock,
    write_file_atomic,
)


@pytest.fixture(params=[0o022, 0o077], ids=["umask 022", "umask 077"])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.rglob("*")]}


def expected_modes(folder: Path, umask: int) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): (0o777 if p.is_dir() else 0o666) & ~umask for p in [folder, *folder.rglob("*")]
    }


def test_merged_folder_and_vector_follow_the_umask(umask, tmp_path, base_dir, finetuned_dirs):
    """Merged folders, their shards and files, and vector folders get the modes a plain mkdir/open would give
    (not `mkdtemp`'s 0700 and `mkstemp`'s 0600), so another account can read them when the umask says so."""
    vector = DistributionVector.from_models(base_dir, finetuned_dirs["math"], name="math", save_directory=tmp_path / "vec")
    merged = DEMMerger.from_pretrained(base_dir, vectors=[vector]).save_pretrained(
        tmp_path / "merged", max_shard_size=20_000, save_vectors=True
    )
    assert len(list(merged.glob("model-*.safetensors"))) > 1
    for folder in (tmp_path / "vec", merged):
        assert modes(folder) == expected_modes(folder, umask)


def test_single_files_follow_the_umask(umask, tmp_path):
    path = write_file_atomic(tmp_path / "sub" / "result.json", lambda handle: handle.write(json.dumps({"best": 1})))
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o777 & ~umask


def test_plot_follows_the_umask(umask, tmp_path):
    pytest.importorskip("matplotlib")
    from dem_hf.search.plots import plot_search

    from .test_search import fake_result

    plot_search(fake_result(["a"], "grid", [(0.0,), (0.5,), (1.0,)]), tmp_path / "plot.png")
    assert stat.S_IMODE((tmp_path / "plot.png").stat().st_mode) == 0o666 & ~umask


def test_the_lock_excludes_a_second_writer_and_is_removed_after(tmp_path):
    target = tmp_path / "out"
    with output_lock(target):
        assert (tmp_path / ".out.lock").exists()
        with pytest.raises(OutputInUseError, match="being written by another"):
            with atomic_directory(target):
                pytest.fail("entered while locked")
        with pytest.raises(OutputInUseError):
            with output_lock(target):
                pass
    assert list(tmp_path.iterdir()) == []
    with atomic_directory(target) as staging:
        (staging / "f").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_retired_previous_result_of_a_killed_overwrite_is_restored(tmp_path):
    """Killed between moving the previous result aside and moving the new one in: the next run puts the previous
    result back instead of deleting it (and then fails on it as on any non-empty folder)."""
    target = tmp_path / "out"
    (tmp_path / ".out.old-abcd1234" / "out").mkdir(parents=True)
    (tmp_path / ".out.old-abcd1234" / "out" / "weights").write_text("previous")
    with pytest.raises(ValueError, match="not empty"):
        with atomic_directory(target):
            pass
    assert (target / "weights").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

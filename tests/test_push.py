"""DEMMerger.push_to_hub, `dem-hf push` and loading back from Hub ids, against the loopback Hub (hub_server.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, constants
from transformers import AutoModelForCausalLM, AutoTokenizer

from dem_hf import DEMConfig, DEMMerger, DistributionVector
from dem_hf.commands.cli import main
from dem_hf.hub.push import HubPushError
from dem_hf.io.shards import ShardedWriter

from .conftest import make_llama, save_model
from .hub_server import skip_retry_waits

REPO = "org/dem-model"
INPUT_IDS = torch.tensor([[2, 5, 9, 17, 33, 8, 41, 3]])
EXPECTED_FILES = {
    ".gitattributes", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
    "tokenizer_config.json", "dem_config.json", "README.md",
}


@pytest.fixture
def merger(tmp_path, base_dir, finetuned_dirs) -> DEMMerger:
    merger = DEMMerger.from_pretrained(base_dir)
    for name in ["math", "chat"]:
        merger.add_vector(
            DistributionVector.from_models(
                base_dir, finetuned_dirs[name], name=name, save_directory=tmp_path / "vec" / name
            )
        )
    merger.config.coefficients = {"math": 0.5, "chat": 1.5}
    return merger


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(INPUT_IDS).logits


def count_writes(monkeypatch) -> list[str]:
    writes: list[str] = []
    original = ShardedWriter.add
    monkeypatch.setattr(
        ShardedWriter, "add", lambda self, name, tensor: (writes.append(name), original(self, name, tensor))
    )
    return writes


def test_push_then_load_back_by_repo_id(hub_server, merger, tmp_path, caplog):
    expected = logits(merger.merge())

    info = merger.push_to_hub(REPO, commit_message="First DEM push")

    assert len(hub_server.commits) == 1 and hub_server.commits[0].message == "First DEM push"
    assert set(hub_server.repo_files(REPO)) == EXPECTED_FILES
    assert info.oid == hub_server.commits[0].oid and info.commit_url.startswith(hub_server.url)
    card = ModelCard(hub_server.repo_files(REPO)["README.md"].decode())
    assert card.data.tags == ["dem", "merge", "dem_hf"] and f'from_pretrained("{REPO}")' in card.text
    assert hub_server.unhandled == [] and not any("xet" in r for r in hub_server.requests)

    # a second push to the same repo, with other coefficients: one more commit, the README is kept
    with caplog.at_level(logging.WARNING):
        second = merger.push_to_hub(REPO, {"math": 1.0})
    assert len(hub_server.commits) == 2 and second.oid != info.oid
    assert sorted(hub_server.commits[1].added) == ["dem_config.json", "model.safetensors"]
    assert "Kept the repo's own README.md" in caplog.text
    expected = logits(merger.merge())

    loaded = AutoModelForCausalLM.from_pretrained(REPO)
    torch.testing.assert_close(logits(loaded), expected, rtol=0, atol=0)
    assert AutoTokenizer.from_pretrained(REPO)("w1 w2").input_ids == [5, 6]
    restored = DEMMerger.from_pretrained(REPO)
    assert restored.config.coefficients == {"math": 1.0, "chat": 1.5}
    torch.testing.assert_close(logits(restored.merge()), expected, rtol=0, atol=0)


def test_push_after_merge_pushes_exactly_the_merged_model(hub_server, merger):
    coefficients = {"math": 0.25, "chat": -0.5}
    model = merger.merge(coefficients=coefficients)

    merger.push_to_hub(REPO)

    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(REPO)), logits(model), rtol=0, atol=0)
    assert DEMMerger.from_pretrained(REPO).config.coefficients == coefficients


def test_regenerate_card_replaces_the_remote_readme(hub_server, merger):
    merger.push_to_hub(REPO)
    HfApi().upload_file(path_or_fileobj=b"# edited on the Hub\n", path_in_repo="README.md", repo_id=REPO)

    merger.push_to_hub(REPO, {"math": 2.0})
    assert hub_server.repo_files(REPO)["README.md"] == b"# edited on the Hub\n"

    merger.push_to_hub(REPO, regenerate_card=True)
    assert b"| `math` | full | `math` | 2 |" in hub_server.repo_files(REPO)["README.md"]


def test_pushed_vectors_restore_the_merger_from_the_hub(hub_server, merger, tmp_path, finetuned_dirs):
    info = merger.push_to_hub(REPO, push_vectors=True)

    files = hub_server.repo_files(REPO)
    assert {"vectors/math/vector_config.json", "vectors/chat/vector.safetensors"} <= set(files)
    assert "DEMMerger.from_pretrained" in files["README.md"].decode()

    seen = len(hub_server.requests)
    restored = DEMMerger.from_pretrained(REPO, revision=info.oid, cache_dir=tmp_path / "cache")
    downloads = [r for r in hub_server.requests[seen:] if "/resolve/" in r]
    assert downloads and not any("model" in r.rsplit("/", 1)[-1] for r in downloads), downloads  # no merged weights
    snapshot = tmp_path / "cache" / "models--org--dem-model" / "snapshots" / info.oid
    for name in ["math", "chat"]:
        assert restored.vectors[name].path == snapshot / "vectors" / name  # downloaded, not the local sources
    torch.testing.assert_close(logits(restored.merge({"math": 0.2})), logits(merger.merge({"math": 0.2})))

    vector = DistributionVector.from_pretrained(REPO, subfolder="vectors/math")
    assert vector.name == "math" and Path(constants.HF_HUB_CACHE) in vector.path.parents
    cached = DistributionVector.from_pretrained(REPO, subfolder="vectors/math", local_files_only=True)
    assert cached.path == vector.path
    with pytest.raises(FileNotFoundError, match="local_files_only"):
        DistributionVector.from_pretrained(REPO, subfolder="vectors/chat", local_files_only=True)


def test_hub_sources_are_recorded_as_ids_at_their_commit(hub_server, merger, tmp_path, base_dir, monkeypatch):
    """A base and vectors from the Hub are recorded as repo ids with the commit that was merged, not as cache paths,
    and a folder saved without its vectors restores through the Hub at those commits from any working directory,
    even after both repos moved on."""
    HfApi().create_repo("org/base")
    HfApi().upload_folder(folder_path=base_dir, repo_id="org/base")
    base_commit = HfApi().upload_file(path_or_fileobj=b"notes\n", path_in_repo="notes.md", repo_id="org/base").oid
    pushed = merger.push_to_hub(REPO, push_vectors=True)
    hub_merger = DEMMerger.from_pretrained("org/base")
    for name in ["math", "chat"]:
        hub_merger.add_vector(DistributionVector.from_pretrained(REPO, subfolder=f"vectors/{name}", revision=pushed.oid))
    model = hub_merger.merge({"math": 0.25, "chat": 2.0})
    saved = hub_merger.save_pretrained(tmp_path / "dem", save_vectors=False)

    recorded = DEMConfig.from_pretrained(saved)
    assert (recorded.base_model_name_or_path, recorded.base_revision) == ("org/base", base_commit)
    assert {k: recorded.vectors["chat"][k] for k in ("source", "revision", "subfolder")} == {
        "source": REPO, "revision": pushed.oid, "subfolder": "vectors/chat"
    }
    assert "snapshots" not in (saved / "dem_config.json").read_text()  # no cache paths
    other = save_model(make_llama(seed=5), tmp_path / "other")  # both repos move on
    HfApi().upload_file(path_or_fileobj=other / "model.safetensors", path_in_repo="model.safetensors", repo_id="org/base")
    merger.push_to_hub(REPO, push_vectors=True)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    restored = DEMMerger.from_pretrained(saved)
    assert restored.base_folder.name == base_commit and restored.vectors["math"].path.parts[-3] == pushed.oid
    torch.testing.assert_close(logits(restored.merge()), logits(model), rtol=0, atol=0)


def test_stale_shards_and_vectors_are_deleted_in_the_same_commit(hub_server, merger):
    merger.push_to_hub(REPO, push_vectors=True, max_shard_size=20_000)
    first = set(hub_server.repo_files(REPO))
    assert "model.safetensors.index.json" in first and "vectors/math/vector.safetensors" in first

    merger.push_to_hub(REPO)  # one shard, no vectors

    assert len(hub_server.commits) == 2
    assert set(hub_server.repo_files(REPO)) == EXPECTED_FILES
    stale = {p for p in first if p.startswith(("model-", "model.safetensors.index", "vectors/"))}
    assert set(hub_server.commits[1].deleted) == stale


def test_branch_pull_request_and_bare_name(hub_server, merger):
    merger.push_to_hub(REPO)
    on_branch = merger.push_to_hub(REPO, {"math": 1.0}, revision="dev")
    pull_request = merger.push_to_hub(REPO, {"math": 2.0}, create_pr=True)
    bare = merger.push_to_hub("solo-dem")

    assert [c.revision for c in hub_server.commits] == ["main", "dev", "refs/pr/1", "main"]
    assert pull_request.pr_url.endswith("/discussions/1") and on_branch.oid == hub_server.commits[1].oid
    assert bare.repo_url.repo_id == "tester/solo-dem"
    assert 'from_pretrained("tester/solo-dem")' in hub_server.repo_files("tester/solo-dem")["README.md"].decode()


def test_missing_token_fails_before_the_merge(hub_server, merger, monkeypatch):
    hub_server.require_token = "hf_secret"
    writes = count_writes(monkeypatch)

    with pytest.raises(PermissionError, match="No Hugging Face token was found.*hf auth login"):
        merger.push_to_hub(REPO)
    with pytest.raises(PermissionError, match="rejected the token"):
        merger.push_to_hub(REPO, token="hf_wrong")
    assert writes == [] and hub_server.commits == []

    merger.push_to_hub(REPO, token="hf_secret", private=True)
    assert len(hub_server.commits) == 1 and hub_server.repos[("model", REPO)].private


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"repo_id": "my org/model"}, "Invalid Hub repo id 'my org/model'"),
        ({"repo_id": "org/name.git"}, "namespace/name"),
        ({"repo_id": REPO, "revision": "dev", "create_pr": True}, "create_pr"),
        ({"repo_id": REPO, "coefficients": {"poetry": 1.0}}, "poetry"),
    ],
)
def test_bad_push_arguments_fail_before_any_request_or_merge(hub_server, merger, monkeypatch, kwargs, message):
    writes = count_writes(monkeypatch)
    with pytest.raises(ValueError, match=message):
        merger.push_to_hub(**kwargs)
    assert hub_server.requests == [] and writes == []


def test_failed_upload_is_clear_and_the_next_push_succeeds(hub_server, merger, tmp_path, monkeypatch):
    skip_retry_waits(monkeypatch)
    saved = merger.save_pretrained(tmp_path / "merged")
    before = {p: p.read_bytes() for p in saved.rglob("*") if p.is_file()}
    temp_root = tmp_path / "tmp"
    temp_root.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(temp_root))
    hub_server.fail_commits = True

    with pytest.raises(HubPushError, match="500.*local folder is intact"):
        merger.push_to_hub(REPO)

    assert hub_server.commits == [] and list(temp_root.iterdir()) == []  # the temporary folder is gone
    assert {p: p.read_bytes() for p in saved.rglob("*") if p.is_file()} == before
    hub_server.fail_commits = False
    merger.push_to_hub(REPO)
    assert len(hub_server.commits) == 1 and set(hub_server.repo_files(REPO)) == EXPECTED_FILES


# ------------------------------------------------------------------------------------------------ command line


def test_cli_pushes_a_saved_dem_folder_as_it_is(hub_server, merger, tmp_path, capsys):
    saved = merger.save_pretrained(tmp_path / "merged")
    before = {p: p.read_bytes() for p in saved.rglob("*") if p.is_file()}

    code = main(["push", "--model", str(saved), "--repo-id", REPO, "--push-vectors", "--private",
                 "--commit-message", "from the CLI"])

    assert code == 0 and f"{hub_server.url}/{REPO}/commit/" in capsys.readouterr().out
    files = hub_server.repo_files(REPO)
    vector_files = {f"vectors/{n}/{f}" for n in ["math", "chat"] for f in ["vector.safetensors", "vector_config.json", "README.md"]}
    assert set(files) == EXPECTED_FILES | vector_files
    assert files["model.safetensors"] == (saved / "model.safetensors").read_bytes()  # not merged again
    assert files["README.md"] != (saved / "README.md").read_bytes()
    assert f'from_pretrained("{REPO}")' in files["README.md"].decode()  # card for the repo, not the folder
    assert hub_server.commits[0].message == "from the CLI" and hub_server.repos[("model", REPO)].private
    assert {p: p.read_bytes() for p in saved.rglob("*") if p.is_file()} == before
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(REPO)), logits(merger.merge()))

    assert main(["push", "--model", str(saved), "--repo-id", REPO, "--local-card", "--regenerate-card"]) == 0
    files = hub_server.repo_files(REPO)
    assert files["README.md"] == (saved / "README.md").read_bytes() and not any(p.startswith("vectors/") for p in files)


def test_cli_push_errors(hub_server, merger, tmp_path, base_dir, capsys, monkeypatch):
    skip_retry_waits(monkeypatch)
    saved = merger.save_pretrained(tmp_path / "merged", save_vectors=False)
    for vector in merger.vectors.values():  # the recorded vector sources disappear
        for file in vector.path.iterdir():
            file.unlink()

    assert main(["push", "--model", str(saved), "--repo-id", REPO, "--push-vectors"]) == 2
    assert "Cannot push the vectors ['math', 'chat']" in capsys.readouterr().err
    assert main(["push", "--model", str(saved), "--repo-id", "bad repo"]) == 2
    assert main(["push", "--model", str(tmp_path / "missing"), "--repo-id", REPO]) == 2
    capsys.readouterr()
    assert hub_server.requests == []

    hub_server.fail_commits = True
    assert main(["push", "--model", str(saved), "--repo-id", REPO]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "500" in err and "Traceback" not in err
    hub_server.fail_commits = False

    assert main(["push", "--model", str(base_dir), "--repo-id", "org/plain"]) == 0  # a plain folder, unchanged
    assert "README.md" not in hub_server.repo_files("org/plain")


def test_private_repo_loads_with_a_token_then_from_the_cache(hub_server, merger, tmp_path):
    hub_server.require_token = "hf_secret"
    merger.push_to_hub(REPO, token="hf_secret", push_vectors=True)
    cache = tmp_path / "cache"

    with pytest.raises(PermissionError, match="refused access"):
        DEMMerger.from_pretrained(REPO, cache_dir=cache)
    restored = DEMMerger.from_pretrained(REPO, token="hf_secret", cache_dir=cache)
    offline = DEMMerger.from_pretrained(REPO, cache_dir=cache, local_files_only=True)

    path = offline.vectors["math"].path
    assert path == restored.vectors["math"].path and cache in path.parents
    torch.testing.assert_close(logits(offline.merge()), logits(merger.merge()), rtol=0, atol=0)


# ------------------------------------------------------------------------------ DistributionVector.push_to_hub


def test_vector_push_to_hub_then_from_pretrained_gives_the_same_tensors(hub_server, tmp_path, base_dir, finetuned_dirs):
    """One commit with the tensors, config and card; the card's own snippet, run as written, merges the base + Δ."""
    from dem_hf.hub.push import push_folder

    push_folder(base_dir, "org/tiny-base")
    vector = DistributionVector.from_models("org/tiny-base", finetuned_dirs["math"], name="math", metadata={"dataset": "math"})

    info = vector.push_to_hub("org/math-vector", private=True)

    assert len(hub_server.commits) == 2 and hub_server.commits[1].oid == info.oid
    assert hub_server.commits[1].message == "Upload distribution vector 'math' with dem_hf"
    assert set(hub_server.repo_files("org/math-vector")) == {".gitattributes", "README.md", "vector.safetensors", "vector_config.json"}
    loaded = DistributionVector.from_pretrained("org/math-vector")
    assert (loaded.name, loaded.metadata, loaded.base_fingerprint) == ("math", {"dataset": "math"}, vector.base_fingerprint)
    assert sorted(loaded.target_names) == sorted(vector.target_names)
    for name in vector.target_names:
        torch.testing.assert_close(loaded.delta(name), vector.delta(name), rtol=0, atol=0)

    card = ModelCard(hub_server.repo_files("org/math-vector")["README.md"].decode())
    assert card.data.base_model == "org/tiny-base" and card.data.library_name == "dem_hf"
    snippet = card.text.split("```python\n", 1)[1].split("```", 1)[0]
    assert 'DistributionVector.from_pretrained("org/math-vector")' in snippet
    namespace: dict = {}
    exec(snippet.replace('merger.save_pretrained("dem-model")', f'merger.save_pretrained({str(tmp_path / "dem")!r})'), namespace)
    expected = AutoModelForCausalLM.from_pretrained(finetuned_dirs["math"])
    torch.testing.assert_close(logits(namespace["model"]), logits(expected))


def test_vector_push_replaces_stale_shards_keeps_an_edited_card_and_fails_early(hub_server, tmp_path, base_dir, finetuned_dirs, monkeypatch):
    vector = DistributionVector.from_models(base_dir, finetuned_dirs["math"], name="math")
    vector.push_to_hub("org/v", max_shard_size=4000)
    assert len([f for f in hub_server.repo_files("org/v") if f.startswith("vector-")]) > 1
    HfApi().upload_file(path_or_fileobj=b"# edited\n", path_in_repo="README.md", repo_id="org/v")

    vector.push_to_hub("org/v", commit_message="one file")

    files = hub_server.repo_files("org/v")
    assert not any(f.startswith("vector-") for f in files) and "vector.safetensors" in files
    assert hub_server.commits[-1].message == "one file" and files["README.md"] == b"# edited\n"
    vector.push_to_hub("org/v", regenerate_card=True)
    assert b"# Distribution vector `math`" in hub_server.repo_files("org/v")["README.md"]

    commits = len(hub_server.commits)
    with pytest.raises(ValueError, match="namespace/name"):
        vector.push_to_hub("bad id")
    with pytest.raises(ValueError, match="create_pr"):
        vector.push_to_hub("org/v", create_pr=True, revision="dev")
    hub_server.require_token = "hf_secret"
    with pytest.raises(PermissionError):
        vector.push_to_hub("org/v")
    assert len(hub_server.commits) == commits
    vector.push_to_hub("org/v", token="hf_secret", revision="dev", max_shard_size=4000)  # files differ from main's
    pull_request = vector.push_to_hub("org/v", token="hf_secret", create_pr=True, max_shard_size=6000)
    assert [c.revision for c in hub_server.commits[commits:]] == ["dev", "refs/pr/1"] and pull_request.pr_num == 1

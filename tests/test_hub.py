"""dem_hf.hub.push against a loopback Hub (tests/hub_server.py), through the real huggingface_hub client."""

from __future__ import annotations

import os
from pathlib import Path

import huggingface_hub.hf_api
import pytest
import torch
import transformers.utils.hub
from huggingface_hub import HfApi, constants, hf_hub_download
from transformers import AutoModelForCausalLM, AutoTokenizer

from dem_hf.hub.download import resolve_pretrained
from dem_hf.hub.push import HubPushError, push_folder, validate_repo_id

from .hub_server import HubServer, point_clients_at, skip_retry_waits

REPO = "org/dem-model"


def make_folder(root: Path) -> Path:
    """A small saved-model-like folder, with a subfolder."""
    folder = root / "saved"
    (folder / "vectors" / "math").mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama"}\n')
    (folder / "dem_config.json").write_text('{"coefficients": {"math": 0.5}}\n')
    (folder / "README.md").write_text("---\nlibrary_name: transformers\ntags: [dem]\n---\n# A DEM model\n")
    (folder / "vectors" / "math" / "vector.safetensors").write_bytes(bytes(range(256)) * 8)
    return folder


def folder_state(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {
        path.relative_to(folder).as_posix(): (path.read_bytes() if path.is_file() else b"", path.stat().st_mtime_ns)
        for path in sorted(folder.rglob("*"))
    }


def local_files(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def test_push_creates_the_repo_in_one_commit_with_every_file(hub_server, tmp_path):
    folder = make_folder(tmp_path)

    info = push_folder(folder, REPO, commit_message="Add DEM model")

    assert len(hub_server.commits) == 1
    commit = hub_server.commits[0]
    assert (commit.repo_id, commit.revision, commit.message, commit.oid) == (REPO, "main", "Add DEM model", info.oid)
    assert sorted(commit.added) == sorted(local_files(folder))
    assert hub_server.repo_files(REPO) == {
        **local_files(folder),
        ".gitattributes": hub_server.repo_files(REPO)[".gitattributes"],
    }
    assert sorted(HfApi().list_repo_files(REPO)) == sorted([*local_files(folder), ".gitattributes"])
    assert HfApi().model_info(REPO).sha == info.oid
    assert hub_server.unhandled == []
    assert not any("xet" in request for request in hub_server.requests)


def test_push_to_a_bare_name_goes_to_the_users_namespace(hub_server, tmp_path):
    info = push_folder(make_folder(tmp_path), "solo-model")

    assert info.repo_url.repo_id == hub_server.commits[0].repo_id == "tester/solo-model"


def test_second_push_commits_only_what_changed(hub_server, tmp_path):
    folder = make_folder(tmp_path)
    first = push_folder(folder, REPO)

    unchanged = push_folder(folder, REPO)  # nothing changed: no empty commit, the head is returned
    assert unchanged.oid == first.oid and len(hub_server.commits) == 1

    (folder / "dem_config.json").write_text('{"coefficients": {"math": 0.7}}\n')
    (folder / "extra.txt").write_text("new\n")
    second = push_folder(folder, REPO)

    assert len(hub_server.commits) == 2 and second.oid == hub_server.commits[1].oid != first.oid
    assert sorted(hub_server.commits[1].added) == ["dem_config.json", "extra.txt"]
    assert hub_server.repo_files(REPO)["dem_config.json"] == (folder / "dem_config.json").read_bytes()


def test_push_can_delete_stale_remote_files_in_the_same_commit(hub_server, tmp_path):
    folder = make_folder(tmp_path)
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"1")
    (folder / "model-00002-of-00002.safetensors").write_bytes(b"2")
    push_folder(folder, REPO)
    for shard in folder.glob("model-*.safetensors"):
        shard.unlink()
    (folder / "model.safetensors").write_bytes(b"whole")

    push_folder(folder, REPO, delete_patterns="model*.safetensors")

    last = hub_server.commits[-1]
    assert len(hub_server.commits) == 2
    assert sorted(last.deleted) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert "model.safetensors" in last.added
    assert not any(path.startswith("model-") for path in hub_server.repo_files(REPO))


def test_push_to_a_branch_and_as_a_pull_request(hub_server, tmp_path):
    folder = make_folder(tmp_path)
    main = push_folder(folder, REPO)
    (folder / "extra.txt").write_text("proposal\n")

    on_branch = push_folder(folder, REPO, revision="dev")
    pull_request = push_folder(folder, REPO, create_pr=True)

    assert [c.revision for c in hub_server.commits] == ["main", "dev", "refs/pr/1"]
    assert pull_request.pr_num == 1 and pull_request.pr_url.endswith("/discussions/1")
    assert "extra.txt" in hub_server.repo_files(REPO, revision=on_branch.oid)
    assert HfApi().model_info(REPO).sha == main.oid  # main untouched
    with pytest.raises(ValueError, match="create_pr"):
        push_folder(folder, REPO, create_pr=True, revision="dev")


def test_resolve_pretrained_downloads_the_pushed_files(hub_server, tmp_path):
    folder = make_folder(tmp_path)
    info = push_folder(folder, REPO)

    snapshot = resolve_pretrained(REPO)
    assert snapshot.parent.name == "snapshots" and snapshot.name == info.oid
    assert Path(constants.HF_HUB_CACHE) in snapshot.parents
    assert {k: v for k, v in local_files(snapshot).items() if k != ".gitattributes"} == local_files(folder)

    vectors = resolve_pretrained(REPO, subfolder="vectors/math", cache_dir=tmp_path / "cache")
    assert local_files(vectors) == local_files(folder / "vectors" / "math")
    assert local_files(vectors.parents[1]).keys() == {"vectors/math/vector.safetensors"}  # only the subfolder

    config = hf_hub_download(REPO, "config.json", revision=info.oid)
    assert Path(config).read_bytes() == (folder / "config.json").read_bytes()


def test_resolve_pretrained_uses_local_folders_as_they_are(tmp_path):
    folder = make_folder(tmp_path)

    assert resolve_pretrained(folder) == folder
    assert resolve_pretrained(str(folder), subfolder="vectors/math") == folder / "vectors" / "math"
    with pytest.raises(FileNotFoundError, match="no subfolder 'nope'"):
        resolve_pretrained(folder, subfolder="nope")


@pytest.mark.parametrize("missing", ["./no/such/dir", "/no such/dir", "a/b/c"])
def test_resolve_pretrained_names_a_path_that_is_neither_local_nor_a_repo_id(missing):
    with pytest.raises(FileNotFoundError, match="not a local folder") as error:
        resolve_pretrained(missing)
    assert repr(missing) in str(error.value)


def test_resolve_pretrained_offline_uses_the_cache_or_says_why_not(hub_server, tmp_path, monkeypatch):
    info = push_folder(make_folder(tmp_path), REPO)
    online = resolve_pretrained(REPO)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    requests_before = len(hub_server.requests)

    assert resolve_pretrained(REPO) == online  # cached: works offline
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE") as error:
        resolve_pretrained("org/never-downloaded")
    assert "'org/never-downloaded'" in str(error.value)
    with pytest.raises(FileNotFoundError, match="local_files_only"):
        resolve_pretrained(REPO, revision="dev", local_files_only=True)
    assert len(hub_server.requests) == requests_before
    assert online.name == info.oid


def test_resolve_pretrained_unknown_repo_or_revision(hub_server, tmp_path):
    push_folder(make_folder(tmp_path), REPO)
    with pytest.raises(FileNotFoundError, match="no such repo"):
        resolve_pretrained("org/missing")
    with pytest.raises(FileNotFoundError, match="Revision 'v9'"):
        resolve_pretrained(REPO, revision="v9")


def test_tiny_llama_pushed_then_loaded_by_repo_id_gives_identical_logits(hub_server, tmp_path, base_model, tokenizer):
    folder = tmp_path / "llama"
    base_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    push_folder(folder, "org/tiny-llama")

    loaded = AutoModelForCausalLM.from_pretrained("org/tiny-llama").eval()
    loaded_tokenizer = AutoTokenizer.from_pretrained("org/tiny-llama")

    input_ids = loaded_tokenizer("w1 w2 w3 w4", return_tensors="pt").input_ids
    assert input_ids.tolist() == tokenizer("w1 w2 w3 w4", return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, base_model(input_ids).logits)
    assert hub_server.unhandled == []
    assert len(hub_server.commits) == 1


@pytest.mark.parametrize("bad_id", ["my org/model", "a/b/c", "org/bad--name", "org/name.git", "-org/name", ""])
def test_invalid_repo_id_is_a_value_error_before_any_request(hub_server, tmp_path, bad_id):
    with pytest.raises(ValueError, match="namespace/name") as error:
        push_folder(make_folder(tmp_path), bad_id)
    assert repr(bad_id) in str(error.value)
    assert hub_server.requests == []


def test_validate_repo_id_accepts_hub_ids():
    for good in ["org/name", "name", "Org-1/my_model.v2"]:
        validate_repo_id(good)
    with pytest.raises(ValueError, match="namespace/name"):
        validate_repo_id(None)  # type: ignore[arg-type]


def test_push_without_a_token_where_the_hub_demands_one(hub_server, tmp_path):
    hub_server.require_token = "hf_secret"
    folder = make_folder(tmp_path)

    with pytest.raises(PermissionError, match="No Hugging Face token was found.*hf auth login.*token="):
        push_folder(folder, REPO)
    with pytest.raises(PermissionError, match="rejected the token"):
        push_folder(folder, REPO, token="hf_wrong")
    assert hub_server.commits == []

    push_folder(folder, REPO, token="hf_secret")
    assert len(hub_server.commits) == 1
    assert HfApi().whoami(token="hf_secret")["name"] == "tester"
    assert resolve_pretrained(REPO, token="hf_secret").is_dir()
    with pytest.raises(PermissionError, match="refused access"):
        resolve_pretrained(REPO, cache_dir=tmp_path / "other-cache")


def test_server_error_is_clear_leaves_the_folder_intact_and_the_next_push_works(hub_server, tmp_path, monkeypatch):
    skip_retry_waits(monkeypatch)
    folder = make_folder(tmp_path)
    before = folder_state(folder)
    hub_server.fail_commits = True

    with pytest.raises(HubPushError, match="failed.*500") as error:
        push_folder(folder, REPO)

    assert isinstance(error.value, OSError)
    assert "simulated by the test server" in str(error.value) and "local folder is intact" in str(error.value)
    assert hub_server.failed_commit_attempts >= 1 and hub_server.commits == []
    assert folder_state(folder) == before

    hub_server.fail_commits = False
    push_folder(folder, REPO)
    assert len(hub_server.commits) == 1
    assert sorted(hub_server.commits[0].added) == sorted(local_files(folder))


def test_unreachable_hub_is_a_clear_error(tmp_path, monkeypatch):
    with HubServer() as stopped:  # a free port that nothing listens on once the server is stopped
        url = stopped.url
    point_clients_at(monkeypatch, url, tmp_path / "hf_home")
    folder = make_folder(tmp_path)
    before = folder_state(folder)

    with pytest.raises(HubPushError, match="local folder is intact"):
        push_folder(folder, REPO)
    with pytest.raises(ConnectionError, match="Could not reach the Hub"):
        resolve_pretrained(REPO)
    assert folder_state(folder) == before


def test_push_rejects_missing_or_empty_folders_before_any_request(hub_server, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        push_folder(tmp_path / "missing", REPO)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no files"):
        push_folder(tmp_path / "empty", REPO)
    with pytest.raises(ValueError, match="repo_type"):
        push_folder(make_folder(tmp_path), REPO, repo_type="models")
    assert hub_server.requests == []


def test_pointing_clients_at_the_server_is_undone_afterwards(tmp_path):
    def client_state():
        return (
            constants.ENDPOINT,
            constants.HF_HUB_OFFLINE,
            constants.HF_HUB_CACHE,
            os.environ.get("HF_ENDPOINT"),
            os.environ.get("HF_HUB_OFFLINE"),
            huggingface_hub.hf_api.api.endpoint,
            transformers.utils.hub._hf_api,
        )

    before = client_state()
    with pytest.MonkeyPatch.context() as monkeypatch:
        point_clients_at(monkeypatch, "http://127.0.0.1:9", tmp_path)
        assert constants.ENDPOINT == huggingface_hub.hf_api.api.endpoint == "http://127.0.0.1:9"
        assert not constants.is_offline_mode() and constants.HF_HUB_CACHE == str(tmp_path / "hub")
        assert transformers.utils.hub.hf_api().endpoint == "http://127.0.0.1:9"
    assert client_state() == before
    assert constants.is_offline_mode()  # tests/conftest.py keeps the suite offline


# ------------------------------------------------------------------------------ from_pretrained: arguments, files


def downloaded(hub_server, repo: str) -> list[str]:
    """The files of `repo` the client fetched (GET .../resolve/<rev>/<path>), in order."""
    marker = f"/{repo}/resolve/"
    return [r.split(marker, 1)[1].split("/", 1)[1] for r in hub_server.requests if r.startswith("GET") and marker in r]


UNRELATED = {  # what a real repo holds beside what loading needs: PyTorch copies, originals, data, media
    "pytorch_model.bin": b"\0" * 300_000,
    "consolidated.safetensors": b"\0" * 300_000,
    "original/params.json": b"{}",
    "data/train.jsonl": b'{"text": "w1"}\n' * 1000,
    "demo.mp4": b"\0" * 200_000,
}


def with_unrelated_files(folder: Path) -> Path:
    for name, content in UNRELATED.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
    return folder


@pytest.mark.parametrize("sharded", [False, True])
def test_a_base_from_the_hub_downloads_config_tokenizer_and_weights_only(hub_server, tmp_path, base_model, tokenizer, sharded):
    from dem_hf import DEMMerger

    folder = tmp_path / "llama"
    base_model.save_pretrained(folder, max_shard_size="20KB" if sharded else "1GB")
    tokenizer.save_pretrained(folder)
    with_unrelated_files(folder)
    if sharded:  # a shard-like file the index does not list is not part of the checkpoint
        (folder / "model-00099-of-00099.safetensors").write_bytes(b"\0" * 1000)
    push_folder(folder, "org/base")
    needed = {p for p in local_files(folder) if p not in UNRELATED and not p.startswith("model-00099")}
    assert (len([p for p in needed if p.endswith(".safetensors")]) > 1) == sharded  # the case is real

    merger = DEMMerger.from_pretrained("org/base")

    assert sorted(downloaded(hub_server, "org/base")) == sorted(needed)
    assert set(local_files(merger.base_folder)) == needed
    assert sorted(merger.base.keys()) == sorted(base_model.state_dict().keys() - {"lm_head.weight"})
    assert hub_server.unhandled == []


def test_a_vector_from_the_hub_downloads_its_config_and_tensors_only(hub_server, tmp_path, base_dir, finetuned_dirs):
    from dem_hf import DistributionVector

    saved = DistributionVector.from_models(base_dir, finetuned_dirs["math"], name="math", save_directory=tmp_path / "v")
    with_unrelated_files(saved.path)
    push_folder(saved.path, "org/vector")

    loaded = DistributionVector.from_pretrained("org/vector")

    assert sorted(downloaded(hub_server, "org/vector")) == ["vector.safetensors", "vector_config.json"]
    assert loaded.name == "math" and loaded.target_names == saved.target_names
    for name in saved.target_names:
        assert torch.equal(loaded.delta(name), saved.delta(name))


def test_a_peft_adapter_from_the_hub_downloads_the_adapter_only(hub_server, tmp_path, base_dir):
    from peft import LoraConfig, get_peft_model

    from dem_hf import DistributionVector

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    push_folder(with_unrelated_files(tmp_path / "adapter"), "org/adapter")

    vector = DistributionVector.from_peft("org/adapter", base=base_dir)

    assert sorted(downloaded(hub_server, "org/adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
    assert vector.vector_type == "lora" and len(vector.lora_modules) == 2


HUB_ARGUMENTS = ["subfolder", "revision", "token", "cache_dir", "local_files_only", "force_download"]


def test_every_from_pretrained_takes_transformers_names():
    """The same names as Transformers' `from_pretrained`, as explicit keyword parameters (no `**kwargs` to hide a typo)."""
    import inspect

    from dem_hf import DEMConfig, DEMMerger, DistributionVector, SearchConfig
    from dem_hf.hub.download import HUB_ARGUMENTS as LIBRARY_HUB_ARGUMENTS

    assert list(LIBRARY_HUB_ARGUMENTS) == HUB_ARGUMENTS
    model_arguments = {"dtype", "device_map"}
    for cls, loads_a_model in [(DEMMerger, True), (DistributionVector, False), (DEMConfig, False), (SearchConfig, False)]:
        parameters = inspect.signature(cls.from_pretrained).parameters
        assert next(iter(parameters)) == "pretrained_model_name_or_path", cls
        assert set(HUB_ARGUMENTS) <= set(parameters), cls
        assert all(parameters[a].kind is inspect.Parameter.KEYWORD_ONLY for a in HUB_ARGUMENTS), cls
        assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()), cls
        assert (model_arguments <= set(parameters)) == loads_a_model, cls


def _hub_objects(tmp_path, base_dir, finetuned_dirs) -> Path:
    """A folder holding a saved DEM model (base beside it) under `sub/`, pushed twice by the tests."""
    from dem_hf import DEMMerger, DistributionVector

    merger = DEMMerger.from_pretrained(base_dir)
    merger.add_vector(DistributionVector.from_models(base_dir, finetuned_dirs["math"], name="math"))
    folder = tmp_path / "repo"
    merger.save_pretrained(folder / "sub", coefficients={"math": 0.25})
    return folder


LOADERS = {  # class -> (load from the repo's `sub/` folder, what identifies the loaded version)
    "DEMMerger": (lambda cls, **kw: cls.from_pretrained(REPO, subfolder="sub", **kw), lambda m: m.config.coefficients["math"]),
    "DistributionVector": (lambda cls, **kw: cls.from_pretrained(REPO, subfolder="sub/vectors/math", **kw), lambda v: v.metadata.get("version", 1)),
    "DEMConfig": (lambda cls, **kw: cls.from_pretrained(REPO, subfolder="sub", **kw), lambda c: c.coefficients["math"]),
}


@pytest.mark.parametrize("class_name", list(LOADERS))
def test_each_hub_argument_is_honoured_by_each_class(hub_server, tmp_path, base_dir, finetuned_dirs, class_name):
    """`subfolder`, `revision`, `token`, `cache_dir`, `local_files_only` and `force_download` do what Transformers'
    do, for every class that loads from the Hub."""
    import json

    import dem_hf

    cls = getattr(dem_hf, class_name)
    load, version_of = LOADERS[class_name]
    folder = _hub_objects(tmp_path, base_dir, finetuned_dirs)
    hub_server.require_token = "hf_secret"
    first = push_folder(folder, REPO, token="hf_secret")
    config_path = folder / "sub" / "dem_config.json"
    config_path.write_text(config_path.read_text().replace('"math": 0.25', '"math": 0.75'))
    vector_config = folder / "sub" / "vectors" / "math" / "vector_config.json"
    values = json.loads(vector_config.read_text())
    vector_config.write_text(json.dumps({**values, "metadata": {**values["metadata"], "version": 2}}))
    push_folder(folder, REPO, token="hf_secret")
    cache = tmp_path / "cache"

    with pytest.raises(PermissionError):  # token: the repo needs one
        load(cls, cache_dir=cache)
    latest = load(cls, token="hf_secret", cache_dir=cache)
    old = load(cls, token="hf_secret", cache_dir=cache, revision=first.oid)
    assert (version_of(latest), version_of(old)) == ({"DistributionVector": 2}.get(class_name, 0.75), {"DistributionVector": 1}.get(class_name, 0.25))
    assert list(cache.glob("models--org--dem-model/snapshots/*")), "cache_dir is where the files went"
    assert not list(Path(constants.HF_HUB_CACHE).glob("models--org--dem-model"))

    requests = len(hub_server.requests)
    offline = load(cls, cache_dir=cache, revision=first.oid, local_files_only=True)
    assert version_of(offline) == version_of(old) and len(hub_server.requests) == requests

    load(cls, token="hf_secret", cache_dir=cache, revision=first.oid, force_download=True)
    again = [r for r in hub_server.requests[requests:] if r.startswith("GET") and "/resolve/" in r]
    assert again, "force_download fetched the files again"


def test_dtype_and_device_map_are_how_the_merger_loads_the_base(base_dir, finetuned_dirs, monkeypatch):
    from dem_hf import DEMMerger, DistributionVector

    calls = []
    original = AutoModelForCausalLM.from_pretrained.__func__
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(
        lambda cls, *args, **kwargs: (calls.append(kwargs), original(cls, *args, **kwargs))[1]
    ))
    vector = DistributionVector.from_models(base_dir, finetuned_dirs["math"], name="math")
    default = DEMMerger.from_pretrained(base_dir, vectors=[vector]).merge()
    half = DEMMerger.from_pretrained(base_dir, vectors=[vector], dtype=torch.float16, device_map="cpu").merge()
    bf16 = DEMMerger.from_pretrained(base_dir, vectors=[vector], dtype=torch.float16).merge(dtype=torch.bfloat16)

    assert (default.dtype, half.dtype, bf16.dtype) == (torch.float32, torch.float16, torch.bfloat16)
    assert calls == [{"dtype": "auto"}, {"dtype": torch.float16, "device_map": "cpu"}, {"dtype": torch.bfloat16}]

"""Faults in the middle of long operations: nothing half-written, inputs untouched, a retry succeeds.

New features add their cases here (see CONTRIBUTING.md).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback

from dem_hf import DEMMerger, DistributionVector
from dem_hf.commands.cli import main
from dem_hf.io.shards import ShardedWriter

REPO = Path(__file__).resolve().parents[1]


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()
    }


class Boom(Exception):
    pass


def fail_after(calls: int, error: BaseException):
    """A replacement for `ShardedWriter.add` that works `calls` times, then raises `error`."""
    original = ShardedWriter.add
    count = {"n": 0}

    def add(self, name, tensor):
        count["n"] += 1
        if count["n"] > calls:
            raise error
        return original(self, name, tensor)

    return add


def disk_full():
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


FAULTS = {
    "exception mid-merge": (lambda: Boom("writer failed"), Boom),
    "KeyboardInterrupt mid-merge": (lambda: KeyboardInterrupt(), KeyboardInterrupt),
    "disk full mid-merge": (disk_full, OSError),
}


def open_files_under(folder: Path) -> list[str]:
    """The files under `folder` this process holds open (Linux: /proc/self/fd; elsewhere nothing is checked)."""
    fds = Path("/proc/self/fd")
    if not fds.is_dir():
        return []
    found = []
    for fd in fds.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if target.startswith(str(folder)):
            found.append(target)
    return found


@pytest.fixture
def vectors(tmp_path, base_dir, finetuned_dirs):
    return [
        DistributionVector.from_models(base_dir, path, name=name, save_directory=tmp_path / "vec" / name)
        for name, path in finetuned_dirs.items()
    ]


@pytest.mark.parametrize("fault", list(FAULTS), ids=list(FAULTS))
def test_interrupted_merge_leaves_no_output_and_retry_succeeds(fault, tmp_path, base_dir, vectors, monkeypatch):
    make_error, error_type = FAULTS[fault]
    inputs = {p: tree_digest(p) for p in [base_dir, *(v.path for v in vectors)]}
    merger = DEMMerger.from_pretrained(base_dir, vectors=vectors)
    out = tmp_path / "merged"
    with monkeypatch.context() as patch:
        patch.setattr(ShardedWriter, "add", fail_after(5, make_error()))
        with pytest.raises(error_type):
            merger.save_pretrained(out, max_shard_size=10_000)
    assert open_files_under(tmp_path) == []  # the shards' descriptors are closed, not leaked
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".merged")] == []
    assert {p: tree_digest(p) for p in inputs} == inputs
    merger.save_pretrained(out)
    AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.parametrize("fault", list(FAULTS), ids=list(FAULTS))
def test_failed_overwrite_keeps_the_previous_result(fault, tmp_path, base_dir, vectors, monkeypatch):
    make_error, error_type = FAULTS[fault]
    merger = DEMMerger.from_pretrained(base_dir, vectors=vectors)
    out = merger.save_pretrained(tmp_path / "merged", {"math": 0.5})
    before = tree_digest(out)
    with monkeypatch.context() as patch:
        patch.setattr(ShardedWriter, "add", fail_after(3, make_error()))
        with pytest.raises(error_type):
            merger.save_pretrained(out, {"math": 0.9}, overwrite=True)
    assert tree_digest(out) == before


@pytest.mark.parametrize("fault", list(FAULTS), ids=list(FAULTS))
def test_interrupted_extraction_leaves_nothing_and_keeps_the_previous_vector(fault, tmp_path, base_dir, finetuned_dirs, monkeypatch):
    """A fault in the middle of the streaming extraction (3 threads, many blocks, several shards): no folder appears,
    nothing temporary is left, the inputs are untouched, an existing vector being overwritten is kept, and the retry
    succeeds."""
    import dem_hf.vectors.extraction as extraction

    make_error, error_type = FAULTS[fault]
    monkeypatch.setattr(extraction, "EXTRACT_WORKERS", 3)
    monkeypatch.setattr(extraction, "EXTRACT_BLOCK_VALUES", 100)
    inputs = {p: tree_digest(p) for p in [base_dir, finetuned_dirs["math"]]}
    previous = DistributionVector.from_models(base_dir, finetuned_dirs["chat"], name="chat", save_directory=tmp_path / "old").path
    kept = tree_digest(previous)
    for target, overwrite in ((tmp_path / "v", False), (previous, True)):
        with monkeypatch.context() as patch:
            patch.setattr(ShardedWriter, "add", fail_after(4, make_error()))
            with pytest.raises(error_type):
                DistributionVector.from_models(
                    base_dir, finetuned_dirs["math"], name="math", save_directory=target, overwrite=overwrite, max_shard_size=20_000
                )
            assert open_files_under(tmp_path) == []
    assert not (tmp_path / "v").exists() and tree_digest(previous) == kept
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name or p.name.endswith(".lock")] == []
    assert {p: tree_digest(p) for p in inputs} == inputs
    DistributionVector.from_models(base_dir, finetuned_dirs["math"], name="math", save_directory=tmp_path / "v")


def test_folder_appearing_during_extraction_is_left_untouched(tmp_path, base_dir, finetuned_dirs, monkeypatch):
    """Another program creates the vector's folder while the streaming extraction runs: its files stay, the call fails
    clearly, nothing temporary is left, and a retry elsewhere succeeds."""
    out = tmp_path / "vec"
    original = ShardedWriter.close

    def close_after_someone_else_wrote(self):
        out.mkdir()
        (out / "precious.txt").write_text("theirs")
        return original(self)

    with monkeypatch.context() as patch:
        patch.setattr(ShardedWriter, "close", close_after_someone_else_wrote)
        with pytest.raises(FileExistsError, match="appeared while"):
            DistributionVector.from_models(base_dir, finetuned_dirs["math"], name="math", save_directory=out)
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"] and (out / "precious.txt").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".vec")] == []
    DistributionVector.from_models(base_dir, finetuned_dirs["math"], name="math", save_directory=tmp_path / "elsewhere")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupted_safetensors_is_refused_before_merging(damage, tmp_path, base_dir, vectors):
    broken = vectors[0].path / "vector.safetensors"
    if damage == "truncated":
        os.truncate(broken, broken.stat().st_size - 64)
    else:
        broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ValueError, match="truncated or corrupted"):
        DEMMerger.from_pretrained(base_dir, vectors=[vectors[0].path])



def test_nan_in_a_vector_on_disk_stops_the_merge_without_output(tmp_path, base_dir, vectors):
    from safetensors.torch import load_file, save_file

    path = vectors[0].path / "vector.safetensors"
    tensors = load_file(path)
    tensors["model.norm.weight"][0] = float("nan")
    save_file(tensors, path)
    merger = DEMMerger.from_pretrained(base_dir, vectors=[vectors[0].path])
    with pytest.raises(ValueError, match="NaN or infinite values in 'model.norm.weight'"):
        merger.save_pretrained(tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_hub_failing_mid_push_leaves_the_local_model_intact_and_a_retry_succeeds(
    hub_server, tmp_path, base_dir, vectors, monkeypatch
):
    """The Hub answers 500 to the commit (after the repo was created and the merge was streamed): a clear
    `HubPushError`, the saved folder and the inputs untouched, no temporary folder left, nothing committed;
    the next push succeeds and loads back."""
    from dem_hf.hub.push import HubPushError

    from .hub_server import skip_retry_waits

    skip_retry_waits(monkeypatch)
    merger = DEMMerger.from_pretrained(base_dir, vectors=vectors)
    saved = merger.save_pretrained(tmp_path / "merged", {"math": 0.5})
    inputs = {p: tree_digest(p) for p in [saved, base_dir, *(v.path for v in vectors)]}
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(scratch))
    hub_server.fail_commits = True

    with pytest.raises(HubPushError, match="500.*local folder is intact"):
        merger.push_to_hub("org/dem-model", push_vectors=True)

    assert hub_server.failed_commit_attempts >= 1 and hub_server.commits == []
    assert {p: tree_digest(p) for p in inputs} == inputs and list(scratch.iterdir()) == []
    hub_server.fail_commits = False
    merger.push_to_hub("org/dem-model", push_vectors=True)
    assert len(hub_server.commits) == 1
    reloaded = AutoModelForCausalLM.from_pretrained("org/dem-model")
    local = AutoModelForCausalLM.from_pretrained(saved)
    for (name, a), (_, b) in zip(reloaded.state_dict().items(), local.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("fault", ["exception mid-search", "KeyboardInterrupt mid-search"])
def test_interrupted_search_restores_the_model_and_records_nothing(fault, base_dir, vectors, monkeypatch):
    import torch

    from dem_hf import SearchConfig
    from dem_hf.evaluation import perplexity as evaluation
    from dem_hf.io.tensors import untied_state_dict

    from .conftest import make_llama

    merger = DEMMerger.from_pretrained(base_dir, vectors=vectors)
    recorded = dict(merger.config.coefficients)
    model = make_llama(seed=0)
    before = {n: t.clone() for n, t in untied_state_dict(model).items()}
    data = [{"text": "w1 w2 w3 w4 w5 w6"}, {"text": "w7 w8 w9 w10"}]
    original, calls = evaluation.batch_nll, {"n": 0}

    def failing_batch_nll(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:
            raise Boom("evaluation failed") if fault.startswith("exception") else KeyboardInterrupt()
        return original(*args, **kwargs)

    config = SearchConfig(grid_values=[0.5, 1.0], allow_extra_eval_sets=True)
    with monkeypatch.context() as patch:
        patch.setattr(evaluation, "batch_nll", failing_batch_nll)
        with pytest.raises((Boom, KeyboardInterrupt)):
            merger.search({"math": data}, config, model=model, show_progress=False)
    assert all(torch.equal(t, before[n]) for n, t in untied_state_dict(model).items())
    assert merger.config.search_result is None and merger.config.coefficients == recorded
    result = merger.search({"math": data}, config, model=model, show_progress=False)
    assert len(result.candidates) == 2 ** len(vectors)


@pytest.mark.parametrize("fault", ["ENOSPC mid-write", "KeyboardInterrupt mid-write"])
def test_interrupted_file_write_keeps_the_previous_file(fault, tmp_path):
    """Search results (`--result-json`), plots and ablation tables are single files written by
    `write_file_atomic`: a failure mid-write leaves the previous file whole and no temporary behind."""
    from dem_hf.io.outputs import write_file_atomic

    error = OSError(errno.ENOSPC, "No space left on device") if fault.startswith("ENOSPC") else KeyboardInterrupt()
    target = write_file_atomic(tmp_path / "result.json", lambda handle: handle.write('{"best": 1}'))

    def write_half(handle):
        handle.write('{"best": 2, "candidates": [')
        raise error

    with pytest.raises(type(error)):
        write_file_atomic(target, write_half)
    assert target.read_text() == '{"best": 1}' and sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]
    write_file_atomic(target, lambda handle: handle.write('{"best": 2}'))  # the retry succeeds
    assert target.read_text() == '{"best": 2}'


@pytest.mark.parametrize("fault", ["ENOSPC mid-unpack", "KeyboardInterrupt mid-unpack"])
def test_interrupted_debian_fetch_leaves_nothing_and_a_retry_succeeds(fault, tmp_path, monkeypatch):
    """A plain-text distribution's Debian package is unpacked into a temporary folder: a failure mid-unpack
    leaves no package folder (so nothing half-unpacked is ever reused) and the next call fetches it whole."""
    from dem_hf import demo
    from dem_hf.demo import debian

    from .test_demo_texts import VERSIONS, fake_package

    error = OSError(errno.ENOSPC, "No space left on device") if fault.startswith("ENOSPC") else KeyboardInterrupt()

    def unpack_half(package, into):
        (into / "root" / "usr").mkdir(parents=True)
        (into / "root" / "usr" / "half").write_text("half")
        raise error

    def unpack(package, into):
        fake_package(package, into / "root")
        return VERSIONS[package]

    monkeypatch.setattr(debian.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    monkeypatch.setattr(debian, "_download_and_unpack", unpack_half)
    with pytest.raises(type(error)):
        demo.prepare_distributions(tmp_path, "jargon", n_train=6, n_val=2, n_test=2)
    assert list((tmp_path / "debian").iterdir()) == [] and not (tmp_path / "distributions").exists()
    monkeypatch.setattr(debian, "_download_and_unpack", unpack)
    data = demo.prepare_distributions(tmp_path, "jargon", n_train=6, n_val=2, n_test=2)["jargon"]
    assert len(data["train"]) == 6 and (tmp_path / "debian/jargon-text/package.json").is_file()


# ---------------------------------------------------------------------------------------------- data loss (issue 14)

@pytest.mark.parametrize("factor, value", [("lora_A", float("nan")), ("lora_B", float("inf"))])
def test_non_finite_lora_factor_on_disk_stops_the_merge_without_output(factor, value, tmp_path, base_dir):
    """The streaming merge reads LoRA factors with NumPy (bf16 ones too) and refuses a non-finite one by name."""
    from safetensors.torch import load_file, save_file

    vector = DistributionVector.from_peft(_peft_adapter(tmp_path / "adapter"), name="lora", base=base_dir)
    vector.save_pretrained(tmp_path / "vec")
    path = tmp_path / "vec" / "vector.safetensors"
    tensors = {name: tensor.to(torch.bfloat16) for name, tensor in load_file(path).items()}
    name = f"model.layers.1.self_attn.q_proj.weight.{factor}"
    tensors[name][0, 1] = value
    save_file(tensors, path)
    merger = DEMMerger.from_pretrained(base_dir, vectors=[tmp_path / "vec"])
    with pytest.raises(ValueError, match=re.escape(f"'lora' has NaN or infinite values in {name!r}")):
        merger.save_pretrained(tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def _peft_adapter(folder: Path) -> Path:
    from peft import LoraConfig, get_peft_model

    from .conftest import make_llama

    model = get_peft_model(make_llama(seed=0), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(folder)
    return folder


OVERLAPS = {
    "cli extract --output the fine-tuned model --overwrite": lambda w: main([
        "extract", "--base", str(w["base"]), "--finetuned", str(w["tuned"]), "--name", "x", "--output", str(w["tuned"]),
        "--overwrite"]),
    "cli extract --output the base model --overwrite": lambda w: main([
        "extract", "--base", str(w["base"]), "--finetuned", str(w["tuned"]), "--name", "x", "--output", str(w["base"]),
        "--overwrite"]),
    "cli extract --output inside the adapter": lambda w: main([
        "extract", "--base", str(w["base"]), "--adapter", str(w["adapter"]), "--name", "x", "--output",
        str(w["adapter"] / "vector")]),
    "from_models(save_directory=the fine-tuned model, overwrite=True)": lambda w: DistributionVector.from_models(
        w["base"], w["tuned"], name="x", save_directory=w["tuned"], overwrite=True),
    "from_models(save_directory inside the base)": lambda w: DistributionVector.from_models(
        w["base"], w["tuned"], name="x", save_directory=w["base"] / "vector"),
    "vector.save_pretrained onto its own folder": lambda w: DistributionVector.from_pretrained(w["vector"]).save_pretrained(
        w["vector"], overwrite=True),
    "vector.save_pretrained onto its base": lambda w: DistributionVector.from_peft(
        w["adapter"], name="x", base=str(w["base"])).save_pretrained(w["base"], overwrite=True),
}


@pytest.mark.parametrize("case", list(OVERLAPS), ids=list(OVERLAPS))
def test_outputs_never_overlap_an_input(case, tmp_path, base_dir, finetuned_dirs, capsys):
    """Extracting or saving a vector onto or inside one of its inputs is refused before anything is written: the
    inputs are byte for byte untouched (on the command line: one line, exit status 2)."""
    w = dict(base=base_dir, tuned=finetuned_dirs["math"], adapter=_peft_adapter(tmp_path / "adapter"))
    w["vector"] = DistributionVector.from_models(base_dir, w["tuned"], name="v", save_directory=tmp_path / "vector").path
    inputs = {p: tree_digest(p) for p in [base_dir, w["tuned"], w["adapter"], w["vector"]]}
    if case.startswith("cli"):
        assert OVERLAPS[case](w) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "overlaps the input" in err and "Traceback" not in err, err
    else:
        with pytest.raises(ValueError, match="overlaps the input"):
            OVERLAPS[case](w)
    assert {p: tree_digest(p) for p in inputs} == inputs
    assert [p.name for p in tmp_path.rglob(".*tmp-*")] == []


def test_folder_appearing_during_save_is_left_untouched(tmp_path, base_dir, vectors, monkeypatch):
    """Another program creates the target while `save_pretrained(overwrite=False)` runs: its files stay, the call
    fails clearly, nothing temporary is left, and a retry elsewhere succeeds."""
    out = tmp_path / "merged"
    original = ShardedWriter.close

    def close_after_someone_else_wrote(self):
        out.mkdir()
        (out / "precious.txt").write_text("theirs")
        return original(self)

    merger = DEMMerger.from_pretrained(base_dir, vectors=vectors)
    with monkeypatch.context() as patch:
        patch.setattr(ShardedWriter, "close", close_after_someone_else_wrote)
        with pytest.raises(FileExistsError, match="appeared while"):
            merger.save_pretrained(out)
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"] and (out / "precious.txt").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".merged")] == []
    AutoModelForCausalLM.from_pretrained(merger.save_pretrained(tmp_path / "elsewhere"))


def _merge_argv(base_dir, vectors, out) -> list[str]:
    argv = ["merge", "--base", str(base_dir), "--output", str(out)]
    for vector in vectors:
        argv += ["--vector", f"{vector.path}=0.5"]
    return argv


# `dem-hf merge` in a process whose writer pauses before finishing, so that two started together overlap
SLOW_MERGE = """
import sys, time
from dem_hf.commands.cli import main
from dem_hf.io.shards import ShardedWriter
original = ShardedWriter.close
def close_slowly(self):
    time.sleep(2)
    return original(self)
ShardedWriter.close = close_slowly
sys.exit(main(sys.argv[1:]))
"""


def test_two_concurrent_merge_processes_on_one_output(tmp_path, base_dir, vectors):
    """Two `dem-hf merge` processes started together on one `--output`: exactly one succeeds, the other exits
    non-zero with one line, and the output is a complete, valid model (the winner's)."""
    out = tmp_path / "merged"
    argv = [sys.executable, "-c", SLOW_MERGE, *_merge_argv(base_dir, vectors, out)]
    processes = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, cwd=REPO) for _ in range(2)]
    results = [(p.wait(timeout=240), *p.communicate()) for p in processes]
    codes = sorted(code for code, _, _ in results)
    assert codes[0] == 0 and codes[1] != 0, results
    loser_err = next(err for code, _, err in results if code != 0)
    assert loser_err.count("\n") == 1 and "Traceback" not in loser_err, loser_err
    assert "being written by another" in loser_err or "not empty" in loser_err, loser_err
    expected = DEMMerger.from_pretrained(base_dir, vectors=vectors).merge({v.name: 0.5 for v in vectors})
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert all(torch.equal(a, b) for a, b in zip(merged.state_dict().values(), expected.state_dict().values()))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".merged")] == []


def test_a_merge_into_an_output_locked_by_another_writer_fails_at_once(tmp_path, base_dir, vectors, capsys):
    """The deterministic half of the race above: while another writer holds the output's lock, a merge fails
    before any heavy work with one line naming the lock, and leaves nothing."""
    from dem_hf.io.outputs import output_lock

    out = tmp_path / "merged"
    with output_lock(out):
        assert main(_merge_argv(base_dir, vectors, out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "being written by another" in err, err
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".merged")] == []


KILLED_MERGE = """
import sys, time
from dem_hf import DEMMerger
from dem_hf.io.shards import ShardedWriter
original = ShardedWriter.add
def add_then_hang(self, name, tensor):
    original(self, name, tensor)
    print("writing", flush=True)
    time.sleep(120)
ShardedWriter.add = add_then_hang
DEMMerger.from_pretrained(sys.argv[1], vectors=sys.argv[3:]).save_pretrained(sys.argv[2])
"""


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGKILL"])
def test_temporary_folder_of_a_killed_merge_is_removed_by_the_next_run(signal_name, tmp_path, base_dir, vectors):
    """A merge process killed mid-write (SIGTERM, SIGKILL: no Python cleanup runs) leaves its hidden temporary
    folder; the next run on the same output removes it and succeeds."""
    out = tmp_path / "merged"
    process = subprocess.Popen([sys.executable, "-c", KILLED_MERGE, str(base_dir), str(out), *(str(v.path) for v in vectors)],
                               stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert process.stdout.readline().startswith("writing")  # (worker threads may print on one line)
    process.send_signal(getattr(signal, signal_name))
    process.wait(timeout=60)
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".merged.tmp-")]
    assert len(leftovers) == 1 and any(leftovers[0].iterdir()) and not out.exists()
    DEMMerger.from_pretrained(base_dir, vectors=vectors).save_pretrained(out)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".merged")] == []
    AutoModelForCausalLM.from_pretrained(out)


def test_sigterm_of_a_merge_command_leaves_nothing(tmp_path, base_dir, vectors):
    """`dem-hf merge` turns SIGTERM into a clean exit (status 143): its temporary folder is removed at once."""
    import time

    out = tmp_path / "merged"
    process = subprocess.Popen([sys.executable, "-c", SLOW_MERGE, *_merge_argv(base_dir, vectors, out)],
                               stderr=subprocess.PIPE, text=True, cwd=REPO)
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(".merged.tmp-") for p in tmp_path.iterdir()):
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 143
    assert "terminated; no partial output was left" in process.stderr.read()
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".merged")] == []


def test_stale_temporary_file_of_a_killed_write_is_removed(tmp_path):
    """`write_file_atomic`'s temporaries left by a killed process are removed by the next write of that file
    (and only that file's)."""
    from dem_hf.io.outputs import write_file_atomic

    (tmp_path / ".result.json.tmp-k1ll3d_x").write_text('{"best": ')
    (tmp_path / ".other.json.tmp-k1ll3d_x").write_text("not ours")
    write_file_atomic(tmp_path / "result.json", lambda handle: handle.write("{}"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.json.tmp-k1ll3d_x", "result.json"]


@pytest.mark.parametrize("source", ["finetuned", "adapter"])
def test_disk_full_during_extract_is_one_line_and_leaves_nothing(source, tmp_path, base_dir, finetuned_dirs, monkeypatch, capsys):
    """A full disk in the middle of `dem-hf extract` is one line on the command line (exit status 1, an environment
    failure), no partial output, and the retry succeeds. A full fine-tune streams into planned shards (the disk fills
    in a positioned write, `os.pwrite`); an adapter's factors go through safetensors' `save_file`, which reports a
    full disk as its own `SafetensorError`."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full_disk(*args, **kwargs):
        if source == "adapter":
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        raise disk_full()

    inputs = {"finetuned": finetuned_dirs["math"], "adapter": _peft_adapter(tmp_path / "adapter") if source == "adapter" else None}
    argv = ["extract", "--base", str(base_dir), f"--{source}", str(inputs[source]), "--name", "math",
            "--output", str(tmp_path / "vec"), "--max-shard-size", "20KB"]
    before = sorted(p.name for p in tmp_path.iterdir())
    with monkeypatch.context() as patch:
        patch.setattr(*((safetensors.torch, "save_file") if source == "adapter" else (os, "pwrite")), full_disk)
        assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert main(argv) == 0


# ------------------------------------------------------------------------------------- non-finite merges (issue 14)

NON_FINITE = {"float16 base, coefficient 1e7": (torch.float16, 1e7), "float32 base, coefficient 1e39": (torch.float32, 1e39)}


@pytest.mark.parametrize("case", list(NON_FINITE), ids=list(NON_FINITE))
def test_merge_overflowing_the_dtype_stops_without_output(case, tmp_path, tokenizer):
    """Finite vectors with a coefficient too large for the base's dtype give inf weights: the streaming merge and
    the in-memory `merge()` stop with a ValueError naming the tensor and the coefficients; no folder appears."""
    from .conftest import make_llama, perturbed, save_model

    dtype, weight = NON_FINITE[case]
    base = make_llama(seed=0).to(dtype)
    base_dir = save_model(base, tmp_path / "base", tokenizer)
    tuned_dir = save_model(perturbed(base, 1).to(dtype), tmp_path / "tuned", tokenizer)
    vector = DistributionVector.from_models(base_dir, tuned_dir, name="math", save_directory=tmp_path / "vec")
    merger = DEMMerger.from_pretrained(base_dir, vectors=[vector])
    message = r"Merged tensor '[\w.]+' \(rows \d+:\d+\) has NaN or infinite values with the weights " + re.escape(f"{{'math': {weight!r}}}")
    with pytest.raises(ValueError, match=message):
        merger.save_pretrained(tmp_path / "merged", {"math": weight})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "tuned", "vec"]
    with pytest.raises(ValueError, match=message):
        merger.merge({"math": weight})
    merger.save_pretrained(tmp_path / "merged", {"math": 1.0})  # a sane coefficient still merges


# ============================================================================================ training runs


def _plain_texts(start: int, n: int = 16):
    from datasets import Dataset

    return Dataset.from_dict({"text": [" ".join(f"w{start + (i + j) % 10}" for j in range(10)) for i in range(n)]})


def _train(base, data, output, **settings):
    from trl import SFTConfig

    from dem_hf import train_distributions

    config = dict(output_dir=str(output), use_cpu=True, bf16=False, report_to="none", max_steps=2, learning_rate=2e-2,
                  per_device_train_batch_size=8, save_strategy="no", disable_tqdm=True, seed=0)
    retrain, callbacks = settings.pop("retrain", False), settings.pop("callbacks", None)
    return train_distributions(base, data, SFTConfig(**{**config, **settings}), None, output, retrain=retrain,
                               callbacks=callbacks)


class StepCounter(TrainerCallback):
    """Records the step each training run starts at (one entry per run that starts)."""

    def __init__(self) -> None:
        self.starts: list[int] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.starts.append(state.global_step)


def test_stale_dataset_with_the_same_row_count_is_never_silently_reused(tmp_path, base_dir):
    """Same name, same number of rows, other content: refused before training with the way out, the old run
    untouched; `retrain=True` trains it again and replaces the run only once the new one has finished."""
    output = tmp_path / "runs"
    [old] = _train(base_dir, {"plain": _plain_texts(0)}, output)
    embeddings = "model.embed_tokens.weight"  # trained on other words, other embedding rows move
    old_embeddings = old.tensors.get(embeddings).clone()  # read now: the vector reads its folder lazily
    before = tree_digest(output)
    counter = StepCounter()
    with pytest.raises(ValueError, match=r"Run 'plain' .*data\.fingerprint: .*retrain=True"):
        _train(base_dir, {"plain": _plain_texts(30)}, output, callbacks=[counter])
    assert counter.starts == [] and tree_digest(output) == before
    [new] = _train(base_dir, {"plain": _plain_texts(30)}, output, retrain=True, callbacks=[counter])
    assert counter.starts == [0] and sorted(p.name for p in output.iterdir()) == ["plain"]
    assert new.metadata["compute"]["global_step"] == 2
    assert not torch.equal(new.tensors.get(embeddings), old_embeddings)
    [reused] = _train(base_dir, {"plain": _plain_texts(30)}, output, callbacks=[counter])  # the new run is the run now
    assert counter.starts == [0] and torch.equal(reused.tensors.get(embeddings), new.tensors.get(embeddings))


@pytest.mark.parametrize("fault", ["exception mid-retrain", "KeyboardInterrupt mid-retrain"])
def test_interrupted_retrain_keeps_the_previous_run_and_a_retry_succeeds(fault, tmp_path, base_dir):
    class Fail(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            raise Boom("retrain failed") if fault.startswith("exception") else KeyboardInterrupt()

    output = tmp_path / "runs"
    _train(base_dir, {"plain": _plain_texts(0)}, output)
    before = tree_digest(output / "plain")
    with pytest.raises((Boom, KeyboardInterrupt)):
        _train(base_dir, {"plain": _plain_texts(0)}, output, learning_rate=1e-3, retrain=True, callbacks=[Fail()])
    assert tree_digest(output / "plain") == before  # the finished run stays until a new one finishes
    [vector] = _train(base_dir, {"plain": _plain_texts(0)}, output, learning_rate=1e-3, retrain=True)
    assert vector.metadata["sft_config"]["learning_rate"] == 1e-3 and sorted(p.name for p in output.iterdir()) == ["plain"]


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


HALF_WRITTEN_CHECKPOINTS = {
    "checkpoint without trainer_state.json": lambda folder: (folder / "trainer_state.json").unlink(),
    "truncated trainer_state.json": lambda folder: _truncate(folder / "trainer_state.json"),
    "truncated weights": lambda folder: _truncate(folder / "model.safetensors"),
}


@pytest.mark.parametrize("damage", list(HALF_WRITTEN_CHECKPOINTS), ids=list(HALF_WRITTEN_CHECKPOINTS))
def test_half_written_checkpoint_is_skipped_on_resume(damage, tmp_path, base_dir):
    """A kill or a full disk while a checkpoint is written leaves `checkpoint-N` half-written: the next call resumes
    from the last complete checkpoint instead of failing (and keeps failing) on the broken one."""
    import shutil

    class CrashAtStep3(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise Boom("crash at step 3")

    output, settings = tmp_path / "runs", dict(max_steps=4, save_strategy="steps", save_steps=1)
    with pytest.raises(Boom):
        _train(base_dir, {"plain": _plain_texts(0)}, output, callbacks=[CrashAtStep3()], **settings)
    run = output / "plain"
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    shutil.copytree(run / "checkpoint-2", run / "checkpoint-3")
    HALF_WRITTEN_CHECKPOINTS[damage](run / "checkpoint-3")  # checkpoint 3, killed while being written
    counter = StepCounter()
    [vector] = _train(base_dir, {"plain": _plain_texts(0)}, output, callbacks=[counter], **settings)
    assert counter.starts == [2] and vector.metadata["compute"]["global_step"] == 4
    assert json.loads((run / "checkpoint-3" / "trainer_state.json").read_text())["global_step"] == 3  # written anew

"""Issue 17, distributed training proven: `train_distributions` under `accelerate launch` with two CPU (gloo)
processes, and processes sharing an output folder without forming a process group refused.

The launched tests start real processes (`tests/launched_training.py`), which record every output write they
make, the optimizer steps they take and the world size their trainers see, so the counts come from outside the
code under test. They take 30-90 s each on a busy 2-core machine, so they are marked slow and `.ci/run`
runs them in a step of their own.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import Trainer
from trl import SFTConfig

import dem_hf
from dem_hf import DistributionVector, train_distributions, train_mixture
from dem_hf.io.outputs import OutputInUseError
from dem_hf.training.processes import check_process_group, hold_run_folders

from .conftest import make_llama, make_tokenizer, save_model
from .launched_training import DATASETS as NAMES
from .launched_training import launched_settings

ROOT = Path(dem_hf.__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "launched_training.py"
LAUNCH_TIMEOUT = 400  # seconds; a launch takes 30-50 s on a busy 2-core machine


def cycle(start: int, offset: int, length: int) -> str:
    return " ".join(f"w{start + (offset + j) % 10}" for j in range(length))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny base (built from a config, saved) and two 8-row datasets as JSON lines files."""
    root = tmp_path_factory.mktemp("distributed")
    save_model(make_llama(seed=0), root / "base", make_tokenizer())
    (root / "data").mkdir()
    for name, start in zip(NAMES, (0, 20)):
        rows = [json.dumps({"text": cycle(start, i, 12)}) for i in range(8)]  # 13 tokens each with the EOS
        (root / "data" / f"{name}.jsonl").write_text("\n".join(rows) + "\n")
    return root


def child_environment(tmp: Path) -> dict[str, str]:
    """This checkout first on the path, offline, no launcher variables or Accelerate settings from outside."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "PET_", "TORCHELASTIC_"))
                 and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return {**inherited, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "HF_HOME": str(tmp / "hf-home"),  # no accelerate config file of the machine's user
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def script_arguments(world: Path, output: Path, logs: Path, *extra: str) -> list[str]:
    logs.mkdir(parents=True, exist_ok=True)
    return [str(SCRIPT), str(world / "base"), str(world / "data"), str(output), str(logs), *extra]


def accelerate_launch(world: Path, output: Path, logs: Path, *extra: str) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes 2` of the script: on a machine without GPU, two gloo processes."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), *script_arguments(world, output, logs, *extra)]
    return subprocess.run(command, env=child_environment(logs), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)


def results(logs: Path) -> list[dict]:
    """What each process reported, by rank (then pid)."""
    found = [json.loads(path.read_text()) for path in logs.glob("result-*.json")]
    return sorted(found, key=lambda r: (str(r["rank"]), r["pid"]))


def writes(logs: Path) -> list[dict]:
    """Every output folder moved into place and every run_info.json written, by any process."""
    return [json.loads(line) for path in sorted(logs.glob("writes-*.jsonl")) for line in path.read_text().splitlines()]


def once_per_run(output: Path) -> Counter:
    """A vector folder once per run, run_info.json twice (at the start and, last, when it finished)."""
    counts = Counter()
    for name in NAMES:
        counts[("folder", str(output / name / "vector"))] += 1
        counts[("json", str(output / name / "run_info.json"))] += 2
    return counts


def snapshot(folder: Path) -> dict[str, tuple[int, int, int]]:
    """Every file and folder under `folder` with its inode, size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def explain(completed: subprocess.CompletedProcess) -> str:
    return f"exit status {completed.returncode}; output:\n{completed.stdout[-3000:]}\n{completed.stderr[-6000:]}"


# ============================================================================================ acceptance 2


@pytest.mark.slow
def test_a_launch_trains_each_run_once_as_one_group_and_a_second_launch_reuses_it(world, tmp_path):
    output, first, second = tmp_path / "runs", tmp_path / "first", tmp_path / "second"
    launched = accelerate_launch(world, output, first)
    assert launched.returncode == 0, explain(launched)
    reports = results(first)
    assert [r["rank"] for r in reports] == ["0", "1"], explain(launched)
    for rank, report in enumerate(reports):
        assert report["vectors"] == list(NAMES)
        assert report["runs"] == {name: {"steps": 2, "world_size": 2, "process_index": rank} for name in NAMES}
    # each vector folder and run_info.json written by the main process only, each vector once
    made = writes(first)
    assert {w["rank"] for w in made} == {"0"}
    assert Counter((w["kind"], w["path"]) for w in made) == once_per_run(output)
    assert sorted(p.name for p in output.iterdir()) == sorted(NAMES)  # no lock, temporary or retrain leftovers
    for name in NAMES:
        assert sorted(p.name for p in (output / name).iterdir()) == ["model", "run_info.json", "vector"]
        info = json.loads((output / name / "run_info.json").read_text())
        assert info["finished"] is True
        assert info["compute"]["world_size"] == 2 and info["sft_config"]["world_size"] == 2
        assert info["sft_config"]["total_train_batch_size"] == 8
        # the vector is the trained model minus the base, exactly
        vector = DistributionVector.from_pretrained(output / name / "vector")
        expected = DistributionVector.from_models(world / "base", output / name / "model", name=name)
        for key in expected.tensors.keys():
            torch.testing.assert_close(vector.tensors.get(key), expected.tensors.get(key), rtol=0, atol=0)

    # the oracle for one process group: with 4 rows per process and step, two processes take the same full-batch
    # gradient steps as one process with all 8 rows (every row has 13 tokens, so the mean losses agree). The gradients
    # agree up to summation order, which Adam turns into up to ~1e-4 of a step on coordinates whose gradient is near
    # zero (seen: 4.7e-6 at lr 2e-2), so the tolerance is 1e-3 of the learning rate, far below one Adam step (about the
    # learning rate per coordinate).
    settings = launched_settings(tmp_path / "single", per_device_train_batch_size=8)
    single = train_distributions(world / "base", {"plain": str(world / "data" / "plain.jsonl")}, settings)[0]
    launched_vector = DistributionVector.from_pretrained(output / "plain" / "vector")
    for key in single.tensors.keys():
        torch.testing.assert_close(launched_vector.tensors.get(key), single.tensors.get(key), rtol=1e-4,
                                   atol=1e-3 * settings.learning_rate)

    before = snapshot(output)
    relaunched = accelerate_launch(world, output, second)
    assert relaunched.returncode == 0, explain(relaunched)
    assert [(r["rank"], r["vectors"], r["runs"]) for r in results(second)] == [("0", list(NAMES), {}), ("1", list(NAMES), {})]
    assert writes(second) == []  # nothing retrained, nothing rewritten
    assert snapshot(output) == before


@pytest.mark.slow
def test_a_launch_whose_processes_form_no_group_is_refused_before_training(world, tmp_path):
    """Without use_cpu on a machine without GPU, Accelerate leaves the launched processes alone (world size 1 each):
    both would train every run into the same folder. Both are refused before anything is written."""
    if torch.cuda.is_available():
        pytest.skip("on a GPU machine the launch forms an NCCL group")
    output, logs = tmp_path / "runs", tmp_path / "logs"
    launched = accelerate_launch(world, output, logs, "--no-cpu")
    assert launched.returncode != 0, explain(launched)
    reports = results(logs)
    assert len(reports) == 2, explain(launched)
    for report in reports:
        assert report["runs"] == {} and "vectors" not in report
        assert report["error"].startswith("ValueError: This process is one of 2 processes started by a launcher "
                                          "(WORLD_SIZE=2), but its trainer runs alone (world size 1)")
        assert "pass SFTConfig(use_cpu=True)" in report["error"]
    assert writes(logs) == []
    assert not output.exists()


@pytest.mark.slow
def test_independent_processes_sharing_an_output_folder_train_each_run_once(world, tmp_path):
    """Two plain `python` processes started at once on one output folder: the first to lock the runs trains them
    (it waits after its first step until the other has ended, so they overlap for sure); the other is refused
    before it trains or writes anything."""
    output, logs, hold = tmp_path / "runs", tmp_path / "logs", tmp_path / "hold"
    command = [sys.executable, *script_arguments(world, output, logs, "--hold-file", str(hold))]
    processes = [subprocess.Popen(command, env=child_environment(logs), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True) for _ in range(2)]
    try:
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        while all(p.poll() is None for p in processes) and time.monotonic() < deadline:
            time.sleep(0.2)
        hold.touch()  # the first one has ended: let the other finish
        outputs = [p.communicate(timeout=LAUNCH_TIMEOUT)[0] for p in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    codes = sorted(p.returncode for p in processes)
    assert codes == [0, 1], "\n".join(o[-4000:] for o in outputs)
    reports = {r["pid"]: r for r in results(logs)}
    refused = reports[next(p.pid for p in processes if p.returncode == 1)]
    trained = reports[next(p.pid for p in processes if p.returncode == 0)]
    assert refused["runs"] == {}
    assert refused["error"].startswith(
        f"OutputInUseError: Run 'plain' in {str(output)!r} is being trained by another process right now")
    assert "did not form one process group" in refused["error"] and "accelerate launch" in refused["error"]
    assert trained["vectors"] == list(NAMES)
    assert trained["runs"] == {name: {"steps": 2, "world_size": 1, "process_index": 0} for name in NAMES}
    made = writes(logs)
    assert Counter((w["kind"], w["path"]) for w in made) == once_per_run(output)
    assert sorted(p.name for p in output.iterdir()) == sorted(NAMES)


# ============================================================================================ in this process


def test_check_process_group_refuses_a_launch_that_formed_no_group(monkeypatch):
    alone = SimpleNamespace(world_size=1, use_cpu=False, device=torch.device("cpu"))
    for variable in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(variable, raising=False)
    check_process_group(alone, "runs")  # no launcher: one process, nothing to check
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_process_group(alone, "runs")
    monkeypatch.setenv("WORLD_SIZE", "2")
    check_process_group(SimpleNamespace(world_size=2, use_cpu=True, device=torch.device("cpu")), "runs")  # one group
    with pytest.raises(ValueError) as refused:
        check_process_group(alone, "runs")
    assert str(refused.value) == (
        "This process is one of 2 processes started by a launcher (WORLD_SIZE=2), but its trainer runs alone (world "
        "size 1): the processes formed no process group, so each one would train every run into the same output "
        "folder 'runs'. On a machine without a GPU, Accelerate forms a CPU (gloo) group only when asked: pass "
        "SFTConfig(use_cpu=True) (dem-hf train --use_cpu, or ACCELERATE_USE_CPU=1 in the environment). Otherwise "
        "start one process (plain `python`), or give each process its own output_dir."
    )
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")  # an MPI launch
    with pytest.raises(ValueError, match=r"one of 4 processes started by a launcher \(OMPI_COMM_WORLD_SIZE=4\)"):
        check_process_group(SimpleNamespace(world_size=1, use_cpu=False, device=torch.device("cuda")), "runs")


def test_a_run_folder_held_by_another_call_is_refused_before_training(world, tmp_path, monkeypatch):
    """The lock the main process holds while it trains: another call on the same run fails at once, nothing trained,
    nothing written; the runs not held stay free, and the locks go when the holder ends."""
    trained = []
    monkeypatch.setattr(Trainer, "train", lambda self, *args, **kwargs: trained.append(self.args.run_name))
    output = tmp_path / "runs"
    config = SFTConfig(output_dir=str(output), use_cpu=True, report_to="none", save_strategy="no", max_steps=1)
    datasets = {name: str(world / "data" / f"{name}.jsonl") for name in NAMES}
    with hold_run_folders([output / "other"], main_process=True):
        with pytest.raises(OutputInUseError, match=r"Run 'other' in .* is being trained by another process right now"):
            train_distributions(world / "base", datasets, config, output_dir=output)
        assert sorted(p.name for p in output.iterdir()) == [".other.lock"]  # 'plain' was neither opened nor locked
        with hold_run_folders([output / "plain"], main_process=False):  # a process that is not the main one
            assert sorted(p.name for p in output.iterdir()) == [".other.lock"]
    assert trained == [] and list(output.iterdir()) == []


def test_a_mixture_run_held_by_another_call_is_refused_before_training(world, tmp_path, monkeypatch):
    trained = []
    monkeypatch.setattr(Trainer, "train", lambda self, *args, **kwargs: trained.append(self.args.run_name))
    output = tmp_path / "mixtures"
    config = SFTConfig(output_dir=str(output), use_cpu=True, report_to="none", save_strategy="no", max_steps=1)
    datasets = {name: str(world / "data" / f"{name}.jsonl") for name in NAMES}
    with hold_run_folders([output / "half"], main_process=True):
        with pytest.raises(OutputInUseError, match=r"Run 'half' in .* is being trained by another process right now"):
            train_mixture(world / "base", datasets, {"plain": 0.5, "other": 0.5}, config, output_dir=output, name="half")
    assert trained == [] and list(output.iterdir()) == []

"""The `dem-hf` command line: extract and merge end to end, and one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from dem_hf import DEMMerger
from dem_hf.commands.cli import main


def test_extract_then_merge_on_the_command_line(tmp_path, base_dir, finetuned_dirs, capsys):
    for name, folder in finetuned_dirs.items():
        assert main(["extract", "--base", str(base_dir), "--finetuned", str(folder), "--name", name,
                     "--output", str(tmp_path / "vec" / name)]) == 0
    args = ["merge", "--base", str(base_dir), "--output", str(tmp_path / "out")]
    for name, weight in [("math", 0.5), ("chat", 1.0), ("code", -0.25)]:
        args += ["--vector", f"{tmp_path / 'vec' / name}={weight}"]
    assert main(args) == 0
    assert "math=0.5" in capsys.readouterr().out
    config = json.loads((tmp_path / "out" / "dem_config.json").read_text())
    assert config["coefficients"] == {"math": 0.5, "chat": 1.0, "code": -0.25}
    merger = DEMMerger.from_pretrained(tmp_path / "out")
    ids = torch.tensor([[2, 7, 9, 3]])
    with torch.no_grad():
        expected = merger.merge().forward(ids).logits
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").forward(ids).logits
    torch.testing.assert_close(loaded, expected, rtol=0, atol=0)


def test_cli_errors_are_one_line_without_traceback(tmp_path, base_dir, capsys):
    code = main(["merge", "--base", str(base_dir), "--vector", str(tmp_path / "missing") + "=1", "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "missing" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_cli_debug_shows_the_exception(tmp_path, base_dir):
    with pytest.raises(FileNotFoundError):
        main(["--debug", "merge", "--base", str(base_dir), "--vector", str(tmp_path / "missing"), "--output", str(tmp_path / "o")])


def test_cli_rejects_a_non_numeric_weight(tmp_path, base_dir, capsys):
    """A command line argparse refuses is one line too, status 2, with where to look."""
    assert main(["merge", "--base", str(base_dir), "--vector", "vec=heavy", "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "PATH=WEIGHT" in err and "see dem-hf merge --help" in err


def test_merge_command_imports_neither_torch_nor_the_hub_client(tmp_path, base_dir, finetuned_dirs):
    """`dem-hf merge` of saved full vectors into a local base starts fast: only the chosen subcommand's module (and
    what it needs) is imported, the streaming merge works on NumPy arrays, so not even torch (about 2 s of start-up)
    loads, and the card is rendered without `huggingface_hub.ModelCard`, so neither does the Hub client (`hf_api`,
    `file_download`, `repocard` and the HTTP library they pull in: about 0.4 s), which only Hub ids and pushes need."""
    import subprocess
    import sys

    # the HTTP library huggingface_hub uses (httpx, or a fork of it under another name)
    from huggingface_hub.utils import httpx

    assert main(["extract", "--base", str(base_dir), "--finetuned", str(finetuned_dirs["math"]), "--name", "math",
                 "--output", str(tmp_path / "vec")]) == 0
    absent = (
        "torch", "trl", "peft", "transformers", "dem_hf.training.trainers", "dem_hf.search.run",
        "huggingface_hub.hf_api", "huggingface_hub.file_download", "huggingface_hub.repocard", "httpx", httpx.__name__,
    )
    code = (
        "import sys; from dem_hf.commands.cli import main; "
        f"code = main(['merge', '--base', {str(base_dir)!r}, '--vector', {str(tmp_path / 'vec')!r} + '=0.5', "
        f"'--output', {str(tmp_path / 'out')!r}]); "
        f"print(code, sorted(m for m in {absent!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "0 []"
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    expected = DEMMerger.from_pretrained(tmp_path / "out").merge()
    assert all(torch.equal(a, b) for a, b in zip(merged.state_dict().values(), expected.state_dict().values()))


def test_unexpected_errors_are_one_line_with_a_hint_unless_debug(tmp_path, base_dir, finetuned_dirs, monkeypatch, capsys):
    """An exception no documented class covers (a bug, a library's own error type) is still one line, exit status 1,
    with a hint to rerun with --debug; --debug shows the traceback."""
    from dem_hf.vectors import vector as vectors

    def broken(*args, **kwargs):
        raise RuntimeError("something\nunexpected")

    monkeypatch.setattr(vectors.DistributionVector, "from_models", broken)
    argv = ["extract", "--base", str(base_dir), "--finetuned", str(finetuned_dirs["math"]), "--name", "m",
            "--output", str(tmp_path / "v")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err == "dem-hf extract: failed: RuntimeError: something unexpected (rerun with --debug for the traceback)\n"
    with pytest.raises(RuntimeError):
        main(["--debug", *argv])


def test_python_dash_m_dem_hf_runs_the_command_line():
    """`python -m dem_hf` is `dem-hf` (what the demo script and `accelerate launch -m dem_hf` use)."""
    import subprocess
    import sys

    from dem_hf import __version__

    out = subprocess.run([sys.executable, "-m", "dem_hf", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"dem_hf {__version__}"

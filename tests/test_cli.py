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


# ============================================================== configs on the command line (HfArgumentParser)

from transformers import HfArgumentParser  # noqa: E402

from dem_hf.commands import HELP  # noqa: E402
from dem_hf.commands.cli import build_parser  # noqa: E402
from dem_hf.commands.options import add_config_options, config_from_args  # noqa: E402
from dem_hf.demo.pipeline import DemoConfig  # noqa: E402
from dem_hf.merging.config import DEMConfig  # noqa: E402
from dem_hf.search.config import SearchConfig  # noqa: E402

# Every field a command line can set, and the config the same values give from Python. DEMConfig's `vectors`,
# `search_result` and `dem_hf_version` are records a merge writes, not settings: they keep their defaults.
CONFIG_COMMAND_LINES = {
    "DEMConfig": (
        DEMConfig,
        ["--base_model_name_or_path", "org/base", "--base_revision", "abc123", "--weighting", "average",
         "--coefficients", "math=0.7", "chat=0.5", "--max_shard_size", "1GB"],
        DEMConfig(base_model_name_or_path="org/base", base_revision="abc123", weighting="average",
                  coefficients={"math": 0.7, "chat": 0.5}, max_shard_size="1GB"),
    ),
    "SearchConfig, one value for all": (
        SearchConfig,
        ["--strategy", "bayesian", "--objective", "max", "--metric", "log_perplexity", "--allow_extra_eval_sets",
         "--bounds", "-0.5", "1.5", "--grid_values", "0", "0.5", "1", "--grid_points", "3", "--n_trials", "7",
         "--bayesian_sampler", "tpe", "--initial_coefficients", "math=0.5,chat=1", "--gradient_optimizer", "adam",
         "--gradient_steps", "4", "--gradient_lr", "0.05", "--gradient_tolerance", "1e-3", "--seed", "3",
         "--batch_size", "2", "--max_length", "64", "--lora_mode", "update", "--cache_deltas", "false",
         "--device", "cpu"],
        SearchConfig(strategy="bayesian", objective="max", metric="log_perplexity", allow_extra_eval_sets=True,
                     bounds=(-0.5, 1.5), grid_values=[0, 0.5, 1], grid_points=3, n_trials=7, bayesian_sampler="tpe",
                     initial_coefficients={"math": 0.5, "chat": 1}, gradient_optimizer="adam", gradient_steps=4,
                     gradient_lr=0.05, gradient_tolerance=1e-3, seed=3, batch_size=2, max_length=64,
                     lora_mode="update", cache_deltas=False, device="cpu"),
    ),
    "SearchConfig, per vector": (
        SearchConfig,
        ["--objective", "weighted_mean", "--objective_weights", "math=2", "chat=1",
         "--bounds", "math=0,1", "chat=-1,2", "--grid_values", '{"math": [0, 1], "chat": [0.5]}',
         "--initial_coefficients", '{"math": 0.25}'],
        SearchConfig(objective="weighted_mean", objective_weights={"math": 2, "chat": 1},
                     bounds={"math": (0, 1), "chat": (-1, 2)}, grid_values={"math": [0, 1], "chat": [0.5]},
                     initial_coefficients={"math": 0.25}),
    ),
    "DEMConfig, a merge operator and per-group coefficients": (
        DEMConfig,
        ["--merge_method", "dare_linear", "--density", "0.4", "--seed", "7",
         "--coefficients", '{"math": {"layer.0": 0.5, "head": 1.5}, "chat": 0.25}'],
        DEMConfig(merge_method="dare_linear", density=0.4, seed=7,
                  coefficients={"math": {"layer.0": 0.5, "head": 1.5}, "chat": 0.25}),
    ),
    "SearchConfig, per group and density": (
        SearchConfig,
        ["--strategy", "gradient", "--granularity", "module", "--layer_regularization", "0.01", "--holdout_fraction",
         "0.5", "--gradient_batch_sequences", "4", "--early_stopping_patience", "2"],
        SearchConfig(strategy="gradient", granularity="module", layer_regularization=0.01, holdout_fraction=0.5,
                     gradient_batch_sequences=4, early_stopping_patience=2),
    ),
    "SearchConfig, density search": (
        SearchConfig,
        ["--strategy", "random", "--search_density", "true", "--density_bounds", "0.2", "0.8"],
        SearchConfig(strategy="random", search_density=True, density_bounds=(0.2, 0.8)),
    ),
    "DemoConfig": (
        DemoConfig,
        ["--output_dir", "out", "--cache_dir", "cache", "--distributions", "math", "chat", "--n_train", "10",
         "--n_val", "4", "--n_test", "5", "--max_steps", "3", "--batch_size", "2", "--learning_rate", "1e-3",
         "--max_length", "64", "--lora_r", "4", "--lora_alpha", "8", "--strategy", "gradient", "--n_trials", "2",
         "--metric", "perplexity", "--bounds", "0", "1", "--eval_batch_size", "2", "--seed", "1",
         "--lr_scheduler_type", "cosine", "--warmup_ratio", "0.1", "--finetuning", "full",
         "--group_batch_sequences", "4"],
        DemoConfig(output_dir="out", cache_dir="cache", distributions=["math", "chat"], n_train=10, n_val=4, n_test=5,
                   max_steps=3, batch_size=2, learning_rate=1e-3, max_length=64, lora_r=4, lora_alpha=8,
                   strategy="gradient", n_trials=2, metric="perplexity", bounds=[0.0, 1.0], eval_batch_size=2, seed=1,
                   lr_scheduler_type="cosine", warmup_ratio=0.1, finetuning="full", group_batch_sequences=4),
    ),
}


@pytest.mark.parametrize("case", list(CONFIG_COMMAND_LINES))
def test_every_config_parses_with_hf_argument_parser(case):
    config_class, argv, expected = CONFIG_COMMAND_LINES[case]
    (parsed,) = HfArgumentParser(config_class).parse_args_into_dataclasses(argv, look_for_args_file=False)
    assert parsed == expected
    (defaults,) = HfArgumentParser(config_class).parse_args_into_dataclasses([], look_for_args_file=False)
    assert defaults == config_class()


@pytest.mark.parametrize("case", list(CONFIG_COMMAND_LINES))
def test_dem_hf_options_parse_as_hf_argument_parser_does(case):
    """dem-hf's own builder (which must not import transformers) against HfArgumentParser, the oracle; with the
    dashed spelling of every flag too."""
    import argparse

    config_class, argv, expected = CONFIG_COMMAND_LINES[case]
    parser = argparse.ArgumentParser()
    add_config_options(parser, config_class)
    assert config_from_args(config_class, parser.parse_args(argv)) == expected
    dashed = [word.replace("_", "-") if word.startswith("--") else word for word in argv]
    assert config_from_args(config_class, parser.parse_args(dashed)) == expected
    assert config_from_args(config_class, parser.parse_args([])) == config_class()


@pytest.mark.parametrize(
    "field, words, message",
    [
        ("bounds", ["low", "high"], "bounds: expected numbers, NAME=NUMBER"),
        ("bounds", ["math=0,1", "math=0,2"], "name 'math' twice"),
        ("objective_weights", ["2", "1"], "expected NAME=NUMBER pairs"),
        ("initial_coefficients", ["math=0,1"], "one number per name"),
        ("grid_values", ['{"math": [0, 1]'], "expected a JSON object"),
    ],
)
def test_bad_command_line_values_are_value_errors_naming_the_field(field, words, message):
    extra = {"objective": "weighted_mean"} if field == "objective_weights" else {}
    with pytest.raises(ValueError, match=message):
        SearchConfig(**{field: words}, **extra)


SEARCH = ["search", "--base", "b", "--vector", "v/math", "--eval", "math=m.jsonl"]


def test_underscores_and_dashes_parse_to_the_same_configs():
    from dem_hf.commands.search import search_config_from_args

    underscores = [*SEARCH, "--grid_points", "3", "--n_trials", "4", "--allow_extra_eval_sets", "--result_json", "r.json",
                   "--objective", "weighted_mean", "--objective_weights", "math=1", "--weighting", "average"]
    dashes = [*SEARCH, "--grid-points", "3", "--n-trials", "4", "--allow-extra-eval-sets", "--result-json", "r.json",
              "--objective", "weighted_mean", "--objective-weight", "math=1", "--weighting", "average"]
    parsed = [build_parser(argv).parse_args(argv) for argv in (underscores, dashes)]
    assert search_config_from_args(parsed[0]) == search_config_from_args(parsed[1])
    assert search_config_from_args(parsed[0]).grid_points == 3 and parsed[1].result_json == "r.json"
    assert parsed[0].weighting == parsed[1].weighting == "average"

    merge = ["merge", "--base", "b", "--vector", "v=1", "--output", "o"]
    a = build_parser(merge).parse_args([*merge, "--max_shard_size", "1GB", "--save_vectors", "false"])
    b = build_parser(merge).parse_args([*merge, "--max-shard-size", "1GB", "--no-save-vectors"])
    assert (a.max_shard_size, a.save_vectors) == (b.max_shard_size, b.save_vectors) == ("1GB", False)


def test_repeated_objective_weights_add_up_as_in_dem_hf_0_1():
    from dem_hf.commands.search import search_config_from_args

    argv = [*SEARCH, "--objective", "weighted_mean", "--objective-weight", "math=2", "--objective-weight", "chat=1"]
    assert search_config_from_args(build_parser(argv).parse_args(argv)).objective_weights == {"math": 2.0, "chat": 1.0}


CHOICES = {
    "search": ["{bayesian,gradient,grid,random}", "{mean,weighted_mean,max}", "{sum,average}", "{auto,adapter,update}",
               "{perplexity,log_perplexity,relative_perplexity}", "{gp,tpe}", "{lbfgs,adam}"],
    "merge": ["{sum,average}"],
    "ablate": ["{mean,weighted_mean,max}", "{perplexity,log_perplexity,relative_perplexity}"],
    "demo": ["{bayesian,gradient,grid,random}", "{perplexity,log_perplexity,relative_perplexity}"],
}


@pytest.mark.parametrize("command", list(HELP))
def test_every_subcommand_help_says_what_it_does_and_lists_choices(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"`dem-hf {command}`:" in text  # the description: the subcommand's docs, with an example
    assert f"dem-hf {command} --" in text or command == "card"
    assert "option_strings" not in text  # a help text's stray `%` makes argparse format its own dict into the help
    for choices in CHOICES.get(command, []):
        assert choices in text.replace(" ", ""), choices
    with pytest.raises(SystemExit):
        main(["--help"])
    assert HELP[command] in " ".join(capsys.readouterr().out.split())


def test_an_invalid_choice_is_one_line_with_the_choices(capsys):
    assert main([*SEARCH, "--metric", "accuracy"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid choice: 'accuracy'" in err and "log_perplexity" in err


TRAIN = ["train", "--base", "b", "--dataset", "x=data.csv", "--output_dir", "runs"]


def test_train_takes_trl_model_config_lora_options():
    """`--use_peft --lora_r ...` give the LoraConfig TRL's own parsing gives (HfArgumentParser(ModelConfig) and
    trl.get_peft_config, the oracle); dem_hf 0.1's `--lora-r`/`--target-modules` give the same."""
    from trl import ModelConfig, get_peft_config

    from dem_hf.commands.train import lora_config_from_args

    lora = ["--use_peft", "--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0.1",
            "--lora_target_modules", "q_proj", "v_proj", "--use_rslora"]
    (model_config,) = HfArgumentParser(ModelConfig).parse_args_into_dataclasses(lora, look_for_args_file=False)
    expected = get_peft_config(model_config).to_dict()
    argv = [*TRAIN, *lora]
    assert lora_config_from_args(build_parser(argv).parse_args(argv)).to_dict() == expected
    old = [*TRAIN, "--lora-r", "8", "--lora-alpha", "16", "--lora-dropout", "0.1", "--target-modules", "q_proj",
           "v_proj", "--use-rslora"]
    assert lora_config_from_args(build_parser(old).parse_args(old)).to_dict() == expected

    one = [*TRAIN, "--lora_r", "4", "--lora_target_modules", "q_proj"]  # implies --use_peft; one module is a name
    config = lora_config_from_args(build_parser(one).parse_args(one))
    assert config.r == 4 and config.lora_alpha == ModelConfig.lora_alpha and config.target_modules == {"q_proj"}
    assert lora_config_from_args(build_parser(TRAIN).parse_args(TRAIN)) is None  # no LoRA option: full fine-tunes


def test_train_refuses_lora_options_with_use_peft_false():
    from dem_hf.commands.train import lora_config_from_args

    argv = [*TRAIN, "--use_peft", "false", "--lora_r", "4"]
    with pytest.raises(ValueError, match="use_peft false"):
        lora_config_from_args(build_parser(argv).parse_args(argv))


def test_train_help_lists_its_own_options_first(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    options = out[out.index("\noptions:"):]  # after the description
    assert options.index("--dataset NAME=PATH") < options.index("--use_peft") < options.index("--learning_rate")
    assert "--target-modules" in out and "--lora-r" in out


def test_merge_command_applies_a_merge_operator(tmp_path, base_dir, finetuned_dirs):
    """`dem-hf merge --merge_method ties --density 0.5` writes the model DEMMerger writes with that DEMConfig."""
    vectors = []
    for name in ("math", "chat"):
        assert main(["extract", "--base", str(base_dir), "--finetuned", str(finetuned_dirs[name]), "--name", name,
                     "--output", str(tmp_path / name)]) == 0
        vectors += ["--vector", f"{tmp_path / name}=0.7"]
    assert main(["merge", "--base", str(base_dir), *vectors, "--merge_method", "ties", "--density", "0.5",
                 "--output", str(tmp_path / "cli")]) == 0
    merged = DEMMerger.from_pretrained(tmp_path / "cli")
    assert (merged.config.merge_method, merged.config.density) == ("ties", 0.5)
    expected = DEMMerger.from_pretrained(
        base_dir, vectors=[tmp_path / "math", tmp_path / "chat"], config=DEMConfig(merge_method="ties", density=0.5)
    ).merge({"math": 0.7, "chat": 0.7})
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "cli")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), expected.state_dict().values()))

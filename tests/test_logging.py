"""dem_hf's logging rule: Transformers' verbosity governs dem_hf's messages, `dem_hf.logging` can override it, and
progress bars follow `disable_progress_bar` (dem_hf's, else Transformers').

The messages are real ones: the INFO line `atomic_directory` logs when it removes what a killed run left beside its
target (it is on the torch-free merge path, so the subprocess tests need neither torch nor transformers).
"""

from __future__ import annotations

import logging as std_logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import transformers

from dem_hf import logging

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def restore_verbosity():
    """Each test starts with dem_hf following Transformers, Transformers at WARNING, progress bars as configured."""
    before = transformers.logging.get_verbosity()
    logging.set_verbosity(None)
    transformers.logging.set_verbosity_warning()
    yield
    logging.set_verbosity(None)
    logging.reset_progress_bar()
    transformers.logging.enable_progress_bar()
    transformers.logging.set_verbosity(before)


def log_a_real_info_message(tmp_path: Path) -> str:
    """Leave what a killed run leaves beside an output, write the output, return dem_hf's INFO line's text."""
    from dem_hf.io.outputs import atomic_directory

    leftover = tmp_path / ".out.tmp-abcd1234"
    leftover.mkdir(parents=True)
    with atomic_directory(tmp_path / "out") as staging:
        (staging / "file.txt").write_text("x")
    assert not leftover.exists()
    return "left by a killed run"


def test_transformers_set_verbosity_info_shows_dem_hf_info_messages(tmp_path, capsys):
    message = log_a_real_info_message(tmp_path / "a")
    assert message not in capsys.readouterr().err  # WARNING, Transformers' default: hidden

    transformers.logging.set_verbosity_info()
    assert logging.get_verbosity() == std_logging.INFO
    log_a_real_info_message(tmp_path / "b")
    lines = [line for line in capsys.readouterr().err.splitlines() if message in line]
    assert len(lines) == 1 and lines[0].startswith("[dem_hf] Removed ")  # once: through dem_hf's own handler

    transformers.logging.set_verbosity_error()
    log_a_real_info_message(tmp_path / "c")
    assert message not in capsys.readouterr().err


def test_dem_hf_set_verbosity_overrides_transformers_until_reset(tmp_path, capsys):
    message = "left by a killed run"
    logging.set_verbosity_info()
    log_a_real_info_message(tmp_path / "a")
    assert message in capsys.readouterr().err
    assert transformers.logging.get_verbosity() == std_logging.WARNING  # Transformers' own level is untouched

    transformers.logging.set_verbosity_debug()
    logging.set_verbosity_error()  # dem_hf's choice wins over Transformers'
    assert logging.get_verbosity() == std_logging.ERROR
    log_a_real_info_message(tmp_path / "b")
    assert message not in capsys.readouterr().err

    logging.set_verbosity(None)  # follow Transformers (DEBUG) again
    assert logging.get_verbosity() == std_logging.DEBUG
    log_a_real_info_message(tmp_path / "c")
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "setter, level",
    [
        (logging.set_verbosity_debug, std_logging.DEBUG),
        (logging.set_verbosity_info, std_logging.INFO),
        (logging.set_verbosity_warning, std_logging.WARNING),
        (logging.set_verbosity_error, std_logging.ERROR),
    ],
)
def test_set_verbosity_functions(setter, level):
    setter()
    assert logging.get_verbosity() == level
    assert logging.get_logger("dem_hf.training.trainers").getEffectiveLevel() == level
    assert logging.get_logger().name == "dem_hf"


@pytest.mark.parametrize("bad", ["info", 1.5, True])
def test_set_verbosity_refuses_what_is_not_a_level(bad):
    with pytest.raises(ValueError, match="expected a logging level"):
        logging.set_verbosity(bad)


def test_warning_once(capsys):
    logger = logging.get_logger("dem_hf.test_logging")
    for _ in range(3):
        logging.warning_once(logger, "said once")
    assert capsys.readouterr().err.count("said once") == 1


def run_python(code: str, **environment: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in ("TRANSFORMERS_VERBOSITY", "CI")}
    env.update(environment, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, check=True)


INFO_IN_A_FRESH_PROCESS = """
    import sys, tempfile
    from pathlib import Path
    from dem_hf.io.outputs import atomic_directory

    folder = Path(tempfile.mkdtemp())
    (folder / ".out.tmp-abcd1234").mkdir()
    with atomic_directory(folder / "out") as staging:
        pass
    print(sorted(m for m in ("torch", "transformers") if m in sys.modules))
"""


@pytest.mark.parametrize("verbosity, shown", [("info", True), ("debug", True), ("warning", False), ("error", False), (None, False)])
def test_transformers_verbosity_variable_governs_dem_hf_without_importing_transformers(verbosity, shown):
    environment = {} if verbosity is None else {"TRANSFORMERS_VERBOSITY": verbosity}
    result = run_python(INFO_IN_A_FRESH_PROCESS, **environment)
    assert result.stdout.strip() == "[]"  # neither torch nor transformers was imported to find the level
    assert ("[dem_hf] Removed " in result.stderr) is shown, result.stderr


def test_transformers_verbosity_variable_applies_once_transformers_is_imported():
    """Transformers configures its root logger from the variable on first use; dem_hf keeps following it after."""
    code = """
        import logging as std, transformers
        from dem_hf import logging
        before = logging.get_verbosity()
        transformers.logging.get_logger("transformers.x")  # Transformers configures its root logger now
        after_configure = logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        print(before == std.INFO, after_configure == std.INFO, logging.get_verbosity() == std.ERROR)
    """
    assert run_python(code, TRANSFORMERS_VERBOSITY="info").stdout.strip() == "True True True"


def test_an_unknown_transformers_verbosity_warns_and_keeps_the_default():
    result = run_python("from dem_hf import logging; import logging as std; print(logging.get_verbosity() == std.WARNING)",
                        TRANSFORMERS_VERBOSITY="loud")
    assert result.stdout.strip() == "True" and "Unknown option TRANSFORMERS_VERBOSITY=loud" in result.stderr


def test_dem_hf_messages_do_not_reach_the_root_logger_by_default():
    """As Transformers' do not: no doubled lines for a user who configured the root logger (unless CI is set)."""
    code = """
        import logging as std
        std.basicConfig(format="ROOT %(message)s")
        from dem_hf import logging
        logging.set_verbosity_info()
        logging.get_logger("dem_hf.x").info("hello")
        logging.enable_propagation()
        logging.get_logger("dem_hf.x").info("again")
    """
    result = run_python(code)
    assert result.stderr.splitlines() == ["[dem_hf] hello", "[dem_hf] again", "ROOT again"]


# ---------------------------------------------------------------------------------------------- progress bars


def bar_output(capsys, show_progress=None) -> str:
    """What a real dem_hf progress bar (compute_perplexity's, on a tiny model) writes to stderr."""
    from dem_hf.evaluation.perplexity import compute_perplexity

    from .conftest import make_llama, make_tokenizer

    capsys.readouterr()
    compute_perplexity(make_llama(), ["w1 w2 w3", "w4 w5"], make_tokenizer(), batch_size=1, show_progress=show_progress)
    return capsys.readouterr().err


def test_progress_bars_respect_dem_hf_disable_progress_bar(capsys):
    logging.enable_progress_bar()
    assert "Perplexity" in bar_output(capsys)
    logging.disable_progress_bar()
    assert not logging.is_progress_bar_enabled()
    assert bar_output(capsys) == ""
    assert "Perplexity" in bar_output(capsys, show_progress=True)  # an explicit argument still wins


def test_progress_bars_follow_transformers_unless_dem_hf_chose(capsys):
    transformers.logging.disable_progress_bar()
    assert not logging.is_progress_bar_enabled()
    assert bar_output(capsys) == ""
    logging.enable_progress_bar()  # dem_hf's own choice wins
    assert "Perplexity" in bar_output(capsys)
    logging.reset_progress_bar()
    transformers.logging.enable_progress_bar()
    assert logging.is_progress_bar_enabled() is not bool(os.getenv("HF_HUB_DISABLE_PROGRESS_BARS"))


def test_tqdm_is_a_real_bar_or_disabled():
    logging.disable_progress_bar()
    with logging.tqdm(total=3) as bar:
        bar.update(3)
    assert bar.disable
    assert list(logging.tqdm(range(3))) == [0, 1, 2]

"""dem_hf's logging and progress bars, used the way `transformers.utils.logging` is used for Transformers.

    >>> from dem_hf import logging
    >>> logger = logging.get_logger(__name__)   # in a dem_hf module
    >>> logging.set_verbosity_info()            # a user: show dem_hf's INFO messages

The rule: dem_hf's messages follow Transformers' verbosity, so `transformers.logging.set_verbosity_info()` or
`TRANSFORMERS_VERBOSITY=info` shows dem_hf's INFO messages (which training run is reused or resumed, ...) as well
as Transformers', with no stdlib configuration; `dem_hf.logging.set_verbosity_*` sets dem_hf's own level instead,
and `set_verbosity(None)` follows Transformers again. The messages go to `sys.stderr` as `[dem_hf] message` through
dem_hf's own handler, and, as Transformers' do, do not propagate to the root logger unless `enable_propagation()`
is called (or the variable `CI` is set).

This module never imports transformers (or torch): `dem-hf merge` of saved vectors must start without them.
Transformers' verbosity is the level of its library root logger, `logging.getLogger("transformers")`, which
`transformers.logging.set_verbosity` sets and which transformers configures from `TRANSFORMERS_VERBOSITY` on first
use; until then this module reads `TRANSFORMERS_VERBOSITY` itself, as transformers would. It is looked up at every
message (a stand-in parent logger above `dem_hf` whose level is Transformers'), so a later change applies at once.

Progress bars (`tqdm`) are shown unless `disable_progress_bar()` was called here, or, without a choice made here,
unless `transformers.logging.disable_progress_bar()` or `huggingface_hub`'s `HF_HUB_DISABLE_PROGRESS_BARS` /
`disable_progress_bars()` turned them off.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import threading
from logging import CRITICAL, DEBUG, ERROR, INFO, NOTSET, WARNING  # noqa: F401  (re-exported, as transformers does)
from typing import Any

LIBRARY_NAME = "dem_hf"
TRANSFORMERS_LOGGER_NAME = "transformers"
# The values TRANSFORMERS_VERBOSITY takes (transformers.utils.logging.log_levels).
LOG_LEVELS = {"detail": DEBUG, "debug": DEBUG, "info": INFO, "warning": WARNING, "error": ERROR, "critical": CRITICAL}
DEFAULT_LEVEL = WARNING

_lock = threading.Lock()
_default_handler: logging.Handler | None = None
_progress_bars: bool | None = None  # None: follow Transformers and huggingface_hub


class _StderrHandler(logging.StreamHandler):
    """Writes to `sys.stderr` as it is at each message (test runners and notebooks replace it)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _environment_level() -> int:
    """`TRANSFORMERS_VERBOSITY` as transformers reads it (an unknown value warns and falls back to WARNING)."""
    value = os.getenv("TRANSFORMERS_VERBOSITY")
    if value and value not in LOG_LEVELS:
        logging.getLogger().warning(
            f"Unknown option TRANSFORMERS_VERBOSITY={value}, has to be one of: {', '.join(LOG_LEVELS)}"
        )
    return LOG_LEVELS.get(value or "", DEFAULT_LEVEL)


class _TransformersVerbosity(logging.Logger):
    """The parent of the `dem_hf` logger: no handlers, and as its level Transformers' verbosity.

    The `dem_hf` logger has no level of its own until `set_verbosity` gives it one, so the stdlib takes the
    effective level of every `dem_hf.*` logger from here: the level of Transformers' library root logger once it has
    one, else `TRANSFORMERS_VERBOSITY`. Setting any logger's level clears the stdlib's cached answers, so
    `transformers.logging.set_verbosity_*` applies at once.
    """

    def __init__(self, environment_level: int) -> None:
        super().__init__(f"{LIBRARY_NAME}.<transformers verbosity>")
        self.environment_level = environment_level
        self.parent = logging.getLogger()  # records that propagate reach the root logger's handlers

    @property
    def level(self) -> int:
        transformers_logger = logging.Logger.manager.loggerDict.get(TRANSFORMERS_LOGGER_NAME)
        if isinstance(transformers_logger, logging.Logger) and transformers_logger.level != NOTSET:
            return transformers_logger.level
        return self.environment_level

    @level.setter
    def level(self, value: int) -> None:  # set by logging.Logger.__init__; the level is Transformers'
        pass


def _configure_library_root_logger() -> None:
    global _default_handler

    with _lock:
        if _default_handler is not None:
            return
        _default_handler = _StderrHandler()
        detail = os.getenv("TRANSFORMERS_VERBOSITY") == "detail"
        _default_handler.setFormatter(logging.Formatter(
            "%(levelname)s [%(name)s:%(lineno)s] %(asctime)s %(message)s" if detail else f"[{LIBRARY_NAME}] %(message)s"
        ))
        root = logging.getLogger(LIBRARY_NAME)
        root.parent = _TransformersVerbosity(_environment_level())
        root.addHandler(_default_handler)
        ci = os.getenv("CI")
        root.propagate = ci is not None and ci.upper() in {"1", "ON", "YES", "TRUE"}
        root.setLevel(root.level)  # clears the levels that loggers made before this cached


def _get_library_root_logger() -> logging.Logger:
    _configure_library_root_logger()
    return logging.getLogger(LIBRARY_NAME)


def get_logger(name: str | None = None) -> logging.Logger:
    """The logger `name` (a `dem_hf.*` module name), under dem_hf's settings; without a name, dem_hf's root logger.

    Example:
        ```python
        >>> from dem_hf import logging
        >>> logger = logging.get_logger(__name__)
        ```
    """
    root = _get_library_root_logger()
    return root if name is None else logging.getLogger(name)


def get_verbosity() -> int:
    """dem_hf's effective level (`logging.INFO`, ...): its own if `set_verbosity` chose one, else Transformers'."""
    return _get_library_root_logger().getEffectiveLevel()


def set_verbosity(verbosity: int | None) -> None:
    """Set dem_hf's level (`logging.DEBUG` ... `logging.CRITICAL`); `None` follows Transformers' verbosity again.

    Example:
        ```python
        >>> import logging as std_logging
        >>> from dem_hf import logging
        >>> logging.set_verbosity(std_logging.INFO)
        >>> logging.get_verbosity() == std_logging.INFO
        True
        ```
    """
    if verbosity is not None and (isinstance(verbosity, bool) or not isinstance(verbosity, int)):
        raise ValueError(f"verbosity: expected a logging level such as logging.INFO (an int) or None, got {verbosity!r}.")
    _get_library_root_logger().setLevel(NOTSET if verbosity is None else verbosity)


def set_verbosity_info() -> None:
    """Show dem_hf's INFO messages and above."""
    set_verbosity(INFO)


def set_verbosity_warning() -> None:
    """Show dem_hf's warnings and errors only."""
    set_verbosity(WARNING)


def set_verbosity_debug() -> None:
    """Show all of dem_hf's messages."""
    set_verbosity(DEBUG)


def set_verbosity_error() -> None:
    """Show dem_hf's errors only."""
    set_verbosity(ERROR)


def disable_default_handler() -> None:
    """Stop writing dem_hf's messages to `sys.stderr` (for a handler of your own, or with `enable_propagation`)."""
    _get_library_root_logger().removeHandler(_default_handler)


def enable_default_handler() -> None:
    """Write dem_hf's messages to `sys.stderr` again."""
    _get_library_root_logger().addHandler(_default_handler)


def enable_propagation() -> None:
    """Pass dem_hf's messages on to the root logger's handlers too (disable the default handler to avoid doubles)."""
    _get_library_root_logger().propagate = True


def disable_propagation() -> None:
    """Keep dem_hf's messages from the root logger's handlers (the default)."""
    _get_library_root_logger().propagate = False


@functools.lru_cache(None)
def warning_once(logger: logging.Logger, message: str) -> None:
    """`logger.warning(message)` the first time this message is logged by this logger, and never again."""
    logger.warning(message)


def is_progress_bar_enabled() -> bool:
    """Whether dem_hf shows tqdm bars: its own choice if made, else what Transformers and huggingface_hub say."""
    if _progress_bars is not None:
        return _progress_bars
    transformers_logging = sys.modules.get("transformers.utils.logging")
    if transformers_logging is not None and not transformers_logging.is_progress_bar_enabled():
        return False
    return not _hub_progress_bars_disabled()


def _hub_progress_bars_disabled() -> bool:
    hub_tqdm = sys.modules.get("huggingface_hub.utils.tqdm")
    if hub_tqdm is not None:
        return bool(hub_tqdm.are_progress_bars_disabled())
    value = os.getenv("HF_HUB_DISABLE_PROGRESS_BARS", "")  # huggingface_hub's variable, read as it reads it
    return value.upper() in {"1", "ON", "YES", "TRUE"}


def enable_progress_bar() -> None:
    """Show dem_hf's progress bars (whatever Transformers' setting)."""
    global _progress_bars
    _progress_bars = True


def disable_progress_bar() -> None:
    """Hide dem_hf's progress bars (whatever Transformers' setting)."""
    global _progress_bars
    _progress_bars = False


def reset_progress_bar() -> None:
    """Follow Transformers' and huggingface_hub's progress-bar settings again (the default)."""
    global _progress_bars
    _progress_bars = None


def tqdm(*args: Any, **kwargs: Any):
    """`tqdm.auto.tqdm(*args, **kwargs)`; without a `disable` argument, disabled when progress bars are off (see
    `is_progress_bar_enabled`)."""
    from tqdm.auto import tqdm as tqdm_class

    if kwargs.get("disable") is None:
        kwargs["disable"] = not is_progress_bar_enabled()
    return tqdm_class(*args, **kwargs)

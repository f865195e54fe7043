"""Public names imported on first use (PEP 562), so that importing a package costs only what is used.

`dem-hf merge` imports `dem_hf.merging` without torch or transformers; `from dem_hf import DEMMerger` need not
import TRL. Every package of dem_hf declares its public names with [`lazy_exports`].
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` for `package`, importing `exports[name]` (a submodule) when `name` is first used.

    Example:
        ```python
        >>> __getattr__, __dir__ = lazy_exports(__name__, {"DEMMerger": "merger"})  # in a package's __init__.py
        ```
    """
    module = importlib.import_module(package)

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
        setattr(module, name, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(module), *exports})

    return __getattr__, __dir__

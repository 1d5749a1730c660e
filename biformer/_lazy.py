"""Package attributes loaded on first use, so ``biformer COMMAND --help`` never imports torch."""
from __future__ import annotations

import importlib
import sys
from typing import Any, Callable, Dict


def lazy_exports(package: str, where: Dict[str, str]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` for ``package``: ``name`` comes from the submodule
    ``where[name]``, imported on first access and then cached on the package."""

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{where[name]}"), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__

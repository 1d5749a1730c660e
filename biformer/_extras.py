"""Optional dependencies: ``require("matplotlib", extra="viz")`` imports a module that only an extra
installs, and names the extra when it is absent, so the core install stays small."""
from __future__ import annotations

import importlib
from types import ModuleType

from .errors import UserError


class MissingExtraError(UserError, ImportError):
    """An optional dependency is not installed; the message names the pip command that installs it."""


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` (dotted names work), or raise :class:`MissingExtraError` naming ``extra``."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        missing = getattr(e, "name", None) or ""
        if missing and missing.split(".")[0] != top:
            raise  # the module is there but one of its own imports is broken: keep the traceback
        raise MissingExtraError(
            f"{module} is not installed; it comes with the {extra!r} extra: pip install \"biformer[{extra}]\""
        ) from None

"""Moved to :mod:`biformer.ops.backends.flex`; this name stays importable (it is the same module)."""
import sys

from .backends import flex as _flex

sys.modules[__name__] = _flex

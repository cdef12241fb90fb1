"""The method registry: every method the package ships, by class name.

``@register_method`` on a :class:`~selfsup.methods.base.Method` subclass makes it known to
:func:`available_methods` and :func:`get_method`, and therefore to everything derived from the registry: the test
suite's smoke, DDP-gradient, spectrum and teacher tests, and ``selfsup recipes``. A recipe names a registered method
by its class name (``class_path: MMCR``) and any other method by its import path (``class_path:
mypkg.methods.MyMethod``); an unregistered class works everywhere except in those derived lists.
"""

from __future__ import annotations

import importlib
from typing import TypeVar

__all__ = ["available_methods", "get_method", "register_method"]

_METHODS: dict[str, type] = {}
M = TypeVar("M", bound=type)


def register_method(cls: M) -> M:
    """Class decorator: register ``cls`` under its class name (a second class of the same name is an error)."""
    from selfsup.methods.base import Method

    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"register_method expects a Method subclass, got {cls!r}")
    name = cls.__name__
    known = _METHODS.get(name)
    if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"a method named '{name}' is already registered ({known.__module__}.{known.__qualname__})")
    _METHODS[name] = cls
    return cls


def available_methods() -> list[str]:
    """The registered method names, sorted."""
    import selfsup.methods  # noqa: F401  (importing the package registers its methods)

    return sorted(_METHODS)


def get_method(name: str) -> type:
    """A method class by registered name (``MMCR``) or import path (``mypkg.methods.MyMethod``)."""
    known = {n: _METHODS[n] for n in available_methods()}
    if name in known:
        return known[name]
    module, _, attr = name.rpartition(".")
    if not module:
        raise ValueError(f"unknown method '{name}'; registered: {', '.join(known)} (or give an import path)")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import method '{name}': {e}") from e
    from selfsup.methods.base import Method

    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise ValueError(f"'{name}' is not a selfsup Method subclass")
    return cls

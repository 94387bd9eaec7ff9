"""Deprecation shims: old names and argument positions keep working for one release, with a warning.

Every shim emits a ``DeprecationWarning`` that names the old spelling and the new one, and is removed
in the release after the one that introduced it.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def warn_deprecated(old: str, new: str, *, stacklevel: int = 3) -> None:
    """Emit the one-release ``DeprecationWarning`` for ``old`` in favour of ``new``.

    Args:
        old: the deprecated spelling, as the caller wrote it.
        new: what to write instead.
        stacklevel: passed to ``warnings.warn`` (3 points at the caller of the deprecated function).
    """
    warnings.warn(f"{old} is deprecated and will be removed in the next release; use {new}", DeprecationWarning,
                  stacklevel=stacklevel)


def keyword_only(old_positional: Sequence[str] = (), renamed: Mapping[str, str] | None = None,
                 values: Mapping[str, Mapping[Any, Any]] | None = None) -> Callable[[F], F]:
    """Decorate a function whose options became keyword-only (and some renamed), accepting the old calls.

    Positional arguments beyond the new signature's positional ones are mapped, in order, to
    ``old_positional`` (the names the old signature had at those positions, in the new spelling);
    keywords in ``renamed`` (old -> new) are translated; ``values`` translates old values of an
    argument (``{"backend": {"autodiff": "autodiff", ...}}``). Each translation warns once per call.

    Args:
        old_positional: new names of the arguments the old signature took positionally after the
            ones still positional.
        renamed: old keyword -> new keyword.
        values: per (new) argument name, old value -> new value.

    Returns:
        The decorator.
    """
    renamed = dict(renamed or {})
    values = {k: dict(v) for k, v in (values or {}).items()}

    def decorate(fn: F) -> F:
        sig = inspect.signature(fn)
        positional = [p.name for p in sig.parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            name = fn.__name__
            if len(args) > len(positional):
                extra = args[len(positional):]
                if len(extra) > len(old_positional):
                    raise TypeError(f"{name}() takes {len(positional)} positional arguments but {len(args)} were "
                                    f"given; pass the options by keyword")
                moved = list(old_positional[:len(extra)])
                warn_deprecated(f"passing {', '.join(moved)} to {name}() by position",
                                f"keywords ({', '.join(f'{m}=...' for m in moved)})")
                for k, v in zip(moved, extra, strict=True):
                    if k in kwargs:
                        raise TypeError(f"{name}() got multiple values for argument {k!r}")
                    kwargs[k] = v
                args = args[:len(positional)]
            for old, new in renamed.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{name}() got both {old}= (deprecated) and {new}=; pass only {new}=")
                    warn_deprecated(f"{name}({old}=...)", f"{new}=...")
                    kwargs[new] = kwargs.pop(old)
            for arg, table in values.items():
                v = kwargs.get(arg)
                if isinstance(v, str) and v in table and table[v] != v:
                    warn_deprecated(f"{name}({arg}={v!r})", f"{arg}={table[v]!r}")
                    kwargs[arg] = table[v]
            return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate

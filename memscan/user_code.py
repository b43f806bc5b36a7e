"""``py:module:attribute`` specs: user code named on the command line (generators, noise
predictors, train and likelihood functions)."""

from __future__ import annotations

import importlib
import importlib.util
import secrets
import sys
from pathlib import Path
from typing import Any

from memscan.errors import InputError, UserCodeError, first_line


def import_object(spec: str, what: str = "a function, a factory or an object") -> Any:
    """The object a ``py:module:attribute`` spec names; ``module`` may be a ``.py`` file path.

    ``what`` says, in the error for a missing attribute, what the spec should name.
    """
    body = spec[3:] if spec.startswith("py:") else spec
    if ":" not in body:
        raise InputError(f"{spec!r} must be py:module:attribute", "e.g. py:mypkg.models:sample or py:./my.py:sample")
    module_name, attr = body.rsplit(":", 1)
    try:
        if module_name.endswith(".py"):
            file = Path(module_name).resolve()
            if not file.is_file():
                raise InputError(f"file {module_name} named by {spec!r} does not exist", "give an existing .py path")
            mod_spec = importlib.util.spec_from_file_location(f"memscan_user_{file.stem}", file)
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[mod_spec.name] = module
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except InputError:
        raise
    except ImportError as exc:
        raise InputError(
            f"cannot import {module_name!r} for {spec!r}: {exc}", "check PYTHONPATH or give a .py file path"
        ) from None
    except Exception as exc:  # a syntax error, or module code that raises on import
        raise UserCodeError(
            f"importing {module_name!r} for {spec!r} failed: {first_line(exc)}", "fix the module, then rerun"
        ) from exc
    obj = getattr(module, attr, None)
    if obj is None:
        raise InputError(f"{module_name} has no attribute {attr!r}", f"name {what}")
    return obj


def callable_name(fn: Any) -> str:
    """A name for ``fn`` that is the same in every process, when there is one: ``module:qualname``
    for a function or class that this name imports back to (the very same object). Other
    callables — a closure, a lambda, a bound method, a ``functools.partial``, an instance — cannot
    be known to be the same from a name (two closures of one factory share it, whatever they
    captured; even their memory address is reused once one is freed), so they get a name no
    other call gets: their ``repr``, a note and a random token. A run identified by it is never
    taken for another invocation's (its rerun is refused, saying why). Spec strings
    (``py:module:attr``) are returned as given.

    Examples
    --------
    >>> import math
    >>> callable_name(math.sqrt)
    'math:sqrt'
    >>> f = lambda x: x
    >>> callable_name(f).startswith("<function <lambda> at 0x"), callable_name(f) == callable_name(f)
    (True, False)
    """
    if isinstance(fn, str):
        return fn
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if isinstance(module, str) and isinstance(qualname, str) and "<" not in qualname:
        obj: Any = sys.modules.get(module)  # the module is loaded: nothing is imported here
        for part in qualname.split("."):
            obj = getattr(obj, part, None)
        if obj is fn:
            return f"{module}:{qualname}"
    return (
        f"{fn!r} (no name to find it by again: pass a module-level function or a py:module:attr spec "
        f"to rerun or resume; #{secrets.token_hex(4)})"
    )

"""``py:module:attribute`` specs: user code named on the command line (generators, noise
predictors, train and likelihood functions)."""

from __future__ import annotations

import importlib
import importlib.util
import re
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
    """A name for ``fn`` that is the same in every process: ``module:qualname`` for a function or
    class, otherwise its ``repr`` without memory addresses (``<... at 0x7f…>``), which change from
    one process to the next. Spec strings (``py:module:attr``) are returned as given.

    Examples
    --------
    >>> import math
    >>> callable_name(math.sqrt)
    'math:sqrt'
    >>> import functools
    >>> callable_name(functools.partial(math.pow, 2.0))
    'functools.partial(<built-in function pow>, 2.0)'
    """
    if isinstance(fn, str):
        return fn
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if isinstance(module, str) and isinstance(qualname, str):
        return f"{module}:{qualname}"
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(fn))

"""What every runner shares: shard tasks, results, the worker-pool protocol, generator specs.

The runner registry (:func:`memscan.runners.make_pool`) lives in the package, beside the runners.

A *stage* is a plain function over one shard of work. A runner builds a *pool* of workers; each
worker calls a ``setup`` function once (load the model, open the run store) and keeps what it
returns as its context; then the pool maps ``stage(context, *task.args)`` over the shards. The
local runner has one in-process worker; the Ray runner has one actor per worker. No stage knows
which runner called it::

    with make_pool("local", setup, setup_args) as pool:
        for done in pool.map(stage, [ShardTask(0, (a,)), ShardTask(1, (b,))]):
            commit(done.key, done.value)        # commits happen in the driver, once per shard

Examples
--------
>>> from memscan.runners import make_pool
>>> def setup(offset):
...     return {"offset": offset}
>>> def stage(ctx, x):
...     return x + ctx["offset"]
>>> with make_pool("local", setup, (10,)) as pool:
...     [(d.key, d.value) for d in pool.map(stage, [ShardTask(0, (1,)), ShardTask(1, (2,))])]
[(0, 11), (1, 12)]
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from memscan.errors import InputError
from memscan.generators.load import load_generator

#: The runners ``--runner`` accepts (:func:`memscan.runners.make_pool` builds their pools).
RUNNERS = ("local", "ray")


@dataclass(frozen=True)
class ShardTask:
    """One unit of work: ``stage(context, *args)``.

    Parameters
    ----------
    key : the shard's identity (its index); results come back under it
    args : positional arguments after the worker's context (a shared object from
        :meth:`WorkerPool.share` may be one of them)
    weight : units of progress the shard stands for (e.g. images), for progress bars
    """

    key: Any
    args: tuple = ()
    weight: int = 1


@dataclass
class ShardDone:
    """A finished shard: the stage's return value, which worker made it, on which attempt."""

    key: Any
    value: Any
    worker: str
    attempt: int = 1


class WorkerPool(Protocol):
    """Workers that each ran ``setup`` once and now run stage functions over shards."""

    name: str

    def __enter__(self) -> WorkerPool: ...  # pragma: no cover

    def __exit__(self, *exc) -> None: ...  # pragma: no cover

    def call(self, fn: Callable, *args) -> Any:
        """Run ``fn(context, *args)`` on one worker and return its value."""
        ...  # pragma: no cover

    def share(self, obj: Any) -> Any:
        """Make a large read-only object available to every worker (pass the result in args)."""
        ...  # pragma: no cover

    def map(
        self, fn: Callable, tasks: Iterable[ShardTask], progress: Callable[[int], None] | None = None
    ) -> Iterator[ShardDone]:
        """Run ``fn(context, *task.args)`` for every task; yield each result once, as it finishes."""
        ...  # pragma: no cover

    def describe(self) -> dict:
        """What to record in the run manifest about this runner."""
        ...  # pragma: no cover


def accepts_progress(fn: Callable) -> bool:
    """True when ``fn`` takes a ``progress`` keyword (the local runner then passes a callback)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "progress" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


@dataclass(frozen=True)
class GeneratorSpec:
    """A generator named by its ``--model`` spec and load options, loaded where it runs.

    Distributed workers load their own model from this (one load per worker) instead of receiving
    a model object. Relative file paths are made absolute, so a worker whose working directory
    differs finds the same files.

    Parameters
    ----------
    spec : what :func:`memscan.generators.load.load_generator` accepts (a diffusers directory,
        a hub id, ``py:module:attribute``, ``py:path/file.py:attribute``)
    options : keyword arguments for ``load_generator`` (``device``, ``batch_size``, …)

    Examples
    --------
    >>> GeneratorSpec("py:gen.py:make").normalized().spec.endswith("/gen.py:make")
    True
    >>> GeneratorSpec("org/model", {"device": "cuda"}).normalized().spec
    'org/model'
    """

    spec: str
    options: dict = field(default_factory=dict)

    @classmethod
    def of(cls, obj: str | GeneratorSpec) -> GeneratorSpec:
        if isinstance(obj, GeneratorSpec):
            return obj
        if isinstance(obj, str):
            return cls(obj)
        raise InputError(
            f"expected a --model spec string, got {type(obj).__name__}",
            "pass the spec (e.g. 'py:mypkg.gen:sample' or a model directory) so each worker loads its own model",
        )

    def normalized(self) -> GeneratorSpec:
        spec = self.spec
        if spec.startswith("py:") and ":" in spec[3:]:
            module, attr = spec[3:].rsplit(":", 1)
            if module.endswith(".py"):
                spec = f"py:{Path(module).expanduser().resolve()}:{attr}"
        elif not spec.startswith("py:") and Path(spec).expanduser().exists():
            spec = str(Path(spec).expanduser().resolve())
        return GeneratorSpec(spec, dict(self.options))

    def load(self):
        """Load the generator (``load_generator(spec, **options)``)."""
        return load_generator(self.spec, **self.options)

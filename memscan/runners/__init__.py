"""Runners: where the stage functions run.

- ``local`` (:class:`LocalPool`): one in-process worker, shards one after the other;
- ``ray`` (:class:`RayPool`, extra ``memscan[ray]``): a pool of Ray actors, one model load each,
  on one machine or a cluster, with retries when a worker dies.

Both map the very same stage function over the same shards and commit in the driver, so a run
started with one runner can be resumed with the other. See ``docs/scale.md``.
"""

from collections.abc import Callable

from memscan.errors import InputError
from memscan.runners.base import RUNNERS, GeneratorSpec, ShardDone, ShardTask, WorkerPool
from memscan.runners.local import LocalPool
from memscan.runners.ray_runner import INSTALL_HINT, RayOptions, RayPool, map_shards, require_ray


def make_pool(runner: str, setup: Callable, setup_args: tuple = (), options=None, log=None) -> WorkerPool:
    """A worker pool of the named runner (``"local"`` or ``"ray"``).

    Parameters
    ----------
    runner : ``"local"`` (one in-process worker) or ``"ray"`` (an actor pool; needs ``memscan[ray]``)
    setup : called once per worker with ``setup_args``; its value is the worker's context. For
        ``"ray"`` it must be picklable (a module-level function).
    options : :class:`memscan.runners.ray_runner.RayOptions` (or a dict of its fields) for ``"ray"``
    log : ``log(message)`` for worker starts, deaths and retries (e.g. ``RunStore.log``)
    """
    if runner == "local":
        if options:
            raise InputError(
                f"runner options {options!r} apply to the Ray runner only", "pass --runner ray, or drop them"
            )
        return LocalPool(setup, setup_args, log=log)
    if runner == "ray":
        opts = options if isinstance(options, RayOptions) else RayOptions(**(options or {}))
        return RayPool(setup, setup_args, opts, log=log)
    raise InputError(f"unknown runner {runner!r}", f"use one of {', '.join(RUNNERS)}")


__all__ = [
    "INSTALL_HINT",
    "RUNNERS",
    "GeneratorSpec",
    "LocalPool",
    "RayOptions",
    "RayPool",
    "ShardDone",
    "ShardTask",
    "WorkerPool",
    "make_pool",
    "map_shards",
    "require_ray",
]

"""Runners: where the stage functions run.

- ``local`` (:class:`LocalPool`): one in-process worker, shards one after the other;
- ``ray`` (:class:`RayPool`, extra ``memscan[ray]``): a pool of Ray actors, one model load each,
  on one machine or a cluster, with retries when a worker dies.

Both map the very same stage function over the same shards and commit in the driver, so a run
started with one runner can be resumed with the other. See ``docs/scale.md``.
"""

from memscan.runners.base import RUNNERS, GeneratorSpec, ShardDone, ShardTask, WorkerPool, make_pool
from memscan.runners.local import LocalPool
from memscan.runners.ray_runner import INSTALL_HINT, RayOptions, RayPool, map_shards, require_ray

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

"""The local runner: one in-process worker that runs the shards one after the other."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from memscan.runners.base import ShardDone, ShardTask, accepts_progress


class LocalPool:
    """A pool of one worker: this process.

    ``setup(*setup_args)`` runs when the pool is entered; ``map`` then runs the stage over the
    shards in the order given. A stage that takes a ``progress`` keyword gets the progress
    callback (so bars move inside a shard); an exception in a stage propagates unchanged.

    Examples
    --------
    >>> from memscan.runners.base import ShardTask
    >>> with LocalPool(lambda: 2) as pool:
    ...     [d.value for d in pool.map(lambda k, x: k * x, [ShardTask(0, (3,)), ShardTask(1, (4,))])]
    [6, 8]
    """

    name = "local"

    def __init__(self, setup: Callable, setup_args: tuple = (), log: Callable[[str], None] | None = None):
        self.setup = setup
        self.setup_args = tuple(setup_args)
        self.log = log or (lambda message: None)
        self.context: Any = None
        self._ready = False
        self.worker = f"local:{socket.gethostname()}:{os.getpid()}"

    def __enter__(self) -> LocalPool:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        if not self._ready:
            self.context = self.setup(*self.setup_args)
            self._ready = True

    def close(self) -> None:
        self.context, self._ready = None, False

    def call(self, fn: Callable, *args) -> Any:
        self.start()
        return fn(self.context, *args)

    def share(self, obj: Any) -> Any:
        return obj

    def map(
        self, fn: Callable, tasks: Iterable[ShardTask], progress: Callable[[int], None] | None = None
    ) -> Iterator[ShardDone]:
        self.start()
        kwargs = {"progress": progress} if progress is not None and accepts_progress(fn) else {}
        for task in tasks:
            value = fn(self.context, *task.args, **kwargs)
            if progress is not None and not kwargs:
                progress(task.weight)
            yield ShardDone(task.key, value, self.worker, 1)

    def describe(self) -> dict:
        return {"name": "local", "workers": 1, "worker": self.worker}

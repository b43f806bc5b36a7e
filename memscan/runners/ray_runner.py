"""The Ray runner: the same stage functions over the same shards, on a pool of Ray actors.

Each worker is one Ray actor that calls ``setup`` once (one model load per worker, on the GPUs
Ray assigned to it with ``num_gpus``) and then runs shards one at a time. The driver (the process
that called :func:`memscan.extract`) hands a shard only to an idle worker, so at most one shard
per worker is in flight and only the per-shard results (small tables) travel back through the
object store; the generations stay inside the worker that made them.

Exactly-once results: workers never commit. The driver receives each shard's result, commits it
(``RunStore.commit_shard``: tables written to temporary names and renamed, then the completion
record) and yields it once. A shard is handed out again only after its previous attempt has
failed, so two attempts can never both deliver; a duplicate delivery would be dropped anyway.

Failures:

- a worker that dies (process killed, node lost, Ray's memory monitor) fails the shard it held;
  the driver replaces the worker and hands the shard to the next free worker, up to
  ``max_attempts`` attempts per shard and ``max_worker_failures`` replacements per run;
- a :class:`memscan.errors.MemscanError` raised by the stage (bad input) is re-raised in the
  driver unchanged (message and hint), without retry: it would fail again;
- any other exception in the stage is a bug or a deterministic failure (CUDA out of memory): it is
  re-raised with the remote traceback, without retry;
- a driver that dies takes its actors with it (Ray kills the actors of a dead owner); the run
  directory then holds the committed shards and ``--resume`` finishes it with either runner.

:func:`map_shards` is the generic entry point for other stages (triage, membership-inference
losses): map a picklable stage function over shards with an actor pool and retries.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from memscan.errors import InputError, MemscanError, first_line
from memscan.runners.base import RUNNERS, ShardDone, ShardTask

#: Shown whenever Ray is needed but missing.
INSTALL_HINT = "install the extra: pip install 'memscan[ray]' (or pip install ray)"


def require_ray():
    """Import Ray, or raise an :class:`InputError` that says how to install it."""
    try:
        import ray
    except ImportError:
        raise InputError("the Ray runner needs Ray, which is not installed", INSTALL_HINT) from None
    return ray


@dataclass
class RayOptions:
    """How the Ray runner places its workers.

    Parameters
    ----------
    address : an existing cluster (``auto``, ``HOST:6379``, ``ray://HOST:10001``); ``None`` starts a
        local Ray in this process (stopped again at the end), unless this process is already
        connected to one, which is then used
    num_workers : actors (one model load each); ``None``: as many as the cluster's GPUs (or CPUs,
        when ``gpus_per_worker`` is 0) allow
    gpus_per_worker : GPUs each actor asks Ray for (fractions share a GPU); Ray sets
        ``CUDA_VISIBLE_DEVICES`` so the actor sees only its own
    cpus_per_worker : CPUs each actor asks for
    max_attempts : attempts per shard before the run fails (a shard that kills every worker it
        lands on is a bug to report, not to retry forever)
    max_worker_failures : worker replacements per run; ``None``: ``2 × num_workers + max_attempts``
    start_timeout_s : fail when no worker has started after this long (a cluster without the
        resources a worker asks for would otherwise wait forever)
    env : environment variables for the workers (Ray ``runtime_env``), e.g. ``PYTHONPATH``, ``HF_HOME``
    num_cpus, num_gpus : resources of a local Ray started here (default: what the machine has)
    include_dashboard : start the dashboard with a local Ray
    """

    address: str | None = None
    num_workers: int | None = None
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    max_attempts: int = 3
    max_worker_failures: int | None = None
    start_timeout_s: float = 600.0
    env: dict[str, str] = field(default_factory=dict)
    num_cpus: int | None = None
    num_gpus: int | None = None
    include_dashboard: bool = False

    @classmethod
    def from_cli(
        cls,
        runner: str,
        *,
        address: str | None = None,
        num_workers: int | None = None,
        gpus_per_worker: float | None = None,
        device: str = "cpu",
    ) -> RayOptions | None:
        """Options of ``--runner ray`` from the command line (``None`` for the local runner).

        ``gpus_per_worker`` defaults to 1 when ``device`` is CUDA, else 0. Ray options with the
        local runner are an error rather than silently ignored.

        Examples
        --------
        >>> RayOptions.from_cli("ray", num_workers=2, device="cuda").gpus_per_worker
        1.0
        >>> RayOptions.from_cli("local") is None
        True
        """
        if runner not in RUNNERS:
            raise InputError(f"unknown runner {runner!r}", f"use one of {', '.join(RUNNERS)}")
        if runner != "ray":
            given = [
                name
                for name, v in (
                    ("--ray-address", address),
                    ("--num-workers", num_workers),
                    ("--gpus-per-worker", gpus_per_worker),
                )
                if v is not None
            ]
            if given:
                verb = "apply" if len(given) > 1 else "applies"
                raise InputError(f"{', '.join(given)} {verb} to --runner ray only", "add --runner ray, or drop them")
            return None
        if gpus_per_worker is None:
            gpus_per_worker = 1.0 if str(device).startswith("cuda") else 0.0
        return cls(address=address, num_workers=num_workers, gpus_per_worker=float(gpus_per_worker)).validate()

    def validate(self) -> RayOptions:
        if self.num_workers is not None and self.num_workers < 1:
            raise InputError(f"num_workers={self.num_workers}", "use at least 1 worker")
        if self.gpus_per_worker < 0 or self.cpus_per_worker < 0:
            raise InputError(
                f"gpus_per_worker={self.gpus_per_worker}, cpus_per_worker={self.cpus_per_worker}",
                "resources per worker cannot be negative",
            )
        if self.max_attempts < 1:
            raise InputError(f"max_attempts={self.max_attempts}", "use at least 1")
        return self


@dataclass
class _UserFailure:
    """A MemscanError raised in a worker, carried back as data (message and hint intact)."""

    module: str
    cls: str
    message: str
    hint: str | None
    where: str
    trace: str

    @classmethod
    def of(cls, exc: MemscanError, where: str) -> _UserFailure:
        return cls(type(exc).__module__, type(exc).__qualname__, exc.message, exc.hint, where, traceback.format_exc())

    def to_error(self) -> MemscanError:
        import importlib

        try:
            klass = getattr(importlib.import_module(self.module), self.cls)
            return klass(self.message, self.hint)
        except Exception:  # a subclass with another constructor: keep the message and hint
            return MemscanError(self.message, self.hint)


class StageWorker:
    """The actor: runs ``setup`` once, then stage functions on its context.

    User errors (``MemscanError``) are returned as :class:`_UserFailure` rather than raised, so
    they reach the driver with their class, message and hint.
    """

    def __init__(self, setup: Callable, *setup_args):
        self.ident = f"{socket.gethostname()}:{os.getpid()}"
        self.failure: _UserFailure | None = None
        self.context = None
        try:
            self.context = setup(*setup_args)
        except MemscanError as exc:
            self.failure = _UserFailure.of(exc, self.ident)

    def ready(self):
        if self.failure is not None:
            return self.failure
        return {"worker": self.ident, "pid": os.getpid(), "host": socket.gethostname()}

    def pid(self) -> int:
        return os.getpid()

    def run(self, fn: Callable, *args):
        if self.failure is not None:
            return self.failure
        try:
            return fn(self.context, *args)
        except MemscanError as exc:
            return _UserFailure.of(exc, self.ident)


@dataclass
class _Worker:
    index: int
    handle: Any
    ident: str = "starting"
    ready: bool = False

    @property
    def name(self) -> str:
        return f"ray:w{self.index}@{self.ident}"


class RayPool:
    """A pool of Ray actors running stage functions over shards (see the module docstring).

    Parameters
    ----------
    setup : picklable function, called once in each actor with ``setup_args``; its value is the
        worker's context (top-level ``ray.ObjectRef`` arguments arrive resolved)
    setup_args : arguments of ``setup``
    options : :class:`RayOptions`
    log : ``log(message)`` for starts, deaths and retries (e.g. ``RunStore.log``)
    """

    name = "ray"

    def __init__(
        self,
        setup: Callable,
        setup_args: tuple = (),
        options: RayOptions | None = None,
        log: Callable[[str], None] | None = None,
    ):
        self.ray = require_ray()
        self.options = (options or RayOptions()).validate()
        self.setup = setup
        self.setup_args = tuple(setup_args)
        self.log = log or (lambda message: None)
        self.workers: list[_Worker] = []
        self.started_ray = False
        self.failures = 0
        self.n_workers = 0
        self._actor_class = None
        self._next_index = 0
        self._starting: dict[Any, _Worker] = {}  # ready() ObjectRef → worker

    # ---- lifecycle ------------------------------------------------------------------------
    def __enter__(self) -> RayPool:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        if self.workers:
            return
        ray, opts = self.ray, self.options
        # 1. connect to the cluster (or start a local Ray)
        if not ray.is_initialized():
            if opts.address:
                try:
                    ray.init(address=opts.address, logging_level=logging.WARNING)
                except (ConnectionError, ValueError, RuntimeError) as exc:
                    raise InputError(
                        f"cannot connect to the Ray cluster at {opts.address!r}: {str(exc).splitlines()[0]}",
                        "check --ray-address (e.g. auto, HOST:6379 or ray://HOST:10001) and that the cluster runs",
                    ) from None
            else:
                ray.init(
                    num_cpus=opts.num_cpus,
                    num_gpus=opts.num_gpus,
                    include_dashboard=opts.include_dashboard,
                    logging_level=logging.WARNING,
                )
                self.started_ray = True
        # 2. size the pool from the cluster's resources
        res = ray.cluster_resources()
        cpus, gpus = float(res.get("CPU", 0)), float(res.get("GPU", 0))
        if opts.gpus_per_worker > gpus or opts.cpus_per_worker > cpus:
            msg = (
                f"each Ray worker asks for {opts.gpus_per_worker:g} GPU and {opts.cpus_per_worker:g} CPU, "
                f"but the cluster has {gpus:g} GPU and {cpus:g} CPU"
            )
            if self.started_ray:
                self.close()
                raise InputError(msg, "lower --gpus-per-worker, or pass --ray-address of a cluster with GPUs")
            self.log(f"ray: {msg}; workers wait until the cluster grows (autoscaler)")
        if opts.num_workers is not None:
            n = opts.num_workers
        elif opts.gpus_per_worker > 0:
            n = max(1, int(gpus // opts.gpus_per_worker))
        else:
            n = max(1, int(cpus // max(opts.cpus_per_worker, 1e-9)))
        fit = min(
            int(gpus // opts.gpus_per_worker) if opts.gpus_per_worker > 0 else n,
            int(cpus // opts.cpus_per_worker) if opts.cpus_per_worker > 0 else n,
        )
        if fit < n:
            self.log(f"ray: only {fit} of {n} workers fit the cluster's resources now; the rest wait for resources")
        self.n_workers = n
        if opts.max_worker_failures is None:
            self.max_worker_failures = 2 * n + opts.max_attempts
        else:
            self.max_worker_failures = opts.max_worker_failures
        # 3. start the actors; each loads its model in its constructor
        self._actor_class = ray.remote(StageWorker).options(
            num_cpus=opts.cpus_per_worker,
            num_gpus=opts.gpus_per_worker,
            max_restarts=0,
            max_task_retries=0,
            runtime_env={"env_vars": dict(opts.env)} if opts.env else None,
        )
        for _ in range(n):
            self._spawn()
        self.log(
            f"ray: {n} workers ({opts.cpus_per_worker:g} CPU, {opts.gpus_per_worker:g} GPU each) on a cluster "
            f"with {cpus:g} CPU, {gpus:g} GPU" + (" (local Ray started for this run)" if self.started_ray else "")
        )

    def _spawn(self) -> _Worker:
        w = _Worker(self._next_index, self._actor_class.remote(self.setup, *self.setup_args))
        self._next_index += 1
        self.workers.append(w)
        self._starting[w.handle.ready.remote()] = w
        return w

    def _retire(self, w: _Worker) -> None:
        try:
            self.ray.kill(w.handle, no_restart=True)
        except Exception:  # already gone
            pass
        if w in self.workers:
            self.workers.remove(w)
        for ref, s in list(self._starting.items()):
            if s is w:
                del self._starting[ref]

    def close(self) -> None:
        for w in list(self.workers):
            self._retire(w)
        self._starting.clear()
        if self.started_ray and self.ray.is_initialized():
            self.ray.shutdown()
        self.started_ray = False

    def describe(self) -> dict:
        return {
            "name": "ray",
            "ray": getattr(self.ray, "__version__", None),
            "address": self.options.address or ("local (started for this run)" if self.started_ray else "connected"),
            "workers": self.n_workers,
            "gpus_per_worker": self.options.gpus_per_worker,
            "cpus_per_worker": self.options.cpus_per_worker,
            "max_attempts": self.options.max_attempts,
        }

    # ---- work -----------------------------------------------------------------------------
    def share(self, obj: Any) -> Any:
        """Put ``obj`` in the object store once; pass the reference as a top-level task argument.

        Workers on one node read the same copy (numpy arrays zero-copy, read-only)."""
        return self.ray.put(obj)

    def call(self, fn: Callable, *args) -> Any:
        """Run ``fn(context, *args)`` on one worker (retried on another if that worker dies)."""
        done = list(self.map(fn, [ShardTask("call", tuple(args))]))
        return done[0].value

    def worker_pids(self) -> dict[str, int]:
        """Process id of every started worker (for tests and diagnostics)."""
        out = {}
        for w in self.workers:
            if w.ready:
                out[w.name] = self.ray.get(w.handle.pid.remote())
        return out

    def map(
        self, fn: Callable, tasks: Iterable[ShardTask], progress: Callable[[int], None] | None = None
    ) -> Iterator[ShardDone]:
        """Run ``fn(context, *task.args)`` for every task on the pool; yield results as they finish.

        At most one task per worker is in flight. A task whose worker dies goes back to the front
        of the queue and runs on the next free worker (a fresh worker replaces the dead one).
        """
        ray = self.ray
        from ray.exceptions import RayActorError, RayError, RayTaskError

        self.start()
        pending: deque[ShardTask] = deque(tasks)
        attempts: Counter = Counter()
        delivered: set = set()
        running: dict[Any, tuple[_Worker, ShardTask]] = {}
        idle: deque[_Worker] = deque(w for w in self.workers if w.ready)  # nothing is in flight between maps
        no_worker_since: float | None = None  # start of the current wait with no worker ready

        def fill() -> None:
            while pending and idle:
                w, task = idle.popleft(), pending.popleft()
                attempts[task.key] += 1
                running[w.handle.run.remote(fn, *task.args)] = (w, task)

        while pending or running:
            fill()
            refs = list(running) + list(self._starting)
            if not refs:
                raise MemscanError("no Ray worker is left to run the remaining shards", "see run.log")
            timeout = None
            if any(w.ready for w in self.workers):
                no_worker_since = None
            else:
                no_worker_since = no_worker_since or time.monotonic()
                timeout = max(0.1, self.options.start_timeout_s - (time.monotonic() - no_worker_since))
            ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
            if not ready:
                raise MemscanError(
                    f"no Ray worker started within {self.options.start_timeout_s:g} s",
                    "the cluster lacks the resources a worker asks for (--gpus-per-worker, CPUs), "
                    "or model loading hangs; check `ray status`",
                )
            ref = ready[0]
            # 1. a worker finished starting (its model is loaded)
            if ref in self._starting:
                w = self._starting.pop(ref)
                try:
                    info = ray.get(ref)
                except RayError as exc:
                    if isinstance(exc, RayActorError) and exc.actor_init_failed:
                        # one line in the message; the remote traceback goes to run.log
                        self.log(f"ray: worker {w.name} failed while loading:\n{_plain(str(exc))}")
                        raise MemscanError(
                            f"a Ray worker failed while loading: {_remote_error_line(exc)}",
                            "run.log has the worker's traceback",
                        ) from None
                    self._worker_died(w, exc, None)
                    continue
                if isinstance(info, _UserFailure):
                    raise info.to_error()
                w.ident, w.ready = info["worker"], True
                self.log(f"ray: worker {w.name} ready")
                idle.append(w)
                continue
            # 2. a shard finished, or its worker died
            w, task = running.pop(ref)
            try:
                value = ray.get(ref)
            except RayTaskError:
                raise  # a bug or a deterministic failure in the stage: the remote traceback says where
            except RayError as exc:  # the worker or its node died, its result was lost, OOM kill
                self._worker_died(w, exc, task)
                if attempts[task.key] >= self.options.max_attempts:
                    raise MemscanError(
                        f"shard {task.key} failed on {attempts[task.key]} workers (last: {first_line(exc)})",
                        "see run.log; a shard that kills every worker it lands on (memory?) needs a smaller "
                        "--shard-size or --batch-size",
                    ) from None
                pending.appendleft(task)
                continue
            if isinstance(value, _UserFailure):
                self.log(f"ray: shard {task.key} raised on {w.name}: {value.message}")
                raise value.to_error()
            idle.append(w)
            fill()  # keep the workers busy while the caller commits
            if task.key in delivered:  # cannot happen (one attempt in flight per shard); kept as a guard
                self.log(f"ray: duplicate result of shard {task.key} from {w.name} dropped")
                continue
            delivered.add(task.key)
            if progress is not None:
                progress(task.weight)
            yield ShardDone(task.key, value, w.name, attempts[task.key])

    def _worker_died(self, w: _Worker, exc: BaseException, task: ShardTask | None) -> None:
        self.failures += 1
        what = f"during shard {task.key}" if task is not None else "while starting"
        self.log(f"ray: worker {w.name} died {what}: {first_line(exc)}")
        self._retire(w)
        if self.failures > self.max_worker_failures:
            raise MemscanError(
                f"{self.failures} Ray workers died in this run (limit {self.max_worker_failures})",
                "see run.log for the causes (out of memory? preempted nodes?)",
            )
        replacement = self._spawn()
        self.log(f"ray: started worker w{replacement.index} to replace it" + (" and retry the shard" if task else ""))


def map_shards(
    setup: Callable,
    setup_args: tuple,
    stage: Callable,
    tasks: Iterable[ShardTask],
    options: RayOptions | None = None,
    *,
    log: Callable[[str], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> Iterator[ShardDone]:
    """Map a picklable stage over shards on a Ray actor pool, with retries; yield each result once.

    The generic helper for any stage (extraction, triage, membership-inference losses): every
    actor runs ``setup(*setup_args)`` once (e.g. load the model), then ``stage(context, *task.args)``
    per shard. Commit each result in the caller as it arrives (``RunStore.commit_shard``), so a
    killed driver loses only the shards in flight.

    Parameters
    ----------
    setup, setup_args : the worker's one-time setup (module-level function, picklable arguments)
    stage : module-level function ``stage(context, *args) -> small result``; raise
        :class:`memscan.errors.MemscanError` for bad input (re-raised in the caller, no retry)
    tasks : :class:`ShardTask` s (their ``key`` names them in results and logs)
    options : :class:`RayOptions`

    Examples
    --------
    Not run here (starts Ray)::

        from memscan.runners import RayOptions, ShardTask, map_shards

        for done in map_shards(load_model, (spec,), score_shard,
                               [ShardTask(i, (batch,)) for i, batch in enumerate(batches)],
                               RayOptions(num_workers=4, gpus_per_worker=1)):
            store.commit_shard(done.key, done.value, {"worker": done.worker})
    """
    with RayPool(setup, setup_args, options, log=log) as pool:
        yield from pool.map(stage, tasks, progress=progress)


# --------------------------------------------------------------------------------------------
# parts of a sharded index served by Ray actors, one per part
# --------------------------------------------------------------------------------------------
def _plain(text: str) -> str:
    """``text`` without terminal colour codes (Ray colours the remote task's name)."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _remote_error_line(exc: BaseException) -> str:
    """The line naming the exception a Ray worker raised (``Type: message``, after the remote
    traceback in Ray's text), else :func:`memscan.errors.first_line`."""
    lines = _plain(str(exc)).splitlines()
    frames = [i for i, line in enumerate(lines) if line.lstrip().startswith('File "')]
    if frames:
        for line in lines[frames[-1] + 1 :]:
            if line and not line[0].isspace():
                text = line.strip()
                return text if len(text) <= 300 else text[:299] + "…"
    return first_line(exc)


class IndexPartServer:
    """A Ray actor holding one part of an index built in shards, answering searches of it in
    global rows.

    ``opener(*args)`` returns ``(part, first_row)``; it runs where the actor runs (for a training
    index: :func:`memscan.index.faiss_index.open_index_part`, memory-mapped from a file system
    that node mounts), so no other part is read there.
    """

    def __init__(self, opener: Callable, args: tuple, threads: int = 1):
        self.part, self.offset = opener(*args)
        if threads:
            import faiss

            faiss.omp_set_num_threads(int(threads))

    def ntotal(self) -> int:
        return int(self.part.ntotal)

    def search(self, queries, k: int):
        import numpy as np

        sims, idx = self.part.search(queries, min(int(k), int(self.part.ntotal)))
        return sims, np.where(idx < 0, -1, idx + self.offset)


class RayIndexParts:
    """The parts of a sharded index, each searched by its own Ray actor; answers merged.

    Stands where :class:`memscan.index.faiss_index.IndexParts` stands (``TrainingIndex.index``):
    :meth:`search` sends the queries to every part's actor at once (one object in Ray's store)
    and merges their answers with ``merge(answers, k)``
    (:func:`memscan.index.faiss_index.merge_searches`), so the result is the unsharded index's.
    An index larger than one machine's memory is thus served by several machines, each holding
    only its parts. :func:`memscan.index.faiss_index.serve_index_on_ray` opens an index this way.

    Parameters
    ----------
    opener : ``opener(*args) → (part, first_row)``, run in each actor (picklable)
    part_args : the arguments of each part's opener, one tuple per part
    merge : ``merge(list of (similarities, rows), k) → (similarities, rows)``
    cpus_per_part : CPUs Ray reserves for each part's actor (and its search threads)
    address : a Ray cluster to connect to (None: the running one, or a local Ray)
    """

    def __init__(
        self,
        opener: Callable,
        part_args: list[tuple],
        merge: Callable,
        *,
        cpus_per_part: float = 1,
        address: str | None = None,
    ):
        ray = require_ray()
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
        self.ray, self.merge = ray, merge
        actor = ray.remote(IndexPartServer).options(num_cpus=cpus_per_part, max_restarts=1, max_task_retries=1)
        self.servers = [actor.remote(opener, tuple(a), max(1, int(cpus_per_part))) for a in part_args]
        self.sizes = ray.get([s.ntotal.remote() for s in self.servers])  # each part opened (or its error)
        #: which servers these are, the same in every process this object is sent to (the cache of
        #: :func:`memscan.extraction.verify_index.open_index_verifier` is keyed by it)
        self.key = ("ray-actors", *(s._actor_id.hex() for s in self.servers))

    @property
    def ntotal(self) -> int:
        return int(sum(self.sizes))

    def search(self, queries, k: int):
        q = self.ray.put(queries)
        return self.merge(self.ray.get([s.search.remote(q, int(k)) for s in self.servers]), int(k))

    def range_search(self, queries, radius):
        raise InputError("an index served by Ray actors answers search() only", "load it locally for range queries")

    def close(self) -> None:
        for s in self.servers:
            self.ray.kill(s)
        self.servers = []

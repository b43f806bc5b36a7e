"""Splitting a batch of independent rows across the CPU's cores: threads, or forked worker processes.

A decoding step of a small language model is a chain of small operations that torch's intra-op
threads divide too finely to pay, while the rows of a batch decode independently. So a CPU batch is
cut into parts (:func:`memscan.generators.causal_lm.TransformersCausalLM.row_workers`), each
decoded with one intra-op thread. Two ways to run the parts:

- :func:`split_rows` — one thread per part. Simple, but the parts contend for the GIL: each torch
  call releases and re-takes it, and a small model's step is hundreds of calls. On 2 cores two
  threads give 1.45–1.6× one thread.
- :class:`ForkedRows` — the first part in the caller's process, each further part in a persistent
  worker process forked from it (Linux), so the parts share no GIL: on 2 cores the demo language
  model decodes 1.15× faster than with threads (docs/benchmarks.md).
  The workers are forked once, when first needed, and hold the model by copy-on-write: its weights
  are shared with the parent, not copied. Each call sends the part's arguments and receives its
  result through a pipe (our own arrays; nothing a user supplied is unpickled).

``ForkedRows`` is an optimisation only; it never changes a result and never loses work:

1. The workers see the object as it was when they were forked. Before each call the owner's
   ``fingerprint(owner)`` (for a torch model: every parameter's and buffer's identity, address,
   in-place version counter and bit checksum, each module's training flag and hooks) is compared
   with the one taken at fork time; if the model changed (training, ``load_state_dict``, ``.to``,
   a hook) the workers are closed and forked again.
2. A part whose worker fails — an exception in the method, a worker killed by the system — is run
   again in the caller's process, so a deterministic error is raised there with its own traceback,
   and the broken workers are closed (forked again on the next call). A call interrupted in the
   caller (its own part failing, Ctrl-C) kills the workers: no reply is left in a pipe for the
   next call to read.
3. Every part runs in a fresh thread with one torch thread, in the caller and in the workers
   alike, so no thread-local torch state (autocast, grad mode) of the thread that forked leaks in.
4. A worker exits when its pipe closes: when the owner is collected, at interpreter exit (the
   workers are daemons), or when the parent is killed outright.

``MEMSCAN_ROW_SPLIT=threads`` selects threads everywhere (the default, ``auto``, forks where the
platform's ``fork`` start method exists, i.e. Linux; macOS and Windows use threads).

Examples
--------
>>> class Squares:
...     def rows(self, x):
...         return [v * v for v in x]
>>> owner = Squares()
>>> split = ForkedRows(owner, fingerprint=lambda owner: 0)
>>> split.map("rows", [([1, 2],), ([3],)])
[[1, 4], [9]]
>>> split.close()
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import threading
import warnings
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import wait as wait_ready
from typing import Any

#: Environment variable choosing how a CPU batch's parts run: ``auto`` (processes where ``fork``
#: exists), ``processes`` or ``threads``.
ENV = "MEMSCAN_ROW_SPLIT"


def split_mode() -> str:
    """``"processes"`` or ``"threads"``: how a CPU batch's parts run here (see :data:`ENV`)."""
    from memscan.errors import InputError

    mode = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if mode not in ("auto", "processes", "threads"):
        raise InputError(f"{ENV}={mode!r} is not a row-split mode", f"set {ENV} to auto, processes or threads")
    can_fork = "fork" in multiprocessing.get_all_start_methods() and sys.platform.startswith("linux")
    if mode == "threads" or not can_fork:
        return "threads"
    return "processes"


def _single_threaded(fn: Callable, *args) -> Any:
    """``fn(*args)`` in a fresh thread whose torch runs one intra-op thread (a per-thread setting)."""
    import torch

    with ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        return pool.submit(fn, *args).result()


def split_rows(fn: Callable, parts: list) -> list:
    """``[fn(part) for part in parts]``, one thread per part, each running torch single-threaded.

    torch's intra-op thread count is a per-thread setting, so the workers' ``set_num_threads(1)``
    leaves the caller's unchanged. The first exception is raised here."""
    import torch

    if len(parts) == 1:
        return [fn(parts[0])]
    with ThreadPoolExecutor(len(parts), initializer=torch.set_num_threads, initargs=(1,)) as pool:
        return list(pool.map(fn, parts))


def _worker_loop(owner: Any, conn, inherited: list) -> None:
    """A forked worker: run ``getattr(owner, method)(*args)`` for each request until told to stop
    (``None``) or the pipe closes."""
    # 1. the parent's ends of the pipes (this one's and earlier workers') are not this worker's to
    #    hold open: the pipe reads end-of-file when the parent's copy closes (the parent killed)
    for c in inherited:
        c.close()
    # 2. nothing the parent's other threads held at fork time (stdout locks, a progress bar) is touched
    devnull = open(os.devnull, "w")
    sys.stdout = sys.stderr = devnull
    warnings.simplefilter("ignore")
    logging.disable(logging.CRITICAL)  # handlers may hold the parent's streams (and their locks)
    # 3. serve requests, each in a fresh thread with one torch thread, as the caller runs its own
    #    part: the same thread-local torch state (no autocast or grad mode inherited from the
    #    thread that forked); any failure is reported and the parent runs the part itself
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError, KeyboardInterrupt):
            os._exit(0)
        if request is None:
            os._exit(0)
        method, args = request
        try:
            reply = ("ok", _single_threaded(getattr(owner, method), *args))
        except BaseException as exc:  # noqa: BLE001 - reported to the parent, which re-runs the part
            reply = ("error", f"{type(exc).__name__}: {exc}")
        try:
            conn.send(reply)
        except (OSError, ValueError):
            os._exit(0)


def _close(conns: list, procs: list, kill: bool = False) -> None:
    """Tell the workers to stop, close the pipes and reap the workers. (A stop message, not only the
    closed pipe: workers forked later for another owner hold copies of these pipes' ends.) With
    ``kill`` (an interrupted call: the workers may be mid-part) they are killed at once."""
    for c, p in zip(conns, procs):
        if kill:
            p.kill()
        else:
            try:
                c.send(None)
            except (OSError, ValueError):
                pass
        try:
            c.close()
        except OSError:  # pragma: no cover
            pass
    for p in procs:
        p.join(timeout=2.0)
        if p.is_alive():  # pragma: no cover - a worker stuck in a long call
            p.kill()
            p.join(timeout=2.0)
    conns.clear()
    procs.clear()


class ForkedRows:
    """Run the parts of a batch in the caller and in persistent forked workers (see the module docstring).

    Parameters
    ----------
    owner : object
        The object whose methods run the parts (a causal LM). The parent keeps only a weak
        reference; the workers have their own forked copy.
    fingerprint : callable
        ``fingerprint(owner)`` returns a value that changes whenever what the workers would compute
        changes (the model's weights); compared before every call.
    """

    def __init__(self, owner: Any, fingerprint: Callable[[Any], Any]):
        self._owner = weakref.ref(owner)
        self.fingerprint = fingerprint
        self._conns: list = []
        self._procs: list = []
        self._forked_at: Any = None
        self._lock = threading.RLock()
        self.forks = 0  # how many workers were forked over this object's life (tests, diagnostics)
        self.fallbacks = 0  # parts re-run in the caller after a worker failed
        self._finalizer = weakref.finalize(self, _close, self._conns, self._procs)

    @property
    def workers(self) -> int:
        """Worker processes alive now."""
        return sum(p.is_alive() for p in self._procs)

    def close(self, kill: bool = False) -> None:
        """Close the workers (forked again on the next call); ``kill``: at once, mid-part."""
        with self._lock:
            _close(self._conns, self._procs, kill)
            self._forked_at = None

    def _ensure(self, n: int, stamp: Any) -> None:
        """At least ``n`` workers forked from the owner as it is now (``stamp``)."""
        if self._forked_at != stamp or any(not p.is_alive() for p in self._procs):
            self.close()
        owner = self._owner()
        ctx = multiprocessing.get_context("fork")
        while len(self._procs) < n:
            parent_end, child_end = ctx.Pipe()
            proc = ctx.Process(target=_worker_loop, args=(owner, child_end, [*self._conns, parent_end]), daemon=True)
            proc.start()
            child_end.close()
            self._conns.append(parent_end)
            self._procs.append(proc)
            self.forks += 1
        self._forked_at = stamp

    def _drain(self, sent: list[bool]) -> list:
        """The workers' replies to the parts sent (None where a worker failed to answer: an error
        reply, or the worker gone — its exit is watched beside its pipe)."""
        replies = []
        for conn, proc, ok in zip(self._conns, self._procs, sent):
            reply = None
            if ok:
                try:
                    wait_ready([conn, proc.sentinel])
                    if conn.poll():
                        reply = conn.recv()
                except (EOFError, OSError):
                    reply = None
            replies.append(reply)
        return replies

    def map(self, method: str, args: list[tuple]) -> list:
        """``[getattr(owner, method)(*a) for a in args]``: ``args[0]`` in this process (one torch
        thread), the rest in the workers, in parallel. Results in order.

        An exception that interrupts the call (the caller's own part failing, Ctrl-C) kills the
        workers, so that no reply is left in a pipe for the next call to read."""
        owner = self._owner()
        if owner is None:  # pragma: no cover - the owner calls this
            raise RuntimeError("ForkedRows: the owner is gone")
        fn = getattr(owner, method)
        if len(args) == 1:
            return [fn(*args[0])]
        with self._lock:  # one batch at a time through the workers; another caller waits
            # 1. workers forked from the owner as it is now
            self._ensure(len(args) - 1, self.fingerprint(owner))
            try:
                # 2. send the further parts, run the first here, collect
                sent = []
                for conn, a in zip(self._conns, args[1:]):
                    try:
                        conn.send((method, a))
                        sent.append(True)
                    except (OSError, ValueError):
                        sent.append(False)
                first = _single_threaded(fn, *args[0])
                replies = self._drain(sent)
            except BaseException:
                self.close(kill=True)
                raise
            results, failed = [first], []
            for i, reply in enumerate(replies, start=1):
                if reply is not None and reply[0] == "ok":
                    results.append(reply[1])
                else:
                    results.append(None)
                    failed.append(i)
            # 3. a failed part runs again here; its error, if deterministic, is raised from here
            if failed:
                self.close()
                for i in failed:
                    self.fallbacks += 1
                    results[i] = _single_threaded(fn, *args[i])
            return results

"""Row-split execution (memscan.generators.row_split): forked workers give the results the caller
would compute, follow the owner's changes, survive worker failures and never outlive their parent."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from memscan.errors import InputError
from memscan.generators.row_split import ENV, ForkedRows, split_mode

pytestmark = pytest.mark.skipif(split_mode() != "processes", reason="forked workers need Linux's fork")


class Owner:
    def __init__(self):
        self.scale = 1
        self.parent = os.getpid()

    def rows(self, xs):
        return [self.scale * x for x in xs], os.getpid()

    def fails_in_worker(self, xs):
        if os.getpid() != self.parent:
            raise RuntimeError("only in a worker")
        return [2 * x for x in xs]

    def crashes_in_worker(self, xs):
        if os.getpid() != self.parent:
            os._exit(3)
        return [3 * x for x in xs]

    def fails(self, xs):
        if xs == [2]:
            raise ValueError(f"bad rows {xs}")
        return xs


def _gone(pid: int, wait: float = 10.0) -> bool:
    """True once ``pid`` has exited (no such process, or a zombie not yet reaped)."""
    deadline = time.time() + wait
    while time.time() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


def test_parts_run_in_the_caller_and_in_persistent_workers():
    owner = Owner()
    split = ForkedRows(owner, fingerprint=lambda o: o.scale)
    out = split.map("rows", [([1, 2],), ([3],), ([4, 5],)])
    assert [r for r, _ in out] == [[1, 2], [3], [4, 5]]
    pids = [p for _, p in out]
    assert pids[0] == os.getpid() and len({*pids[1:]}) == 2 and os.getpid() not in pids[1:]
    assert split.forks == 2 and split.workers == 2
    again = split.map("rows", [([6],), ([7],)])  # the same workers serve the next call
    assert [r for r, _ in again] == [[6], [7]] and again[1][1] == pids[1] and split.forks == 2
    split.close()
    assert split.workers == 0 and all(_gone(p) for p in pids[1:])


def test_workers_follow_the_owner_when_its_fingerprint_changes():
    owner = Owner()
    split = ForkedRows(owner, fingerprint=lambda o: o.scale)
    first = split.map("rows", [([1],), ([2],)])
    owner.scale = 10  # the forked copy still has scale 1: it must be forked again
    second = split.map("rows", [([1],), ([2],)])
    assert [r for r, _ in first] == [[1], [2]] and [r for r, _ in second] == [[10], [20]]
    assert split.forks == 2 and second[1][1] != first[1][1]
    split.close()


def test_a_failing_or_killed_worker_loses_nothing():
    owner = Owner()
    split = ForkedRows(owner, fingerprint=lambda o: 0)
    # 1. an exception only in the worker: the part runs again here and succeeds
    assert split.map("fails_in_worker", [([1],), ([2],)]) == [[2], [4]] and split.fallbacks == 1
    # 2. a worker that dies mid-call
    assert split.map("crashes_in_worker", [([1],), ([2],)]) == [[3], [6]] and split.fallbacks == 2
    # 3. a worker killed between calls: forked again
    split.map("rows", [([1],), ([2],)])
    (proc,) = split._procs
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    assert not proc.is_alive()
    assert [r for r, _ in split.map("rows", [([1],), ([2],)])] == [[1], [2]] and split.workers == 1
    # 4. a deterministic error is raised here, with the caller's own exception
    with pytest.raises(ValueError, match=r"bad rows \[2\]"):
        split.map("fails", [([1],), ([2],)])
    # 5. ... and when the caller's own part fails, no worker's reply is left for the next call
    with pytest.raises(ValueError, match=r"bad rows \[2\]"):
        split.map("fails", [([2],), ([1],)])
    assert [r for r, _ in split.map("rows", [([4],), ([5],)])] == [[4], [5]]
    split.close()


class SlowInWorkers(Owner):
    def rows(self, xs):
        if os.getpid() != self.parent:
            time.sleep(0.5)
        return [10 * x for x in xs], os.getpid()


def test_an_interrupted_call_leaves_no_reply_for_the_next():
    """An exception while the caller waits for the workers (Ctrl-C) kills them: the next calls get
    their own results, not the interrupted call's."""

    class Interrupted(Exception):
        pass

    def interrupt(signum, frame):
        raise Interrupted

    owner = SlowInWorkers()
    split = ForkedRows(owner, fingerprint=lambda o: 0)
    split.map("rows", [([0],), ([0],)])
    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(Interrupted):
            split.map("rows", [([1],), ([2],)])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert split.workers == 0
    assert [r for r, _ in split.map("rows", [([3],), ([4],)])] == [[30], [40]]
    assert [r for r, _ in split.map("rows", [([5],), ([6],)])] == [[50], [60]]
    split.close()


def test_workers_stop_when_the_owner_is_collected():
    owner = Owner()
    split = ForkedRows(owner, fingerprint=lambda o: 0)
    split.map("rows", [([1],), ([2],)])
    pid = split._procs[0].pid
    del split
    gc.collect()
    assert _gone(pid)


def test_workers_exit_when_their_parent_is_killed(tmp_path):
    script = textwrap.dedent(
        """
        import os, signal, sys
        from memscan.generators.row_split import ForkedRows
        class Owner:
            def rows(self, xs):
                return os.getpid()
        owner = Owner()
        split = ForkedRows(owner, fingerprint=lambda o: 0)
        pids = split.map("rows", [([1],), ([2],), ([3],)])
        print(" ".join(str(p) for p in pids[1:]), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == -signal.SIGKILL, res.stderr
    pids = [int(p) for p in res.stdout.split()]
    assert len(pids) == 2 and all(_gone(p) for p in pids)


def test_split_mode_setting(monkeypatch):
    monkeypatch.setenv(ENV, "threads")
    assert split_mode() == "threads"
    monkeypatch.setenv(ENV, "processes")
    assert split_mode() == "processes"
    monkeypatch.setenv(ENV, "forks")
    with pytest.raises(InputError, match="MEMSCAN_ROW_SPLIT"):
        split_mode()

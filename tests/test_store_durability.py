"""The run store's durability: directory fsyncs after commits, a lock file that appears only
whole, and temporary files of other hosts kept (each test fails on the store before these)."""

import builtins
import errno
import os
import socket
import stat
import subprocess
import sys
import time

import pandas as pd
import pytest

import memscan.store as store_mod
from memscan.errors import MemscanError
from memscan.store import RunLock, RunStore, open_run, remove_stale_temporaries


# ---- directory fsyncs -----------------------------------------------------------------------------
@pytest.fixture
def syncs(monkeypatch):
    """Record, in order, every rename/link (``("rename", dst)``) and every fsync of a directory
    (``("dir", inode)``), as the os module sees them."""
    events: list = []
    real_fsync, real_replace, real_rename, real_link = os.fsync, os.replace, os.rename, os.link
    real_mkdir = os.mkdir

    def fsync(fd):
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            events.append(("dir", st.st_ino))
        return real_fsync(fd)

    def replace(src, dst, *a, **k):
        real_replace(src, dst, *a, **k)
        events.append(("rename", os.path.abspath(dst)))

    def rename(src, dst, *a, **k):
        real_rename(src, dst, *a, **k)
        events.append(("rename", os.path.abspath(dst)))

    def link(src, dst, *a, **k):
        real_link(src, dst, *a, **k)
        events.append(("rename", os.path.abspath(dst)))

    def mkdir(path, *a, **k):
        real_mkdir(path, *a, **k)
        events.append(("rename", os.path.abspath(path)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "link", link)
    monkeypatch.setattr(os, "mkdir", mkdir)
    return events


def _made_durable(events, path) -> bool:
    """Whether the last rename onto ``path`` is followed by an fsync of its directory."""
    path = os.path.abspath(path)
    last = max((i for i, e in enumerate(events) if e == ("rename", path)), default=None)
    assert last is not None, f"{path} was never renamed into place: {events}"
    parent = os.stat(os.path.dirname(path)).st_ino
    return ("dir", parent) in events[last + 1 :]


def test_a_shard_commit_fsyncs_its_directory_after_each_rename(tmp_path, syncs):
    store = RunStore(tmp_path / "run")
    store.create()
    syncs.clear()
    store.commit_shard(0, {"detections": pd.DataFrame({"a": [1, 2]})}, {})
    shards = tmp_path / "run" / "shards"
    # the record (the commit point) and the table it vouches for both survive a power failure
    assert _made_durable(syncs, shards / "00000.done.json"), syncs
    assert _made_durable(syncs, shards / "00000.detections.parquet"), syncs
    # the table's rename is durable before the record's rename happens
    table = syncs.index(("rename", str(shards / "00000.detections.parquet")))
    record = syncs.index(("rename", str(shards / "00000.done.json")))
    assert ("dir", shards.stat().st_ino) in syncs[table:record]


def test_manifest_merged_tables_and_images_fsync_their_directory(tmp_path, syncs):
    import numpy as np

    root = tmp_path / "run"
    with open_run(root, "example") as run:
        run.start({"config": {}}, identity=("config",))
        assert _made_durable(syncs, root / "manifest.json"), syncs
        run.store.commit_shard(0, {"detections": pd.DataFrame({"a": [1]}), "extractions": pd.DataFrame({"b": [2]})}, {})
        run.store.merge(1)
        assert _made_durable(syncs, root / "detections.parquet"), syncs
        rel = run.store.save_image(np.zeros((4, 4, 3), dtype=np.uint8), "candidates", "c0")
        assert _made_durable(syncs, root / rel), syncs
        run.finish()
        assert _made_durable(syncs, root / "manifest.json"), syncs


def test_new_run_directories_are_made_durable_in_their_parents(tmp_path, syncs):
    store = RunStore(tmp_path / "a" / "run")
    store.create()
    store.image_dir("cliques")
    for d in ("a", "a/run", "a/run/shards", "a/run/images", "a/run/images/cliques"):
        assert _made_durable(syncs, tmp_path / d), (d, syncs)


def test_a_fresh_lock_and_a_takeover_fsync_the_run_directory(tmp_path, syncs):
    lock = RunLock(tmp_path).acquire()
    assert _made_durable(syncs, tmp_path / ".lock"), syncs
    lock.release()
    (tmp_path / ".lock").write_text(f"pid=999999999 host={socket.gethostname()} since=killed token=dead")
    syncs.clear()
    lock = RunLock(tmp_path).acquire()
    assert lock.token in (tmp_path / ".lock").read_text()
    assert _made_durable(syncs, tmp_path / ".lock"), syncs
    lock.release()


def test_fsync_dir_skips_file_systems_that_cannot_sync_a_directory_only(tmp_path, monkeypatch):
    real = os.fsync
    for code, raised in ((errno.EINVAL, False), (errno.EOPNOTSUPP, False), (errno.EIO, True)):

        def fsync(fd, code=code):
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                raise OSError(code, os.strerror(code))
            return real(fd)

        monkeypatch.setattr(os, "fsync", fsync)
        if raised:
            with pytest.raises(OSError):
                store_mod.fsync_dir(tmp_path)
        else:
            store_mod.fsync_dir(tmp_path)
    monkeypatch.undo()
    # Windows cannot open a directory: skipped there, without opening anything
    opened = []
    monkeypatch.setattr(os, "open", lambda *a, **k: opened.append(a) or 0 / 0)
    monkeypatch.setattr(os, "name", "nt")
    store_mod.fsync_dir(str(tmp_path))
    monkeypatch.undo()
    assert opened == []


def _fail_directory_fsyncs(monkeypatch):
    """From now on ``os.fsync`` of a directory fails with EIO (a file's still syncs)."""
    real = os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, "Input/output error")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def test_a_failed_directory_fsync_fails_the_commit_with_a_clear_error(tmp_path, monkeypatch):
    store = RunStore(tmp_path / "run")
    store.create()
    _fail_directory_fsyncs(monkeypatch)
    with pytest.raises(MemscanError, match="Input/output error"):
        store.commit_shard(0, {"detections": pd.DataFrame({"a": [1]})}, {})


def test_a_failed_directory_fsync_while_locking_leaves_no_lock(tmp_path, monkeypatch):
    _fail_directory_fsyncs(monkeypatch)
    with pytest.raises(MemscanError, match="cannot write the lock file.*Input/output error"):
        RunLock(tmp_path).acquire()
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == []
    RunLock(tmp_path).acquire().release()  # nothing blocks the next attempt


# ---- the lock appears whole -----------------------------------------------------------------------
def test_a_reader_racing_lock_creation_never_sees_an_empty_lock(tmp_path, monkeypatch):
    """At every file operation of an acquisition, ``.lock`` is absent or complete, and a
    contender looking at that moment is refused with the holder's pid, host and token."""
    lock_path = tmp_path / ".lock"
    real = {name: getattr(os, name) for name in ("open", "write", "fsync", "close", "link", "replace", "fdopen")}
    real_open = builtins.open
    seen: list = []
    inside = [False]

    def look():
        if inside[0]:
            return
        inside[0] = True
        try:
            try:
                fd = real["open"](lock_path, os.O_RDONLY)
            except FileNotFoundError:
                return
            try:
                text = os.read(fd, 4096).decode()
            finally:
                real["close"](fd)
            seen.append(text)
            with pytest.raises(MemscanError) as err:  # a contender at this very moment
                RunLock(tmp_path).acquire()
            seen.append(str(err.value))
        finally:
            inside[0] = False

    def wrap(fn):
        def wrapped(*a, **k):
            look()
            try:
                return fn(*a, **k)
            finally:
                look()

        return wrapped

    for name, fn in real.items():
        monkeypatch.setattr(os, name, wrap(fn))
    monkeypatch.setattr(builtins, "open", wrap(real_open))
    lock = RunLock(tmp_path).acquire()
    monkeypatch.undo()
    assert seen, "the lock was never observed"
    for text in seen[0::2]:
        assert f"pid={os.getpid()}" in text and f"token={lock.token}" in text, seen
    for message in seen[1::2]:
        assert "in use by another memscan process" in message and f"token={lock.token}" in message, seen
    lock.release()
    assert not lock_path.exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary file left


def test_a_lock_is_created_whole_even_without_hard_links(tmp_path, monkeypatch):
    """A file system without hard links (vfat: EPERM) falls back to O_EXCL creation."""

    def no_links(*a, **k):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    lock = RunLock(tmp_path).acquire()
    assert f"token={lock.token}" in (tmp_path / ".lock").read_text()
    with pytest.raises(MemscanError, match="in use by another memscan process"):
        RunLock(tmp_path).acquire()
    lock.release()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_an_empty_lock_is_held_while_young_and_stale_after_the_grace_period(tmp_path):
    """An older memscan created ``.lock`` and then wrote it: empty, it is being created (refused);
    empty long after, its writer was killed in between (taken over)."""
    lock_path = tmp_path / ".lock"
    lock_path.write_text("")
    with pytest.raises(MemscanError, match="in use by another memscan process") as err:
        RunLock(tmp_path).acquire()
    assert "its .lock is empty" in str(err.value)
    assert lock_path.read_text() == ""
    old = time.time() - getattr(store_mod, "INCOMPLETE_LOCK_GRACE_S", 60.0) - 5
    os.utime(lock_path, (old, old))
    lock = RunLock(tmp_path).acquire()
    assert f"token={lock.token}" in lock_path.read_text()
    lock.release()
    assert not lock_path.exists()
    # a complete lock of a live process is never taken over, however old
    lock_path.write_text(f"pid={os.getppid()} host={socket.gethostname()} since=long-ago token=alive")
    os.utime(lock_path, (old, old))
    with pytest.raises(MemscanError, match="in use by another memscan process"):
        RunLock(tmp_path).acquire()


# ---- temporary files of other hosts -------------------------------------------------------------
def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def _temporary_name(monkeypatch, path, *, pid, host) -> str:
    """The temporary name that the store's writer of ``path`` uses as process ``pid`` on ``host``."""
    names = []
    real = os.replace
    with monkeypatch.context() as m:
        m.setattr(os, "getpid", lambda: pid)
        m.setattr(socket, "gethostname", lambda: host)
        m.setattr(os, "replace", lambda src, dst: (names.append(os.path.basename(src)), real(src, dst)))
        store_mod.atomic_write_json(path, {"x": 1})
    assert len(names) == 1
    return names[0]


def test_temporary_files_of_another_host_are_kept_and_this_hosts_dead_ones_removed(tmp_path, monkeypatch):
    root = tmp_path / "r"
    with open_run(root, "index") as run:
        run.start({}, identity=())
    dead = _dead_pid()
    here, there = socket.gethostname(), "some-other-node.cluster"
    ours = _temporary_name(monkeypatch, root / "shards" / "00001.done.json", pid=dead, host=here)
    theirs = _temporary_name(monkeypatch, root / "embeddings.npy", pid=dead, host=there)
    theirs_shard = _temporary_name(monkeypatch, root / "shards" / "00002.done.json", pid=dead, host=there)
    stale = [root / "shards" / ours, root / f".old.npy.tmp-{dead}"]  # the second: a name without a host
    keep = [root / theirs, root / "shards" / theirs_shard, root / f".live.npy.tmp-{os.getppid()}"]
    for p in stale + keep:
        p.write_bytes(b"partial")
    removed = remove_stale_temporaries(RunStore(root))
    assert sorted(removed) == sorted(str(p.relative_to(root)) for p in stale)
    assert [p.exists() for p in stale] == [False, False]
    assert all(p.exists() for p in keep)
    log = (root / "run.log").read_text()
    assert "kept 2 temporary file(s) of processes on other hosts" in log and theirs in log


def test_temporary_names_carry_this_host(tmp_path, monkeypatch):
    name = _temporary_name(monkeypatch, tmp_path / "m.json", pid=os.getpid(), host="node-7.example")
    assert name.startswith(f".m.json.tmp-{os.getpid()}") and name.endswith("@node-7.example")
    # a host name with characters a file name should not hold is made safe
    name = _temporary_name(monkeypatch, tmp_path / "m.json", pid=1, host="we ird/host:name")
    assert "/" not in name and " " not in name and store_mod._TEMPORARY.match(name).group(2) == "we_ird_host_name"


def test_a_link_that_was_made_despite_an_eexist_reply_is_this_process_lock(tmp_path, monkeypatch):
    """NFS may answer EEXIST to a retransmitted link(2) that did create the link: the lock is
    then this process's (the same file as its temporary), not another process's."""
    real_link = os.link

    def link_then_eexist(src, dst, *args, **kwargs):
        real_link(src, dst, *args, **kwargs)
        raise FileExistsError(errno.EEXIST, "File exists", str(dst))

    (tmp_path / "r").mkdir()
    monkeypatch.setattr(os, "link", link_then_eexist)
    lock = RunLock(tmp_path / "r").acquire()
    assert lock.held and lock.token in (tmp_path / "r" / ".lock").read_text()
    monkeypatch.undo()
    with pytest.raises(MemscanError, match="in use by another memscan process"):
        RunLock(tmp_path / "r").acquire()  # a real second process is still refused
    lock.release()
    assert not (tmp_path / "r" / ".lock").exists()


def test_a_directory_that_cannot_be_opened_is_not_synced_and_the_write_stands(tmp_path, monkeypatch):
    """A directory this process may write but not open (mode -wx, as a non-root user): the
    rename happened, so fsync_dir skips the sync rather than failing a write that worked."""
    real_open = os.open

    def no_directory_open(path, flags, *args, **kwargs):
        if os.path.isdir(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_directory_open)
    store_mod.fsync_dir(tmp_path)
    store_mod.atomic_write_bytes(tmp_path / "a.json", b"{}")
    assert (tmp_path / "a.json").read_bytes() == b"{}"

"""The run store: a run is a directory.

::

    RUN/
      manifest.json            config, thresholds, seeds, versions, times, throughput
      prompts.parquet          the prompts attacked, in shard order
      detections.parquet       one row per prompt (largest clique of its generations)
      extractions.parquet      one row per (candidate, nearest training image)
      shards/NNNNN.done.json   completion record of each shard (row counts, file hashes)
      shards/NNNNN.*.parquet   the shard's tables (merged into the top-level tables at the end)
      images/candidates/…png   clique medoids (the candidate copies)
      images/cliques/…png      a montage of each detected clique
      images/train/…png        matched training images
      report.html              made by `memscan report` from the tables alone
      run.log                  what happened, including skipped inputs
      .lock                    held while a process writes the run

Every file is written to a temporary name (``.NAME.tmp-PID@HOST``), fsynced and renamed, and its
directory is fsynced after the rename, so a killed process leaves either the old file or the new
one, and a power failure after a write returned does not undo it. A shard counts as done only
when its completion record exists and the hashes in it match its files; anything else is redone
on ``--resume``.

Every command that writes a run opens it the same way, through :func:`open_run` (create or
resume, lock, a manifest with one ``kind`` key, versions, status, shard records)::

    with open_run(out, "extract", resume=resume) as run:      # refuses a run of another kind
        ... read inputs, load the model ...
        run.start({"config": cfg.to_dict(), "n_shards": n}, identity=("config", "n_shards"))
        for shard in run.todo(n): ... run.store.commit_shard(shard, tables, meta)
        run.finish(counts={...})                              # status "complete"

A failure inside the block leaves the manifest at ``status: incomplete`` with the committed shards
kept, and releases the lock, so ``--resume`` continues.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import platform
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from memscan.data.images import save_png
from memscan.errors import InputError, MemscanError

SHARD_TABLES = ("detections", "extractions")


def fsync_dir(path: str | Path) -> None:
    """Make the entries of the directory ``path`` durable: a rename, link or new file in it
    survives a power failure once this returns (fsyncing the file alone does not guarantee that).

    Skipped on Windows, where a directory cannot be opened; a file system that cannot sync a
    directory (``EINVAL``, ``ENOTSUP``: some FUSE and network mounts), or a directory this process
    may write but not open (mode ``-wx``), is skipped too. Any other error (``EIO``) is raised: the
    commit may not be durable.
    """
    if os.name == "nt":  # pragma: no cover - a directory cannot be opened there
        return
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except PermissionError:  # a write-only directory (mode -wx) cannot be opened to sync it
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _NO_DIR_SYNC:
            raise
    finally:
        os.close(fd)


_NO_DIR_SYNC = {errno.EINVAL, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP), errno.EOPNOTSUPP}


def make_dirs(path: str | Path) -> None:
    """``mkdir -p path``, durably: each directory it creates is fsynced into its parent (a new
    directory's entry is as easily lost on power failure as a renamed file's)."""
    missing = []
    p = Path(path)
    while not p.is_dir():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        d.mkdir(exist_ok=True)
        fsync_dir(d.parent)


def _host_tag() -> str:
    """This host's name as it appears in temporary file names (file-system safe)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", socket.gethostname())[:64] or "host"


def temporary_path(path: Path, tag: str = "") -> Path:
    """The temporary name a writer of ``path`` uses until its rename: ``.NAME.tmp-PID[-TAG]@HOST``
    beside it (one file system, so the rename is atomic). The pid and host let
    :func:`remove_stale_temporaries` tell a dead writer's leftovers from a live one's."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}{'-' + tag if tag else ''}@{_host_tag()}")


@contextmanager
def replacing(path: str | Path):
    """A temporary name beside ``path`` (:func:`temporary_path`) for a writer that needs a file
    name (Parquet, FAISS, ``np.save``); once the block ends it is fsynced, renamed to ``path`` and
    the rename made durable (:func:`fsync_dir`): a reader sees the old file or the new one, never a
    part. A failed write removes it and leaves the old file."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)  # the rename itself survives a power failure
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through :func:`replacing` (a failed write leaves the old file)."""
    with replacing(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: Path, obj, default=str) -> None:
    """Write ``obj`` as JSON atomically (a reader sees the old file or the new one, never a part);
    ``default`` turns what JSON cannot hold into what it can."""
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=1, default=default) + "\n").encode())


def write_table(df: pd.DataFrame, path: Path) -> str:
    """Write a Parquet table atomically; returns its sha256."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with replacing(path) as tmp:
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp)
        digest = sha256_file(tmp)  # the bytes renamed into place (fsynced as the block ends)
    return digest


class _WriteGuard:
    """Turn an OSError while writing the run (disk full, read-only, quota) into a clear error."""

    def __init__(self, root: Path, what: str):
        self.root, self.what = root, what

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and issubclass(exc_type, OSError):
            reason = exc.strerror or str(exc)
            hint = (
                "--out must be a folder: pass another --out"
                if isinstance(exc, (NotADirectoryError, FileExistsError))
                else "free disk space or fix permissions, then rerun with --resume (committed shards are kept)"
            )
            raise MemscanError(f"cannot write {self.what} in {self.root}: {reason}", hint) from exc
        return False


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def safe_name(identifier: str) -> str:
    """A file-system-safe, collision-free name for an untrusted id (no path separators)."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(identifier))[:60].strip("._") or "id"
    return f"{slug}-{hashlib.sha1(str(identifier).encode()).hexdigest()[:8]}"


#: What to open instead, for runs of commands other than ``memscan extract``.
WHERE_RESULTS_ARE = {
    "extract-unconditional": "`memscan report RUN` shows it; its tables are generations.parquet and extractions.parquet",
    "triage": "`memscan report RUN` shows it; pass its prompts.csv to `memscan extract --prompts`",
    "mia": "`memscan report RUN` shows it; its tables are scores.parquet and metrics.parquet",
    "inpaint": "`memscan report RUN` shows it; its tables are scores.parquet and metrics.parquet",
    "memscore": "`memscan report RUN` shows it; its table is memscore.parquet",
    "demo-mia": "`memscan report RUN` shows it; its tables are scores.parquet and metrics.parquet",
    "lm-mia": "`memscan report RUN` shows it; its tables are scores.parquet and metrics.parquet",
    "lm-extractable": "`memscan report RUN` shows it; its table is sequences.parquet",
    "lm-exposure": "`memscan report RUN` shows it; its table is exposures.parquet",
    "lm-extract": "`memscan report RUN` shows it; its tables are samples.parquet and precision.parquet",
    "compare": "`memscan report RUN` shows it; its tables are compare.parquet, overlap.parquet, outliers.parquet",
    "index": "it is a training-set index: pass it as --index; `memscan report INDEX` shows it",
}


class RunLock:
    """An exclusive lock on a run directory (a ``.lock`` file that only one process can create).

    The file says who holds it: ``pid=… host=… since=… token=…`` (the token is unique to this
    acquisition). It is created whole: the content is written and fsynced to a temporary file,
    which is then hard-linked to ``.lock`` (``link`` fails when ``.lock`` exists, like
    ``O_EXCL``), so a reader never sees ``.lock`` empty or half-written. Where the file system
    has no hard links, ``.lock`` is created with ``O_EXCL`` and then written, as before.

    A lock left by a process that no longer exists on this host is taken over, and the takeover
    is atomic: the contender ``flock``s the stale lock file itself, checks under that flock that
    the file is still the one at ``.lock`` and still stale, then renames its own new lock file
    over it. A second contender, blocked on the old file's flock, then finds ``.lock`` replaced
    and sees the new holder (alive): it is refused. At no moment is ``.lock`` absent, so a
    process that creates a fresh lock cannot slip in either. :meth:`release` removes ``.lock``
    only while it still holds this acquisition's token (under the same flock), never a lock
    another process has taken over since.

    A ``.lock`` without a pid and host (empty or cut short: written in two steps by an older
    memscan or on a file system without hard links, by a writer that may be between the steps)
    is held while younger than :data:`INCOMPLETE_LOCK_GRACE_S`; older, its writer was killed
    between the two steps, and it is stale.

    Where ``fcntl`` is missing (Windows), takeovers are serialised within one process only: two
    processes taking over one stale lock at the same instant can then both believe they hold it.
    The same holds on a file system that refuses locks (``ENOLCK``: some FUSE mounts, NFS without
    lockd). The flock is advisory and per open file; on NFS Linux emulates it with POSIX locks,
    which exclude other processes (threads of one process are serialised by :data:`_TAKEOVER`).
    """

    def __init__(self, root: Path):
        self.path = Path(root) / ".lock"
        self.held = False
        self.token: str | None = None

    def _content(self, token: str) -> str:
        since = time.strftime("%Y-%m-%dT%H:%M:%S")
        return f"pid={os.getpid()} host={socket.gethostname()} since={since} token={token}"

    def acquire(self) -> RunLock:
        token = uuid.uuid4().hex
        for _ in range(8):
            try:
                created = self._create(token)
            except FileNotFoundError:
                if self.path.parent.is_dir():  # our temporary file vanished meanwhile: try again
                    continue
                raise MemscanError(
                    f"{self.path.parent} is not a memscan run (the directory does not exist)",
                    "pass the --out directory of a memscan run",
                ) from None
            except OSError as exc:  # read-only file system, permissions, quota
                raise _unwritable(self.path, exc) from None
            if created:
                self.held, self.token = True, token
                return self
            if self._stale():
                if self._take_over(token):
                    return self
                continue  # replaced or removed meanwhile: look again
            try:
                info = self.path.read_text(errors="replace").strip()
            except FileNotFoundError:  # released meanwhile: try again
                continue
            if not _lock_complete(info):
                state = f"incomplete ({info!r})" if info else "empty"
                info = (
                    f"its .lock is {state}: a process is creating it; if none is, "
                    f"it counts as stale {INCOMPLETE_LOCK_GRACE_S:.0f} s after it was made"
                )
            raise MemscanError(
                f"run directory {self.path.parent} is in use by another memscan process ({info})",
                "wait for it to finish, or remove the .lock file if that process is gone",
            )
        raise MemscanError(  # pragma: no cover - eight races in a row
            f"could not lock {self.path}: other processes keep taking and releasing it", "rerun"
        )

    def _create(self, token: str) -> bool:
        """Create ``.lock`` with this acquisition's content in one step (class docstring).
        False when ``.lock`` exists."""
        tmp = temporary_path(self.path, token)
        _write_new(tmp, self._content(token))
        try:
            try:
                os.link(tmp, self.path)  # fails when .lock exists; .lock appears with its content
            except FileExistsError:
                if not _linked(tmp, self.path):  # NFS may answer EEXIST to a link it made (link(2))
                    return False
            except (OSError, AttributeError) as exc:  # no hard links here: create it in two steps
                if isinstance(exc, OSError) and exc.errno not in _NO_HARD_LINKS:
                    raise
                return self._create_in_two_steps(token)
        finally:
            try:
                tmp.unlink()
            except OSError:  # pragma: no cover - removed by remove_stale_temporaries later
                pass
        self._sync_or_remove()
        return True

    def _sync_or_remove(self) -> None:
        """fsync the run directory after ``.lock`` was placed; if that fails, remove ``.lock``
        (this process's, just placed) so the error leaves no lock behind."""
        try:
            fsync_dir(self.path.parent)
        except BaseException:
            self.path.unlink(missing_ok=True)
            raise

    def _create_in_two_steps(self, token: str) -> bool:
        """``O_EXCL`` creation, then the content (readers allow for the moment between them)."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "w") as f:
                f.write(self._content(token))
                f.flush()
                os.fsync(f.fileno())
        except BaseException:  # disk full: leave no empty .lock behind
            self.path.unlink(missing_ok=True)
            raise
        self._sync_or_remove()
        return True

    def _stale(self) -> bool:
        """Whether ``.lock`` names a process of this host that no longer exists (or is an
        incomplete lock older than the grace period)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return False
        try:
            return _stale_lock(_read_fd(fd), os.fstat(fd).st_mtime)
        except OSError:
            return False
        finally:
            os.close(fd)

    def _take_over(self, token: str) -> bool:
        """Replace the stale ``.lock`` by this process's lock, atomically (class docstring).
        False when ``.lock`` changed meanwhile (the caller looks again)."""
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise _unwritable(self.path, exc) from None
        try:
            with _TAKEOVER, _flocked(fd):
                # under the flock of the file judged stale: is it still .lock, and still stale?
                if not _same_file(fd, self.path) or not _stale_lock(_read_fd(fd), os.fstat(fd).st_mtime):
                    return False
                tmp = temporary_path(self.path, token)
                try:
                    _write_new(tmp, self._content(token))
                    os.replace(tmp, self.path)  # .lock is never absent: no creator slips in
                except BaseException:
                    tmp.unlink(missing_ok=True)
                    raise
                self._sync_or_remove()
            self.held, self.token = True, token
            return True
        except OSError as exc:
            raise _unwritable(self.path, exc) from None
        finally:
            os.close(fd)

    def release(self) -> None:
        """Remove ``.lock`` if it is still this acquisition's (never a lock taken over since)."""
        if not self.held:
            return
        self.held = False
        try:
            fd = os.open(self.path, os.O_RDWR)
        except OSError:  # removed by hand, or the directory is gone
            return
        try:
            with _TAKEOVER, _flocked(fd):
                if _same_file(fd, self.path) and _lock_fields(_read_fd(fd)).get("token") == self.token:
                    self.path.unlink()
        except OSError:  # pragma: no cover - nothing more to do
            pass
        finally:
            os.close(fd)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


#: Serialises lock takeovers and releases between the threads of this process (``flock`` on NFS
#: and the no-fcntl fallback do not exclude threads of one process).
_TAKEOVER = threading.Lock()

#: Seconds a ``.lock`` without a pid and host (an older or hard-link-less writer between creating
#: and writing it) counts as held; older, its writer was killed in between and it is stale.
INCOMPLETE_LOCK_GRACE_S = 60.0

#: ``link`` errors meaning the file system has no hard links (vfat/exfat: EPERM; SMB, some FUSE).
_NO_HARD_LINKS = {
    errno.EPERM,
    errno.EOPNOTSUPP,
    getattr(errno, "ENOTSUP", errno.EOPNOTSUPP),
    errno.ENOSYS,
    errno.EINVAL,  # Windows: a FAT volume (ERROR_INVALID_FUNCTION)
}


def _linked(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` are one file (a hard link made despite an error reply)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _write_new(path: Path, text: str) -> None:
    """Create ``path`` (it must not exist) holding ``text``, fsynced."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        with os.fdopen(fd, "w") as f:
            fd = -1  # the file object closes it
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if fd >= 0:
            os.close(fd)
        path.unlink(missing_ok=True)
        raise


def _unwritable(path: Path, exc: OSError) -> MemscanError:
    return MemscanError(
        f"cannot write the lock file in {path.parent}: {exc.strerror or exc}",
        "choose an --out on a writable disk, or fix its permissions",
    )


def _lock_fields(text: str) -> dict:
    return dict(kv.split("=", 1) for kv in text.split() if "=" in kv)


def _lock_complete(text: str) -> bool:
    """Whether a lock file's text holds a pid and a host (not an empty or cut-short file)."""
    fields = _lock_fields(text)
    return "pid" in fields and "host" in fields


def _stale_lock(text: str, mtime: float) -> bool:
    """Whether a lock file with ``text``, last modified at ``mtime``, may be taken over: it names
    a process of this host that no longer exists, or it is incomplete (no pid and host) and older
    than :data:`INCOMPLETE_LOCK_GRACE_S` (its writer was killed between creating and writing it)."""
    if not _lock_complete(text):
        return time.time() - mtime > INCOMPLETE_LOCK_GRACE_S
    return _stale_text(text)


def _stale_text(text: str) -> bool:
    """Whether a lock file's text names a process of this host that no longer exists."""
    try:
        fields = _lock_fields(text)
        return fields.get("host") == socket.gethostname() and not _alive(int(fields["pid"]))
    except (ValueError, KeyError):
        return False


def _read_fd(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 4096):
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` is still the file open as ``fd``."""
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


@contextmanager
def _flocked(fd: int):
    """An exclusive ``flock`` on ``fd`` (a no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: see RunLock
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as exc:  # a file system without locks (some FUSE mounts, NFS without lockd)
        if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
        yield  # as without fcntl: serialised within this process only (RunLock's docstring)
        return
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


#: What ``run.log`` writes escaped: C0 controls but tab, DEL and C1 controls, the Unicode line and
#: paragraph separators (all of them line breaks to some reader) and lone surrogates.
_LOG_UNSAFE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def escape_controls(text: str) -> str:
    r"""``text`` with the characters ``run.log`` escapes (:data:`_LOG_UNSAFE`: control characters,
    line separators, lone surrogates) written as ``\n``, ``\xNN``, ``\uNNNN``: one line that
    cannot move a terminal's cursor, clear it or forge another line.

    >>> print(escape_controls("run\x1b[2J\nFAKE"))
    run\x1b[2J\nFAKE
    """
    return _LOG_UNSAFE.sub(_log_escape, text)


def _log_escape(m: re.Match) -> str:
    """The escape of one :data:`_LOG_UNSAFE` character: ``\\n``/``\\r``, a file name's undecodable
    byte (the surrogate ``os.fsdecode`` makes of it) as that byte, ``\\xNN`` or ``\\uNNNN``."""
    c = m.group()
    o = ord(c)
    if c in "\n\r":
        return "\\n" if c == "\n" else "\\r"
    if 0xDC80 <= o <= 0xDCFF:
        return f"\\x{o - 0xDC00:02x}"
    return f"\\x{o:02x}" if o <= 0xFF else f"\\u{o:04x}"


class RunStore:
    """Read and write one run directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        # shards this object committed or verified by hash: shard -> (tables, the files' identities)
        self._verified: dict[int, tuple] = {}

    # ---- layout ---------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    @property
    def shard_dir(self) -> Path:
        return self.root / "shards"

    def image_dir(self, kind: str) -> Path:
        d = self.root / "images" / kind
        with _WriteGuard(self.root, f"images/{kind}"):
            make_dirs(d)
        return d

    def save_image(self, arr, kind: str, name: str) -> str:
        """Write ``images/<kind>/<name>.png`` atomically (a crash never leaves half a PNG);
        returns its path relative to the run. ``name`` must already be safe (``safe_name``)."""
        buf = io.BytesIO()
        save_png(arr, buf)
        path = self.image_dir(kind) / f"{name}.png"
        with _WriteGuard(self.root, f"images/{kind}/{name}.png"):
            atomic_write_bytes(path, buf.getvalue())
        return f"images/{kind}/{name}.png"

    def create(self) -> None:
        with _WriteGuard(self.root, "the run directory"):
            make_dirs(self.shard_dir)  # the run directory too, each fsynced into its parent

    def exists(self) -> bool:
        return self.manifest_path.exists()

    # ---- manifest -------------------------------------------------------------------------
    def read_manifest(self, expect: str | tuple[str, ...] | None = None) -> dict:
        """The run's manifest; with ``expect`` (a command or several), refuse a run made by
        another command."""
        if not self.manifest_path.exists():
            raise MemscanError(
                f"{self.root} is not a memscan run (no manifest.json)", "pass the --out directory of a memscan run"
            )
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except json.JSONDecodeError as exc:
            raise MemscanError(
                f"{self.manifest_path} is not valid JSON ({exc})", "the run is damaged; rerun it"
            ) from None
        if not isinstance(manifest, dict):
            raise MemscanError(f"{self.manifest_path} is not a memscan manifest", "the run is damaged; rerun it")
        kind = manifest_kind(manifest)
        if kind is not None:
            manifest["kind"] = kind  # runs made before memscan 0.2 recorded it as "command"
        wanted = (expect,) if isinstance(expect, str) else expect
        if wanted is not None and kind not in wanted:
            names = " or ".join(f"`memscan {w}`" for w in wanted)
            raise MemscanError(
                f"{self.root} is a `memscan {kind}` run, not a {names} run",
                WHERE_RESULTS_ARE.get(kind, f"pass the --out directory of {names}"),
            )
        return manifest

    def write_manifest(self, manifest: dict) -> None:
        with _WriteGuard(self.root, "manifest.json"):
            atomic_write_json(self.manifest_path, manifest)

    def log(self, message: str) -> None:
        """Append ``message`` to ``run.log`` as one timestamped line. Messages carry paths, ids and
        exception text: line breaks and other control characters are written escaped (``\\n``,
        ``\\x1b``, ``\\u2028``), and so is a file name's undecodable byte (a lone surrogate,
        ``\\xff``), so a call writes exactly one line and no message can forge another."""
        line = _LOG_UNSAFE.sub(_log_escape, str(message))
        with open(self.root / "run.log", "a", encoding="utf-8", errors="backslashreplace") as f:
            f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {line}\n")

    # ---- shards ---------------------------------------------------------------------------
    def _record_path(self, shard: int) -> Path:
        return self.shard_dir / f"{shard:05d}.done.json"

    def _table_path(self, shard: int, table: str) -> Path:
        return self.shard_dir / f"{shard:05d}.{table}.parquet"

    def shard_done(self, shard: int) -> bool:
        """True when the shard's record exists and its files match the recorded hashes.

        Each file is hashed once per process: a shard this store committed, or verified before,
        is taken as done while its record and tables are the very files it wrote or hashed (same
        inode, size and modification time) — the end-of-run check does not read a large run's
        shards a second time. Any other state (a file replaced, rewritten or removed) is hashed
        again."""
        rec = self._record_path(shard)
        if not rec.exists():
            self._verified.pop(shard, None)
            return False
        try:
            known = self._verified.get(shard)
            if known is not None and known[1] == self._identity(shard, known[0]):
                return True
            record = json.loads(rec.read_text())
            done = all(
                self._table_path(shard, t).exists() and sha256_file(self._table_path(shard, t)) == h
                for t, h in record["sha256"].items()
            )
        except (ValueError, KeyError, TypeError, AttributeError, OSError):  # unreadable or damaged: redo
            done = False
        if done:
            self._remember(shard, tuple(record["sha256"]))
        else:
            self._verified.pop(shard, None)
        return done

    def _identity(self, shard: int, tables: tuple) -> tuple:
        """(inode, size, mtime) of the shard's record and of each of its ``tables`` (a few
        ``stat`` calls: no listing of the shard folder, which holds every shard's files)."""
        paths = [self._record_path(shard), *(self._table_path(shard, t) for t in tables)]
        return tuple((st.st_ino, st.st_size, st.st_mtime_ns) for st in map(os.stat, paths))

    def _remember(self, shard: int, tables: tuple) -> None:
        try:
            self._verified[shard] = (tables, self._identity(shard, tables))
        except OSError:
            self._verified.pop(shard, None)

    def commit_shard(self, shard: int, tables: dict[str, pd.DataFrame], meta: dict) -> None:
        """Write a shard's tables, then its completion record (the commit point)."""
        with _WriteGuard(self.root, f"shard {shard}"):
            make_dirs(self.shard_dir)
            hashes = {name: write_table(df, self._table_path(shard, name)) for name, df in tables.items()}
            rows = {name: len(df) for name, df in tables.items()}
            # the commit fields win over a stage's meta of the same name (the hashes are the commit)
            record = {**meta, "shard": shard, "rows": rows, "sha256": hashes}
            atomic_write_json(self._record_path(shard), record)
            self._remember(shard, tuple(hashes))  # its tables are the files just hashed

    def shard_record(self, shard: int) -> dict:
        return json.loads(self._record_path(shard).read_text())

    def read_shard(self, shard: int, table: str) -> pd.DataFrame:
        return pd.read_parquet(self._table_path(shard, table))

    def merge(self, n_shards: int, tables=SHARD_TABLES) -> dict[str, pd.DataFrame]:
        """Concatenate every shard's tables into the top-level tables (in shard order)."""
        out = {}
        for t in tables:
            parts = [self.read_shard(s, t) for s in range(n_shards)]
            parts = [p for p in parts if len(p)]
            df = pd.concat(parts, ignore_index=True) if parts else self.read_shard(0, t).iloc[0:0]
            with _WriteGuard(self.root, f"{t}.parquet"):
                write_table(df, self.root / f"{t}.parquet")
            out[t] = df
        return out

    def table(self, name: str) -> pd.DataFrame:
        """A top-level table of the run; missing or unreadable is one error naming the file."""
        path = self.root / f"{name}.parquet"
        if not path.exists():
            raise MemscanError(f"{path} is missing", f"the run did not finish: {self._rerun_hint()}")
        try:
            return pd.read_parquet(path)
        except Exception as exc:  # noqa: BLE001 - any read failure: a damaged table
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            raise MemscanError(f"cannot read {path} ({first})", f"the table is damaged: {self._rerun_hint()}") from None

    def _rerun_hint(self) -> str:
        """What to do about a run's missing or damaged table, in its own command's words."""
        try:
            kind = manifest_kind(json.loads((self.root / "manifest.json").read_text()))
        except (OSError, ValueError):
            kind = None
        if not kind:
            return "rerun the command that made it with --resume, or start a new run"
        if kind == "demo-mia":  # its run lies in OUT/run; rerunning the demo resumes it
            return f"rerun `memscan demo mia --out {self.root.parent}` (it resumes), or start a new one"
        command = "lm " + kind[3:] if kind.startswith("lm-") else kind
        return f"rerun `memscan {command} ... --out {self.root} --resume`, or start a new run"


def check_out_folder(out: str | Path, option: str = "--out") -> Path:
    """``out`` as a folder to write into: refused at once (before any work) when it, or a folder
    above it, is a file."""
    out = Path(out)
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                raise InputError(
                    f"{option} {out}: {p} is a file, not a folder", f"choose another {option} (a folder to create)"
                )
            break
    return out


# ---- the run lifecycle ------------------------------------------------------------------------
#: Version of the run-directory layout written by :func:`open_run` (1: before the common
#: lifecycle, with the kind under ``"command"`` in some manifests).
RUN_FORMAT = 2

#: Fields every manifest written through :func:`open_run` holds.
COMMON_MANIFEST_FIELDS = ("memscan_run", "kind", "status", "started", "versions")


def manifest_kind(manifest: dict) -> str | None:
    """The run kind of a manifest (``"kind"``; older runs recorded ``"command"``).

    Examples
    --------
    >>> manifest_kind({"kind": "mia"}), manifest_kind({"command": "extract", "memscan_run": 1})
    ('mia', 'extract')
    """
    return manifest.get("kind") or manifest.get("command")


def versions() -> dict:
    """Versions of Python and of the packages that decide a run's numbers, for the manifest."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("memscan", "numpy", "torch", "diffusers", "transformers", "pyarrow", "pandas"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def _now(t: float | None = None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t))


def _same_record(old, new) -> bool:
    """Whether a manifest's recorded value ``old`` equals ``new`` as the manifest would record it."""
    if old == new:
        return True
    return json.dumps(old, sort_keys=True, default=str) == json.dumps(new, sort_keys=True, default=str)


def _difference(key: str, old, new) -> str:
    """``old vs new`` for a refusal message; for two records, only the fields that differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        fields = [k for k in sorted(set(old) | set(new)) if not _same_record(old.get(k), new.get(k))]
        if fields:
            return "; ".join(f"{k}: {_shown(k, old.get(k))} vs {_shown(k, new.get(k))}" for k in fields)
    return f"{_shown(key, old)} vs {_shown(key, new)}"


def _shown(key: str, value) -> str:
    """A value in a refusal message (a sha256 shortened to its first 12 digits)."""
    if key.endswith("_sha256") and isinstance(value, str) and len(value) > 12:
        return value[:12] + "…"
    return str(value)


@dataclass
class Run:
    """A run directory opened for writing by :func:`open_run`: its store, manifest and lock.

    Use it as a context manager: on an exception the manifest is marked ``incomplete`` (the
    committed shards stay; ``--resume`` continues) and the lock is released.
    """

    store: RunStore
    kind: str
    lock: RunLock
    previous: dict | None = None
    manifest: dict = field(default_factory=dict)
    #: shards this process has logged, committed or kept (:func:`memscan.runners.shards.run_shards`)
    shards_logged: set[int] = field(default_factory=set)

    @property
    def root(self) -> Path:
        return self.store.root

    @property
    def resuming(self) -> bool:
        """True when this opens a run that an earlier process started."""
        return self.previous is not None

    def check(self, fields: dict, identity: Iterable[str], free: Mapping[str, Iterable[str]] | None = None) -> None:
        """Refuse a resume whose ``identity`` fields differ from the earlier run's (a no-op for a
        new run). Writes nothing, so it can run before any model loads or input is decoded, with
        the fields already known; :meth:`start` checks again with all of them.

        Values are compared as the manifest records them (JSON: a tuple equals a list). A key the
        earlier manifest lacks while this invocation records one is refused too: that run was
        started by an older memscan (or with other options), and its inputs cannot be checked. So
        is a record that lacks fields this invocation's has, the rest being equal (a setting an
        older memscan did not record): the error names those fields. ``free`` names fields of a
        record that may change on resume (``{"config": ("batch_size",)}``: how the work is batched,
        where that changes no result); the manifest then records the new value.
        """
        if self.previous is None:
            return
        free = free or {}
        for key in identity:
            old, new = self.previous.get(key), fields.get(key)
            if key in free and isinstance(old, dict) and isinstance(new, dict):
                old = {k: v for k, v in old.items() if k not in free[key]}
                new = {k: v for k, v in new.items() if k not in free[key]}
            if key == "definitions" and not _same_record(old, new):
                raise MemscanError(
                    f"cannot resume {self.root}: it was started by a memscan version whose definitions "
                    f"of its numbers differ ({old} vs {new}); its finished "
                    "shards would be mixed with new ones",
                    "start a new run with another --out",
                )
            if key not in self.previous and new is not None:
                raise MemscanError(
                    f"cannot resume {self.root}: its manifest records no {key} (the run was started by an older "
                    "memscan, or with other options), so this invocation cannot be checked to be the same run",
                    "start a new run with another --out",
                )
            missing = sorted(set(new) - set(old)) if isinstance(old, dict) and isinstance(new, dict) else []
            if missing and not _same_record(old, {k: v for k, v in new.items() if k in old}):
                missing = []  # other fields differ too: the plain difference says more
            if missing:
                raise MemscanError(
                    f"cannot resume {self.root}: its {key} records no {', '.join(missing)} (the run was started "
                    "by an older memscan, or without these settings), so this invocation cannot be checked to be "
                    "the same run",
                    "start a new run with another --out",
                )
            if not _same_record(old, new):
                raise MemscanError(
                    f"cannot resume {self.root}: its {key} differs from this invocation ({_difference(key, old, new)})",
                    "resume with the original model, inputs and options, or start a new run with another --out",
                )

    def start(
        self,
        fields: dict,
        *,
        identity: Iterable[str] = (),
        started: float | None = None,
        free: Mapping[str, Iterable[str]] | None = None,
    ) -> dict:
        """Write the manifest (``status: running``) with the common fields and ``fields``.

        When resuming, every key in ``identity`` must equal the earlier run's (a resumed run must
        be the same run; :meth:`check`; ``free``: fields that may change); the start time and the
        list of resumptions carry over. Nothing is written when it is refused.
        """
        self.check(fields, identity, free)
        manifest = {"memscan_run": RUN_FORMAT, "kind": self.kind, **fields}
        manifest.setdefault("versions", versions())
        if self.previous is not None:
            manifest["started"] = self.previous.get("started")
            manifest["resumed"] = [*self.previous.get("resumed", []), _now()]
        else:
            manifest["started"] = _now(started)
        manifest["status"] = "running"
        self.manifest = manifest
        self.store.write_manifest(manifest)
        return manifest

    def save(self) -> None:
        """Write the manifest as it stands."""
        self.store.write_manifest(self.manifest)

    def todo(self, n_shards: int) -> list[int]:
        """The shards without a valid completion record (all of them in a new run)."""
        return [s for s in range(n_shards) if not self.store.shard_done(s)]

    def finish(self, **fields) -> dict:
        """Record ``fields``, ``status: complete`` and the finishing time."""
        self.manifest.update(fields)
        self.manifest["status"] = "complete"
        self.manifest["finished"] = _now()
        self.save()
        return self.manifest

    def close(self) -> None:
        self.lock.release()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None and self.manifest.get("status") == "running":
                self.manifest["status"] = "incomplete"
                try:
                    self.save()
                except Exception:  # pragma: no cover - the original error matters more
                    pass
        finally:
            self.close()


def open_run(out: str | Path, kind: str, *, resume: bool = False, accept: Iterable[str] = ()) -> Run:
    """Create (or, with ``resume``, reopen) the run directory ``out`` of ``kind`` and lock it.

    Parameters
    ----------
    out : the run directory
    kind : the run kind recorded in the manifest (``extract``, ``mia``, …); ``memscan report``
        picks its renderer by it
    resume : continue the run already in ``out`` (it must be of this kind); without it, a
        directory that already holds a run is refused
    accept : further kinds a resume may reopen (e.g. a legacy name)

    Nothing is written and nothing is locked when the directory is refused, so a corrected
    rerun on the same ``out`` is never blocked.

    Examples
    --------
    >>> import tempfile
    >>> d = tempfile.mkdtemp() + "/run"
    >>> with open_run(d, "example") as run:
    ...     _ = run.start({"config": {"n": 1}}, identity=("config",))
    ...     _ = run.finish(counts={"rows": 0})
    >>> RunStore(d).read_manifest()["status"], RunStore(d).read_manifest(expect="example")["kind"]
    ('complete', 'example')
    >>> open_run(d, "example")
    Traceback (most recent call last):
    ...
    memscan.errors.MemscanError: run directory ... already holds a run (pass --resume to finish it, or choose a new --out)
    """
    store = RunStore(out)
    previous = None
    if store.exists():
        if not resume:
            raise MemscanError(
                f"run directory {out} already holds a run", "pass --resume to finish it, or choose a new --out"
            )
        previous = store.read_manifest(expect=(kind, *accept))  # before anything is loaded or logged
    store.create()
    lock = RunLock(store.root).acquire()
    try:
        if previous is not None:  # re-read under the lock: another process may have finished it
            previous = store.read_manifest(expect=(kind, *accept))
        remove_stale_temporaries(store)
    except BaseException:
        lock.release()
        raise
    return Run(store, kind, lock, previous)


#: ``.NAME.tmp-PID[-TOKEN][@HOST]`` (files written before temporary names carried the host lack it)
_TEMPORARY = re.compile(r"^\..+\.tmp-(\d+)(?:-[0-9a-f]+)?(?:@([A-Za-z0-9_.-]+))?$")


def remove_stale_temporaries(store: RunStore) -> list[str]:
    """Remove the temporary files (``.NAME.tmp-PID@HOST``, :func:`temporary_path`) a killed
    writer left anywhere in the run directory (e.g. a half-written ``embeddings.npy`` of
    ``memscan index``, as large as the embeddings, or a candidate PNG under ``images/``): those of processes of this host that no
    longer exist. Those of another host are kept (its process may still be alive; this host
    cannot tell), and logged; names without a host (older writers) are judged by their pid on
    this host. Called under the run's lock, so no live writer of this run owns them. Returns (and
    logs) the names removed."""
    removed, foreign = [], []
    here = _host_tag()
    for folder, _, files in os.walk(store.root):  # images/* too: PNGs are written under temporary names
        for path in (Path(folder) / name for name in files):
            m = _TEMPORARY.match(path.name)
            if m is None:
                continue
            pid, host = int(m.group(1)), m.group(2)
            if host is not None and host != here:
                foreign.append(str(path.relative_to(store.root)))
                continue
            if pid == os.getpid() or _alive(pid):
                continue
            try:
                path.unlink()
                removed.append(str(path.relative_to(store.root)))
            except OSError:
                pass
    if removed:
        store.log(f"removed {len(removed)} temporary file(s) left by a killed process: {', '.join(removed[:10])}")
    if foreign:
        store.log(
            f"kept {len(foreign)} temporary file(s) of processes on other hosts (remove them by hand if those "
            f"processes are gone): {', '.join(foreign[:10])}"
        )
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True

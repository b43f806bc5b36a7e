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

Every file is written to a temporary name and renamed, so a killed process leaves either the old
file or the new one. A shard counts as done only when its completion record exists and the
hashes in it match its files; anything else is redone on ``--resume``.

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

import hashlib
import io
import json
import os
import platform
import re
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from memscan.data.images import save_png
from memscan.errors import InputError, MemscanError

SHARD_TABLES = ("detections", "extractions")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write leaves the old file, never a half-written one
        raise


def atomic_write_json(path: Path, obj, default=str) -> None:
    """Write ``obj`` as JSON atomically (a reader sees the old file or the new one, never a part);
    ``default`` turns what JSON cannot hold into what it can."""
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=1, default=default) + "\n").encode())


def write_table(df: pd.DataFrame, path: Path) -> str:
    """Write a Parquet table atomically; returns its sha256."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        digest = sha256_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
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
            raise MemscanError(
                f"cannot write {self.what} in {self.root}: {reason}",
                "free disk space or fix permissions, then rerun with --resume (committed shards are kept)",
            ) from exc
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
    """An exclusive lock on a run directory (a ``.lock`` file created with O_EXCL).

    A lock left by a process that no longer exists on this host is taken over.
    """

    def __init__(self, root: Path):
        self.path = Path(root) / ".lock"
        self.held = False

    def acquire(self) -> RunLock:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileNotFoundError:
                raise MemscanError(
                    f"{self.path.parent} is not a memscan run (the directory does not exist)",
                    "pass the --out directory of a memscan run",
                ) from None
            except FileExistsError:
                if self._stale():
                    self.path.unlink(missing_ok=True)
                    continue
                info = self.path.read_text(errors="replace").strip()
                raise MemscanError(
                    f"run directory {self.path.parent} is in use by another memscan process ({info})",
                    "wait for it to finish, or remove the .lock file if that process is gone",
                ) from None
            except OSError as exc:  # read-only file system, permissions, quota
                raise MemscanError(
                    f"cannot write the lock file in {self.path.parent}: {exc.strerror or exc}",
                    "choose an --out on a writable disk, or fix its permissions",
                ) from None
            with os.fdopen(fd, "w") as f:
                f.write(f"pid={os.getpid()} host={socket.gethostname()} since={time.strftime('%Y-%m-%dT%H:%M:%S')}")
            self.held = True
            return self
        raise MemscanError(f"could not lock {self.path}")  # pragma: no cover

    def _stale(self) -> bool:
        try:
            fields = dict(kv.split("=", 1) for kv in self.path.read_text().split())
            if fields.get("host") != socket.gethostname():
                return False
            os.kill(int(fields["pid"]), 0)
            return False
        except ProcessLookupError:
            return True
        except (ValueError, KeyError, OSError):
            return False

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


class RunStore:
    """Read and write one run directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

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
            d.mkdir(parents=True, exist_ok=True)
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
            self.root.mkdir(parents=True, exist_ok=True)
            self.shard_dir.mkdir(exist_ok=True)

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
        with open(self.root / "run.log", "a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {message}\n")

    # ---- shards ---------------------------------------------------------------------------
    def _record_path(self, shard: int) -> Path:
        return self.shard_dir / f"{shard:05d}.done.json"

    def _table_path(self, shard: int, table: str) -> Path:
        return self.shard_dir / f"{shard:05d}.{table}.parquet"

    def shard_done(self, shard: int) -> bool:
        """True when the shard's record exists and its files match the recorded hashes."""
        rec = self._record_path(shard)
        if not rec.exists():
            return False
        try:
            record = json.loads(rec.read_text())
            return all(
                self._table_path(shard, t).exists() and sha256_file(self._table_path(shard, t)) == h
                for t, h in record["sha256"].items()
            )
        except (json.JSONDecodeError, KeyError, OSError):
            return False

    def commit_shard(self, shard: int, tables: dict[str, pd.DataFrame], meta: dict) -> None:
        """Write a shard's tables, then its completion record (the commit point)."""
        with _WriteGuard(self.root, f"shard {shard}"):
            self.shard_dir.mkdir(parents=True, exist_ok=True)
            hashes = {name: write_table(df, self._table_path(shard, name)) for name, df in tables.items()}
            rows = {name: len(df) for name, df in tables.items()}
            atomic_write_json(self._record_path(shard), {"shard": shard, "rows": rows, "sha256": hashes, **meta})

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

    @property
    def root(self) -> Path:
        return self.store.root

    @property
    def resuming(self) -> bool:
        """True when this opens a run that an earlier process started."""
        return self.previous is not None

    def check(self, fields: dict, identity: Iterable[str]) -> None:
        """Refuse a resume whose ``identity`` fields differ from the earlier run's (a no-op for a
        new run). Writes nothing, so it can run before any model loads or input is decoded, with
        the fields already known; :meth:`start` checks again with all of them.

        Values are compared as the manifest records them (JSON: a tuple equals a list). A key the
        earlier manifest lacks while this invocation records one is refused too: that run was
        started by an older memscan (or with other options), and its inputs cannot be checked.
        """
        if self.previous is None:
            return
        for key in identity:
            old, new = self.previous.get(key), fields.get(key)
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
            if not _same_record(old, new):
                raise MemscanError(
                    f"cannot resume {self.root}: its {key} differs from this invocation "
                    f"({_shown(key, old)} vs {_shown(key, new)})",
                    "resume with the original model, inputs and options, or start a new run with another --out",
                )

    def start(self, fields: dict, *, identity: Iterable[str] = (), started: float | None = None) -> dict:
        """Write the manifest (``status: running``) with the common fields and ``fields``.

        When resuming, every key in ``identity`` must equal the earlier run's (a resumed run must
        be the same run; :meth:`check`); the start time and the list of resumptions carry over.
        Nothing is written when it is refused.
        """
        self.check(fields, identity)
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
    except BaseException:
        lock.release()
        raise
    return Run(store, kind, lock, previous)

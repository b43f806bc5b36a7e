"""A run's shards are hashed at most once per process: the end-of-run check (``run.todo`` after
the shard loop) used to read every committed shard again — for a 160M-image index, hundreds of GB
a second time. A shard whose files changed since is still hashed, and found damaged."""

from __future__ import annotations

import os

import pandas as pd

from memscan import store as store_mod
from memscan.store import open_run


def _hashed(monkeypatch) -> list[str]:
    seen: list[str] = []
    real = store_mod.sha256_file

    def counting(path):
        if not path.name.startswith("."):  # write_table hashes its temporary file: not a check
            seen.append(path.name)
        return real(path)

    monkeypatch.setattr(store_mod, "sha256_file", counting)
    return seen


def _commit_all(run, n: int) -> None:
    for s in run.todo(n):
        run.store.commit_shard(s, {"detections": pd.DataFrame({"x": [s] * 50})}, {})


def test_a_fresh_run_never_reads_its_shards_back(tmp_path, monkeypatch):
    seen = _hashed(monkeypatch)
    with open_run(tmp_path / "r", "extract") as run:
        run.start({"config": {}})
        _commit_all(run, 6)
        assert run.todo(6) == []  # the end-of-run check
        run.finish()
    assert seen == []


def test_a_resumed_run_hashes_each_earlier_shard_once(tmp_path, monkeypatch):
    with open_run(tmp_path / "r", "extract") as run:
        run.start({"config": {}})
        for s in range(3):
            run.store.commit_shard(s, {"detections": pd.DataFrame({"x": [s] * 50})}, {})
    seen = _hashed(monkeypatch)
    with open_run(tmp_path / "r", "extract", resume=True) as run:
        run.start({"config": {}})
        _commit_all(run, 6)  # todo: hashes shards 0-2 once; 3-5 committed here
        assert run.todo(6) == []
        run.finish()
    assert sorted(seen) == [f"{s:05d}.detections.parquet" for s in range(3)]


def test_a_shard_changed_after_its_check_is_hashed_again_and_redone(tmp_path, monkeypatch):
    seen = _hashed(monkeypatch)
    with open_run(tmp_path / "r", "extract") as run:
        run.start({"config": {}})
        _commit_all(run, 3)
        table = run.store.shard_dir / "00001.detections.parquet"
        table.write_bytes(table.read_bytes()[:-8] + b"damaged!")  # same size, another file time

        st = table.stat()
        os.utime(table, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
        assert run.todo(3) == [1]
        assert seen == ["00001.detections.parquet"]
        (run.store.shard_dir / "00002.detections.parquet").unlink()
        assert run.todo(3) == [1, 2]


def test_the_check_of_a_known_shard_lists_no_folder(tmp_path, monkeypatch):
    """A known shard is checked by a few stat calls: listing the shard folder (every shard's
    files) per shard made the end-of-run check quadratic in the number of shards."""
    from pathlib import Path

    with open_run(tmp_path / "r", "extract") as run:
        run.start({"config": {}})
        _commit_all(run, 4)

        def refused(*args, **kwargs):
            raise AssertionError("the shard folder was listed")

        monkeypatch.setattr(Path, "glob", refused)
        monkeypatch.setattr(Path, "iterdir", refused)
        monkeypatch.setattr(os, "scandir", refused)
        monkeypatch.setattr(os, "listdir", refused)
        assert run.todo(4) == []
        monkeypatch.undo()
        run.finish()

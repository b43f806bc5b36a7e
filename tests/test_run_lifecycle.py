"""The one run lifecycle (`memscan.store.open_run`) and the model record every manifest carries."""

import json

import pytest

from memscan.errors import MemscanError
from memscan.generators.model_record import count_parameters, model_record, training_step
from memscan.store import COMMON_MANIFEST_FIELDS, RunStore, open_run


def test_new_run_writes_the_common_fields_and_completes(tmp_path):
    with open_run(tmp_path / "r", "extract") as run:
        assert not run.resuming
        m = run.start({"config": {"a": 1}, "n_shards": 2}, identity=("config", "n_shards"))
        assert (tmp_path / "r" / ".lock").exists()
        assert m["status"] == "running"
        assert run.todo(2) == [0, 1]
        run.store.commit_shard(0, {}, {})
        assert run.todo(2) == [1]
        run.finish(counts={"x": 3})
    assert not (tmp_path / "r" / ".lock").exists()
    m = RunStore(tmp_path / "r").read_manifest(expect="extract")
    for key in COMMON_MANIFEST_FIELDS:
        assert key in m, key
    assert m["kind"] == "extract" and m["status"] == "complete" and m["counts"] == {"x": 3}
    assert m["versions"]["memscan"] and "finished" in m


def test_existing_run_is_refused_without_resume_and_nothing_is_written(tmp_path):
    with open_run(tmp_path / "r", "mia") as run:
        run.start({})
        run.finish()
    before = (tmp_path / "r" / "manifest.json").read_bytes()
    with pytest.raises(MemscanError, match="already holds a run") as err:
        open_run(tmp_path / "r", "mia")
    assert "--resume" in err.value.hint
    assert (tmp_path / "r" / "manifest.json").read_bytes() == before
    assert not (tmp_path / "r" / ".lock").exists()


def test_resume_of_another_kind_is_refused(tmp_path):
    with open_run(tmp_path / "r", "triage") as run:
        run.start({})
    with pytest.raises(MemscanError, match="is a `memscan triage` run, not a `memscan extract` run"):
        open_run(tmp_path / "r", "extract", resume=True)
    assert not (tmp_path / "r" / ".lock").exists()


def test_resume_keeps_start_time_and_checks_identity(tmp_path):
    with open_run(tmp_path / "r", "extract") as run:
        first = run.start({"config": {"a": 1}, "n_shards": 3}, identity=("config", "n_shards"))
    with open_run(tmp_path / "r", "extract", resume=True) as run:
        assert run.resuming and run.previous["status"] == "running"
        with pytest.raises(MemscanError, match="its config differs"):
            run.start({"config": {"a": 2}, "n_shards": 3}, identity=("config", "n_shards"))
    with open_run(tmp_path / "r", "extract", resume=True) as run:
        m = run.start({"config": {"a": 1}, "n_shards": 3}, identity=("config", "n_shards"))
        assert m["started"] == first["started"] and len(m["resumed"]) == 1


def test_resume_of_a_run_predating_a_setting_names_the_setting(tmp_path):
    """A setting added to a config record (e.g. lm mia's document_start) made the resume of a run
    started by the previous version fail with "config differs" and a hint to resume with the
    original options, which cannot help: the error now names the missing field and the hint says
    to start a new run. A real difference still reads "differs"."""
    with open_run(tmp_path / "r", "lm-mia") as run:
        run.start({"config": {"a": 1}}, identity=("config",))  # the older version's record
    with open_run(tmp_path / "r", "lm-mia", resume=True) as run:
        with pytest.raises(MemscanError, match="its config records no document_start, z .*older memscan") as err:
            run.start({"config": {"a": 1, "z": 0, "document_start": False}}, identity=("config",))
    assert "another --out" in err.value.hint
    with open_run(tmp_path / "r", "lm-mia", resume=True) as run:
        with pytest.raises(MemscanError, match="its config differs"):  # a also differs: the plain message
            run.start({"config": {"a": 2, "document_start": False}}, identity=("config",))


def test_a_run_started_under_other_definitions_is_not_resumed(tmp_path):
    """A run whose manifest records other definitions of its numbers (or none: started before
    they were recorded, e.g. the k-eidetic count centred on the generation) is refused on
    resume, saying why and what to do; its manifest is left as it was."""
    from memscan.extraction.verify import DEFINITIONS

    with open_run(tmp_path / "r", "extract") as run:
        run.start({"config": {"a": 1}}, identity=("config",))  # an earlier version: no definitions
    before = (tmp_path / "r" / "manifest.json").read_text()
    with open_run(tmp_path / "r", "extract", resume=True) as run:
        with pytest.raises(MemscanError, match="definitions of its numbers differ") as err:
            run.start({"config": {"a": 1}, "definitions": DEFINITIONS}, identity=("config", "definitions"))
    assert "another --out" in err.value.hint
    assert (tmp_path / "r" / "manifest.json").read_text() == before


def test_failure_inside_marks_incomplete_and_releases_the_lock(tmp_path):
    with pytest.raises(RuntimeError):
        with open_run(tmp_path / "r", "extract") as run:
            run.start({})
            run.store.commit_shard(0, {}, {"kept": True})
            raise RuntimeError("model failed")
    m = RunStore(tmp_path / "r").read_manifest()
    assert m["status"] == "incomplete"
    assert not (tmp_path / "r" / ".lock").exists()
    assert RunStore(tmp_path / "r").shard_done(0)  # committed work is kept


def test_second_concurrent_open_is_refused(tmp_path):
    with open_run(tmp_path / "r", "extract") as run:
        run.start({})
        with pytest.raises(MemscanError, match="in use by another memscan process"):
            open_run(tmp_path / "r", "extract", resume=True)
    assert not (tmp_path / "r" / ".lock").exists()


def test_legacy_manifest_with_command_key_still_opens(tmp_path):
    d = tmp_path / "old"
    d.mkdir()
    (d / "manifest.json").write_text(json.dumps({"memscan_run": 1, "command": "extract", "status": "running"}))
    assert RunStore(d).read_manifest(expect="extract")["kind"] == "extract"
    with open_run(d, "extract", resume=True) as run:
        assert run.previous["command"] == "extract"
        m = run.start({})
    assert m["kind"] == "extract" and m["memscan_run"] == 2


def test_parameter_count_matches_torch(tmp_path):
    import torch

    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))  # 3*4+4 + 4*2+2 = 26

    class Holder:
        def __init__(self):
            self.unet = net
            self.pipe = type("P", (), {"components": {"a": net, "b": torch.nn.Linear(2, 2), "c": None}})()

    assert count_parameters(net) == 26
    assert count_parameters(Holder()) == 26 + 6  # the shared module counted once
    assert count_parameters(lambda p, s: None) is None


def test_training_step_from_checkpoint_records(tmp_path):
    ck = tmp_path / "run" / "checkpoint-2000"
    (ck / "unet").mkdir(parents=True)
    assert training_step(ck) == 2000
    assert training_step(ck / "unet") == 2000  # a unet/ subfolder of a trainer's checkpoint
    (ck / "trainer_state.json").write_text(json.dumps({"global_step": 1999}))
    assert training_step(ck) == 1999  # the trainer's own record wins over the folder name
    plain = tmp_path / "model"
    plain.mkdir()
    assert training_step(plain) is None
    (plain / "memscan.json").write_text(json.dumps({"training": {"recipe": {"steps": 300}}}))
    assert training_step(plain) == 300
    rec = model_record(str(plain))
    assert rec == {"id": str(plain.resolve()), "parameters": None, "training_step": 300}


def test_a_missing_or_damaged_run_table_is_one_error_in_the_runs_own_words(tmp_path):
    """`report` / `verify` read a run's tables: a missing one and a damaged one (truncated
    parquet) are each one error naming the file, with the hint of the command that made the run
    (not `memscan extract` for an `lm extractable` run)."""
    import pandas as pd

    with open_run(tmp_path / "r", "lm-extractable") as run:
        run.start({"config": {}}, identity=("config",))
        pd.DataFrame({"a": [1, 2]}).to_parquet(run.root / "sequences.parquet")
    store = RunStore(tmp_path / "r")
    assert store.table("sequences")["a"].tolist() == [1, 2]
    with pytest.raises(MemscanError, match="summary.parquet is missing") as err:
        store.table("summary")
    assert "memscan lm extractable" in err.value.hint and "extract ..." not in err.value.hint
    path = tmp_path / "r" / "sequences.parquet"
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(MemscanError, match="cannot read .*sequences.parquet") as err:
        store.table("sequences")
    assert "damaged" in err.value.hint and "memscan lm extractable" in err.value.hint
    with open_run(tmp_path / "demo" / "run", "demo-mia") as run:  # the demo's run lies in OUT/run
        run.start({"config": {}}, identity=("config",))
    with pytest.raises(MemscanError) as err:
        RunStore(tmp_path / "demo" / "run").table("metrics")
    assert f"memscan demo mia --out {tmp_path / 'demo'}`" in err.value.hint and "--resume" not in err.value.hint


# ---- the lock: an atomic takeover of a stale lock, a release that removes only its own -------------
def _dead_lock(root) -> str:
    """A lock left by a process of this host that no longer exists."""
    import socket

    text = f"pid=999999999 host={socket.gethostname()} since=killed"
    (root / ".lock").write_text(text)
    return text


def test_two_takeovers_of_one_stale_lock_never_both_hold_it(tmp_path, monkeypatch):
    """Both contenders judge the lock stale before either acts; the second acts only once the
    first holds the lock (the interleaving a check-then-act takeover loses): one holds it."""
    import threading

    from memscan.store import RunLock

    tmp_path.mkdir(exist_ok=True)
    _dead_lock(tmp_path)
    judged = threading.Barrier(2)
    first_holds = threading.Event()
    original = RunLock._stale
    seen: set = set()

    def stale_then_wait(self):
        result = original(self)
        me = threading.current_thread().name
        if result and me not in seen:  # the first judgement of each contender
            seen.add(me)
            judged.wait(timeout=60)
            if me == "second":
                first_holds.wait(timeout=60)  # a guard against a hang, not an assertion
        return result

    monkeypatch.setattr(RunLock, "_stale", stale_then_wait)
    outcome: dict = {}

    def contend(name):
        lock = RunLock(tmp_path)
        try:
            lock.acquire()
            outcome[name] = lock
        except MemscanError as exc:
            outcome[name] = exc
        finally:
            if name == "first":
                first_holds.set()

    threads = [threading.Thread(target=contend, args=(n,), name=n) for n in ("first", "second")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    holders = [n for n, v in outcome.items() if not isinstance(v, Exception)]
    assert holders == ["first"], outcome
    assert "in use by another memscan process" in str(outcome["second"])
    # the file names the holder (its token), and its release removes it
    assert outcome["first"].token in (tmp_path / ".lock").read_text()
    outcome["first"].release()
    assert not (tmp_path / ".lock").exists()


def _contend_in_a_process(root, start, done, results):
    from memscan.store import RunLock

    lock = RunLock(root)
    start.wait(timeout=60)
    try:
        lock.acquire()
        results.put("held")
    except MemscanError:
        results.put("refused")
    done.wait(timeout=60)  # hold it until every contender has tried
    lock.release()


def test_processes_racing_for_a_stale_lock_one_holds_it(tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    _dead_lock(tmp_path)
    n = 4
    start, done, results = ctx.Barrier(n), ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_contend_in_a_process, args=(tmp_path, start, done, results)) for _ in range(n)]
    for p in procs:
        p.start()
    outcomes = sorted(results.get(timeout=120) for _ in range(n))
    for p in procs:
        p.join(timeout=120)
    assert outcomes == ["held"] + ["refused"] * (n - 1)
    assert not (tmp_path / ".lock").exists()  # the holder's release removed its own lock


def test_release_never_removes_a_lock_another_process_took_over(tmp_path):
    from memscan.store import RunLock

    lock = RunLock(tmp_path).acquire()
    # another process took the run over (e.g. this one was judged gone): its lock, not ours
    other = "pid=1 host=elsewhere since=now token=theirs"
    (tmp_path / ".lock").write_text(other)
    lock.release()
    assert (tmp_path / ".lock").read_text() == other


def test_stage_meta_cannot_overwrite_the_commit_fields_of_a_shard_record(tmp_path):
    import hashlib

    import pandas as pd

    store = RunStore(tmp_path)
    store.create()
    table = pd.DataFrame({"a": [1, 2, 3]})
    store.commit_shard(0, {"t": table}, {"rows": {"t": 99}, "sha256": {"t": "0" * 64}, "shard": 7, "kept": 1})
    rec = store.shard_record(0)
    digest = hashlib.sha256((tmp_path / "shards" / "00000.t.parquet").read_bytes()).hexdigest()
    assert rec["rows"] == {"t": 3} and rec["sha256"] == {"t": digest} and rec["shard"] == 0 and rec["kept"] == 1
    assert store.shard_done(0)


@pytest.mark.parametrize(
    "damage",
    [b"\xff\xfe\x00garbage", b'{"sha256": null}', b"[1, 2]", b'{"sha256": {"t": 5}}', b'{"sha256": ', b""],
)
def test_a_damaged_shard_record_means_the_shard_is_redone(tmp_path, damage):
    """Any record that cannot be read as one (not UTF-8, valid JSON of the wrong shape,
    truncated) means "not done": the shard is redone. Not UTF-8 or the wrong shape used to
    crash the resume (UnicodeDecodeError, AttributeError, TypeError)."""
    import pandas as pd

    store = RunStore(tmp_path)
    store.create()
    store.commit_shard(0, {"t": pd.DataFrame({"a": [1, 2, 3]})}, {})
    assert store.shard_done(0)
    (tmp_path / "shards" / "00000.done.json").write_bytes(damage)
    assert not RunStore(tmp_path).shard_done(0)  # a new process, as on resume
    assert not store.shard_done(0)  # this one: the record changed since it was verified


def test_resume_removes_the_temporary_files_of_a_killed_writer_only(tmp_path):
    """A writer killed mid-write leaves ``.NAME.tmp-PID`` (e.g. a half-written embeddings.npy);
    the next open of the run removes those of dead processes and keeps a live process's."""
    import os
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # a process that has exited
    run_dir = tmp_path / "r"
    with pytest.raises(RuntimeError):
        with open_run(run_dir, "index") as run:
            run.start({"n_shards": 2}, identity=("n_shards",))
            raise RuntimeError("killed")
    (run_dir / "images" / "candidates").mkdir(parents=True)
    stale = [
        run_dir / f".embeddings.npy.tmp-{dead_pid}",
        run_dir / "shards" / f".00001.embeddings.parquet.tmp-{dead_pid}",
        # a PNG a killed worker was writing (images/ was not swept: such files stayed for good)
        run_dir / "images" / "candidates" / f".p0-abc.png.tmp-{dead_pid}",
    ]
    live = run_dir / f".embeddings.npy.tmp-{os.getppid()}"
    keep = [
        live,
        run_dir / "images" / "candidates" / f".p1-abc.png.tmp-{os.getppid()}",
        run_dir / "notes.tmp-1",
        run_dir / "shards" / "00000.done.json",
        run_dir / "images" / "candidates" / "p0-abc.png",
    ]
    for p in stale + keep:
        p.write_bytes(b"partial")
    with open_run(run_dir, "index", resume=True) as run:
        assert [p.exists() for p in stale] == [False, False, False]
        assert all(p.exists() for p in keep)
    assert "removed 3 temporary file(s)" in (run_dir / "run.log").read_text()


def test_a_resume_logs_the_shards_an_earlier_process_committed_without_a_log_line(tmp_path):
    """A driver killed between a shard's commit and its "committed" log line (the commit is the
    record's rename, the log line comes after it) left a committed shard the log never names; the
    resume names it in one "kept" line, once, and commits only the rest, each logged once."""
    import pandas as pd
    from conftest import assert_committed_once, shard_log_counts

    from memscan.runners.local import LocalPool
    from memscan.runners.shards import run_shards

    def stage(ctx, lo, hi):
        return {"rows": pd.DataFrame({"i": range(lo, hi)})}, {"n": hi - lo}

    args = {s: (2 * s, 2 * s + 2) for s in range(6)}
    with open_run(tmp_path / "r", "example") as run:
        run.start({"n_shards": 6})
        # the killed process: shards 0, 1 and 4 committed, the log line written for shard 1 only
        for s in (0, 1, 4):
            run.store.commit_shard(s, *stage(None, *args[s]))
        run.store.log("shard 1 committed: 2 rows")
    with open_run(tmp_path / "r", "example", resume=True) as run, LocalPool(lambda: None) as pool:
        run.start({"n_shards": 6})
        # an audit calls run_shards once per round, each time with every shard so far
        assert run_shards(run, pool, stage, {s: args[s] for s in range(5)}, progress=False) == 2
        assert run_shards(run, pool, stage, args, progress=False) == 1
        assert run.store.merge(6, tables=("rows",))["rows"]["i"].tolist() == list(range(12))
    log = (tmp_path / "r" / "run.log").read_text()
    assert log.count("resume: kept") == 1 and "resume: kept 3 shards committed earlier (0-1, 4)" in log
    assert shard_log_counts(log, 6) == {0: (0, 1), 1: (1, 1), 2: (1, 0), 3: (1, 0), 4: (0, 1), 5: (1, 0)}
    assert_committed_once(log, 6)
    # the old log (no "kept" line) fails the check: shard 0's commit is unaccounted for
    with pytest.raises(AssertionError):
        assert_committed_once(log.replace("resume: kept", "resume: had"), 6)


def test_a_new_run_logs_no_kept_line(tmp_path):
    import pandas as pd

    from memscan.runners.local import LocalPool
    from memscan.runners.shards import run_shards

    def stage(ctx, lo, hi):
        return {"rows": pd.DataFrame({"i": range(lo, hi)})}, {"n": hi - lo}

    with open_run(tmp_path / "r", "example") as run, LocalPool(lambda: None) as pool:
        run.start({"n_shards": 2})
        run_shards(run, pool, stage, {0: (0, 1)}, progress=False)
        run_shards(run, pool, stage, {0: (0, 1), 1: (1, 2)}, progress=False)  # shard 0: this process's
    assert "kept" not in (tmp_path / "r" / "run.log").read_text()

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

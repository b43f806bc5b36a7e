"""The Ray runner: same tables as the local runner, a killed worker or driver loses nothing and
commits nothing twice, user errors keep their message, a missing Ray gives the install hint.

One local Ray with 2 CPUs serves the whole test session (``ray_address`` in conftest.py); tests/
reaches its workers through PYTHONPATH, set before it starts.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest
from conftest import TESTS, assert_committed_once
from gen_support import MEMORIZED, planted

from memscan import ExtractConfig, InputError, MemscanError, extract
from memscan.runners import GeneratorSpec, RayOptions, ShardTask

CFG = ExtractConfig(samples_per_prompt=40, shard_size=2, batch_size=10)
ARGS = ["--samples-per-prompt", 40, "--shard-size", 2, "--batch-size", 10, "--quiet"]
N_SHARDS = 6
TABLES = ("prompts", "detections", "extractions")


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    p = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    p.write_text("\n".join(list(MEMORIZED)[:3] + [f"fresh {i}" for i in range(9)]) + "\n")
    return p


@pytest.fixture(scope="module")
def reference(tmp_path_factory, prompts, synth_train):
    """The local runner's run of the extraction every Ray run must reproduce."""
    out = tmp_path_factory.mktemp("ref") / "run"
    extract(planted(), prompts, synth_train, out, CFG, progress=False)
    return out


def _tables(run):
    return {t: pd.read_parquet(run / f"{t}.parquet") for t in TABLES}


def _assert_same_run(ref, run, retrieved=None):
    """``run``'s tables are ``ref``'s; a run verified through an index has one more column,
    ``retrieved`` (each candidate's retrieved images: here all of them, ``retrieved``)."""
    a, b = _tables(ref), _tables(run)
    if retrieved is not None:
        assert (b["extractions"].pop("retrieved") == retrieved).all()
    for name in TABLES:
        pd.testing.assert_frame_equal(a[name], b[name], check_dtype=True)
    # the images the workers wrote are the local run's, byte for byte
    for kind in ("candidates", "cliques", "train"):
        names = sorted(p.name for p in (ref / "images" / kind).glob("*.png"))
        assert names and names == sorted(p.name for p in (run / "images" / kind).glob("*.png"))
        for n in names:
            assert (ref / "images" / kind / n).read_bytes() == (run / "images" / kind / n).read_bytes()
    assert json.loads((run / "manifest.json").read_text())["status"] == "complete"


def _committed_once(run):
    log = (run / "run.log").read_text()
    assert_committed_once(log, N_SHARDS)
    return log


def test_ray_run_equals_local_run(ray_address, reference, prompts, synth_train, tmp_path):
    run = tmp_path / "ray"
    res = extract(
        "py:gen_support:planted",
        prompts,
        synth_train,
        run,
        CFG,
        progress=False,
        runner="ray",
        runner_options=RayOptions(num_workers=2),
    )
    _assert_same_run(reference, run)
    assert res.manifest["runner"]["name"] == "ray" and res.manifest["runner"]["workers"] == 2
    ref_counts = json.loads((reference / "manifest.json").read_text())["counts"]
    assert res.manifest["counts"] == ref_counts and ref_counts["extractions"] >= 2  # planted copies found
    _committed_once(run)
    workers = {json.loads(p.read_text())["worker"] for p in (run / "shards").glob("*.done.json")}
    assert all(w.startswith("ray:w") for w in workers)
    # the driver never loaded the model: the generator ran in the workers only
    assert os.getpid() not in {int(w.rsplit(":", 1)[1]) for w in workers}  # whole pids, not digits


def test_ray_run_through_the_index_equals_local_run(ray_address, reference, prompts, synth_train, tmp_path):
    """extract --index on Ray: workers get the small IndexVerification record (never the training
    images) and open the index memory-mapped; a flat index with K ≥ N gives the --train tables."""
    from memscan.index.faiss_index import build_index

    build_index(synth_train, tmp_path / "idx", embedder="pixel:8", index_type="flat", progress=False)
    run = tmp_path / "ray"
    res = extract(
        "py:gen_support:planted", prompts, None, run, CFG, progress=False, runner="ray",
        runner_options=RayOptions(num_workers=2), index=tmp_path / "idx", retrieve=200,
    )  # fmt: skip
    _assert_same_run(reference, run, retrieved=120)  # K = 200 > the 120 indexed images
    assert res.manifest["verification"]["via"] == "index" and res.manifest["runner"]["name"] == "ray"
    recs = [json.loads(p.read_text()) for p in (run / "shards").glob("*.done.json")]
    assert sum(r["retrieval"]["candidates"] for r in recs) == res.manifest["counts"]["detections"]


def test_ray_run_through_an_index_served_by_part_actors_equals_local_run(
    ray_address, reference, prompts, synth_train, tmp_path, monkeypatch
):
    """extract --index IDX --serve-index-cpus 0 on Ray: an index built in two parts is searched by two
    Ray actors, one per part (no worker opens a part); the tables equal the local --train run's, and
    the actors are stopped when the run ends. Without --runner ray, one clear error."""
    import memscan.extraction.pipeline as pipeline
    from memscan.errors import InputError
    from memscan.index.faiss_index import IndexParams, build_index, serve_index_on_ray

    build_index(synth_train, tmp_path / "idx", embedder="pixel:8", index_type=IndexParams("flat", shards=2),
                progress=False)  # fmt: skip
    served = []

    def serve(*args, **kwargs):  # the real serving, remembered to look at afterwards
        served.append(serve_index_on_ray(*args, **kwargs))
        return served[-1]

    monkeypatch.setattr(pipeline, "serve_index_on_ray", serve)
    run = tmp_path / "served"
    res = extract(
        "py:gen_support:planted", prompts, None, run, CFG, progress=False, runner="ray",
        runner_options=RayOptions(num_workers=2), index=tmp_path / "idx", retrieve=200, serve_index=0,
    )  # fmt: skip
    _assert_same_run(reference, run, retrieved=120)  # K = 200 > the 120 indexed images
    assert res.manifest["index_search"] == "ray actors, one per part"
    assert res.manifest["verification"]["via"] == "index"
    assert len(served) == 1 and len(served[0].index.sizes) == 2 and sum(served[0].index.sizes) == len(served[0].ids)
    assert served[0].index.servers == []  # the part actors were stopped when the run ended
    with pytest.raises(InputError, match="--runner ray"):
        extract("py:gen_support:planted", prompts, None, tmp_path / "x", CFG, progress=False,
                index=tmp_path / "idx", serve_index=0)  # fmt: skip
    assert not (tmp_path / "x").exists()


def test_worker_killed_mid_shard_is_retried_elsewhere(ray_address, reference, prompts, synth_train, tmp_path):
    _, victims = ray_address
    folder = victims / "kill"
    folder.mkdir()
    killed = []

    def killer():  # the test kills the worker process while it is inside a shard
        deadline = time.time() + 90
        while time.time() < deadline:
            pid_file = folder / "victim.pid"
            if pid_file.exists():
                pid = int(pid_file.read_text())
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.02)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    run = tmp_path / "ray"
    extract(
        GeneratorSpec("py:test_ray_support:victim"),
        prompts,
        synth_train,
        run,
        CFG,
        progress=False,
        runner="ray",
        runner_options=RayOptions(num_workers=2, env={"MEMSCAN_VICTIM_DIR": str(folder)}),
    )
    thread.join(5)
    assert len(killed) == 1
    _assert_same_run(reference, run)
    log = _committed_once(run)
    # "fresh 4" is prompt 8 → shard 3: its first worker died inside it, a second attempt committed it
    assert log.count("died during shard") == 1 and "died during shard 3:" in log, log
    assert f":{killed[0]} died during shard 3" in log
    records = {s: json.loads((run / "shards" / f"{s:05d}.done.json").read_text()) for s in range(N_SHARDS)}
    assert records[3]["attempt"] == 2
    assert int(records[3]["worker"].rsplit(":", 1)[1]) != killed[0]
    assert all(records[s]["attempt"] == 1 for s in range(N_SHARDS) if s != 3)


def test_driver_killed_then_resume(ray_address, reference, prompts, synth_train, tmp_path):
    """`memscan extract --runner ray` SIGKILLed mid-run; `--resume` on Ray finishes the run."""
    address, _ = ray_address
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "memscan.cli", "extract", "--model", "py:gen_support:slow"]
    cmd += ["--prompts", prompts, "--train", synth_train, "--out", run, *ARGS]
    cmd += ["--runner", "ray", "--ray-address", address, "--num-workers", 1]
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    proc = subprocess.Popen(list(map(str, cmd)), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not list((run / "shards").glob("*.done.json")) and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list((run / "shards").glob("*.done.json")))
    assert 1 <= done_before < N_SHARDS, f"the kill must land mid-run ({done_before} done): {proc.stderr.read()}"
    assert not (run / "detections.parquet").exists()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "running" and manifest["runner"]["name"] == "ray"

    # --resume (the same call with resume=True) finishes it, on the Ray runner again; the lock
    # left by the dead driver is taken over, the committed shards are kept
    res = extract(
        "py:gen_support:slow",
        prompts,
        synth_train,
        run,
        CFG,
        resume=True,
        progress=False,
        runner="ray",
        runner_options=RayOptions(num_workers=1),
    )
    assert res.manifest["resumed"]
    _assert_same_run(reference, run)
    _committed_once(run)


def test_resume_with_the_other_runner(ray_address, reference, prompts, synth_train, tmp_path):
    """local (2 shards) → ray (2 more) → local (the rest): each resumes what the other left."""
    run = tmp_path / "run"

    def go(runner, **kw):
        return extract(
            "py:gen_support:planted",
            prompts,
            synth_train,
            run,
            CFG,
            progress=False,
            runner=runner,
            runner_options=RayOptions(num_workers=1) if runner == "ray" else None,
            **kw,
        )

    with pytest.raises(MemscanError, match="stopped before all shards"):
        go("local", stop_after_shards=2)
    with pytest.raises(MemscanError, match="stopped before all shards"):
        go("ray", resume=True, stop_after_shards=2)
    records = [json.loads(p.read_text()) for p in sorted((run / "shards").glob("*.done.json"))]
    assert [r["shard"] for r in records] == [0, 1, 2, 3]
    assert [r["worker"].split(":")[0] for r in records] == ["local", "local", "ray", "ray"]
    res = go("local", resume=True)
    assert res.manifest["runner"]["name"] == "local" and len(res.manifest["resumed"]) == 2
    _assert_same_run(reference, run)
    _committed_once(run)


def test_user_error_in_a_worker_keeps_message_and_hint(ray_address, prompts, synth_train, tmp_path):
    with pytest.raises(InputError) as local:
        extract("py:gen_support:wrong_shape", prompts, synth_train, tmp_path / "a", CFG, progress=False)
    with pytest.raises(InputError) as remote:
        extract(
            "py:gen_support:wrong_shape",
            prompts,
            synth_train,
            tmp_path / "b",
            CFG,
            progress=False,
            runner="ray",
            runner_options=RayOptions(num_workers=1),
        )
    assert "has shape (1, 32, 32)" in remote.value.message
    assert (remote.value.message, remote.value.hint) == (local.value.message, local.value.hint)


def test_map_shards_generic_helper(ray_address):
    from memscan.runners import map_shards

    # one worker, so shards run in order: seven good ones, then bad input
    tasks = [ShardTask(i, (i,)) for i in range(7)] + [ShardTask(7, (-3,))]
    done = []
    with pytest.raises(MemscanError) as err:
        for d in map_shards(_setup(), (100,), _stage(), tasks, RayOptions(num_workers=1)):
            done.append(d)
    assert [d.key for d in done] == list(range(7))
    assert [d.value for d in done] == [i * i + 100 for i in range(7)]
    assert len({d.worker for d in done}) == 1 and all(d.attempt == 1 for d in done)
    # the user error arrives with its class, message and hint, and is not retried
    assert isinstance(err.value, InputError)
    assert (err.value.message, err.value.hint) == ("x=-3 is negative", "pass x ≥ 0")


def _setup():
    import test_ray_support

    return test_ray_support.offset_setup


def _stage():
    import test_ray_support

    return test_ray_support.square_stage


def test_ray_option_errors(ray_address, prompts, synth_train, tmp_path):
    with pytest.raises(InputError, match="--gpus-per-worker 1"):
        extract(
            "py:gen_support:planted",
            prompts,
            synth_train,
            tmp_path / "a",
            ExtractConfig(samples_per_prompt=40, device="cuda"),
            progress=False,
            runner="ray",
            runner_options=RayOptions(num_workers=1),
        )
    with pytest.raises(InputError, match="loads the model in each worker"):
        extract(planted(), prompts, synth_train, tmp_path / "b", CFG, progress=False, runner="ray")
    with pytest.raises(InputError, match="--num-workers applies to --runner ray only"):
        RayOptions.from_cli("local", num_workers=2)
    with pytest.raises(InputError, match="--ray-address, --gpus-per-worker apply to"):
        RayOptions.from_cli("local", address="auto", gpus_per_worker=1)
    with pytest.raises(InputError, match="unknown runner"):
        RayOptions.from_cli("dask")
    with pytest.raises(InputError, match="num_workers=0"):
        RayOptions(num_workers=0).validate()
    # a worker the cluster can never place: a clear error after start_timeout_s, not a hang
    from memscan.runners import RayPool

    logged = []
    pool = RayPool(_setup(), (0,), RayOptions(num_workers=1, cpus_per_worker=3, start_timeout_s=2), log=logged.append)
    with pool, pytest.raises(MemscanError, match="no Ray worker started within 2 s"):
        list(pool.map(_stage(), [ShardTask(0, (1,))]))
    assert any("asks for 0 GPU and 3 CPU, but the cluster has 0 GPU and 2 CPU" in m for m in logged)


def test_missing_ray_gives_the_install_hint(monkeypatch, prompts, synth_train, tmp_path):
    from typer.testing import CliRunner

    from memscan.cli import app

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(InputError) as err:
        extract("py:gen_support:planted", prompts, synth_train, tmp_path / "a", CFG, progress=False, runner="ray")
    assert "pip install 'memscan[ray]'" in err.value.hint
    res = CliRunner().invoke(
        app,
        ["extract", "--model", "py:gen_support:planted", "--prompts", str(prompts), "--train", str(synth_train)]
        + ["--out", str(tmp_path / "b"), "--runner", "ray", "--quiet"],
    )
    assert res.exit_code == 2
    assert "needs Ray" in res.output and "memscan[ray]" in res.output


def test_a_worker_that_fails_while_loading_gives_one_line_and_logs_the_traceback(ray_address):
    """A setup that raises something other than a MemscanError: the error names the exception in
    one line (not Ray's whole remote traceback); run.log gets the traceback."""
    from memscan.runners import RayPool

    logged = []
    with pytest.raises(MemscanError) as err:
        with RayPool(int, ("not-a-number",), RayOptions(num_workers=1), log=logged.append) as pool:
            list(pool.map(_stage(), [ShardTask(0, (1,))]))
    want = "ValueError: invalid literal for int() with base 10: 'not-a-number'"
    try:
        int("not-a-number")
    except ValueError as exc:
        assert f"{type(exc).__name__}: {exc}" == want
    assert err.value.message == f"a Ray worker failed while loading: {want}"
    assert "\n" not in err.value.message and "run.log" in err.value.hint
    assert any("failed while loading" in m and 'File "' in m and want in m for m in logged), logged

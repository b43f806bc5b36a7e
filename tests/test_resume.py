"""A killed `memscan extract` resumes to the tables of an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time

import pandas as pd
from conftest import TESTS, assert_committed_once, run_cli
from gen_support import MEMORIZED

ARGS = ["--samples-per-prompt", 30, "--shard-size", 2, "--batch-size", 10, "--quiet"]


def _prompts(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("\n".join(list(MEMORIZED)[:3] + [f"fresh {i}" for i in range(9)]) + "\n")
    return p


def _tables(run):
    return {t: pd.read_parquet(run / f"{t}.parquet") for t in ("detections", "extractions", "prompts")}


def test_sigkill_then_resume_equals_uninterrupted(tmp_path, synth_train):
    prompts = _prompts(tmp_path)
    full = tmp_path / "full"
    run_cli(
        "extract",
        "--model",
        "py:gen_support:slow",
        "--prompts",
        prompts,
        "--train",
        synth_train,
        "--out",
        full,
        *ARGS,
        env={"MEMSCAN_TEST_DELAY": "0"},
    )

    killed = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "memscan.cli",
        "extract",
        "--model",
        "py:gen_support:slow",
        "--prompts",
        str(prompts),
        "--train",
        str(synth_train),
        "--out",
        str(killed),
        *map(str, ARGS),
    ]
    env = {**os.environ, "PYTHONPATH": str(TESTS), "MEMSCAN_TEST_DELAY": "0.1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((killed / "shards").glob("*.done.json"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list((killed / "shards").glob("*.done.json")))
    assert 2 <= done_before < 6, "the kill must land mid-run"
    assert not (killed / "detections.parquet").exists()

    # without --resume the run directory is protected
    again = run_cli(
        "extract",
        "--model",
        "py:gen_support:slow",
        "--prompts",
        prompts,
        "--train",
        synth_train,
        "--out",
        killed,
        *ARGS,
        check=False,
    )
    assert again.returncode == 2 and "--resume" in again.stderr

    run_cli(
        "extract",
        "--model",
        "py:gen_support:slow",
        "--prompts",
        prompts,
        "--train",
        synth_train,
        "--out",
        killed,
        *ARGS,
        "--resume",
        env={"MEMSCAN_TEST_DELAY": "0"},
    )
    a, b = _tables(full), _tables(killed)
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name], check_dtype=True)
    # every shard committed exactly once (a shard whose commit the kill cut off from its log line
    # is named by the resume's "kept" line)
    assert_committed_once((killed / "run.log").read_text(), 6)


def test_half_written_shard_is_redone(tmp_path, synth_train):
    prompts = _prompts(tmp_path)
    run = tmp_path / "run"
    run_cli(
        "extract",
        "--model",
        "py:gen_support:planted",
        "--prompts",
        prompts,
        "--train",
        synth_train,
        "--out",
        run,
        *ARGS,
    )
    before = _tables(run)
    # damage: a shard table truncated after its record was written, and the final tables gone
    victim = run / "shards" / "00001.detections.parquet"
    victim.write_bytes(victim.read_bytes()[:50])
    (run / "detections.parquet").unlink()
    import json

    m = json.loads((run / "manifest.json").read_text())
    m["status"] = "running"
    (run / "manifest.json").write_text(json.dumps(m))
    run_cli(
        "extract",
        "--model",
        "py:gen_support:planted",
        "--prompts",
        prompts,
        "--train",
        synth_train,
        "--out",
        run,
        *ARGS,
        "--resume",
    )
    after = _tables(run)
    for name in before:
        pd.testing.assert_frame_equal(before[name], after[name])
    assert (run / "run.log").read_text().count("shard 1 committed") == 2


def test_resume_with_other_options_is_refused(tmp_path, synth_train):
    prompts = _prompts(tmp_path)
    run = tmp_path / "run"
    run_cli(
        "extract",
        "--model",
        "py:gen_support:planted",
        "--prompts",
        prompts,
        "--train",
        synth_train,
        "--out",
        run,
        *ARGS,
    )
    proc = run_cli(
        "extract",
        "--model",
        "py:gen_support:planted",
        "--prompts",
        prompts,
        "--train",
        synth_train,
        "--out",
        run,
        "--samples-per-prompt",
        31,
        "--shard-size",
        2,
        "--batch-size",
        10,
        "--quiet",
        "--resume",
        check=False,
    )
    assert proc.returncode == 2 and "differs" in proc.stderr

"""``memscan verify RUN`` killed while it rewrites the run's tables (reviewer's report D7).

It rewrites ``detections.parquet``, ``extractions.parquet``, the matched training images and the
manifest, one after the other. A kill in between must leave either the run as it was or one marked
unfinished (``status: verifying``) that ``memscan report`` refuses and that a rerun of ``memscan
verify`` finishes: to the tables and manifest of a verify that was never interrupted.
"""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pandas as pd
import pytest
from gen_support import MEMORIZED, planted
from typer.testing import CliRunner

import memscan.extraction.pipeline as pipeline
from memscan.cli import app
from memscan.extraction.config import ExtractConfig
from memscan.extraction.pipeline import extract

runner = CliRunner()
TABLES = ("detections", "extractions", "prompts")
#: raises the clique threshold (p0: 16, p3: 11 undetected) and lowers δ: both tables change
NEW = ("--min-clique", 17, "--delta", 0.05)


class _Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so nothing in memscan catches or cleans up after it."""


@pytest.fixture(scope="module")
def finished(tmp_path_factory, synth_train):
    """A finished extract run: 5 prompts detected at k = 10 (clique sizes 16, 19, 19, 11, 17)."""
    prompts = list(MEMORIZED) + [f"fresh {i}" for i in range(3)]
    cfg = ExtractConfig(samples_per_prompt=40, batch_size=20, shard_size=4, n_nearest=5)
    return extract(planted(), prompts, synth_train, tmp_path_factory.mktemp("vr") / "run", cfg, progress=False).run_dir


def _cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def _tables(run: Path) -> dict[str, pd.DataFrame]:
    return {t: pd.read_parquet(run / f"{t}.parquet") for t in TABLES}


def _manifest(run: Path) -> dict:
    m = json.loads((run / "manifest.json").read_text())
    for r in m.get("reverified", []):
        r.pop("at")
    return m


def _kill_when_writing(monkeypatch, name: str) -> None:
    """``memscan verify`` dies as it starts writing ``name`` (everything before it is written)."""
    write_table, save_train_matches = pipeline.write_table, pipeline.save_train_matches

    def write_or_die(df, path):
        if Path(path).name == name:
            raise _Killed
        return write_table(df, path)

    def save_or_die(store, ext, training):
        if name == "images/train":
            raise _Killed
        return save_train_matches(store, ext, training)

    monkeypatch.setattr(pipeline, "write_table", write_or_die)
    monkeypatch.setattr(pipeline, "save_train_matches", save_or_die)


@pytest.mark.parametrize("dies_at", ["detections.parquet", "extractions.parquet", "images/train"])
def test_a_killed_verify_is_marked_refused_by_report_and_finished_by_a_rerun(finished, tmp_path, monkeypatch, dies_at):
    full, killed = tmp_path / "full", tmp_path / "killed"
    shutil.copytree(finished, full)
    shutil.copytree(finished, killed)
    res = _cli("verify", full, *NEW)
    assert res.exit_code == 0 and "3 detections" in res.output, res.output
    before = _tables(finished)
    assert not _tables(full)["detections"].equals(before["detections"])
    assert not _tables(full)["extractions"].equals(before["extractions"])

    with monkeypatch.context() as m:
        _kill_when_writing(m, dies_at)
        with pytest.raises(_Killed):
            runner.invoke(app, ["verify", str(killed), *map(str, NEW)], catch_exceptions=False)
    # a real kill leaves the lock of a process that no longer exists
    (killed / ".lock").write_text(f"pid=999999999 host={socket.gethostname()} since=killed")
    manifest = json.loads((killed / "manifest.json").read_text())
    assert manifest["status"] == "verifying", "a run whose tables are half rewritten must not read complete"
    assert manifest["verifying"]["min_clique"] == 17 and manifest["verifying"]["delta"] == 0.05
    assert "memscan verify" in manifest["verifying"]["hint"]
    if dies_at == "extractions.parquet":  # the tables disagree: one rewritten, one not
        pd.testing.assert_frame_equal(_tables(killed)["detections"], _tables(full)["detections"])
        pd.testing.assert_frame_equal(_tables(killed)["extractions"], before["extractions"])

    res = _cli("report", killed)
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert "is not complete (status 'verifying')" in res.output
    assert "memscan verify" in res.output and "--resume" not in res.output  # how to finish it
    assert not (killed / "report.html").exists()

    res = _cli("verify", killed)  # a bare rerun finishes the interrupted verify, with its thresholds
    assert res.exit_code == 0 and "3 detections" in res.output, res.output
    after = _tables(killed)
    for name in TABLES:
        pd.testing.assert_frame_equal(after[name], _tables(full)[name], check_dtype=True, obj=name)
    assert _manifest(killed) == _manifest(full)
    assert sorted(p.name for p in (killed / "images" / "train").iterdir()) == sorted(
        p.name for p in (full / "images" / "train").iterdir()
    )
    assert not (killed / ".lock").exists()
    assert _cli("report", killed).exit_code == 0


def test_a_verify_stopped_by_an_error_while_writing_stays_marked(finished, tmp_path, monkeypatch):
    """A write that fails (disk full) is one error naming the fix; the run stays marked."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    write_table = pipeline.write_table

    def full_disk(df, path):
        if Path(path).name == "extractions.parquet":
            raise OSError(28, "No space left on device")
        return write_table(df, path)

    monkeypatch.setattr(pipeline, "write_table", full_disk)
    res = _cli("verify", run, *NEW)
    assert res.exit_code == 2 and "No space left on device" in res.output and "Traceback" not in res.output
    assert f"rerun `memscan verify {run}`" in res.output.replace("\n", "")
    assert json.loads((run / "manifest.json").read_text())["status"] == "verifying"
    assert not (run / ".lock").exists()
    monkeypatch.setattr(pipeline, "write_table", write_table)
    assert _cli("verify", run).exit_code == 0
    assert json.loads((run / "manifest.json").read_text())["status"] == "complete"


def test_options_given_to_the_rerun_replace_the_interrupted_ones(finished, tmp_path, monkeypatch):
    run, ref = tmp_path / "run", tmp_path / "ref"
    shutil.copytree(finished, run)
    shutil.copytree(finished, ref)
    with monkeypatch.context() as m:
        _kill_when_writing(m, "extractions.parquet")
        with pytest.raises(_Killed):
            runner.invoke(app, ["verify", str(run), *map(str, NEW)], catch_exceptions=False)
    assert _cli("verify", run, "--delta", 0.15).exit_code == 0  # δ given again; k is the interrupted one's
    assert _cli("verify", ref, "--min-clique", 17, "--delta", 0.15).exit_code == 0
    for name in TABLES:
        pd.testing.assert_frame_equal(_tables(run)[name], _tables(ref)[name], obj=name)
    m = json.loads((run / "manifest.json").read_text())
    assert m["status"] == "complete" and "verifying" not in m
    assert m["config"]["min_clique"] == 17 and m["config"]["delta"] == 0.15


@pytest.mark.parametrize("state", ["reverified", "verifying"])
def test_extract_resume_of_a_reverified_run_is_refused(tmp_path, synth_train, state):
    """``extract --resume`` merges a run's tables from its shards. On a run ``memscan verify``
    rewrote (or is rewriting), it used to pass the identity check with the re-verified options
    and silently put back the shards' tables under the new thresholds: refused now, with nothing
    written."""
    run, prompts = tmp_path / "run", tmp_path / "prompts.txt"
    prompts.write_text("\n".join(list(MEMORIZED) + [f"fresh {i}" for i in range(3)]) + "\n")
    args = ["extract", "--model", "py:gen_support:planted", "--prompts", prompts, "--train", synth_train]
    args += ["--out", run, "--samples-per-prompt", 40, "--batch-size", 20, "--shard-size", 4, "--quiet"]
    assert _cli(*args).exit_code == 0
    original = _tables(run)
    res = _cli("verify", run, *NEW)
    assert res.exit_code == 0, res.output
    assert len(_tables(run)["extractions"]) < len(original["extractions"])  # δ 0.15 → 0.05
    if state == "verifying":  # as a killed verify leaves it
        manifest = json.loads((run / "manifest.json").read_text())
        manifest["status"], manifest["verifying"] = "verifying", {"delta": 0.05, "min_clique": 17}
        (run / "manifest.json").write_text(json.dumps(manifest))
    before = {**_tables(run), "manifest": (run / "manifest.json").read_text()}
    res = _cli(*args, *NEW, "--resume")  # the options the manifest now records
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    line = [ln for ln in res.output.splitlines() if ln.startswith("error:")][0]
    assert "memscan verify" in line and "another --out" in line
    assert (run / "manifest.json").read_text() == before.pop("manifest")
    for name, table in before.items():
        pd.testing.assert_frame_equal(_tables(run)[name], table, obj=name)

"""User code that fails (a bug in a ``py:`` generator, CUDA out of memory) ends the run with one
clean error naming the prompt or samples and ``--resume``; the committed shards are kept and
``--resume`` after the fix gives the tables of an uninterrupted run. ``memscan --debug`` adds the
traceback."""

import json

import pandas as pd
import pytest
from conftest import run_cli
from gen_support import MEMORIZED
from typer.testing import CliRunner

from memscan.cli import app
from memscan.errors import InputError, MemscanError, UserCodeError, user_code

ARGS = ["--samples-per-prompt", 20, "--shard-size", 2, "--batch-size", 10, "--min-clique", 5, "--quiet"]
THIRD = list(MEMORIZED)[2]  # the 3rd prompt (line-3), in shard 1


def _prompts(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("\n".join(list(MEMORIZED)[:3] + [f"fresh {i}" for i in range(3)]) + "\n")
    return p


def _extract(prompts, train, out, *extra, env=None, check=True):
    model = "py:user_code_support:fails_on_prompt"
    args = ("extract", "--model", model, "--prompts", prompts, "--train", train, "--out", out, *ARGS, *extra)
    return run_cli(*args, env=env, check=check)


def _tables(run):
    return {t: pd.read_parquet(run / f"{t}.parquet") for t in ("detections", "extractions", "prompts")}


def _error_lines(text):
    return [ln for ln in text.splitlines() if ln.startswith("error:")]


def test_failing_generator_stops_cleanly_then_resume_finishes(tmp_path, synth_train):
    prompts = _prompts(tmp_path)
    full = tmp_path / "full"
    _extract(prompts, synth_train, full)

    run = tmp_path / "run"
    proc = _extract(prompts, synth_train, run, env={"MEMSCAN_TEST_FAIL_PROMPT": THIRD}, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    (line,) = _error_lines(proc.stderr)
    assert proc.stderr.strip() == line  # one line, nothing else
    assert "line-3" in line and repr(THIRD) in line and "samples 0–9" in line  # names the prompt
    assert "RuntimeError: simulated bug in the user's model" in line  # and what the user code raised
    assert " — " in line and "--resume" in line  # and what to do
    # the shard before it is committed, the failing one is not; the run is resumable
    assert (run / "shards" / "00000.done.json").exists()
    assert not (run / "shards" / "00001.done.json").exists()
    assert json.loads((run / "manifest.json").read_text())["status"] != "complete"
    assert not (run / "detections.parquet").exists()
    assert not (run / ".lock").exists()

    # the bug fixed (the variable unset), --resume finishes to the tables of an uninterrupted run
    _extract(prompts, synth_train, run, "--resume")
    a, b = _tables(full), _tables(run)
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name], check_dtype=True)
    log = (run / "run.log").read_text()
    for s in range(3):
        assert log.count(f"shard {s} committed") == 1


runner = CliRunner()


def _cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def _extract_in_process(prompts, train, out, *pre, args=ARGS):
    model = "py:user_code_support:fails_on_prompt"
    return _cli(*pre, "extract", "--model", model, "--prompts", prompts, "--train", train, "--out", out, *args)


def test_debug_prints_the_traceback_and_its_cause(tmp_path, synth_train, monkeypatch):
    monkeypatch.setenv("MEMSCAN_TEST_FAIL_PROMPT", THIRD)
    res = _extract_in_process(_prompts(tmp_path), synth_train, tmp_path / "run", "--debug")
    assert res.exit_code == 2, res.output
    assert "Traceback" in res.output
    assert "RuntimeError: simulated bug in the user's model" in res.output  # the cause, with its frames
    assert "user_code_support.py" in res.output
    assert "direct cause of the following exception" in res.output and "UserCodeError" in res.output
    (line,) = _error_lines(res.output)
    assert res.output.strip().splitlines()[-1] == line and "line-3" in line  # the error line comes last


def test_memscan_errors_from_user_code_pass_through_unchanged(tmp_path, synth_train, monkeypatch):
    monkeypatch.setenv("MEMSCAN_TEST_FAIL_PROMPT", THIRD)
    monkeypatch.setenv("MEMSCAN_TEST_FAIL_KIND", "InputError")
    res = _extract_in_process(_prompts(tmp_path), synth_train, tmp_path / "run")
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert _error_lines(res.output) == [f"error: the user's model refuses {THIRD!r} — the user's own hint"]


def test_out_of_memory_hints_at_the_batch_size(tmp_path, synth_train, monkeypatch):
    monkeypatch.setenv("MEMSCAN_TEST_FAIL_PROMPT", THIRD)
    monkeypatch.setenv("MEMSCAN_TEST_FAIL_KIND", "oom")
    res = _extract_in_process(_prompts(tmp_path), synth_train, tmp_path / "run")
    assert res.exit_code == 2 and "Traceback" not in res.output
    (line,) = _error_lines(res.output)
    assert "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB" in line
    assert "GPU 0 has" not in line  # the first line of the message only
    assert "--batch-size" in line and "--resume" in line
    # doing what the hint says: the same command at a lower batch size, with --resume, finishes
    # the run (it used to be refused: batch_size was part of the run's identity), and its tables
    # are those of an uninterrupted run (each generation's seed is its own, not its batch's)
    monkeypatch.delenv("MEMSCAN_TEST_FAIL_PROMPT")
    lower = [a if a != 10 else 5 for a in ARGS]
    assert lower != ARGS
    res = _extract_in_process(_prompts(tmp_path), synth_train, tmp_path / "run", args=[*lower, "--resume"])
    assert res.exit_code == 0, res.output
    whole = _extract_in_process(_prompts(tmp_path), synth_train, tmp_path / "whole")
    assert whole.exit_code == 0, whole.output
    for table in ("detections", "extractions"):
        got = pd.read_parquet(tmp_path / "run" / f"{table}.parquet").drop(columns=["candidate_image"], errors="ignore")
        want = pd.read_parquet(tmp_path / "whole" / f"{table}.parquet").drop(
            columns=["candidate_image"], errors="ignore"
        )
        pd.testing.assert_frame_equal(got, want)
    assert len(pd.read_parquet(tmp_path / "run" / "detections.parquet")) == 6
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["config"]["batch_size"] == 5 and len(manifest["resumed"]) == 1


def test_keyboard_interrupt_in_user_code_still_exits_130(tmp_path, synth_train):
    env = {"MEMSCAN_TEST_FAIL_PROMPT": THIRD, "MEMSCAN_TEST_FAIL_KIND": "KeyboardInterrupt"}
    proc = _extract(_prompts(tmp_path), synth_train, tmp_path / "run", env=env, check=False)
    assert proc.returncode == 130, proc.stderr
    assert not _error_lines(proc.stderr) and "UserCodeError" not in proc.stderr


def test_a_failing_model_factory_is_one_error(tmp_path, synth_train):
    (tmp_path / "broken.py").write_text("def make():\n    raise ValueError('weights not found')\n")
    res = _cli(
        "extract", "--model", f"py:{tmp_path / 'broken.py'}:make", "--prompts", _prompts(tmp_path),
        "--train", synth_train, "--out", tmp_path / "run", *ARGS,
    )  # fmt: skip
    assert res.exit_code == 2 and "Traceback" not in res.output
    (line,) = _error_lines(res.output)
    assert "loading the model py:" in line and "ValueError: weights not found" in line


def test_unconditional_extraction_names_the_shard_and_resumes(tmp_path, synth_train, monkeypatch):
    from memscan.generators.seeds import derive_seed

    args = ("--train", synth_train, "--samples", 24, "--shard-size", 8, "--batch-size", 4, "--n-nearest", 10)
    model = ("extract-unconditional", "--model", "py:user_code_support:fails_on_seed")
    full = tmp_path / "full"
    assert _cli(*model, *args, "--out", full, "--quiet").exit_code == 0

    run = tmp_path / "run"
    monkeypatch.setenv("MEMSCAN_TEST_FAIL_SEED", str(derive_seed(0, "unconditional", 13)))
    res = _cli(*model, *args, "--out", run, "--quiet")
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    (line,) = _error_lines(res.output)
    assert "shard 1 (samples 12–15)" in line and "--resume" in line
    assert (run / "shards" / "00000.done.json").exists() and not (run / "shards" / "00001.done.json").exists()
    assert json.loads((run / "manifest.json").read_text())["status"] != "complete"

    monkeypatch.delenv("MEMSCAN_TEST_FAIL_SEED")
    assert _cli(*model, *args, "--out", run, "--quiet", "--resume").exit_code == 0
    for t in ("generations", "extractions"):
        pd.testing.assert_frame_equal(pd.read_parquet(full / f"{t}.parquet"), pd.read_parquet(run / f"{t}.parquet"))


def test_user_code_wraps_other_exceptions_and_keeps_the_cause():
    with pytest.raises(UserCodeError) as info:
        with user_code("the generator failed on prompt p1"):
            raise ZeroDivisionError("division by zero")
    err = info.value
    assert isinstance(err, MemscanError) and isinstance(err.__cause__, ZeroDivisionError)
    assert err.message == "the generator failed on prompt p1: ZeroDivisionError: division by zero"
    assert "--resume" in err.hint
    assert UserCodeError(err.message, err.hint).message == err.message  # rebuilt by the Ray runner
    original = InputError("bad", "fix")
    with pytest.raises(InputError) as same:
        with user_code("x"):
            raise original
    assert same.value is original
    with pytest.raises(KeyboardInterrupt):
        with user_code("x"):
            raise KeyboardInterrupt


def test_a_generator_failing_on_its_first_call_is_one_error_naming_the_prompt(tmp_path, synth_train, monkeypatch):
    first = list(MEMORIZED)[0]  # the probe call (output shape) uses the first prompt
    monkeypatch.setenv("MEMSCAN_TEST_FAIL_PROMPT", first)
    res = _extract_in_process(_prompts(tmp_path), synth_train, tmp_path / "run")
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    (line,) = _error_lines(res.output)
    assert "first call" in line and "line-1" in line and repr(first) in line
    assert "RuntimeError: simulated bug in the user's model" in line
    assert not (tmp_path / "run" / ".lock").exists()


def test_unconditional_generator_failing_on_its_first_call_is_one_error(tmp_path, synth_train, monkeypatch):
    from memscan.generators.seeds import derive_seed

    monkeypatch.setenv("MEMSCAN_TEST_FAIL_SEED", str(derive_seed(0, "unconditional", 0)))
    res = _cli(
        "extract-unconditional", "--model", "py:user_code_support:fails_on_seed", "--train", synth_train,
        "--samples", 8, "--n-nearest", 5, "--out", tmp_path / "run", "--quiet",
    )  # fmt: skip
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    (line,) = _error_lines(res.output)
    assert "first call (sample 0" in line and "RuntimeError" in line


def _mia_argv(kind, tmp_path, out):
    """A small mia / inpaint / memscore run (the golden inputs) whose user code can fail."""
    import numpy as np
    from golden_support import MEMSCORE_X, MIA_MEMBERS, _write_png, mia_ids, mia_images

    data, members, x = tmp_path / "data", tmp_path / "members.txt", tmp_path / "x.npy"
    if not data.exists():
        data.mkdir()
        for i, img in zip(mia_ids(), mia_images()):
            _write_png(data / f"{i}.png", img)
        members.write_text("\n".join(mia_ids()[:MIA_MEMBERS]) + "\n")
        np.save(x, np.asarray(MEMSCORE_X))
    common = ["--data", data, "--members", members, "--out", out, "--batch-size", 8, "--shard-size", 8]
    common += ["--bootstrap", 0, "--quiet"]
    if kind == "mia":
        return ["mia", "--model", "py:user_code_support:failing_predictor", *common, "--timesteps", 10]
    if kind == "inpaint":
        return ["inpaint", "--model", "py:user_code_support:failing_predictor", *common, "--steps", 10]
    return [
        "memscore", "--data", x, "--train-fn", "py:user_code_support:failing_train",
        "--log-likelihood-fn", "py:golden_support:gauss_loglik", "--folds", 3, "--out", out, "--quiet",
    ]  # fmt: skip


@pytest.mark.parametrize("kind", ["mia", "inpaint", "memscore"])
def test_failing_user_model_in_membership_runs_stops_cleanly_then_resumes(kind, tmp_path):
    out = tmp_path / "run"
    # shard 0 (8 examples) takes 4 model calls for mia, 20 for inpaint, 1 train call for memscore
    after = {"mia": 4, "inpaint": 20, "memscore": 1}[kind]
    env = {"MEMSCAN_TEST_FAIL": "1", "MEMSCAN_TEST_FAIL_AFTER": str(after)}
    res = run_cli(*_mia_argv(kind, tmp_path, out), env=env, check=False)
    assert res.returncode == 2, res.stderr
    errors = _error_lines(res.stderr)
    assert len(errors) == 1 and "failed on" in errors[0] and "--resume" in errors[0], res.stderr
    assert "Traceback" not in res.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "incomplete"
    assert (out / "shards" / "00000.done.json").exists()  # the shard before the failure is kept
    done = run_cli(*_mia_argv(kind, tmp_path, out), "--resume")
    assert done.returncode == 0
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"


def test_a_generator_whose_image_size_changes_is_one_error_naming_the_prompt(tmp_path, synth_train):
    """Generations of another size for one prompt: one clean error naming the prompt and both
    sizes (not a concatenation traceback); the shards before it stay committed."""
    prompts = _prompts(tmp_path)
    run = tmp_path / "run"
    args = ("extract", "--model", "py:user_code_support:changes_size_on_prompt", "--prompts", prompts,
            "--train", synth_train, "--out", run, *ARGS)  # fmt: skip
    proc = run_cli(*args, env={"MEMSCAN_TEST_SMALL_PROMPT": THIRD}, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    (line,) = _error_lines(proc.stderr)
    assert "line-3" in line and "(16, 16, 3)" in line and "(32, 32, 3)" in line
    assert (run / "shards" / "00000.done.json").exists()

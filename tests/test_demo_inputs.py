"""Bad options of the demo commands (and a few neighbours): one clean ``error:`` line, exit code 2,
refused before any data is written or any model trained (nothing here trains)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from memscan.cli import app

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_clean_error(res, *needles: str) -> str:
    """Exit code 2, exactly one ``error:`` line holding every needle, no traceback."""
    assert res.exception is None or isinstance(res.exception, SystemExit), f"crashed: {res.exception!r}\n{res.output}"
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, res.output
    assert "Traceback" not in res.output
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture(autouse=True)
def no_training(monkeypatch):
    """Every refusal here must come before training: training, if reached, fails the test at once
    (and never writes a model; the shipped ones are in the default --out)."""
    import memscan.demo.lm.train as lm_train
    import memscan.demo.mia as mia
    import memscan.demo.run as run
    import memscan.demo.train as img_train

    def trained(*a, **k):
        raise RuntimeError("training (or the demo's work) started")

    monkeypatch.setattr(run, "build_demo_data", trained)
    monkeypatch.setattr(img_train, "train_demo_model", trained)
    monkeypatch.setattr(lm_train, "train_lm_demo_model", trained)
    monkeypatch.setattr(mia, "train_shadow_models", trained)


@pytest.fixture
def afile(tmp_path):
    p = tmp_path / "afile"
    p.write_text("not a folder")
    return p


# ---- D1: an --out that is a file, refused before training ---------------------------------------
def test_demo_train_out_is_a_file(afile):
    assert_clean_error(cli("demo", "train", "--steps", 1, "--out", afile), "--out", "is a file")


def test_demo_lm_train_out_is_a_file(afile):
    assert_clean_error(cli("demo", "lm", "train", "--steps", 1, "--out", afile, "--quiet"), "--out", "is a file")
    assert_clean_error(cli("demo", "lm", "train", "--steps", 1, "--out", afile / "sub", "--quiet"), "is a file")


# ---- D2: --steps < 1, and an existing model without --overwrite -----------------------------------
@pytest.mark.parametrize("steps", [0, -1])
def test_demo_train_refuses_nonpositive_steps(tmp_path, steps):
    assert_clean_error(cli("demo", "train", "--steps", steps, "--out", tmp_path / "m"), f"--steps {steps}", "≥ 1")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("steps", [0, -1])
def test_demo_lm_train_refuses_nonpositive_steps(tmp_path, steps):
    res = cli("demo", "lm", "train", "--steps", steps, "--out", tmp_path / "m", "--quiet")
    assert_clean_error(res, f"--steps {steps}", "≥ 1")
    assert not (tmp_path / "m").exists()


def test_demo_lm_train_refuses_negative_restart_steps_and_threads(tmp_path):
    out = tmp_path / "m"
    assert_clean_error(cli("demo", "lm", "train", "--restart-steps", -1, "--out", out, "--quiet"), "--restart-steps")
    assert_clean_error(cli("demo", "lm", "train", "--threads", 0, "--out", out, "--quiet"), "--threads")


@pytest.mark.parametrize("marker", ["model_index.json", "memscan.json"])
def test_demo_train_refuses_an_existing_model(tmp_path, marker):
    out = tmp_path / "model"
    out.mkdir()
    (out / marker).write_text("{}")
    assert_clean_error(cli("demo", "train", "--steps", 1, "--out", out), "already holds a model", "--overwrite")
    assert (out / marker).read_text() == "{}"


@pytest.mark.parametrize("marker", ["config.json", "model.safetensors", "memscan.json"])
def test_demo_lm_train_refuses_an_existing_model(tmp_path, marker):
    out = tmp_path / "model"
    out.mkdir()
    (out / marker).write_text("{}")
    res = cli("demo", "lm", "train", "--steps", 1, "--out", out, "--quiet")
    assert_clean_error(res, "already holds a model", "--overwrite")


def test_demo_train_default_out_is_the_shipped_model_and_refused(monkeypatch):
    """Without --out, `demo train` would overwrite the shipped model: refused (before training)."""
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the default --out is relative to the checkout
    assert Path("memscan/demo/model/model_index.json").exists()
    assert_clean_error(cli("demo", "train", "--steps", 1), "already holds a model", "--overwrite")
    assert_clean_error(cli("demo", "lm", "train", "--steps", 1, "--quiet"), "already holds a model", "--overwrite")


def test_demo_train_overwrite_passes_the_model_check(tmp_path, monkeypatch):
    """--overwrite lets an existing model folder through to training (training itself stubbed out)."""
    import memscan.demo.lm.train as lm_train
    import memscan.demo.run as run
    import memscan.demo.train as img_train

    seen = []
    monkeypatch.setattr(run, "build_demo_data", lambda: None)
    monkeypatch.setattr(img_train, "train_demo_model", lambda data, out, cfg, device: seen.append(out) or {
        "training": {"seconds": 0}})  # fmt: skip
    monkeypatch.setattr(lm_train, "train_lm_demo_model", lambda out, cfg, progress: seen.append(out) or {
        "seconds": 0, "threads": 1})  # fmt: skip
    out = tmp_path / "model"
    out.mkdir()
    (out / "memscan.json").write_text("{}")
    res = cli("demo", "train", "--steps", 1, "--out", out, "--overwrite")
    assert res.exit_code == 0, res.output
    res = cli("demo", "lm", "train", "--steps", 1, "--out", out, "--overwrite", "--quiet")
    assert res.exit_code == 0, res.output
    assert seen == [out, out]


def test_quiet_lm_train_hides_the_save_progress_bar(tmp_path):
    """--quiet: transformers' "Writing model shards" bar is disabled while the model is saved."""
    pytest.importorskip("transformers")
    from transformers.utils import logging as hf_logging

    from memscan.demo.lm.train import _no_save_progress_bar

    if not hasattr(hf_logging, "set_tqdm_hook"):
        pytest.skip("this transformers draws no save progress bar")
    with _no_save_progress_bar():
        bar = hf_logging.tqdm(range(3), desc="Writing model shards")
        assert getattr(bar, "disable", True)
    previous = hf_logging.set_tqdm_hook(None)
    hf_logging.set_tqdm_hook(previous)
    assert previous is None  # the hook was restored


# ---- D4: memscan demo --samples-per-prompt ---------------------------------------------------------
@pytest.mark.parametrize("n", [0, 1, -3])
def test_demo_refuses_too_few_samples_per_prompt(tmp_path, n):
    out = tmp_path / "d"
    line = assert_clean_error(cli("demo", "--quick", "--quiet", "--samples-per-prompt", n, "--out", out),
                              f"--samples-per-prompt {n}", "≥ 2")  # fmt: skip
    assert "samples_per_prompt=" not in line
    assert not out.exists()


def test_demo_settings_keep_an_explicit_samples_per_prompt():
    from memscan.demo.run import demo_settings

    assert demo_settings(True, None)["samples"] == 40 and demo_settings(False, None)["samples"] == 100
    assert demo_settings(True, 0)["samples"] == 0  # not replaced by the default (refused by run_demo)


# ---- D5: memscan demo mia ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, needles",
    [
        (("--examples", 0), ("--examples 0", "4..532", "pass --examples between 4 and 532")),
        (("--examples", 600), ("--examples 600", "4..532")),
        (("--models", 0), ("--models 0", "use --models 2 or more")),
        (("--models", 1), ("--models 1", "use --models 2 or more")),
        (("--steps", -1), ("--steps -1", "≥ 1")),
        (("--steps", 0), ("--steps 0", "≥ 1")),
        (("--threads", 0), ("--threads 0",)),
    ],
)
def test_demo_mia_refuses_bad_options_before_writing(tmp_path, args, needles):
    out = tmp_path / "dm"
    line = assert_clean_error(cli("demo", "mia", "--quick", "--quiet", "--out", out, *args), *needles)
    assert "n_models" not in line and "n_examples" not in line and "halves" not in line
    assert not out.exists()  # nothing written: not data/, not shadows/


# ---- D6: memscan report --out under a file ----------------------------------------------------------
def test_write_page_out_under_a_file(afile):
    from memscan.errors import InputError
    from memscan.report.base import write_page

    with pytest.raises(InputError) as e:
        write_page("<html></html>", afile.parent, afile / "r.html")
    assert "is a file" in str(e.value) and "does not exist" not in str(e.value)
    with pytest.raises(InputError, match="does not exist"):
        write_page("<html></html>", afile.parent, afile.parent / "missing" / "r.html")


def test_report_out_under_a_file(tmp_path, afile):
    """`memscan report RUN --out afile/r.html`: the error says afile is a file."""
    from bad_inputs import build_corpus

    c = build_corpus(tmp_path / "c")
    run = tmp_path / "run"
    res = cli("extract", "--model", "py:gen_support:planted", "--prompts", c.blank_lines, "--train", c.clean,
              "--out", run, "--samples-per-prompt", 12, "--min-clique", 3, "--quiet")  # fmt: skip
    assert res.exit_code == 0, res.output
    line = assert_clean_error(cli("report", run, "--out", afile / "r.html"), f"{afile} is a file")
    assert "does not exist" not in line


# ---- minor: memscan lm exposure option errors ---------------------------------------------------------
@pytest.mark.parametrize(
    "field, opt",
    [("exact_limit", "--exact-limit"), ("samples", "--samples"), ("candidates_per_shard", "--candidates-per-shard"),
     ("batch_size", "--batch-size")],
)  # fmt: skip
def test_lm_exposure_option_errors_name_the_option(field, opt):
    from memscan.errors import InputError
    from memscan.lm.exposure_run import ExposureConfig

    with pytest.raises(InputError) as e:
        ExposureConfig(**{field: 0}).validate()
    assert str(e.value.message).startswith(f"{opt} 0 must be ≥ 1")
    assert e.value.hint and f"e.g. {opt}" in e.value.hint

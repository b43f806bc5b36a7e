"""Help texts that state defaults or accepted values say what the code does."""

from __future__ import annotations

import re

from typer.testing import CliRunner

from memscan.cli import app

runner = CliRunner()


def _help(*args) -> str:
    res = runner.invoke(app, [*args, "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert res.exit_code == 0, res.output
    return re.sub(r"\s+", " ", re.sub(r"[│╭╮╰╯─]", " ", res.output))


def test_demo_mia_help_gives_the_settings_defaults():
    from memscan.demo.mia import DemoMiaSettings

    s = DemoMiaSettings()
    for command in (("demo", "mia"), ("demo-mia",)):
        text = _help(*command)
        assert f"pool size [{s.n_examples}]" in text
        assert f"model 0 is the target [{s.n_models}]" in text
        assert f"training steps per model [{s.steps}]" in text
        assert f"torch threads [{s.threads}]" in text


def test_compare_help_lists_every_comparable_kind():
    from memscan.compare.runs import COMPARABLE_KINDS

    text = _help("compare")
    assert all(kind in text for kind in COMPARABLE_KINDS)


def test_lm_index_tokenizer_help_promises_no_checkpoint_sweep():
    text = _help("lm", "index")
    tokenizer = text[text.index("--tokenizer <str>") : text.index("--bytes <bool>")]
    assert "model directory" in tokenizer and "checkpoint" not in tokenizer

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


def _commands(cmd, path=()):
    yield path, cmd
    for name, sub in sorted(getattr(cmd, "commands", {}).items()):
        yield from _commands(sub, (*path, name))


def _bracketed_notes(text: str) -> list[str]:
    """The notes in square brackets, as a reader should see them (markup escapes removed)."""
    plain = text.replace("\\[", "[")
    return [m.group(0) for m in re.finditer(r"\[[a-zA-Z][^\[\]]*\]", plain)]


def test_every_bracketed_note_in_an_option_help_is_shown_by_help():
    # rich reads "[word...]" as a style tag and drops it unless escaped as "\[": a default such as
    # "[cpu]" or "[model's]" vanished from --help
    import typer.main

    notes = [
        (path, param.opts[0], note)
        for path, cmd in _commands(typer.main.get_command(app))
        for param in cmd.params
        for note in _bracketed_notes(getattr(param, "help", None) or "")
    ]
    assert len(notes) > 40  # the walk found the commands and their options
    rendered: dict[tuple, str] = {}
    missing = []
    for path, opt, note in notes:
        if path not in rendered:
            res = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "300", "NO_COLOR": "1"}, terminal_width=300)
            assert res.exit_code == 0, (path, res.output)
            rendered[path] = re.sub(r"\s+", " ", re.sub(r"[│╭╮╰╯─]", " ", res.output))
        if re.sub(r"\s+", " ", note) not in rendered[path]:
            missing.append(f"memscan {' '.join(path)} {opt}: {note}")
    assert not missing, "\n".join(missing)


def test_every_bracketed_note_in_a_command_help_is_shown_by_help():
    import typer.main

    for path, cmd in _commands(typer.main.get_command(app)):
        notes = _bracketed_notes(cmd.help or "")
        if not notes:
            continue
        res = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "300", "NO_COLOR": "1"}, terminal_width=300)
        text = re.sub(r"\s+", " ", re.sub(r"[│╭╮╰╯─]", " ", res.output))
        for note in notes:
            assert re.sub(r"\s+", " ", note) in text, (path, note)

"""The command layer: one module per command under memscan/commands/, assembled by memscan/cli.py."""

import ast
from pathlib import Path

import typer
from conftest import run_cli
from typer.testing import CliRunner

import memscan.commands
from memscan.cli import app
from memscan.commands import COMMAND_MODULES, demo

COMMANDS = Path(memscan.commands.__file__).parent


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):  # imports inside functions included
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_commands_import_neither_each_other_nor_the_cli():
    shared = {"common", "formatting"}  # helpers the commands share; not commands themselves
    modules = {p.stem for p in COMMANDS.glob("*.py")} - {"__init__"} - shared
    assert set(COMMAND_MODULES) == modules  # every command module is registered
    for name in modules:
        imported = _imports(COMMANDS / f"{name}.py")
        assert "memscan.cli" not in imported, name
        others = {f"memscan.commands.{m}" for m in modules}
        assert not imported & others, f"memscan.commands.{name} imports another command: {imported & others}"
    for name in shared:
        imported = _imports(COMMANDS / f"{name}.py")
        assert not {i for i in imported if i.startswith("memscan.cli")}, name
        assert not imported & {f"memscan.commands.{m}" for m in modules}, f"{name} imports a command"


def test_cli_only_assembles():
    tree = ast.parse((COMMANDS.parent / "cli.py").read_text())
    functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert functions == {"global_options", "main"}


def test_every_command_is_there():
    names = set(typer.main.get_command(app).commands)
    assert names >= {
        "extract", "verify", "report", "index", "candidates", "extract-unconditional", "triage", "mia",
        "inpaint", "memscore", "demo", "demo-mia",
    }  # fmt: skip
    assert {c.name for c in demo.demo_app.registered_commands} >= {"train", "mia"}


def test_demo_mia_and_its_alias_call_the_same_function():
    alias = next(c for c in app.registered_commands if c.name == "demo-mia")
    sub = next(c for c in demo.demo_app.registered_commands if c.name == "mia")
    assert alias.callback is sub.callback is demo.demo_mia
    assert alias.hidden  # documented in docs/cli.md, not listed by --help
    res = CliRunner().invoke(app, ["demo", "mia", "--help"])
    assert res.exit_code == 0 and "--examples" in res.output


def test_python_dash_m_and_global_debug_option():
    proc = run_cli("--help")
    assert "--debug" in proc.stdout and "demo" in proc.stdout and "demo-mia" not in proc.stdout
    res = CliRunner().invoke(app, ["--debug", "report", "/nonexistent/run"])
    assert res.exit_code == 2
    assert res.output.strip().splitlines()[-1].startswith("error:") and "Traceback" in res.output
    res = CliRunner().invoke(app, ["report", "/nonexistent/run"])
    assert res.exit_code == 2 and "Traceback" not in res.output and res.output.startswith("error:")


def test_an_out_that_is_a_file_is_one_error_saying_to_pass_a_folder(synth_train, tmp_path):
    """``--out`` naming an existing file: the error says --out must be a folder (not to free disk
    space and resume, which cannot help), and the file is left as it was."""
    out = tmp_path / "afile"
    out.write_text("keep me")
    res = CliRunner().invoke(app, ["index", str(synth_train), "--out", str(out)])
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert res.exit_code == 2 and len(errors) == 1 and "Traceback" not in res.output, res.output
    assert "--out must be a folder" in res.output and "free disk space" not in res.output
    assert out.read_text() == "keep me"

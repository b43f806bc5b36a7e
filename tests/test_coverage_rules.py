"""The project rule "every new command joins the bad-input corpus and the kill/resume conformance
test", enforced.

- Every run kind ``memscan report`` knows (:data:`memscan.report.registry.RENDERERS`) has a
  ``KindCase`` in ``tests/test_run_kinds.py::CASES`` (killed mid-run, resumed to the uninterrupted
  tables), or an entry in :data:`KILL_RESUME_EXEMPT` saying where its kill/resume is tested instead.
- Every CLI command and subcommand (hidden ones too, and a group that runs something on its own,
  as ``memscan demo``) is invoked by the bad-input corpus (:data:`CORPUS_FILES`), or has an entry
  in :data:`BAD_INPUT_EXEMPT` saying why not.

An exemption must name a reason, and one that no longer applies (the kind or command is covered
now, or gone) fails too, so the lists never go stale.
"""

from __future__ import annotations

import ast
from pathlib import Path

import typer.main

TESTS = Path(__file__).parent

#: run kinds whose kill/resume is tested outside ``tests/test_run_kinds.py``: kind → where, and why
KILL_RESUME_EXEMPT = {
    "demo-mia": "its run lies in OUT/run and rerunning the demo resumes it (no --resume option): killed after "
    "one shard commit and resumed in tests/test_mia_cli.py::test_demo_mia_interrupted_attack_resumes_from_its_shards",
}

#: the modules whose CLI invocations make up the bad-input corpus
CORPUS_FILES = ("test_bad_input_corpus.py", "bad_inputs.py", "test_demo_inputs.py")

#: CLI commands the bad-input corpus does not invoke: "command path" → why
BAD_INPUT_EXEMPT: dict[str, str] = {}


# ---- what there is ----------------------------------------------------------------------------
def cli_commands(app=None) -> dict[tuple[str, ...], frozenset[str]]:
    """Every command path of the CLI → the names of its subcommands (empty for a leaf).

    Hidden commands are included; a group is listed only when it runs something on its own
    (``invoke_without_command``, as ``memscan demo``), since one that only dispatches has no
    inputs of its own.
    """
    if app is None:
        from memscan.cli import app
    found: dict[tuple[str, ...], frozenset[str]] = {}

    def walk(cmd, path):
        subs = getattr(cmd, "commands", None)  # typer's group (it vendors click: no click.Group)
        if subs is None:
            found[path] = frozenset()
            return
        if path and getattr(cmd, "invoke_without_command", False):
            found[path] = frozenset(subs)
        for name, sub in subs.items():
            walk(sub, (*path, name))

    walk(typer.main.get_command(app), ())
    return found


#: the functions the corpus calls with a command line (``cli("report", run)``)
CLI_CALLS = {"cli", "invoke", "run_cli"}


def _string(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _argvs(tree: ast.AST):
    """``(words, exact)`` for each literal command line in ``tree``: the string constants it starts
    with, and whether it holds nothing else.

    A command line is the arguments of a call to one of :data:`CLI_CALLS`
    (``cli("report", run)``), a tuple or list that holds an option (``("lm", "mia", "--model",
    m)``), or one that is all words (``["demo", "lm"]``, spread into a call: ``exact``, it counts
    only when it is a whole command path). So a table of labels (``("demo", SCHEDULER, ...)``) or
    a list of command names (``("extract", "audit")``) invokes nothing.
    """
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            if (getattr(node.func, "id", None) or getattr(node.func, "attr", None)) not in CLI_CALLS:
                continue  # its arguments are no command line (a tuple among them is seen on its own)
            items, call = node.args, True
        elif isinstance(node, (ast.Tuple, ast.List)):
            items, call = node.elts, False
        else:
            continue
        strings = [_string(i) for i in items]
        words = []
        for s in strings:
            if s is None:
                break
            words.append(s)
        if not words:
            continue
        if call or any(s is not None and s.startswith("-") for s in strings):
            yield words, False
        elif len(words) == len(items):
            yield words, True


def invoked_commands(sources: dict[str, str], commands: dict[tuple[str, ...], frozenset[str]]) -> set[tuple]:
    """The command paths the test sources invoke (:func:`_argvs`): a command line that starts
    with the path's words, not followed by one of its subcommands (``("demo", "lm", "--quick")``
    invokes ``demo lm``, not ``demo``)."""
    argvs = [a for text in sources.values() for a in _argvs(ast.parse(text))]
    hit = set()
    for path, subs in commands.items():
        n = len(path)
        for words, exact in argvs:
            if tuple(words[:n]) == path and (len(words) == n or (not exact and words[n] not in subs)):
                hit.add(path)
                break
    return hit


def _corpus_sources() -> dict[str, str]:
    return {name: (TESTS / name).read_text() for name in CORPUS_FILES if (TESTS / name).exists()}


def _shown(path: tuple[str, ...]) -> str:
    return " ".join(path)


# ---- the rules ----------------------------------------------------------------------------------
def test_every_run_kind_is_killed_and_resumed_by_the_conformance_test():
    import test_run_kinds

    from memscan.report.registry import RENDERERS

    cased = {c.kind for c in test_run_kinds.CASES}
    missing = sorted(set(RENDERERS) - cased - set(KILL_RESUME_EXEMPT))
    assert not missing, (
        f"run kind(s) {missing} have no kill/resume case: add a KindCase to tests/test_run_kinds.py::CASES "
        "(or, if its kill/resume is tested elsewhere, an entry in KILL_RESUME_EXEMPT naming that test)"
    )
    stale = sorted(k for k in KILL_RESUME_EXEMPT if k in cased or k not in RENDERERS)
    assert not stale, f"KILL_RESUME_EXEMPT lists {stale}, which are in CASES now or no run kind: remove them"
    unknown = sorted(set(cased) - set(RENDERERS))
    assert not unknown, f"CASES holds {unknown}, which memscan report cannot render"


def test_the_kill_resume_exemptions_name_a_test_that_exists():
    for kind, reason in KILL_RESUME_EXEMPT.items():
        assert reason.strip(), f"{kind}: an exemption needs a reason"
        named = [w.rstrip(".,;)") for w in reason.split() if "::test_" in w]
        assert named, f"{kind}: the reason must name the test that kills and resumes it (file::test)"
        for ref in named:
            file, test = ref.split("::")
            tree = ast.parse((TESTS.parent / file).read_text())
            assert test in {f.name for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)}, f"{kind}: no {ref}"


def test_every_cli_command_is_in_the_bad_input_corpus():
    commands = cli_commands()
    assert {("extract",), ("lm", "mia"), ("demo",), ("demo", "lm", "train"), ("demo-mia",)} <= set(commands)
    covered = invoked_commands(_corpus_sources(), commands)
    exempt = {tuple(k.split()) for k in BAD_INPUT_EXEMPT}
    missing = sorted(_shown(p) for p in set(commands) - covered - exempt)
    assert not missing, (
        f"CLI command(s) {missing} are not invoked by the bad-input corpus ({', '.join(CORPUS_FILES)}): add "
        "their bad inputs there (or an entry in BAD_INPUT_EXEMPT with the reason)"
    )
    for name, reason in BAD_INPUT_EXEMPT.items():
        assert reason.strip(), f"{name}: an exemption needs a reason"
    stale = sorted(_shown(p) for p in exempt if p in covered or p not in commands)
    assert not stale, f"BAD_INPUT_EXEMPT lists {stale}, which the corpus covers now or no command is: remove them"


def test_the_scan_finds_a_command_added_without_bad_inputs():
    """The check itself: a new subcommand (hidden, in a nested group) that no argv names is found
    missing; a group's own invocation is told from its subcommands'."""
    app, sub = typer.Typer(), typer.Typer(invoke_without_command=True)

    @app.command("old")
    def old():  # pragma: no cover - never run
        pass

    @sub.callback()
    def grp():  # pragma: no cover - never run
        pass

    @sub.command("new", hidden=True)
    def new():  # pragma: no cover - never run
        pass

    app.add_typer(sub, name="grp")
    commands = cli_commands(app)
    assert set(commands) == {("old",), ("grp",), ("grp", "new")}
    src = {"t.py": "cli('old', path)\nARGS = ('grp', 'new', '--quiet')\n"}
    assert invoked_commands(src, commands) == {("old",), ("grp", "new")}  # `grp` alone: never invoked
    assert invoked_commands({"t.py": "cli(*['grp'], '--x')"}, commands) == {("grp",)}
    # not command lines: a label in a table, a list of names, a call of something else, a spread
    src = {"t.py": "T = {'x': ('old', path, 3)}\nN = ('old', 'grp')\nf('old', '--x')\ncli(*A, 'old')"}
    assert invoked_commands(src, commands) == set()

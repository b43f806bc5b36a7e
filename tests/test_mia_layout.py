"""Layout of the membership-inference code: the library does not import the demo, and model
libraries are reached through memscan.generators only."""

from __future__ import annotations

import ast
from pathlib import Path

import memscan

ROOT = Path(memscan.__file__).parent


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def test_mia_and_triage_import_no_model_library_and_no_demo():
    bad = {}
    for pkg in ("mia", "triage", "report"):
        for f in sorted((ROOT / pkg).glob("*.py")):
            hits = sorted(
                m
                for m in _imports(f)
                if m.split(".")[0] in ("diffusers", "transformers", "ray")
                or m.startswith(("memscan.demo", "memscan.commands", "memscan.cli"))
            )
            if hits:
                bad[f"{pkg}/{f.name}"] = hits
    assert not bad, bad


def test_run_py_is_gone():
    assert not (ROOT / "mia" / "run.py").exists()

"""What every report page shares: the template environment, the CSP, data URIs, the run context.

Every page is one self-contained file: images and plots are embedded as ``data:`` URIs, so it
opens offline and can be mailed around. Every string from a run (prompts, captions, ids, file
names) is untrusted web text and goes through Jinja2 autoescaping; the Content-Security-Policy
(:data:`CSP`, set by ``templates/_base.html.j2``, which every template extends) forbids scripts
altogether.

A page module (``html.py``, ``unconditional.py``, …) imports this module, renders its template
with :func:`run_context` and its own values, and writes it with :func:`write_page`; the registry
(:mod:`memscan.report.registry`) picks the page for a run's kind.
"""

from __future__ import annotations

import base64
import importlib.metadata as md
import time
from pathlib import Path

from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup

from memscan.errors import InputError, MemscanError
from memscan.store import RunStore, atomic_write_bytes

#: The Content-Security-Policy of every report: no script, images only as ``data:`` URIs.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def environment() -> Environment:
    """The report templates, autoescaped: every string from a run is untrusted web text.

    Examples
    --------
    >>> html = environment().from_string("{{ x }}").render(x="<script>")
    >>> html
    '&lt;script&gt;'
    """
    env = Environment(loader=PackageLoader("memscan.report", "templates"), autoescape=select_autoescape(["html", "j2"]))
    env.globals["content_security_policy"] = Markup(CSP)  # a constant of ours, not run text
    return env


def data_uri(root: Path, rel: str | None) -> str | None:
    """Embed a PNG that lives inside the run directory (paths leaving it are ignored)."""
    if not rel:
        return None
    path = (root / rel).resolve()
    if not path.is_relative_to(root.resolve()) or not path.is_file():
        return None
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def png_base64(png: bytes) -> str:
    """A PNG's bytes as the base64 text a template puts after ``data:image/png;base64,``."""
    return base64.b64encode(png).decode()


def version() -> str:
    """The installed memscan version (``"dev"`` in an uninstalled checkout)."""
    try:
        return md.version("memscan")
    except md.PackageNotFoundError:
        return "dev"


def run_context(root: Path, manifest: dict) -> dict:
    """What every run page shows at its top: name, place, time, version, counts, config,
    training set and its skipped files, throughput."""
    training = manifest.get("training_set", {})
    return {
        "title": root.name,
        "run_dir": str(root),
        "made": time.strftime("%Y-%m-%d %H:%M"),
        "version": version(),
        "counts": manifest.get("counts", {}),
        "config": manifest["config"],
        "training": training,
        "skipped": training.get("skipped_files", []),
        "throughput": manifest.get("throughput"),
    }


def open_complete_run(run: str | Path, kind: str) -> tuple[RunStore, dict]:
    """The run's store and manifest; a run of another kind or an unfinished one is an error."""
    store = RunStore(run)
    manifest = store.read_manifest(expect=kind)
    if manifest.get("status") != "complete":
        raise MemscanError(
            f"run {run} is not complete (status {manifest.get('status')!r})",
            # an interrupted `memscan verify` records how to finish it
            (manifest.get("verifying") or {}).get("hint") or "finish it with --resume first",
        )
    return store, manifest


def write_page(html: str, root: Path, out: str | Path | None = None) -> Path:
    """Write a rendered page to ``out`` (default ``RUN/report.html``), atomically (a kill never
    leaves half a page); returns its path. A folder or a path in a missing folder is one error."""
    path = Path(out) if out else root / "report.html"
    if path.is_dir():
        raise InputError(f"--out {path} is a folder", "give the page's file path, e.g. --out report.html")
    if not path.parent.is_dir():
        blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            raise InputError(f"--out {path}: {blocker} is a file, not a folder", "choose another --out")
        raise InputError(f"--out {path}: the folder {path.parent} does not exist", "create it, or choose another --out")
    atomic_write_bytes(path, html.encode("utf-8"))
    return path

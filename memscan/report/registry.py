"""One entry point for every run's report: ``{kind: renderer}``.

``memscan report RUN`` (and :func:`memscan.build_report`) read the run's manifest, take its kind
(``"kind"``, or ``"command"`` in older manifests) and call the renderer registered for it. A
renderer is ``renderer(run, out=None, **options) -> Path``: it reads the run's tables, writes
one self-contained page (with :mod:`memscan.report.base`) and returns its path.

Adding a run kind's report = one page module in ``memscan/report/`` + one line in
:data:`RENDERERS`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from memscan.report.audit import build_audit_report
from memscan.report.compare import build_compare_report
from memscan.report.html import build_extraction_report
from memscan.report.index import build_index_report
from memscan.report.lm import build_lm_exposure_report, build_lm_extractable_report
from memscan.report.lm_extract import build_lm_extract_report
from memscan.report.lm_index import build_lm_index_report
from memscan.report.lm_mia import build_lm_mia_report
from memscan.report.mia import build_mia_report
from memscan.report.triage import build_triage_report
from memscan.report.unconditional import build_unconditional_report
from memscan.store import RunStore

#: The page for each run kind (the manifest's ``kind``, or ``command`` in older runs).
RENDERERS: dict[str, Callable[..., Path]] = {
    "extract": build_extraction_report,
    "audit": build_audit_report,
    "extract-unconditional": build_unconditional_report,
    "index": build_index_report,
    "mia": build_mia_report,
    "inpaint": build_mia_report,
    "memscore": build_mia_report,
    "demo-mia": build_mia_report,
    "triage": build_triage_report,
    "lm-extractable": build_lm_extractable_report,
    "lm-exposure": build_lm_exposure_report,
    "lm-mia": build_lm_mia_report,
    "lm-extract": build_lm_extract_report,
    "lm-index": build_lm_index_report,
    "compare": build_compare_report,
}


def build_report(run: str | Path, out: str | Path | None = None, **options) -> Path:
    """Write the report of a finished run of any registered kind; returns its path.

    Parameters
    ----------
    run : run directory
    out : output path (default ``RUN/report.html``)
    options : passed to the kind's renderer (e.g. ``extra_summary`` for ``extract``: key → value
        rows shown under the summary, as the demo's ground truth)

    A run of a kind with no renderer is refused with a clear error naming its kind and where its
    results are.
    """
    manifest = RunStore(run).read_manifest(expect=tuple(RENDERERS))
    kind = manifest.get("kind") or manifest.get("command")
    return RENDERERS[kind](run, out, **options)

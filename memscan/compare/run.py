"""``memscan compare``: finished runs side by side (run kind ``compare``).

The run directory::

    OUT/
      manifest.json          runs, labels, --by, k, index, mismatches, fits, outlier correlations
      compare.parquet        one row per run (run, kind, label, model, params, step, train_size,
                             the run's counts under their manifest names, rates, MIA metrics with
                             their bootstrap bounds, memscore summaries, memorization,
                             memorization_measure, mismatch, outlier_spearman, outlier_p)
      items.parquet          run, item_type, item: the training items each run memorized
      overlap.parquet        run_a, run_b, item_type, n_a, n_b, both, union, jaccard (runs whose
                             items are of one type)
      by_duplicates.parquet  run, duplicate_count, prompts, extractions, extraction_rate
      outliers.parquet       run, id, caption, score, outlier, score_rank, outlier_rank, disagreement,
                             thumbnail
      fits.parquet           kind, by, measure, n, slope, intercept, slope_se, slope_lo,
                             slope_hi, r2
      images/outliers/…png   thumbnails of the most disagreeing examples
      compare.html           the page (also what ``memscan report OUT`` writes)

One shard per input run (read it, score its examples' outlyingness), so a killed comparison
resumes where it stopped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from memscan.compare.checks import Mismatch, find_mismatches
from memscan.compare.example_outliers import SHOWN as EXAMPLES_SHOWN
from memscan.compare.example_outliers import empty_table, score_outliers, thumb_prefix
from memscan.compare.outliers import DEFAULT_K, analyse
from memscan.compare.overlap import item_sets, overlap_table
from memscan.compare.runs import BY_CHOICES, read_manifest, summarize_run
from memscan.compare.scaling import log_linear_fit
from memscan.errors import InputError
from memscan.runners import make_pool
from memscan.runners.shards import run_shards
from memscan.store import open_run, write_table

KIND = "compare"
TABLES = ("compare", "items", "by_duplicates", "outliers")
#: Examples shown at each end of the outlier disagreement.
SHOWN = EXAMPLES_SHOWN


@dataclass
class CompareResult:
    """A finished comparison (the tables are also in ``run_dir``)."""

    run_dir: Path
    manifest: dict
    table: pd.DataFrame
    overlap: pd.DataFrame
    fits: pd.DataFrame
    outliers: pd.DataFrame
    report: Path | None


def _setup() -> dict:
    return {}


def compare_stage(ctx: dict, run: str, label: str, k: int, out: str, index: str | None = None) -> tuple[dict, dict]:
    """One input run: its summary row, items, rates by duplicate count and outlier scores."""
    s = summarize_run(run, label)
    row = pd.DataFrame([s.row])
    items = pd.DataFrame(
        {"run": str(run), "item_type": pd.Series(s.item_type, index=s.items.index, dtype=object),
         "item": s.items["item"].astype(str)}
    )  # fmt: skip
    dup = s.by_duplicates.copy()
    dup.insert(0, "run", str(run))
    if not len(dup):
        dup = pd.DataFrame(
            {"run": pd.Series([], dtype=str), "duplicate_count": pd.Series([], dtype="int64")}
            | {c: pd.Series([], dtype="float64") for c in ("prompts", "extractions", "extraction_rate")}
        )
    outl = _outliers(run, s, k, Path(out), index)
    return {"compare": row, "items": items, "by_duplicates": dup, "outliers": outl}, {"run": str(run)}


def _empty_outliers() -> pd.DataFrame:
    t = empty_table()
    t.insert(0, "run", pd.Series([], dtype=str))
    return t


def _outliers(run: str, s, k: int, out: Path, index: str | None = None) -> pd.DataFrame:
    """k-NN outlier score of each scored example, in pixel space (images / arrays), TF-IDF
    space (texts) or the training index's embedding space; thumbnails of the most disagreeing
    examples (:func:`memscan.compare.example_outliers.score_outliers`)."""
    from memscan.store import RunStore

    res = score_outliers(run, s, k, index, thumbs=RunStore(out), prefix=thumb_prefix(run))
    if res.analysis is None:
        return _empty_outliers()
    t = res.table
    t.insert(0, "run", str(run))
    return t


def _attribute(row: pd.Series, by: str) -> float:
    v = row.get(by) if by != "label" else row.get("label")
    try:
        x = float(v)
    except (TypeError, ValueError):
        return math.nan
    return x if math.isfinite(x) and x > 0 else math.nan


def _fits(table: pd.DataFrame, by: str) -> pd.DataFrame:
    rows = []
    for kind, g in table.groupby("kind", sort=True):
        x = g.apply(lambda r: _attribute(r, by), axis=1).to_numpy(float)
        y = g["memorization"].to_numpy(float)
        ok = np.isfinite(x) & np.isfinite(y)
        if ok.sum() < 3 or len(set(x[ok])) < 2:
            continue
        f = log_linear_fit(x[ok], y[ok])
        rows.append(
            {
                "kind": kind,
                "by": by,
                "measure": str(g["memorization_measure"].iloc[0]),
                "n": f.n,
                "slope": f.slope,
                "intercept": f.intercept,
                "slope_se": f.slope_se,
                "slope_lo": f.slope_ci[0],
                "slope_hi": f.slope_ci[1],
                "r2": f.r2,
            }
        )
    cols = ["kind", "by", "measure", "n", "slope", "intercept", "slope_se", "slope_lo", "slope_hi", "r2"]
    return pd.DataFrame(rows, columns=cols)


def check_inputs(runs: list[str | Path], labels: dict[str, str] | None, by: str) -> list[tuple[str, str, dict]]:
    """Validate the inputs before anything is written: existing finished runs, no run twice,
    labels naming given runs (each once, no two runs with one label), a known ``--by``."""
    if by not in BY_CHOICES:
        raise InputError(f"--by {by!r} is not one of {', '.join(BY_CHOICES)}", "e.g. --by step")
    if len(runs) < 2:
        raise InputError(f"compare needs at least 2 runs, got {len(runs)}", "pass two or more run directories")
    keys = [str(Path(r).resolve()) for r in runs]
    if len(set(keys)) < len(keys):
        dup = next(r for r, k in zip(runs, keys) if keys.count(k) > 1)
        raise InputError(f"run {dup} is given twice", "pass each run once")
    run_labels(runs, labels)
    return [(str(r), *_kind_manifest(r)) for r in runs]


def run_labels(runs: list[str | Path], labels: dict[str, str] | None = None) -> dict[str, str]:
    """Run (as given) → the label shown for it: ``labels`` (keyed by any spelling of the run's
    path: ``./S10`` and ``S10`` are one run), else the run's folder name, with parent folder names
    added (``d1/run``, ``d2/run``) until no two runs share a label.

    Examples
    --------
    >>> run_labels(["d1/run", "d2/run", "d3/other"])
    {'d1/run': 'd1/run', 'd2/run': 'd2/run', 'd3/other': 'other'}
    >>> run_labels(["a", "b"], {"./a": "first"})
    {'a': 'first', 'b': 'b'}
    """
    given = [str(r) for r in runs]
    key_of = {str(Path(r).resolve()): r for r in given}
    explicit: dict[str, str] = {}
    for name, text in (labels or {}).items():
        run = key_of.get(str(Path(name).resolve()))
        if run is None:
            raise InputError(f"--label {name}=…: {name} is not one of the runs", "use RUN=TEXT with a given RUN")
        if run in explicit:
            raise InputError(f"--label names run {run} twice", "give each run one --label RUN=TEXT")
        explicit[run] = str(text)
    seen: dict[str, str] = {}
    for run, text in explicit.items():
        if text in seen:
            raise InputError(
                f"--label gives runs {seen[text]} and {run} the same label {text!r}",
                "give each run its own label (labels name the runs' columns and points in the page)",
            )
        seen[text] = run
    parts = {r: Path(r).resolve().parts for r in given if r not in explicit}
    depth = dict.fromkeys(parts, 1)
    while True:
        default = {r: "/".join(p[-depth[r] :]) for r, p in parts.items()}
        taken = list(explicit.values()) + list(default.values())
        clash = [r for r, d in default.items() if taken.count(d) > 1 and depth[r] < len(parts[r])]
        if not clash:
            break
        for r in clash:
            depth[r] += 1
    out = {r: explicit.get(r, default.get(r)) for r in given}
    if len(set(out.values())) < len(out):  # a default that cannot be told from an explicit label
        text = next(t for t in out.values() if list(out.values()).count(t) > 1)
        raise InputError(f"two runs would be labelled {text!r}", "give them distinct --label RUN=TEXT")
    return out


def _kind_manifest(run) -> tuple[str, dict]:
    m = read_manifest(run)
    return m.get("kind") or m.get("command"), m


def compare_runs(
    runs: list[str | Path],
    out: str | Path,
    *,
    by: str = "step",
    labels: dict[str, str] | None = None,
    allow_mismatch: bool = False,
    k: int = DEFAULT_K,
    index: str | Path | None = None,
    extra: dict[str, dict] | None = None,
    resume: bool = False,
    progress: bool = True,
    stop_after_shards: int | None = None,
) -> CompareResult:
    """Compare finished runs (see the module for what is written).

    Parameters
    ----------
    runs : run directories (≥ 2) of the kinds in :data:`memscan.compare.runs.COMPARABLE_KINDS`
    out : the comparison's run directory
    by : the attribute of the scaling fit: ``params``, ``step``, ``train_size`` or ``label``
        (a numeric label)
    labels : run → label shown in the table and the page (default: the run's folder name)
    allow_mismatch : compare runs of one kind made with different thresholds or data, flagged
        in the table (``mismatch``), the manifest and the page; without it they are refused
    k : the neighbour of the k-NN outlier score
    index : a training index (``memscan index`` folder): the outlier score is then the k-NN cosine
        distance in its embedding space to its training images, instead of pixels / TF-IDF
    extra : run → further columns of its row (a checkpoint sweep's ``heldout_loss``,
        ``train_loss``, ``loss_gap``)
    resume : continue a killed comparison in ``out``
    stop_after_shards : stop after this many runs (tests of resume)
    """
    labels = dict(labels or {})
    triples = check_inputs(runs, labels, by)
    if k < 1:
        raise InputError(f"--k {k} must be ≥ 1", "e.g. --k 5")
    mismatches = find_mismatches(triples, by)
    if mismatches and not allow_mismatch:
        first = mismatches[0]
        raise InputError(
            f"the runs are not comparable: {first.text()}"
            + (f" (and {len(mismatches) - 1} more difference(s))" if len(mismatches) > 1 else ""),
            "compare runs made with the same thresholds on the same data, or pass --allow-mismatch to "
            "compare them anyway (flagged in the table and the page)",
        )
    label_of = run_labels(runs, labels)
    idx_arg = None if index is None else str(Path(index).resolve())
    if idx_arg is not None:
        from memscan.compare.example_outliers import load_index

        load_index(idx_arg)  # a bad index is refused before anything is written
    with open_run(out, KIND, resume=resume) as run:
        run.start(
            {
                "runs": [str(Path(r).resolve()) for r in runs],
                "labels": label_of,
                "by": by,
                "k": int(k),
                "index": None if index is None else str(Path(index).resolve()),
                "allow_mismatch": bool(allow_mismatch),
                "mismatches": [m.__dict__ for m in mismatches],
                "extra_columns": {str(r): dict(v) for r, v in (extra or {}).items()},
                "n_shards": len(runs),
            },
            identity=("runs", "labels", "by", "k", "index", "allow_mismatch", "n_shards"),
        )
        with make_pool("local", _setup, ()) as pool:
            run_shards(
                run,
                pool,
                compare_stage,
                {i: (str(r), label_of[str(r)], int(k), str(run.root), idx_arg) for i, r in enumerate(runs)},
                label="compare: runs",
                unit="runs",
                progress=progress,
                stop_after_shards=stop_after_shards,
                describe=lambda s, t: f"run {runs[s]}",
            )
        tables = run.store.merge(len(runs), tables=TABLES)
        table = _decorate(tables["compare"], tables["outliers"], mismatches)
        for r, cols in (extra or {}).items():
            for c, v in cols.items():
                if c not in table:
                    table[c] = np.nan
                table.loc[table["run"] == str(r), c] = v
        write_table(table, run.root / "compare.parquet")
        items = tables["items"]
        sets, types = item_sets(items, table["run"], table["kind"], table.get("training_set_sha256"))
        overlap = overlap_table(sets, types)
        write_table(overlap, run.root / "overlap.parquet")
        fits = _fits(table, by)
        write_table(fits, run.root / "fits.parquet")
        manifest = run.finish(
            counts={"runs": len(runs), "kinds": int(table["kind"].nunique()), "mismatches": len(mismatches)},
            fits=fits.to_dict(orient="records"),
        )
    from memscan.report.compare import build_compare_report

    report = build_compare_report(run.root, run.root / "compare.html")
    return CompareResult(run.root, manifest, table, overlap, fits, tables["outliers"], report)


def _decorate(table: pd.DataFrame, outliers: pd.DataFrame, mismatches: list[Mismatch]) -> pd.DataFrame:
    """Add ``mismatch`` (what differs from the other runs of its kind; empty when comparable)
    and the outlier correlation of each run."""
    t = table.copy()
    flags = {r: [] for r in t["run"]}
    for m in mismatches:
        for r in m.values:
            flags.setdefault(r, []).append(f"{m.what} {m.key}")
    t["mismatch"] = [", ".join(flags.get(r, [])) for r in t["run"]]
    rho, p = [], []
    for r in t["run"]:
        o = outliers[outliers["run"] == r]
        if len(o):
            a = analyse(o["id"], o["score"].to_numpy(float), o["outlier"].to_numpy(float))
            rho.append(a.spearman)
            p.append(a.p_value)
        else:
            rho.append(math.nan)
            p.append(math.nan)
    t["outlier_spearman"], t["outlier_p"] = rho, p
    return t

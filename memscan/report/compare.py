"""``compare.html`` of a ``memscan compare`` run (run kind ``compare``), from its tables alone.

Sections: the runs side by side (counts, rates, MIA metrics with their bootstrap intervals,
memorization-score summaries; mismatched runs flagged), extraction rate by duplicate count per
run, the items each run memorized and the overlap between runs, memorization against the chosen
attribute with the log-linear fit, and memorization vs outliers (Spearman's ρ and the examples
where the two rankings disagree most, with thumbnails).
"""

from __future__ import annotations

import math
from pathlib import Path

from memscan.compare.overlap import item_sets, membership_matrix
from memscan.report.base import data_uri, environment, open_complete_run, png_base64, version, write_page
from memscan.report.plots import heldout_plot, memorization_vs_attribute_plot, rates_by_duplicates_plot

#: Columns of compare.parquet the side-by-side table shows, in order, when present.
SHOWN_COLUMNS = (
    "kind", "model", "params", "step", "train_size", "heldout_loss", "train_loss", "loss_gap", "prompts", "samples", "detections",
    "extractions", "detection_rate", "extraction_rate", "extracted_generations", "extracted_training_images",
    "extracted_generation_rate",
    "examples", "members", "statistic", "attack", "auc", "auc_lo", "auc_hi", "tpr@1%fpr", "tpr@1%fpr_lo",
    "tpr@1%fpr_hi", "tpr@0.1%fpr", "tpr@0.1%fpr_lo", "tpr@0.1%fpr_hi", "memscore_mean", "memscore_median",
    "memscore_p90", "memscore_p99", "memscore_max", "sequences", "extractable", "extractable_rate",
    "pythia_score_mean", "exact_memorization_mean", "canaries", "exposure_mean", "exposure_max", "generated", "kept",
    "confirmed", "confirmed_rate",
    "memorization", "memorization_measure", "outlier_spearman", "outlier_p",
)  # fmt: skip


def _fmt(v) -> str:
    """A cell: empty for a missing value, a whole number as an integer (a count in a column
    that holds NaN for other kinds is a float: 10000.0 is shown as 10000, never 1e+04), other
    numbers to 4 significant digits.

    Examples
    --------
    >>> _fmt(10000.0), _fmt(123456789.0), _fmt(0.123456), _fmt(float("nan")), _fmt("x")
    ('10000', '123456789', '0.1235', '', 'x')
    """
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        if v.is_integer() and abs(v) < 1e15:
            return str(int(v))
        return f"{v:.4g}"
    return str(v)


def build_compare_report(run: str | Path, out: str | Path | None = None) -> Path:
    """Write the comparison page (default ``RUN/report.html``; ``memscan compare`` writes it as
    ``RUN/compare.html``) for a finished comparison; returns its path."""
    store, manifest = open_complete_run(run, "compare")
    root = store.root
    # the store's reader: a missing or damaged table is one error naming it and the fix
    table, overlap, items, dup, fits, outl = (
        store.table(t) for t in ("compare", "overlap", "items", "by_duplicates", "fits", "outliers")
    )
    label = dict(zip(table["run"], table["label"].astype(str)))
    by = manifest["by"]

    # 1. side by side: one column per run
    cols = [c for c in SHOWN_COLUMNS if c in table and table[c].notna().any()]
    side = [(c, [_fmt(v) for v in table[c]]) for c in cols]
    # 2. extraction rate by duplicate count
    dup_rows, dup_png = [], None
    if len(dup):
        pivot = dup.pivot_table(index="duplicate_count", columns="run", values="extraction_rate", aggfunc="first")
        runs = [r for r in table["run"] if r in pivot.columns]
        dup_rows = [(int(c), [_fmt(pivot.loc[c, r]) for r in runs]) for c in pivot.index]
        dup_png = png_base64(rates_by_duplicates_plot(dup, label))
        dup_labels = [label[r] for r in runs]
    else:
        dup_labels = []
    # 3. items and overlap, per item type (runs whose items are different things are not paired);
    #    keyed by run directory, never by label (labels may repeat in an old comparison)
    sets, types = item_sets(items, table["run"], table["kind"], table.get("training_set_sha256"))
    order = {r: k for k, r in enumerate(table["run"])}
    item_groups = []
    for kind_of_item in dict.fromkeys(t for t in types.values() if t is not None):
        runs_of = [r for r in table["run"] if types[r] == kind_of_item]
        matrix = membership_matrix({r: sets[r] for r in runs_of})
        if not len(matrix):
            continue
        pairs = overlap[overlap["run_a"].isin(runs_of) & overlap["run_b"].isin(runs_of)]
        pairs = pairs[pairs["run_a"].map(order) < pairs["run_b"].map(order)]
        item_groups.append(
            {
                "type": kind_of_item,
                "labels": [label[r] for r in runs_of],
                "rows": [(i, [bool(v) for v in flags]) for i, flags in zip(matrix.index[:200], matrix.values[:200])],
                "n_items": len(matrix),
                "pairs": [
                    (label[a], label[b], int(both), int(union), _fmt(float(j)))
                    for a, b, both, union, j in pairs[["run_a", "run_b", "both", "union", "jaccard"]].itertuples(
                        index=False
                    )
                ],
            }
        )
    # 4. memorization vs the attribute
    fit_png = None
    if len(table) >= 2:
        fit_png = png_base64(memorization_vs_attribute_plot(table, fits, by))
    heldout_png = None
    if "heldout_loss" in table and table["heldout_loss"].notna().any() and table["step"].notna().any():
        heldout_png = png_base64(heldout_plot(table))
    # 5. outliers
    out_sections = []
    for r in table["run"]:
        o = outl[outl["run"] == r]
        if not len(o):
            continue
        o = o.dropna(subset=["disagreement"]).sort_values("disagreement", kind="stable")
        show = lambda d: [  # noqa: E731
            (x["id"], _fmt(x["score"]), _fmt(x["outlier"]), _fmt(x["disagreement"]), data_uri(root, x["thumbnail"]))
            for _, x in d.iterrows()
        ]
        row = table[table["run"] == r].iloc[0]
        out_sections.append(
            {
                "label": label[r],
                "n": int(len(o)),
                "spearman": _fmt(row.get("outlier_spearman")),
                "p": _fmt(row.get("outlier_p")),
                "memorized_typical": show(o.iloc[::-1].head(5)),
                "outlying_not_memorized": show(o.head(5)),
            }
        )
    html = (
        environment()
        .get_template("compare_report.html.j2")
        .render(
            title=root.name,
            run_dir=str(root),
            version=version(),
            manifest=manifest,
            labels=[str(x) for x in table["label"]],
            runs=list(table["run"]),
            side=side,
            mismatch=[str(x) for x in table["mismatch"]],
            mismatches=manifest.get("mismatches", []),
            dup_rows=dup_rows,
            dup_labels=dup_labels,
            dup_png=dup_png,
            item_groups=item_groups,
            fits=fits.to_dict(orient="records"),
            fit_png=fit_png,
            heldout_png=heldout_png,
            by=by,
            k=manifest.get("k"),
            outlier_index=manifest.get("index"),
            outliers=out_sections,
        )
    )
    return write_page(html, root, out)

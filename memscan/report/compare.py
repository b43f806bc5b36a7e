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

import pandas as pd

from memscan.compare.overlap import membership_matrix
from memscan.report.base import data_uri, environment, open_complete_run, png_base64, version, write_page
from memscan.report.plots import heldout_plot, memorization_vs_attribute_plot, rates_by_duplicates_plot

#: Columns of compare.parquet the side-by-side table shows, in order, when present.
SHOWN_COLUMNS = (
    "kind", "model", "params", "step", "train_size", "heldout_loss", "train_loss", "loss_gap", "prompts", "samples", "detections",
    "extractions", "detection_rate", "extraction_rate", "extracted_generations", "extracted_training_images",
    "examples", "members", "statistic", "attack", "auc", "auc_lo", "auc_hi", "tpr@1%fpr", "tpr@1%fpr_lo",
    "tpr@1%fpr_hi", "tpr@0.1%fpr", "tpr@0.1%fpr_lo", "tpr@0.1%fpr_hi", "memscore_mean", "memscore_median",
    "memscore_p90", "memscore_p99", "memscore_max", "sequences", "extractable", "extractable_rate",
    "pythia_score_mean", "exact_memorization_mean", "canaries", "exposure_mean", "exposure_max", "generated", "kept",
    "confirmed", "confirmed_rate",
    "memorization", "memorization_measure", "outlier_spearman", "outlier_p",
)  # fmt: skip


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def build_compare_report(run: str | Path, out: str | Path | None = None) -> Path:
    """Write the comparison page (default ``RUN/report.html``; ``memscan compare`` writes it as
    ``RUN/compare.html``) for a finished comparison; returns its path."""
    store, manifest = open_complete_run(run, "compare")
    root = store.root
    table = pd.read_parquet(root / "compare.parquet")
    overlap = pd.read_parquet(root / "overlap.parquet")
    items = pd.read_parquet(root / "items.parquet")
    dup = pd.read_parquet(root / "by_duplicates.parquet")
    fits = pd.read_parquet(root / "fits.parquet")
    outl = pd.read_parquet(root / "outliers.parquet")
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
    # 3. items and overlap
    sets = {r: set(items.loc[items["run"] == r, "item"]) for r in table["run"]}
    matrix = membership_matrix({label[r]: s for r, s in sets.items()}) if any(sets.values()) else pd.DataFrame()
    item_rows = [(row["item"], [bool(row[label[r]]) for r in table["run"]]) for _, row in matrix.head(200).iterrows()]
    ov_rows = [
        (label[a], label[b], int(g["both"]), int(g["union"]), _fmt(float(g["jaccard"])))
        for (a, b), g in overlap.set_index(["run_a", "run_b"]).iterrows()
        if a < b or (a != b and False)
    ]
    ov_rows = [r for r in ov_rows if r[0] != r[1]]
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
            item_rows=item_rows,
            n_items=len(matrix),
            ov_rows=ov_rows,
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

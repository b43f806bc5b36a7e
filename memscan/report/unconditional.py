"""``report.html`` for a ``memscan extract-unconditional`` run, from its tables alone.

The page answers what an auditor asks of the CIFAR-10-style attack: how many generations were
judged, how many training images were emitted, which ones (generation beside training image),
and how close the rest came — the calibrated distance ℓ(x̂, x; S_x̂) = d(x̂, x) / (α_c · mean of
the n nearest) of every generation against the decision line ℓ = 1.
"""

from __future__ import annotations

from pathlib import Path

from memscan.report.base import data_uri, environment, open_complete_run, png_base64, run_context, write_page
from memscan.report.plots import calibrated_distance_plot


def build_unconditional_report(run: str | Path, out: str | Path | None = None, top: int = 20) -> Path:
    """Write ``report.html`` for a finished ``extract-unconditional`` run; returns its path.

    ``top``: how many of the closest non-extracted generations the page lists.
    """
    store, manifest = open_complete_run(run, "extract-unconditional")
    root = store.root
    gen, ext = store.table("generations"), store.table("extractions")
    cfg = manifest["config"]
    shape = manifest.get("output_shape", [32, 32, 3])
    w = max(96, int(shape[1]) * 3)
    cards = [
        {
            "train_id": r.train_id,
            "train_caption": r.train_caption or "",
            "candidate": data_uri(root, r.candidate_image),
            "train": data_uri(root, r.train_image),
            "hits": int(r.hits),
            "sample_index": int(r.sample_index),
            "seed": int(r.seed),
            "calibrated": float(r.calibrated),
            "nearest_l2": float(r.nearest_l2),
            "nearest_tiled_l2": float(r.nearest_tiled_l2),
            "w": w,
        }
        for r in ext.itertuples(index=False)
    ]
    closest = gen[~gen["extracted"].astype(bool)].nsmallest(top, "calibrated")
    html = (
        environment()
        .get_template("unconditional_report.html.j2")
        .render(
            **run_context(root, manifest),
            search=manifest.get("search", {}),
            plot_png=png_base64(calibrated_distance_plot(gen, float(cfg["alpha_c"]))),
            cards=cards,
            closest=closest.to_dict("records"),
        )
    )
    return write_page(html, root, out)

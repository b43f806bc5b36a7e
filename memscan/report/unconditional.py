"""``report.html`` for a ``memscan extract-unconditional`` run, from its tables alone.

The page answers what an auditor asks of the CIFAR-10-style attack: how many generations were
judged, how many training images were emitted, which ones (generation beside training image),
and how close the rest came — the calibrated distance ℓ(x̂, x; S_x̂) = d(x̂, x) / (α_c · mean of
the n nearest) of every generation against the decision line ℓ = 1.
"""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pandas as pd

from memscan.report.plots import _fig, _png


def calibrated_distance_plot(gen: pd.DataFrame, alpha_c: float) -> bytes:
    """Left: histogram of calibrated distances (ℓ < 1 extracts); right: nearest distance against
    the mean distance to the n nearest, with the decision line nearest = α_c · mean."""
    plt = _fig()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    cal = gen["calibrated"].to_numpy(dtype=float)
    cal = cal[np.isfinite(cal)]
    hi = max(2.0, float(np.quantile(cal, 0.99)) if len(cal) else 2.0)
    a.hist(np.clip(cal, 0, hi), bins=np.linspace(0, hi, 50), color="#888")
    a.axvline(1.0, ls="--", c="#c0392b", lw=1, label="ℓ = 1 (extracted below)")
    a.set_xlabel("calibrated distance ℓ(x̂, x; S_x̂)")
    a.set_ylabel("generations")
    a.legend(fontsize=8)
    hit = gen["extracted"].astype(bool).to_numpy()
    mean, near = gen["mean_distance"].to_numpy(dtype=float), gen["nearest_distance"].to_numpy(dtype=float)
    b.scatter(mean[~hit], near[~hit], s=6, c="#888", label="not extracted")
    b.scatter(mean[hit], near[hit], s=14, c="#c0392b", label="extracted")
    top = float(np.nanmax(mean)) if len(mean) else 1.0
    xs = np.linspace(0, top * 1.05, 2)
    b.plot(xs, alpha_c * xs, "k--", lw=0.8, label=f"nearest = α_c·mean (α_c = {alpha_c:g})")
    b.set_xlabel("mean distance to the n nearest training images")
    b.set_ylabel("distance to the nearest")
    b.legend(fontsize=8)
    return _png(fig)


def build_unconditional_report(store, manifest: dict, out: str | Path | None = None, top: int = 20) -> Path:
    """Write ``report.html`` for a finished ``extract-unconditional`` run; returns its path."""
    from memscan.report.html import _data_uri, _environment, run_context

    root = store.root
    gen, ext = store.table("generations"), store.table("extractions")
    cfg = manifest["config"]
    shape = manifest.get("output_shape", [32, 32, 3])
    w = max(96, int(shape[1]) * 3)
    cards = [
        {
            "train_id": r.train_id,
            "train_caption": r.train_caption or "",
            "candidate": _data_uri(root, r.candidate_image),
            "train": _data_uri(root, r.train_image),
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
        _environment()
        .get_template("unconditional_report.html.j2")
        .render(
            **run_context(root, manifest),
            search=manifest.get("search", {}),
            plot_png=base64.b64encode(calibrated_distance_plot(gen, float(cfg["alpha_c"]))).decode(),
            cards=cards,
            closest=closest.to_dict("records"),
        )
    )
    path = Path(out) if out else root / "report.html"
    path.write_text(html, encoding="utf-8")
    return path

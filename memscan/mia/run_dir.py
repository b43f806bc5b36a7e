"""The last step of a membership-inference run (opened with :func:`memscan.store.open_run`):
the tables, the thumbnails and ``report.html``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from memscan.mia.inputs import MiaInputs
from memscan.mia.tables import top_indices
from memscan.report.mia import build_mia_report
from memscan.store import Run, RunStore, safe_name, write_table

__all__ = ["cpu_seconds", "finish_mia_run", "save_thumb"]


def cpu_seconds() -> float:
    """CPU time of this process (user + system): on a shared machine, the cost that wall time hides."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def save_thumb(store: RunStore, kind: str, name: str, img: np.ndarray) -> str:
    """Save a uint8 H×W×C (or float [0, 1]) image, upscaled to ≥ 64 px; returns its run-relative path."""
    from PIL import Image

    a = np.asarray(img)
    if a.dtype != np.uint8:
        a = np.clip(np.round(a * 255), 0, 255).astype(np.uint8)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    im = Image.fromarray(a)
    scale = max(1, 64 // max(im.size))
    if scale > 1:
        im = im.resize((im.size[0] * scale, im.size[1] * scale), Image.NEAREST)
    d = store.image_dir(kind)
    path = d / f"{safe_name(name)}.png"
    im.save(path, format="PNG")
    return path.relative_to(store.root).as_posix()


def _write_example_thumbs(store: RunStore, s: MiaInputs, indices: Sequence[int]) -> None:
    for i in indices:
        save_thumb(store, "examples", s.ids[int(i)], s.images[int(i)])


def _write_inpaint_images(store: RunStore, s: MiaInputs, recon: dict, hidden: np.ndarray, indices) -> None:
    for i in indices:
        i = int(i)
        if i not in recon:
            continue
        masked = s.images[i].astype(np.float32) / 255.0
        masked = np.where(hidden[i][..., None], 0.5, masked)
        save_thumb(store, "inpaint", f"{s.ids[i]}/masked", masked)
        save_thumb(store, "inpaint", f"{s.ids[i]}/reconstruction", recon[i])


def finish_mia_run(
    run: Run,
    update: dict,
    examples: pd.DataFrame,
    tables: dict[str, pd.DataFrame],
    top: int,
    s: MiaInputs | None,
    recon: dict | None = None,
    hidden: np.ndarray | None = None,
) -> Path:
    """Write the tables and thumbnails, mark the run complete (with ``update``), build its report.

    ``recon`` maps an example's index to the target's reconstruction (uint8), ``hidden`` holds
    every example's hidden mask (the inpainting attack)."""
    store = run.store
    write_table(examples, store.root / "examples.parquet")
    for name, df in tables.items():
        if df is not None and len(df):
            write_table(df, store.root / f"{name}.parquet")
    if s is not None and "metrics" in tables and len(tables["metrics"]):
        idx = top_indices(tables["scores"], tables["metrics"], examples, top)
        _write_example_thumbs(store, s, idx)
        if recon is not None:
            _write_inpaint_images(store, s, recon, hidden, idx)
    run.finish(**update)
    try:
        return build_mia_report(store.root)
    except BaseException:
        run.manifest["status"] = "incomplete"  # the tables are written, the report is not
        run.save()
        raise

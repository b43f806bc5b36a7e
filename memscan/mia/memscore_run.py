"""``memscan memscore``: the memorization score of van den Burg & Williams (2021) as a run
directory (``manifest.json``, ``memscore.parquet``, ``memscore_store/``, ``report.html``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from memscan.data.training import load_training_set
from memscan.errors import InputError, MemscanError
from memscan.mia.memscore import memorization_score
from memscan.mia.results import MemscoreResult
from memscan.mia.run_dir import base_manifest, save_thumb
from memscan.report.mia import build_mia_report
from memscan.store import RunLock, RunStore, write_table
from memscan.user_code import import_object

__all__ = ["load_array_data", "run_memscore"]


def load_array_data(data: str | Path) -> tuple[Any, list[str], np.ndarray | None]:
    """``.npy`` (no pickle) → (array, ids, images or None); an image folder/manifest → uint8 images."""
    p = Path(data)
    if p.suffix.lower() == ".npy":
        if not p.is_file():
            raise InputError(f"data file {data} does not exist")
        try:
            arr = np.load(p, allow_pickle=False)
        except ValueError as exc:
            if "allow_pickle" in str(exc):
                raise InputError(
                    f"{data}: holds Python objects that only pickle can read; memscan never unpickles data",
                    "save a plain numeric array (np.save of a float or integer array)",
                ) from None
            raise InputError(f"{data}: not a valid .npy file ({exc})", "save it again with np.save") from None
        except (EOFError, OSError) as exc:
            raise InputError(
                f"{data}: truncated or unreadable .npy file ({exc})", "save it again with np.save"
            ) from None
        if arr.dtype.kind not in "biuf":
            raise InputError(f"{data}: array of dtype {arr.dtype} is not numeric", "save a float or integer array")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise InputError(
                f"{data}: {int((~np.isfinite(arr)).sum())} NaN/Inf value(s)", "drop or fill the non-finite entries"
            )
        ids = [str(i) for i in range(len(arr))]
        imgs = arr if (arr.dtype == np.uint8 and arr.ndim in (3, 4)) else None
        return arr, ids, imgs
    ts = load_training_set(p, channels=3)
    if ts.skipped:
        raise InputError(f"{len(ts.skipped)} image(s) of {data} could not be read", "fix or remove them")
    return ts.images, list(ts.ids), ts.images


def run_memscore(
    out: str | Path,
    data: str | Path,
    train_fn: Any,
    log_likelihood_fn: Any,
    *,
    folds: int = 10,
    repeats: int = 1,
    seed: int = 0,
    top: int = 16,
    progress: bool = True,
) -> MemscoreResult:
    """The memorization score of van den Burg & Williams 2021 (``memscan memscore``).

    ``data`` is a ``.npy`` array (loaded without pickle) or an image folder/manifest (uint8
    ``N×H×W×3``); ``train_fn`` and ``log_likelihood_fn`` are callables or ``py:module:attr``
    specs (see :func:`memscan.memorization_score`). Finished (repeat, fold) models are stored in
    ``out/memscore_store`` — rerunning the same command on the same ``out`` resumes.
    """
    t0 = time.perf_counter()
    fns = [_callable(what, f) for what, f in (("train_fn", train_fn), ("log_likelihood_fn", log_likelihood_fn))]
    arr, ids, imgs = load_array_data(data)
    store, resumed = _open_memscore_run(out)
    lock = RunLock(store.root).acquire()
    try:
        sources = {
            "data": str(data),
            "train_fn": train_fn if isinstance(train_fn, str) else repr(train_fn),
            "log_likelihood_fn": log_likelihood_fn if isinstance(log_likelihood_fn, str) else repr(log_likelihood_fn),
        }
        manifest = base_manifest(
            "memscore", sources, memscore={"folds": folds, "repeats": repeats, "seed": seed}, resumed=resumed
        )
        store.write_manifest(manifest)
        res = memorization_score(
            arr,
            fns[0],
            fns[1],
            folds=folds,
            repeats=repeats,
            seed=seed,
            store=store.root / "memscore_store",
            progress=progress,
        )
        table = _memscore_table(ids, res)
        write_table(table, store.root / "memscore.parquet")
        shown = res.top(top)
        if imgs is not None:
            for i in shown:
                save_thumb(store, "examples", ids[int(i)], imgs[int(i)])
        manifest.update(
            status="complete",
            finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
            counts={"examples": len(ids), "models": folds * repeats},
            result=res.to_dict(),
            timings={"total_s": round(time.perf_counter() - t0, 2)},
        )
        store.write_manifest(manifest)
        report = build_mia_report(store.root)
    finally:
        lock.release()
    return MemscoreResult(run_dir=store.root, manifest=manifest, table=table, result=res, shown=shown, report=report)


def _callable(what: str, f: Any) -> Any:
    """``f`` itself, or the object a ``py:module:attribute`` spec names; it must be callable."""
    if isinstance(f, str):
        if not f.startswith("py:"):
            raise InputError(f"{what}: {f!r} is not py:module:attribute", "e.g. py:mymodels.py:train")
        f = import_object(f, "a callable")
    if not callable(f):
        raise InputError(f"{what} is not callable")
    return f


def _open_memscore_run(out: str | Path) -> tuple[RunStore, bool]:
    """The run store of ``out`` and whether it resumes an earlier memscore run."""
    store = RunStore(out)
    store.root.mkdir(parents=True, exist_ok=True)
    resumed = store.exists()
    if resumed:
        old = store.read_manifest()
        if old.get("kind") != "memscore":
            raise MemscanError(f"{out} holds a {old.get('kind')} run", "pass a new --out directory")
    return store, resumed


def _memscore_table(ids: list[str], res) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "index": np.arange(len(ids)),
            "id": ids,
            "score": res.score,
            "u": res.u,
            "v": res.v,
            "n_in": res.n_in.astype(np.int64),
            "n_out": res.n_out.astype(np.int64),
        }
    )

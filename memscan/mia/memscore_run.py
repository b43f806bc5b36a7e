"""``memscan memscore``: the memorization score of van den Burg & Williams (2021) as a run
directory (``manifest.json``, ``memscore.parquet``, ``shards/`` — one shard per (repeat, fold)
model, table ``loglik`` — and ``report.html``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from memscan.data.training import load_training_set
from memscan.errors import InputError, user_code
from memscan.generators.model_record import model_record
from memscan.mia.inputs import absolute_spec
from memscan.mia.memscore import _check_ll, _result_from, _take, data_sha256, fold_assignment
from memscan.mia.results import MemscoreResult
from memscan.mia.run_dir import save_thumb
from memscan.report.mia import build_mia_report
from memscan.runners import make_pool
from memscan.runners.shards import run_shards
from memscan.store import RunStore, open_run, write_table
from memscan.user_code import callable_name, import_object

__all__ = ["load_array_data", "memscore_stage", "memscore_worker", "run_memscore"]


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


def memscore_worker(data: Any, train_fn: Any, log_likelihood_fn: Any) -> dict:
    """A worker's context: the data (an array, or the ``--data`` path loaded here) and the two
    functions (callables, or ``py:`` specs imported here)."""
    if isinstance(data, (str, Path)):
        data = load_array_data(data)[0]
    return {
        "data": data,
        "train_fn": _callable("train_fn", train_fn),
        "log_likelihood_fn": _callable("log_likelihood_fn", log_likelihood_fn),
    }


def memscore_stage(ctx: dict, repeat: int, fold: int, train_idx: np.ndarray) -> tuple[dict, dict]:
    """One (repeat, fold) model: train it on ``train_idx``, then ``log p`` of every example."""
    data = ctx["data"]
    t0 = time.perf_counter()
    with user_code(f"the train function failed on repeat {repeat}, fold {fold}"):
        model = ctx["train_fn"](_take(data, np.asarray(train_idx)))
    with user_code(f"the log-likelihood function failed on repeat {repeat}, fold {fold}"):
        ll = ctx["log_likelihood_fn"](model, data)
    row = _check_ll(ll, len(data), repeat, fold)
    table = pd.DataFrame(
        {"repeat": np.int64(repeat), "fold": np.int64(fold), "index": np.arange(len(row)), "loglik": row}
    )
    return {"loglik": table}, {"repeat": repeat, "fold": fold, "seconds": round(time.perf_counter() - t0, 3)}


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
    resume: bool = False,
    runner: str = "local",
    runner_options=None,
    stop_after_shards: int | None = None,
) -> MemscoreResult:
    """The memorization score of van den Burg & Williams 2021 (``memscan memscore``).

    ``data`` is a ``.npy`` array (loaded without pickle) or an image folder/manifest (uint8
    ``N×H×W×3``); ``train_fn`` and ``log_likelihood_fn`` are callables or ``py:module:attr``
    specs (see :func:`memscan.memorization_score`). Each (repeat, fold) model is one shard of the
    run (``shards/``, committed once, on the ``runner``'s workers): ``resume`` finishes a killed
    run, and rerunning the same command on a finished run recomputes the table from the
    committed shards without training anything (more ``repeats`` add only the new models).
    The manifest records ``data_sha256`` (:func:`memscan.mia.memscore.data_sha256` of the loaded
    array): a rerun or ``resume`` whose data's content differs — even with the same path and
    size — is refused (use another ``out``), as is one of a run made before the digest was
    recorded.
    """
    t0 = time.perf_counter()
    fns = [_callable(what, f) for what, f in (("train_fn", train_fn), ("log_likelihood_fn", log_likelihood_fn))]
    arr, ids, imgs = load_array_data(data)
    n = len(ids)
    if isinstance(folds, bool) or int(folds) != folds or not (2 <= folds <= n):
        raise InputError(
            f"folds: {folds!r} must be an integer with 2 ≤ folds ≤ n = {n}",
            "K = n is leave-one-out; the paper uses K = 10",
        )
    if isinstance(repeats, bool) or int(repeats) != repeats or repeats < 1:
        raise InputError(f"repeats: {repeats!r} must be a positive integer")
    folds, repeats, seed = int(folds), int(repeats), int(seed)
    resume = resume or _finished_memscore_run(out)
    with open_run(out, "memscore", resume=resume) as run:
        sources = {
            "data": str(data),
            "train_fn": callable_name(train_fn),
            "log_likelihood_fn": callable_name(log_likelihood_fn),
        }
        n_shards = folds * repeats
        run.start(
            {
                "sources": sources,
                "memscore": {"folds": folds, "repeats": repeats, "seed": seed},
                "folds_of": {"n": n, "folds": folds, "seed": seed},
                "data_sha256": data_sha256(arr),
                "model": model_record(train_fn),
                "n_shards": n_shards,
                "runner": {"name": runner},
            },
            identity=("sources", "folds_of", "data_sha256"),
        )
        assignments = np.stack([fold_assignment(n, folds, seed, r) for r in range(repeats)])
        shard_args = {
            r * folds + k: (r, k, np.flatnonzero(assignments[r] != k)) for r in range(repeats) for k in range(folds)
        }
        if runner == "local":
            setup_args = (arr, *fns)
        else:  # each worker loads the data and imports the functions itself
            setup_args = (
                str(Path(data).resolve()),
                *(absolute_spec(f) if isinstance(f, str) else f for f in (train_fn, log_likelihood_fn)),
            )
        with make_pool(runner, memscore_worker, setup_args, runner_options, log=run.store.log) as pool:
            run.manifest["runner"] = pool.describe()
            run.save()
            run_shards(
                run,
                pool,
                memscore_stage,
                shard_args,
                label="memorization score: models",
                unit="models",
                progress=progress,
                stop_after_shards=stop_after_shards,
                describe=lambda key, tables: f"model (repeat {key // folds}, fold {key % folds})",
            )
        ll = np.stack([run.store.read_shard(key, "loglik")["loglik"].to_numpy(np.float64) for key in range(n_shards)])
        res = _result_from(ll, assignments, folds, repeats, seed)
        table = _memscore_table(ids, res)
        write_table(table, run.root / "memscore.parquet")
        shown = res.top(top)
        if imgs is not None:
            for i in shown:
                save_thumb(run.store, "examples", ids[int(i)], imgs[int(i)])
        run.finish(
            counts={"examples": len(ids), "models": folds * repeats},
            result=res.to_dict(),
            timings={"total_s": round(time.perf_counter() - t0, 2)},
        )
        try:
            report = build_mia_report(run.root)
        except BaseException:
            run.manifest["status"] = "incomplete"  # the table is written, the report is not
            run.save()
            raise
    return MemscoreResult(run_dir=run.root, manifest=run.manifest, table=table, result=res, shown=shown, report=report)


def _finished_memscore_run(out: str | Path) -> bool:
    """True when ``out`` holds a finished memscore run: rerunning it recomputes from its shards
    (as ``--resume`` does). A killed run needs ``--resume``, as every run kind does."""
    store = RunStore(out)
    if not store.exists():
        return False
    m = store.read_manifest()
    return m.get("kind") == "memscore" and m.get("status") == "complete"


def _callable(what: str, f: Any) -> Any:
    """``f`` itself, or the object a ``py:module:attribute`` spec names; it must be callable."""
    if isinstance(f, str):
        if not f.startswith("py:"):
            raise InputError(f"{what}: {f!r} is not py:module:attribute", "e.g. py:mymodels.py:train")
        f = import_object(f, "a callable")
    if not callable(f):
        raise InputError(f"{what} is not callable")
    return f


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

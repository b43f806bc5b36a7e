"""Shadow models: ``M`` models trained on random halves of a data set, with their member masks.

Membership inference is measured the way Carlini et al. 2022 (LiRA, §IV and its released code)
and Carlini et al. 2023 (§6.1: 16 diffusion models on random halves of CIFAR-10) do it: train
``M`` models, each on a random half of a pool of ``N`` examples, and record which examples each
model saw. Any one of them can then be the *target* (its mask is the ground truth) while the
others are the *shadow* models whose IN/OUT losses calibrate LiRA.

A shadow directory::

    ROOT/
      shadows.json             n, n_models, seed, scheme, example ids, recipe
      membership.npy           bool M×N: membership[m, i] ⇔ model m was trained on example i
      models/0000/             whatever train_fn wrote (the demo recipe: a diffusers pipeline)
      models/0000.done.json    completion record: member indices (JSON), seconds, train_fn's record

Training is resumable per model: a model counts as done only when its completion record exists
and holds the member indices the mask asks for; anything else (a killed run's half-written
folder) is removed and trained again. Nothing is pickled: masks are ``.npy`` without pickle and
JSON, and the demo recipe (:mod:`memscan.demo.shadow_recipe`) saves safetensors weights.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from memscan.errors import InputError
from memscan.generators.seeds import numpy_seed
from memscan.store import atomic_write_json, replacing
from memscan.user_code import callable_name

__all__ = [
    "SCHEMES",
    "ShadowModels",
    "load_shadow_models",
    "shadow_membership",
    "torch_threads",
    "train_shadow_models",
]

SCHEMES = ("balanced", "halves")
_META = "shadows.json"
_MASK = "membership.npy"
_VERSION = 1


def shadow_membership(n: int, n_models: int, *, seed: int = 0, scheme: str = "balanced") -> np.ndarray:
    """Random IN/OUT assignment of ``n`` examples to ``n_models`` models (bool ``M×N``).

    Schemes:

    - ``"balanced"`` (default) — every example is IN exactly ``⌊M/2⌋`` models, chosen at random
      (the ``keep = order < M/2`` construction of LiRA's released code). Each model then sees
      about half of the pool, and every example has enough IN and OUT models for LiRA online.
    - ``"halves"`` — each model independently draws a random subset of exactly ``⌊N/2⌋`` examples
      (Carlini et al. 2023's "random halves"); an example's IN count is then Binomial(M, ½).

    Examples
    --------
    >>> m = shadow_membership(6, 4, seed=0)
    >>> m.shape, m.sum(0).tolist()
    ((4, 6), [2, 2, 2, 2, 2, 2])
    >>> shadow_membership(6, 4, seed=0, scheme="halves").sum(1).tolist()
    [3, 3, 3, 3]
    """
    for name, v, lo in (("n", n, 2), ("n_models", n_models, 1)):
        if isinstance(v, bool) or int(v) != v or v < lo:
            raise InputError(f"{name}: {v!r} must be an integer ≥ {lo}")
    if scheme not in SCHEMES:
        raise InputError(f"scheme: {scheme!r} is unknown", f"choose one of {', '.join(SCHEMES)}")
    rng = np.random.default_rng(np.random.SeedSequence(numpy_seed(seed), spawn_key=(0x5AD0,)))
    if scheme == "balanced":
        if n_models < 2:
            raise InputError("scheme 'balanced' needs n_models ≥ 2", "train at least 2 models, or use 'halves'")
        order = rng.random((n_models, n)).argsort(0)
        return order < n_models // 2
    mask = np.zeros((n_models, n), dtype=bool)
    for m in range(n_models):
        mask[m, rng.permutation(n)[: n // 2]] = True
    return mask


def check_threads(n: int | None) -> None:
    """Refuse a ``--threads`` that is not a positive integer (None: torch's default)."""
    if n is not None and (isinstance(n, bool) or int(n) != n or n < 1):
        raise InputError(
            f"--threads {n}: must be at least 1", "give a positive number, or leave --threads out for torch's default"
        )


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)`` (None: unchanged), then restore.

    On a shared or oversubscribed CPU, one thread per process is often many times faster than
    several (OpenMP threads spin while waiting for cores that other processes hold).
    """
    import torch

    check_threads(n)
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


@dataclass
class ShadowModels:
    """A shadow directory (see the module docstring).

    Attributes
    ----------
    root : pathlib.Path
    membership : numpy.ndarray of bool, shape (M, N)
    ids : list of str
        Example ids, in the column order of ``membership``.
    seed : int
    scheme : str
    recipe : dict
        Description of the training function (recorded by :func:`train_shadow_models`).
    done : list of bool
        Which models are trained.
    """

    root: Path
    membership: np.ndarray
    ids: list[str]
    seed: int
    scheme: str
    recipe: dict = field(default_factory=dict)
    done: list[bool] = field(default_factory=list)

    @property
    def n_models(self) -> int:
        return int(self.membership.shape[0])

    @property
    def n(self) -> int:
        return int(self.membership.shape[1])

    def model_dir(self, m: int) -> Path:
        """Folder of model ``m`` (what the training function wrote)."""
        return self.root / "models" / f"{int(m):04d}"

    def record(self, m: int) -> dict:
        """The completion record of model ``m``."""
        path = _record_path(self.root, m)
        if not path.exists():
            raise InputError(f"shadow model {m} in {self.root} is not trained", "rerun train_shadow_models to finish")
        return json.loads(path.read_text())

    def load_predictor(self, m: int, *, device: str = "cpu"):
        """Model ``m`` as a :class:`~memscan.mia.noise.NoisePredictor` (a diffusers directory)."""
        from memscan.mia.noise import load_noise_predictor

        if not self.done[m]:
            raise InputError(f"shadow model {m} in {self.root} is not trained", "rerun train_shadow_models to finish")
        return load_noise_predictor(self.model_dir(m), device=device)


def _record_path(root: Path, m: int) -> Path:
    return root / "models" / f"{int(m):04d}.done.json"


def _is_done(root: Path, m: int, members: np.ndarray) -> bool:
    path = _record_path(root, m)
    if not path.exists():
        return False
    try:
        rec = json.loads(path.read_text())
        return rec.get("member_indices") == members.tolist() and (root / "models" / f"{m:04d}").is_dir()
    except (json.JSONDecodeError, OSError):
        return False


def _save_mask(path: Path, mask: np.ndarray) -> None:
    with replacing(path) as tmp, open(tmp, "wb") as f:
        np.save(f, mask, allow_pickle=False)


def _take(data: Any, idx: np.ndarray) -> Any:
    if hasattr(data, "shape") and hasattr(data, "__getitem__"):
        return data[idx]
    return [data[int(i)] for i in idx]


def train_shadow_models(
    data: Any,
    train_fn: Callable[[Any, Path], Any],
    root: str | os.PathLike,
    *,
    n_models: int,
    seed: int = 0,
    scheme: str = "balanced",
    ids: Sequence[str] | None = None,
    recipe: dict | None = None,
    progress: bool = False,
) -> ShadowModels:
    """Train ``n_models`` models on random halves of ``data``, resumably, recording each one's
    members.

    Parameters
    ----------
    data : array or sequence
        The pool of ``N`` examples (``len(data)``); arrays are subset by fancy indexing, other
        sequences into a list.
    train_fn : callable
        ``train_fn(subset, model_dir)`` trains a fresh model on ``subset`` (the members, in pool
        order) and saves it into the (new, empty) folder ``model_dir``. Its return value, if a
        dict, is kept in the completion record. The demo's recipe is
        :class:`memscan.demo.shadow_recipe.DemoRecipe`.
    root : path
        The shadow directory. Rerunning with the same settings trains only the missing models.
    n_models : int
        ``M``.
    seed : int
        Seed of the membership assignment (:func:`shadow_membership`).
    scheme : {"balanced", "halves"}
        See :func:`shadow_membership`.
    ids : sequence of str, optional
        Example ids (default ``"0".."N−1"``); recorded, and checked when the directory is reused.
    recipe : dict, optional
        JSON description of ``train_fn`` to record (default: ``train_fn.describe()`` if it has one).
    progress : bool
        Print one line per trained model.

    Returns
    -------
    ShadowModels

    Raises
    ------
    memscan.errors.InputError
        A directory made with other settings or other example ids; bad ``n_models``/``scheme``.

    Examples
    --------
    Any model works; here a "model" is the mean of its training examples, written as JSON:

    >>> import tempfile
    >>> def train(subset, model_dir):
    ...     (model_dir / "mean.json").write_text(json.dumps(float(np.mean(subset))))
    >>> with tempfile.TemporaryDirectory() as d:
    ...     sm = train_shadow_models(np.arange(10.0), train, d, n_models=4, seed=1)
    ...     means = [json.loads((sm.model_dir(m) / "mean.json").read_text()) for m in range(4)]
    >>> sm.membership.sum(0).tolist() == [2] * 10, all(sm.done)
    (True, True)
    >>> bool(np.allclose(means, [np.arange(10.0)[row].mean() for row in sm.membership]))
    True
    """
    try:
        n = len(data)
    except TypeError:
        raise InputError("data: has no len()", "pass an array or a sequence of examples") from None
    ids = [str(i) for i in range(n)] if ids is None else [str(i) for i in ids]
    if len(ids) != n:
        raise InputError(f"ids: {len(ids)} ids for {n} examples", "pass one id per example")
    if len(set(ids)) != n:
        raise InputError("ids: are not unique", "give every example its own id")
    mask = shadow_membership(n, n_models, seed=seed, scheme=scheme)
    if recipe is None:
        recipe = (
            train_fn.describe()
            if hasattr(train_fn, "describe")
            else {"train_fn": getattr(train_fn, "__qualname__", None) or callable_name(train_fn)}
        )
    root = Path(root)
    meta = {
        "version": _VERSION,
        "n": n,
        "n_models": int(n_models),
        "seed": int(seed),
        "scheme": scheme,
        "ids": ids,
        "recipe": recipe,
    }
    _open_shadow_dir(root, meta, mask)
    for m in range(int(n_models)):
        members = np.flatnonzero(mask[m])
        if _is_done(root, m, members):
            continue
        model_dir = root / "models" / f"{m:04d}"
        if model_dir.exists():  # a half-written model from a killed run
            shutil.rmtree(model_dir)
        _record_path(root, m).unlink(missing_ok=True)
        model_dir.mkdir(parents=True)
        t0 = time.perf_counter()
        out = train_fn(_take(data, members), model_dir)
        seconds = time.perf_counter() - t0
        rec = {
            "model": m,
            "n_members": int(members.size),
            "member_indices": members.tolist(),
            "seconds": round(seconds, 2),
            "train_record": out if isinstance(out, dict) else None,
        }
        atomic_write_json(_record_path(root, m), rec)
        if progress:
            print(f"shadow model {m + 1}/{n_models}: {members.size} members, {seconds:.1f} s", flush=True)
    return load_shadow_models(root)


def _open_shadow_dir(root: Path, meta: dict, mask: np.ndarray) -> None:
    """Create the shadow directory ``root`` with its settings and mask, or check that an existing
    one was made with the same settings and the same seeded mask."""
    (root / "models").mkdir(parents=True, exist_ok=True)
    meta = json.loads(json.dumps(meta))  # as it reads back from disk
    meta_path = root / _META
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        diff = [k for k in ("version", "n", "n_models", "seed", "scheme", "ids", "recipe") if old.get(k) != meta[k]]
        if diff:
            raise InputError(
                f"shadow directory {root} was made with other settings ({', '.join(diff)} differ)",
                "use a new directory, or the settings it was made with",
            )
        stored = np.load(root / _MASK, allow_pickle=False)
        if not np.array_equal(stored, mask):
            raise InputError(
                f"shadow directory {root}: stored membership differs from the seeded one",
                "the seeding changed; use a new directory",
            )
    else:
        _save_mask(root / _MASK, mask)
        atomic_write_json(meta_path, meta)


def load_shadow_models(root: str | os.PathLike) -> ShadowModels:
    """Open a shadow directory written by :func:`train_shadow_models`."""
    root = Path(root)
    meta_path = root / _META
    if not meta_path.exists() or not (root / _MASK).exists():
        raise InputError(
            f"{root} is not a shadow directory (no {_META} / {_MASK})",
            "make one with train_shadow_models or `memscan demo-mia`",
        )
    meta = json.loads(meta_path.read_text())
    mask = np.load(root / _MASK, allow_pickle=False)
    if mask.dtype != np.bool_ or mask.shape != (meta["n_models"], meta["n"]):
        raise InputError(f"{root / _MASK}: damaged (dtype {mask.dtype}, shape {mask.shape})", "retrain the shadows")
    done = [_is_done(root, m, np.flatnonzero(mask[m])) for m in range(mask.shape[0])]
    return ShadowModels(root, mask, list(meta["ids"]), int(meta["seed"]), meta["scheme"], meta.get("recipe", {}), done)

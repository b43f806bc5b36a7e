"""The calibrated distance of Carlini et al. (2023) for unconditional models (their CIFAR-10 study).

A plain ℓ2 threshold treats all images alike, but some generations (smooth, low-contrast ones)
are close to many training images without copying any. The paper therefore measures a
generation's distance to its nearest training image **relative to** how far it is from its
neighbourhood (DESIGN.md, "Calibrated distance"):

    ℓ(x̂, x; S_x̂) = ℓ2(x̂, x) / (α_c · mean_{y ∈ S_x̂} ℓ2(x̂, y))

where x is the training image nearest to x̂ and S_x̂ the ``n`` training images nearest to x̂ (x
included). Defaults α_c = 0.5, n = 50; x̂ **extracts** x when ℓ < 1, i.e. when x̂ is more than
twice as close to x as to its typical near neighbour. ℓ2 is the normalised
``sqrt(mean((a − b)²))`` (the ratio does not depend on the normalisation). A generation whose n
nearest are all at distance 0 gets ℓ = 0.

A training set of fewer than ``n`` images shrinks the neighbourhood to all of it
(``CalibratedResult.n``, the effective n; a warning says so): with a single image every
generation gets ℓ = 1/α_c = 2 and none is extracted. Copies of x among the n nearest (a
duplicated training image) count in the mean, as the paper's formula has it — an image
duplicated n or more times gives ℓ = 1/α_c for any generation near it.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import numpy as np

from memscan.errors import InputError
from memscan.index.nearest import PixelSearch

#: α_c and n of Carlini et al. (2023), CIFAR-10 experiments.
ALPHA_C = 0.5
N_NEAREST = 50


@dataclass(frozen=True)
class CalibratedConfig:
    """Parameters of the calibrated distance (recorded in a run's manifest).

    Parameters
    ----------
    alpha_c : the α in the denominator (paper: 0.5)
    n : neighbourhood size S_x̂ (paper: 50)
    metric : ``l2`` (the paper's) or ``tiled_l2`` (grid × grid tiles) for every distance
    grid : tiles per side for ``tiled_l2``
    """

    alpha_c: float = ALPHA_C
    n: int = N_NEAREST
    metric: str = "l2"
    grid: int = 4

    def validate(self) -> CalibratedConfig:
        if not (self.alpha_c > 0 and np.isfinite(self.alpha_c)):
            raise InputError(f"alpha_c={self.alpha_c} must be a positive number", "paper: 0.5")
        if isinstance(self.n, bool) or not isinstance(self.n, (int, np.integer)) or self.n < 1:
            raise InputError(f"n={self.n!r} must be a positive integer", "paper: 50")
        if self.metric not in ("l2", "tiled_l2"):
            raise InputError(f"metric {self.metric!r} is not l2 or tiled_l2", "the paper's calibrated distance uses l2")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CalibratedResult:
    """Calibrated distances of Q generations.

    Attributes
    ----------
    nearest_index : Q int64 — the nearest training image x (row of the training set)
    nearest_distance : Q — ℓ2(x̂, x)
    mean_distance : Q — mean of ℓ2(x̂, y) over the n nearest y
    calibrated : Q — ℓ(x̂, x; S_x̂)
    extracted : Q bool — ``calibrated < 1``
    n : neighbourhood size used, the effective n (``min(n, training-set size)``)
    n_requested : the configured n
    """

    nearest_index: np.ndarray
    nearest_distance: np.ndarray
    mean_distance: np.ndarray
    calibrated: np.ndarray
    extracted: np.ndarray
    n: int
    n_requested: int | None = None


def calibrated_from_neighbours(
    distances: np.ndarray, alpha_c: float = ALPHA_C
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ℓ from each row of ascending distances to the n nearest training images.

    Returns ``(calibrated, nearest_distance, mean_distance)``.

    Examples
    --------
    >>> d = np.array([[0.02, 0.10, 0.12], [0.09, 0.10, 0.11], [0.0, 0.0, 0.0]])
    >>> cal, _, mean = calibrated_from_neighbours(d)
    >>> np.round(cal, 4).tolist(), (cal < 1).tolist()
    ([0.5, 1.8, 0.0], [True, False, True])
    """
    d = np.asarray(distances, dtype=np.float64)
    if d.ndim != 2 or d.shape[1] < 1:
        raise InputError(f"distances must be Q×n with n ≥ 1, got shape {d.shape}")
    if not np.isfinite(d).all() or (d < 0).any():
        raise InputError("distances must be finite and non-negative", "pass the n nearest distances of every query")
    nearest = d.min(axis=1)
    mean = d.mean(axis=1)
    denom = alpha_c * mean
    cal = np.divide(nearest, denom, out=np.zeros_like(nearest), where=denom > 0)
    return cal, nearest, mean


def calibrated_distance(
    generations: np.ndarray,
    training_images: np.ndarray,
    config: CalibratedConfig = CalibratedConfig(),
    *,
    searcher=None,
) -> CalibratedResult:
    """Calibrated distance of every generation against a training set, exact.

    The n nearest training images come from an exact pixel search
    (:class:`memscan.index.nearest.PixelSearch`: FAISS flat ℓ2 with exact refinement; exact tiled
    ℓ2 with a certificate). Pass ``searcher`` (a ``PixelSearch`` over ``training_images``) to
    reuse one across calls.

    Images are compared as 8-bit pixels, as they are saved and as ``memscan
    extract-unconditional`` makes its generations: float images in [0, 1] are first quantized
    to ``round(255·x)``. The distances are those of the quantized images, exactly; for
    low-contrast float images they can differ from :func:`memscan.distances.l2` of the floats by
    about one grey level's worth (quantize the images first to compare the two).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> train = rng.integers(0, 256, (60, 8, 8, 3), dtype=np.uint8)
    >>> copy = np.clip(train[:1].astype(int) + 3, 0, 255).astype(np.uint8)
    >>> fresh = rng.integers(0, 256, (1, 8, 8, 3), dtype=np.uint8)
    >>> r = calibrated_distance(np.concatenate([copy, fresh]), train)
    >>> int(r.nearest_index[0]), r.extracted.tolist(), r.n
    (0, [True, False], 50)
    """
    config = config.validate()
    train = np.asarray(training_images)
    if searcher is None:
        searcher = PixelSearch(train, grid=config.grid)
    n = min(config.n, len(searcher))
    if n < config.n:
        warnings.warn(
            f"the training set holds {len(searcher)} images, fewer than n={config.n}: the calibrated distance "
            f"averages over all {n} (CalibratedResult.n)"
            + (f"; with one image every generation gets l = 1/alpha_c = {1 / config.alpha_c:g}" if n == 1 else ""),
            UserWarning,
            stacklevel=2,
        )
    nb = searcher.search(generations, k=n, metric=config.metric)
    cal, nearest, mean = calibrated_from_neighbours(nb.distances, config.alpha_c)
    return CalibratedResult(nb.indices[:, 0].copy(), nearest, mean, cal, cal < 1.0, n, config.n)

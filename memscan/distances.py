"""Normalised ℓ2 and tiled ℓ2 between images — the one distance module of memscan.

Definitions (Carlini et al. 2023, "Extracting Training Data from Diffusion Models", §4.1 and
DESIGN.md):

- ``l2(a, b) = sqrt(mean((a - b) ** 2))`` with pixels in [0, 1], so 0 ≤ l2 ≤ 1.
- ``tiled_l2(a, b)``: cut both images into a ``grid × grid`` array of equal, non-overlapping
  tiles and take the **maximum** over tile positions of the normalised ℓ2 of corresponding
  tiles. A large shared background cannot hide a differing object.

Images are ``H×W×C`` or batches ``N×H×W×C`` (grayscale: ``C = 1``), as ``uint8`` (0..255) or
floating point already in [0, 1]. numpy inputs give numpy outputs; torch tensors are computed
on their own device (GPU included) and give torch outputs.

The matrix versions never broadcast ``N×N×H×W×C``: each tile position is gathered once and the
squared distances come from one matrix product per tile, ``‖a‖² + ‖b‖² − 2 a·b``.

- **uint8 against uint8** (generations, training images), where the device has int8 products
  (``torch._int_mm``: VNNI/AMX on CPUs, tensor cores on GPUs; checked once per device for exact
  results and, on a CPU, for a product at least 1/``INT8_CPU_MAX_TIME`` × faster): pixels
  minus 128 fit int8, a tile's dot products (≤ D·128²) are exact in int32, and the identity is
  formed in int32 (int64 for tiles over 2¹⁵ values). Every distance is then the exact one,
  rounded once to float32 — nothing to refine, whatever the threads, batching or device. On
  this project's 2-core CPU this is 3.2–3.8× the float32 products (docs/benchmarks.md).
- **Otherwise** (float pixels, mixed dtypes, ``INT8_PRODUCTS = False``, tiles over 2¹⁶
  values): float32 ``N×Dc`` blocks centred on a mean tile, gathered in cache-sized chunks of
  tile rows, the product accumulated over the chunks (for one batch against itself on the CPU
  only the upper triangle: BLAS ``syrk``; elsewhere a GEMM per row block of queries), and the
  exact refinement below.

The tiles (and the batches of :func:`pairwise_tiled_l2_many`) are the work items of worker
threads that each run their products single-threaded: the per-tile products are too small for
intra-op threads, so more threads are used only where they pay (see
:func:`pairwise_tiled_l2_many`), and the result does not depend on how many. With float32
products, cancellation in the identity is guarded: negative values are clamped to 0, and a pair is recomputed exactly (float64, exact integer arithmetic for
uint8) when its distance is within reach of float32 rounding — below
``max(REFINE_BELOW · e, sqrt(4 γ e))``, where ``e`` is the two images' largest centred tile
energy (mean squared pixel, [0, 1] units) and ``γ = (D + 2) · u`` the worst-case relative error
of a length-D float32 dot product (u = 2⁻²⁴; larger when TF32/bfloat16 matmuls are enabled).
The second term is a rigorous bound for identical images, so they always give exactly 0.
With a threshold (``exact_near``: α for detection, δ for verification), the pairs whose
float32 distance lies within the rigorous bound of it are recomputed exactly too.

Threshold decisions (``d < α`` in detection, ``d ≤ δ`` in verification) compare the float32
values with the threshold. For uint8 images every value near a threshold passed as
``exact_near`` is the exact distance rounded once to float32 — the int8 products' value, or the
exact refinement's (the same value) — and a pair left with its float32-product value lies
farther from it than its error bound; so the decisions are those of the exact distances rounded
once to float32 on either path, whatever the device, threads or batching. They can differ from
the exact distances' own decisions only within one float32 ulp of the threshold (half an ulp
compared in float64, as :func:`memscan.cliques.largest_clique` does; a whole one compared in
float32, as numpy does an array with a Python float): 7·10⁻⁹ at α = 0.08, 1.5·10⁻⁸ at
δ = 0.15. E.g. an exact 0.0800000013 ≥ α = 0.08 rounds to the float32 0.0799999982, an edge.
"""

from __future__ import annotations

import math
import threading
import time
from contextlib import contextmanager, nullcontext
from typing import TypeVar

import numpy as np
import torch

from memscan.errors import InputError

ArrayLike = TypeVar("ArrayLike", np.ndarray, torch.Tensor)

#: Pairs whose tiled ℓ2 from the matrix-product identity is below ``REFINE_BELOW`` times their
#: centred tile energy ``e`` (≤ 2; ~0.2–0.4 for unrelated images, ~1e-3 for near copies of one
#: image), or below the rounding bound ``sqrt(4 γ e)``, are recomputed exactly. Above it the
#: float32 products leave ``|d̂² − d²| = k·u·e`` (k ≤ 4(D + 2) proven), so
#: ``|d̂ − d| ≈ k·u·e / (2d) ≤ 5 k u`` (:func:`tiled_l2_error_bound`: the proven 40γ). Measured
#: (torch 2.13's MKL, AVX-512, 30 Nov 2026; ``cross_tiled_l2`` of uint8 images with
#: ``INT8_PRODUCTS = False`` against the exact integer sums; a random search over uniform tiles
#: and centres): k is largest when a whole tile is one product (few references or queries) —
#: up to ~4,100 ≈ 0.083·D for 512×512×3 images at grid 4 (D = 49,152), where |d̂ − d| reached
#: 6e-4 (3e-5 for a zero image against a tile of 38s at d ≈ 0.15, 9e-6 for random images);
#: 940 ≈ 0.076·D and 2.1e-4 at D = 12,288; k ≤ 7 and 5e-7 at D ≤ 3,072; with 80 references or
#: more (gathered in chunks of a few thousand values) k ≤ 5 at D = 49,152. Threshold decisions
#: do not rely on any of this: the pairs near the threshold are recomputed (``exact_near``).
REFINE_BELOW = 0.1

#: Default budget, in float32 elements, for one block of the distance matrix being built.
DEFAULT_BLOCK_ELEMENTS = 1 << 22


# --------------------------------------------------------------------------------------------
# input handling
# --------------------------------------------------------------------------------------------
def _as_tensor(x, name: str) -> tuple[torch.Tensor, bool]:
    """Return (tensor, was_numpy). No copy for numpy arrays that are already contiguous."""
    if isinstance(x, torch.Tensor):
        return x, False
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x)), True
    try:
        return torch.from_numpy(np.ascontiguousarray(np.asarray(x))), True
    except Exception as exc:  # pragma: no cover - defensive
        raise InputError(f"{name}: expected a numpy array or torch tensor, got {type(x)!r}") from exc


def _check_images(x: torch.Tensor, name: str, batched: bool | None) -> torch.Tensor:
    """Validate dtype/rank/range; return a 4-D view N×H×W×C (N = 1 for a single image)."""
    if x.dtype == torch.bool or x.is_complex():
        raise InputError(f"{name}: dtype {x.dtype} is not an image dtype", "pass uint8 or float")
    if x.ndim == 3 and batched is not True:
        x = x.unsqueeze(0)
    elif x.ndim != 4:
        raise InputError(
            f"{name}: expected H×W×C or N×H×W×C, got shape {tuple(x.shape)}",
            "add a channel axis for grayscale (C = 1)",
        )
    if x.dtype != torch.uint8:
        if not x.is_floating_point():
            raise InputError(f"{name}: dtype {x.dtype} is not supported", "pass uint8 or float in [0, 1]")
        if x.numel():
            lo, hi = float(x.min()), float(x.max())
            if not (np.isfinite(lo) and np.isfinite(hi)):
                raise InputError(f"{name}: contains NaN or Inf", "check the generator's output")
            if lo < -1e-6 or hi > 1 + 1e-6:
                raise InputError(
                    f"{name}: float pixels must lie in [0, 1], found [{lo:.3g}, {hi:.3g}]",
                    "divide by 255 or pass uint8",
                )
    return x


def _tile_sizes(shape: tuple[int, ...], grid: int, name: str) -> tuple[int, int]:
    if not isinstance(grid, (int, np.integer)) or grid < 1:
        raise InputError(f"grid must be a positive integer, got {grid!r}")
    h, w = int(shape[1]), int(shape[2])
    if h % grid or w % grid:
        raise InputError(
            f"{name}: image size {h}×{w} does not divide by grid={grid}",
            f"choose a grid that divides both sides, or resize the images to a multiple of {grid}",
        )
    return h // grid, w // grid


def _to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 → float32 in [0, 1]; floats → float32."""
    if x.dtype == torch.uint8:
        return x.to(torch.float32).div_(255.0)
    return x.to(torch.float32)


def _back(t: torch.Tensor, was_numpy: bool):
    return t.cpu().numpy() if was_numpy else t


# --------------------------------------------------------------------------------------------
# element-wise (paired) distances
# --------------------------------------------------------------------------------------------
def l2(a: ArrayLike, b: ArrayLike) -> ArrayLike | float:
    """Normalised ℓ2 distance ``sqrt(mean((a - b)**2))`` with pixels in [0, 1].

    Parameters
    ----------
    a, b : array or tensor, H×W×C or N×H×W×C, uint8 or float in [0, 1]
        Same shape. A batch gives one distance per pair ``(a[n], b[n])``.

    Returns
    -------
    float for single images, else an array (or tensor) of N distances.

    Examples
    --------
    >>> import numpy as np
    >>> a = np.zeros((4, 4, 1), np.uint8); b = np.full((4, 4, 1), 255, np.uint8)
    >>> float(l2(a, b))
    1.0
    """
    return _paired(a, b, grid=1)


def tiled_l2(a: ArrayLike, b: ArrayLike, grid: int = 4) -> ArrayLike | float:
    """Tiled ℓ2 (Carlini et al. 2023, §4.1): max over ``grid × grid`` tiles of the tile ℓ2.

    Parameters
    ----------
    a, b : array or tensor, H×W×C or N×H×W×C, uint8 or float in [0, 1]
        Same shape; H and W must divide by ``grid``.
    grid : int, default 4
        Tiles per side (the paper cuts 512×512 images into 4×4 tiles of 128×128).

    Examples
    --------
    >>> import numpy as np
    >>> a = np.zeros((8, 8, 1), np.uint8); b = a.copy(); b[:2, :2] = 255
    >>> round(float(l2(a, b)), 4), float(tiled_l2(a, b, grid=4))
    (0.25, 1.0)
    """
    return _paired(a, b, grid=grid)


def _paired(a, b, grid: int):
    ta, na = _as_tensor(a, "a")
    tb, _ = _as_tensor(b, "b")
    single = ta.ndim == 3
    if tuple(ta.shape) != tuple(tb.shape):
        raise InputError(
            f"a and b must have the same shape, got {tuple(ta.shape)} and {tuple(tb.shape)}",
            "resize or crop the images to one size before comparing",
        )
    ta = _check_images(ta, "a", None)
    tb = _check_images(tb.to(ta.device), "b", None)
    th, tw = _tile_sizes(tuple(ta.shape), grid, "a")
    # Direct differences (exact integers for uint8, float64 otherwise): the reference everywhere.
    out = _direct_tiled(ta, tb, grid, th, tw, DEFAULT_BLOCK_ELEMENTS)
    if single:
        return float(out[0])
    return _back(out.to(torch.float32), na)


def _direct_tiled(a, b, grid: int, th: int, tw: int, block_elements: int) -> torch.Tensor:
    """Tiled ℓ2 of the pairs ``(a[n], b[n])`` from pixel differences, as float64.

    uint8 pairs are computed exactly in integers (squared differences summed per tile in int64);
    anything else in float64. Works in chunks of pairs so memory stays near ``block_elements``.
    """
    n = a.shape[0]
    out = torch.empty(n, dtype=torch.float64, device=a.device)
    if n == 0:
        return out
    c = a.shape[3]
    d = th * tw * c
    per = a[0].numel()
    chunk = max(1, block_elements // (4 * max(per, 1)))
    exact_int = a.dtype == torch.uint8 and b.dtype == torch.uint8
    for s in range(0, n, chunk):
        x, y = a[s : s + chunk], b[s : s + chunk]
        m = x.shape[0]
        if exact_int:
            diff = x.to(torch.int32).sub_(y.to(torch.int32))
            sq = diff.mul_(diff).view(m, grid, th, grid, tw, c)
            tiles = sq.sum(dim=(2, 4, 5), dtype=torch.int64).to(torch.float64)
            tiles.div_(255.0 * 255.0 * d)
        else:
            diff = _to_unit(x).double().sub_(_to_unit(y).double())
            sq = diff.mul_(diff).view(m, grid, th, grid, tw, c)
            tiles = sq.sum(dim=(2, 4, 5)).div_(d)
        out[s : s + m] = tiles.reshape(m, -1).amax(dim=1).sqrt_()
    return out


# --------------------------------------------------------------------------------------------
# matrices of distances
# --------------------------------------------------------------------------------------------
def pairwise_tiled_l2(
    images: ArrayLike,
    grid: int = 4,
    *,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
    threads: int | None = None,
    exact_near: float | None = None,
) -> ArrayLike:
    """All-pairs tiled ℓ2 of one batch: an N×N symmetric matrix with an exact-zero diagonal.

    Parameters
    ----------
    images : N×H×W×C array or tensor, uint8 or float in [0, 1]
    grid : int, default 4
    block_elements : int
        Memory budget (float32 elements) for one row block of partial results.
    threads : int, optional
        Most worker threads (default: ``torch.get_num_threads()``); fewer are used when the work
        or the memory bound calls for it (see :func:`pairwise_tiled_l2_many`). The result does
        not depend on it.
    exact_near : float, optional
        A threshold (the edge threshold α of detection): pairs whose float32 distance lies
        within the float32 error bound of it are recomputed exactly, so ``d < exact_near``
        is decided as by the exact distance rounded once to float32 (module docstring: it
        differs from the exact decision only within a float32 ulp of the threshold).

    Examples
    --------
    >>> import numpy as np
    >>> x = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    >>> d = pairwise_tiled_l2(np.concatenate([x, x[:1]]), grid=2)
    >>> d.shape, float(d[0, 3]), bool((d == d.T).all())
    ((4, 4), 0.0, True)
    """
    return pairwise_tiled_l2_many(
        [images], grid, block_elements=block_elements, threads=threads, exact_near=exact_near
    )[0]


def pairwise_tiled_l2_many(
    batches,
    grid: int = 4,
    *,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
    threads: int | None = None,
    exact_near: float | None = None,
    batched_gemm: bool | None = None,
) -> list:
    """:func:`pairwise_tiled_l2` of several batches at once (one prompt's generations each).

    The result for each batch is the one :func:`pairwise_tiled_l2` gives for it alone, bit for
    bit on the CPU, whatever the number of batches or threads: every tile product runs on one
    thread with the same shapes (uint8 with int8 products: exact integers in any case), and the
    maximum over tiles does not depend on their order.

    How the work is spread:

    - **CPU**: the (batch, tile) products are the work items of a few worker threads, each
      running its BLAS ``syrk`` and torch operations single-threaded (intra-op threading is off
      in the workers and, for the duration, in the calling thread; it is restored afterwards).
      Workers are added only while each gets at least ``MIN_WORK_PER_THREAD`` multiply-adds and
      their buffers stay within ``WORKER_MEMORY`` times the uint8 size of the images, so that
      more threads are never slower and memory stays bounded.
    - **GPU** (or ``batched_gemm=True``): batches of one shape are stacked. uint8 images take
      exact int8 products (``torch._int_mm``, pixels − 128; on a GPU several batches' tiles share
      one product while they are small, :func:`_int8_group`) where the
      device has them: every distance exact, nothing to refine. Otherwise each row of tiles is
      one batched GEMM (``baddbmm``) over all of them; the exact refinement is done for all
      batches at once (their clusters of near copies stacked into one float64 GEMM per tile),
      with a few host synchronisations per call (two, one per group of clusters, one for the
      remaining pairs), none per batch.

    Parameters
    ----------
    batches : sequence of N_p×H×W×C arrays or tensors (same H×W×C, any N_p)
    threads, exact_near, block_elements : as for :func:`pairwise_tiled_l2`
    batched_gemm : None (GPU tensors: yes), or force the stacked batched-GEMM path (tests)

    Returns
    -------
    list of N_p×N_p matrices (numpy for numpy inputs, torch tensors for tensors)

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> a, b = rng.integers(0, 256, (2, 5, 8, 8, 3), dtype=np.uint8)
    >>> da, db = pairwise_tiled_l2_many([a, b], grid=2)
    >>> bool((da == pairwise_tiled_l2(a, grid=2)).all()), db.shape
    (True, (5, 5))
    """
    if block_elements < 1:
        raise InputError(f"block_elements must be a positive integer, got {block_elements!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1):
        raise InputError(f"threads must be a positive integer, got {threads!r}")
    _check_exact_near(exact_near)
    xs, nps = [], []
    for n, images in enumerate(batches):
        x, was_numpy = _as_tensor(images, "images" if n == 0 else f"images[{n}]")
        xs.append(_check_images(x, "images", True))
        nps.append(was_numpy)
        _tile_sizes(tuple(xs[-1].shape), grid, "images")
    if not xs:
        return []
    outs: list = [None] * len(xs)
    stacked = [n for n, x in enumerate(xs) if (x.device.type != "cpu" if batched_gemm is None else batched_gemm)]
    for group in _same_shape_groups(xs, stacked):
        for n, d in zip(group, _pairwise_stacked([xs[n] for n in group], grid, block_elements, exact_near)):
            outs[n] = d
    rest = [n for n in range(len(xs)) if outs[n] is None]
    if rest:
        got = _tiled_matrices(
            [(xs[n], xs[n]) for n in rest], grid, block_elements, True, threads=threads, near=exact_near
        )
        for n, d in zip(rest, got):
            outs[n] = d
    return [_back(d, nps[n]) for n, d in enumerate(outs)]


def _check_exact_near(exact_near) -> None:
    if exact_near is not None and not (np.isfinite(exact_near) and exact_near > 0):
        raise InputError(f"exact_near must be a positive number, got {exact_near!r}")


def cross_tiled_l2(
    queries: ArrayLike,
    references: ArrayLike,
    grid: int = 4,
    *,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
    threads: int | None = None,
    exact_near: float | None = None,
) -> ArrayLike:
    """Tiled ℓ2 between every query and every reference: a Q×R matrix.

    For very large reference sets use :func:`nearest_tiled_l2`, which keeps only the k nearest.
    ``threads``: as for :func:`pairwise_tiled_l2` (work items are tiles × blocks of queries).
    ``exact_near``: as for :func:`pairwise_tiled_l2` (the extraction threshold δ of
    verification): pairs within the float32 error bound of it are recomputed exactly, so
    ``d <= exact_near`` is decided as by the exact distance rounded once to float32.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> q = rng.integers(0, 256, (2, 8, 8, 1), dtype=np.uint8)
    >>> r = np.concatenate([q[::-1], q])
    >>> cross_tiled_l2(q, r, grid=2)[0, [1, 2]].tolist()
    [0.0, 0.0]
    """
    q, was_numpy = _as_tensor(queries, "queries")
    r, _ = _as_tensor(references, "references")
    q = _check_images(q, "queries", True)
    r = _check_images(r.to(q.device), "references", True)
    if tuple(q.shape[1:]) != tuple(r.shape[1:]):
        raise InputError(
            f"queries are {tuple(q.shape[1:])} but references are {tuple(r.shape[1:])}",
            "resize both sets to one H×W×C before comparing",
        )
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1):
        raise InputError(f"threads must be a positive integer, got {threads!r}")
    _check_exact_near(exact_near)
    d = _cross(q, r, grid, block_elements, symmetric=False, threads=threads, near=exact_near)
    return _back(d, was_numpy)


def _cross(
    q: torch.Tensor,
    r: torch.Tensor,
    grid: int,
    block_elements: int,
    symmetric: bool,
    dtype: torch.dtype = torch.float32,
    refine: bool = True,
    threads: int | None = None,
    near: float | None = None,
):
    """Tiled ℓ2 of every (query, reference) pair (see :func:`_tiled_matrices`; ``near``: the
    threshold near which pairs are refined, as ``exact_near``)."""
    _tile_sizes(tuple(q.shape), grid, "images")
    if block_elements < 1:
        raise InputError(f"block_elements must be a positive integer, got {block_elements!r}")
    return _tiled_matrices([(q, r)], grid, block_elements, symmetric, dtype, refine, threads, near)[0]


# --------------------------------------------------------------------------------------------
# the tiled kernel: work items, worker threads
# --------------------------------------------------------------------------------------------
#: Bytes of one gather buffer: a tile is gathered in chunks of whole tile rows (N × Dc
#: float32, centred), each consumed at once by the product while it is still in cache; the
#: products accumulate over chunks (``beta = 1``). ~1.5 MiB keeps Dc ≳ 700 at N = 500.
GATHER_BYTES = 3 << 19

#: Least multiply-adds per worker thread: below it, starting and joining a thread costs more
#: than it saves (a thread start is ~0.1 ms; 2²⁴ multiply-adds take ~0.3 ms on one core).
MIN_WORK_PER_THREAD = 1 << 24

#: Worker buffers (gather chunks and one tile's product each) stay below this multiple of the
#: uint8 size of the images (at least one worker always runs).
WORKER_MEMORY = 1.5


class _Matrix:
    """One distance matrix being built: squared tile distances (in the kernel's units), their
    running maximum over tiles in ``acc`` and each image's largest centred tile energy."""

    def __init__(self, q, r, symmetric: bool, dtype, grid: int, block_elements: int):
        self.q, self.r, self.symmetric, self.dtype, self.grid = q, r, symmetric, dtype, grid
        self.th, self.tw = q.shape[1] // grid, q.shape[2] // grid
        self.c = q.shape[3]
        self.d = self.th * self.tw * self.c
        self.units = 255.0 if (q.dtype == torch.uint8 and r.dtype == torch.uint8) else 1.0
        self.exact = dtype == torch.float64 and self.units == 255.0
        nq, nr = q.shape[0], r.shape[0]
        device = q.device
        # uint8 against uint8: exact int8 products where the device has them (no rounding at all)
        self.int8 = dtype == torch.float32 and _int8_applies(q.dtype, r.dtype, self.d, device)
        self.wide = self.d > 1 << 15  # int8: ‖a − b‖² (≤ 255²·D) or its partial sums may pass 2³¹
        self.syrk = _cpu_syrk(dtype) if symmetric and device.type == "cpu" and not self.int8 else None
        # syrk: acc's upper triangle holds the result; otherwise every entry (int8: exact integers)
        acc_dtype = (torch.int64 if self.wide else torch.int32) if self.int8 else dtype
        self.acc = torch.zeros((nq, nr), dtype=acc_dtype, device=device)
        self.r_energy = torch.zeros(nr, dtype=dtype, device=device)
        self.q_energy = self.r_energy if symmetric else torch.zeros(nq, dtype=dtype, device=device)
        self.lock = threading.Lock()
        # row blocks of queries bound the size of one product (cross only; symmetric: one block)
        rows = nq if symmetric else max(1, min(nq, block_elements // max(1, nr)))
        self.blocks = [(s, min(nq, s + rows)) for s in range(0, max(nq, 1), rows)] if nq and nr else []
        widest = max(nr, min(nq, rows)) if not symmetric else nr
        per_row = self.tw * self.c * dtype.itemsize * max(1, widest)
        # in cache-sized chunks on the CPU; a GPU gains nothing from them but more launches (int8:
        # the whole tile, a quarter of the float32 bytes, in one product)
        cpu_chunks = device.type == "cpu" and not self.int8
        self.chunk_rows = max(1, min(self.th, GATHER_BYTES // per_row)) if cpu_chunks else self.th

    def items(self):
        return [(self, s, e, i, j) for (s, e) in self.blocks for i in range(self.grid) for j in range(self.grid)]

    def work(self) -> float:
        """Multiply-adds of all its products, in float32 terms (an int8 product does every pair,
        not half, at about a quarter of the time per multiply-add: half the float32 ``syrk``)."""
        nq, nr = self.q.shape[0], self.r.shape[0]
        pairs = nq * (nr + 1) / 2 if self.symmetric else nq * nr
        return pairs * self.d * self.grid * self.grid / (2 if self.int8 else 1)

    def worker_bytes(self) -> int:
        nq, nr = self.q.shape[0], self.r.shape[0]
        rows = max((e - s for s, e in self.blocks), default=0)
        if self.int8:  # the int8 tiles, the int32 product (int64 when wide), the norms' int32 pass
            mq, mr, k = _int8_rows(rows), _int8_rows(nr), _round8(self.d)
            tiles = k * (mr + (0 if self.symmetric else mq))
            norms = 0 if self.symmetric else 4 * k * max(rows, nr)
            return tiles + (12 if self.wide else 4) * mq * mr + norms + 64 * (nq + nr)
        chunk = self.chunk_rows * self.tw * self.c * self.dtype.itemsize
        gathered = chunk * (nr + (0 if self.symmetric else rows))
        products = (2 if self.syrk is not None else 1) * rows * nr * self.dtype.itemsize
        return gathered + products + 64 * (nq + nr)

    def prealloc(self, scratch: dict) -> None:
        """Allocate a worker's largest buffers for this matrix now, in the calling thread: its
        allocator arena then serves them again once freed (worker threads get arenas of their
        own, which would keep the freed memory in addition to what later phases use)."""
        nr = self.r.shape[0]
        rows = max((e - s for s, e in self.blocks), default=0)
        dc = self.chunk_rows * self.tw * self.c
        device = self.q.device
        if not rows:
            return
        if self.int8:
            _int8_tile(scratch, "r8", nr, self.d, device)
            if not self.symmetric:
                _int8_tile(scratch, "q8", rows, self.d, device)
            _buffer(scratch, "gram32", (_int8_rows(rows), _int8_rows(nr)), torch.int32, device)
            return
        _buffer(scratch, "xr", (nr, dc), self.dtype, device)
        if self.syrk is not None:
            if ("gram", nr, self.dtype) not in scratch:
                scratch[("gram", nr, self.dtype)] = torch.zeros((nr, nr), dtype=self.dtype)
            _buffer(scratch, "sq", (nr, nr), self.dtype, device)
            return
        _buffer(scratch, "gemm", (rows, nr), self.dtype, device)
        if not self.symmetric:
            _buffer(scratch, "xq", (rows, dc), self.dtype, device)

    def input_bytes(self) -> int:
        """The images' size counted as uint8 (one byte per value)."""
        return self.q.numel() + (0 if self.symmetric else self.r.numel())


def _compute_item(item, scratch: dict) -> None:
    """One tile (i, j) of one row block [s, e): squared distances into a scratch buffer, then
    merged into the matrix's running maximum (under its lock)."""
    m, s, e, i, j = item
    q, r, th, tw, c, dtype = m.q, m.r, m.th, m.tw, m.c, m.dtype
    nr, rows = r.shape[0], e - s
    device = q.device
    if m.int8:
        _compute_item_int8(m, s, e, i, j, scratch)
        return
    if m.syrk is not None:
        gram = scratch.get(("gram", nr, dtype))
        if gram is None:  # its lower triangle is never written: it stays 0
            gram = scratch[("gram", nr, dtype)] = torch.zeros((nr, nr), dtype=dtype)
        for k, r0 in enumerate(range(0, th, m.chunk_rows)):
            r1 = min(th, r0 + m.chunk_rows)
            xr = _buffer(scratch, "xr", (nr, (r1 - r0) * tw * c), dtype, device)
            _gather_tile(r, i, j, r0, r1, th, tw, xr, m.units, None)
            m.syrk(gram, xr, 0.0 if k == 0 else 1.0)  # upper triangle: a_i · a_j (i ≤ j)
        rn = gram.diagonal().clone()  # ‖a‖², from the same product
        sq = _buffer(scratch, "sq", (nr, nr), dtype, device)
        torch.add(rn[:, None], rn[None, :], out=sq).add_(gram, alpha=-2.0)
        with m.lock:
            torch.maximum(m.acc, sq, out=m.acc)
            torch.maximum(m.r_energy, rn, out=m.r_energy)
        return
    gemm = _buffer(scratch, "gemm", (rows, nr), dtype, device)
    qn = torch.zeros(rows, dtype=dtype, device=device)
    rn = torch.zeros(nr, dtype=dtype, device=device)
    for k, r0 in enumerate(range(0, th, m.chunk_rows)):
        r1 = min(th, r0 + m.chunk_rows)
        dc = (r1 - r0) * tw * c
        xr = _buffer(scratch, "xr", (nr, dc), dtype, device)
        mu = _gather_tile(r, i, j, r0, r1, th, tw, xr, m.units, None)
        rn.add_(_sq_norms(xr, m.exact))
        if m.symmetric:
            xq = xr
        else:
            xq = _buffer(scratch, "xq", (rows, dc), dtype, device)
            _gather_tile(q[s:e], i, j, r0, r1, th, tw, xq, m.units, _rescale(mu, r.dtype, q.dtype))
        if not m.symmetric:
            qn.add_(_sq_norms(xq, m.exact))
        gemm.addmm_(xq, xr.T, beta=0.0 if k == 0 else 1.0, alpha=-2.0)
    if m.symmetric:
        qn = rn
    gemm.add_(qn[:, None]).add_(rn[None, :])
    with m.lock:
        dst = m.acc[s:e]
        torch.maximum(dst, gemm, out=dst)
        torch.maximum(m.r_energy, rn, out=m.r_energy)
        if not m.symmetric:
            torch.maximum(m.q_energy[s:e], qn, out=m.q_energy[s:e])


def _int8_rows(n: int) -> int:
    """Rows of an int8 product operand: a multiple of 8 and over 16, as the int8 kernels want."""
    return max(24, _round8(n))


def _int8_tile(scratch: dict, name: str, n: int, d: int, device) -> torch.Tensor:
    """A worker's zero-padded int8 tile buffer for ``n`` images of ``d`` values. Keyed by ``d``
    itself, so its padding columns ``d:`` are never written and stay 0 (another tile size that
    pads to the same width gets its own buffer); rows past ``n`` may hold an earlier, longer
    batch's tiles, but their products are never read."""
    key = (name, _int8_rows(n), d, str(device))
    buf = scratch.get(key)
    if buf is None:
        buf = scratch[key] = torch.zeros((_int8_rows(n), _round8(d)), dtype=torch.int8, device=device)
    return buf


def _gather_int8(x, i: int, j: int, th: int, tw: int, dst: torch.Tensor) -> None:
    """Tile (i, j) of every uint8 image of ``x``, minus 128, into ``dst[:n, :D]`` (int8): one
    strided copy of the bytes, one XOR with 0x80 (uint8 v → int8 v − 128)."""
    n, c = x.shape[0], x.shape[3]
    region = dst.view(torch.uint8)[:n, : th * tw * c]
    region.view(n, th, tw, c).copy_(x[:, i * th : (i + 1) * th, j * tw : (j + 1) * tw, :])
    region.bitwise_xor_(128)


def _int8_norms(t: torch.Tensor) -> torch.Tensor:
    """Exact squared norms of the rows of an int8 tile (int32: at most D·128² < 2³¹)."""
    return t.to(torch.int32).square_().sum(dim=1, dtype=torch.int32)


def _compute_item_int8(m, s: int, e: int, i: int, j: int, scratch: dict) -> None:
    """One tile of one row block from exact int8 products: ``a·b`` in int32 (``torch._int_mm``,
    pixels − 128), ``‖a‖² + ‖b‖² − 2a·b`` in int32 (int64 for wide tiles), merged into the
    matrix's running maximum. Every value is an exact integer, whatever the order or threads."""
    q, r, th, tw = m.q, m.r, m.th, m.tw
    nr, rows = r.shape[0], e - s
    device = q.device
    # 1. the tiles, shifted into int8
    xr = _int8_tile(scratch, "r8", nr, m.d, device)
    _gather_int8(r, i, j, th, tw, xr)
    if m.symmetric:
        xq = xr
    else:
        xq = _int8_tile(scratch, "q8", rows, m.d, device)
        _gather_int8(q[s:e], i, j, th, tw, xq)
    # 2. one exact product for every pair of the block
    gram = _buffer(scratch, "gram32", (xq.shape[0], xr.shape[0]), torch.int32, device)
    torch._int_mm(xq, xr.t(), out=gram)
    # 3. the squared distances (the norms: the product's diagonal, or their own pass)
    if m.symmetric:
        rn = gram.diagonal()[:nr].clone()
        qn = rn
    else:
        rn, qn = _int8_norms(xr[:nr]), _int8_norms(xq[:rows])
    d2 = gram[:rows, :nr]
    if m.wide:
        d2, qn, rn = d2.long(), qn.long(), rn.long()
    d2.mul_(-2).add_(qn[:, None]).add_(rn[None, :])
    with m.lock:
        dst = m.acc[s:e]
        torch.maximum(dst, d2, out=dst)


def _buffer(scratch: dict, name: str, shape: tuple, dtype, device) -> torch.Tensor:
    """A worker's reusable buffer of at least ``shape`` (a contiguous view of that shape)."""
    size = int(np.prod(shape))
    key = (name, dtype, str(device))
    buf = scratch.get(key)
    if buf is None or buf.numel() < size:
        buf = scratch[key] = torch.empty(size, dtype=dtype, device=device)
    return buf[:size].view(shape)


def _plan_threads(matrices, threads: int | None, input_bytes: int | None = None) -> int:
    """Worker threads for these matrices: at most ``threads`` (default: torch's setting), one
    per work item, ``MIN_WORK_PER_THREAD`` each, and buffers within ``WORKER_MEMORY``."""
    if any(m.q.device.type != "cpu" for m in matrices):
        return 1  # the device runs its own kernels in parallel
    if any(m.syrk is not None and m.syrk.holds_gil for m in matrices):  # pragma: no cover
        return 1
    want = threads if threads is not None else torch.get_num_threads()
    items = sum(len(m.blocks) * m.grid * m.grid for m in matrices)
    work = sum(m.work() for m in matrices)
    per = max(m.worker_bytes() for m in matrices)
    if input_bytes is None:  # the images being compared (a refinement: those of its caller)
        input_bytes = sum(m.input_bytes() for m in matrices)
    budget = WORKER_MEMORY * input_bytes
    return int(max(1, min(want, items, work // MIN_WORK_PER_THREAD, budget // max(1, per))))


def _run_items(items, workers: int) -> None:
    """Run the tile work items on ``workers`` threads (the calling thread alone when 1); each
    worker keeps its own buffers, allocated here (see :meth:`_Matrix.prealloc`)."""
    if workers <= 1 or len(items) <= 1:
        scratch: dict = {}
        for item in items:
            _compute_item(item, scratch)
        return
    scratches = [{} for _ in range(workers)]
    for m in {id(it[0]): it[0] for it in items}.values():
        for scratch in scratches:
            m.prealloc(scratch)
    _thread_map(_compute_item, items, scratches)


def _thread_map(fn, items, states: list) -> list:
    """``[fn(item, state) for item in items]`` on ``len(states)`` threads, each with its own
    state, running its operations single-threaded; the first exception is re-raised here."""
    results: list = [None] * len(items)
    lock = threading.Lock()
    todo = iter(enumerate(items))
    errors: list = []

    def loop(state):
        torch.set_num_threads(1)  # this thread's intra-op pool (OpenMP/MKL settings are per thread)
        while not errors:
            with lock:
                nxt = next(todo, None)
            if nxt is None:
                return
            try:
                results[nxt[0]] = fn(nxt[1], state)
            except BaseException as exc:  # re-raised in the calling thread
                errors.append(exc)

    pool = [
        threading.Thread(target=loop, args=(st,), name=f"memscan-tiles-{n}", daemon=True) for n, st in enumerate(states)
    ]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    del pool, states
    if errors:
        raise errors[0]
    return results


@contextmanager
def _single_threaded_ops():
    """Intra-op threading off in this thread (torch) and in scipy's BLAS, for the duration.

    The tile products are too small for intra-op threads (on 2 cores, two-thread torch and
    BLAS pools spinning against each other made detection 3× slower than one thread);
    parallelism comes from worker threads over tiles and batches instead. Restores the
    previous settings on exit.
    """
    before = torch.get_num_threads()
    if before != 1:
        torch.set_num_threads(1)
    try:
        with _blas_threads(1):
            yield before
    finally:
        if before != 1:
            torch.set_num_threads(before)


def _tiled_matrices(
    pairs,
    grid: int,
    block_elements: int,
    symmetric: bool,
    dtype: torch.dtype = torch.float32,
    refine: bool = True,
    threads: int | None = None,
    near: float | None = None,
    input_bytes: int | None = None,
) -> list:
    """Tiled ℓ2 matrices of several (queries, references) pairs: per tile one product, max over tiles.

    For each tile position, a tile of every image is gathered in chunks of tile rows into an
    ``N×Dc`` block of ``dtype``, centred on a mean tile (distances do not change; cancellation
    in ``‖a‖² + ‖b‖² − 2a·b`` shrinks with the norms), and the product accumulates over the
    chunks. uint8 pixels stay in 0..255 units until the final scaling and the centre is
    rounded to an integer, so in float64 every product and sum is an exact integer and the
    result is exact. For ``symmetric`` (q is r) on the CPU, one BLAS ``syrk`` per chunk
    computes just one triangle of the Gram matrix (half the flops; the norms are its diagonal);
    elsewhere a GEMM per row block of queries. The triangle is mirrored, so the result is
    exactly symmetric. Work items (matrix, row block, tile) run on worker threads
    (:func:`_plan_threads`); the result does not depend on how many.
    """
    with _single_threaded_ops() as default_threads:
        matrices = [_Matrix(q, r, symmetric, dtype, grid, block_elements) for q, r in pairs]
        workers = _plan_threads(matrices, threads if threads is not None else default_threads, input_bytes)
        _run_items([it for m in matrices for it in m.items()], workers)

        def finish(m, threads_inside):
            out = m.acc  # symmetric: the upper triangle is used
            m.acc = None
            scale = m.units * m.units * m.d
            if m.int8:  # exact integers: the exact distance, rounded once to float32
                return out.double().div_(scale).sqrt_().to(torch.float32)
            out.clamp_(min=0.0).div_(scale).sqrt_()
            if refine and out.numel():
                thresholds = _refine_thresholds(m.q_energy / scale, m.r_energy / scale, m.d, out.device)
                args = (grid, m.th, m.tw, block_elements, symmetric, near, threads_inside, m.input_bytes())
                _refine_small(m.q, m.r, out, thresholds, *args)
            if symmetric:
                out = torch.triu(out, diagonal=1)
                out = out + out.T
            return out

        # several matrices: finished (scaled, refined, mirrored) in parallel, each on one thread,
        # as many at once as their temporaries allow; one matrix: its refinement uses the workers
        fin = 0
        if len(matrices) > 1 and workers > 1:
            per = max(4 * m.acc.numel() * m.acc.element_size() + 3 * block_elements for m in matrices)
            budget = WORKER_MEMORY * sum(m.input_bytes() for m in matrices)
            fin = int(min(workers, len(matrices), budget // max(1, per)))
        if fin > 1:
            return _thread_map(finish, matrices, [1] * fin)
        return [finish(m, workers) for m in matrices]


def _same_shape_groups(xs, chosen) -> list[list[int]]:
    groups: dict = {}
    for n in chosen:
        groups.setdefault((tuple(xs[n].shape), xs[n].dtype, str(xs[n].device)), []).append(n)
    return list(groups.values())


def _pairwise_stacked(xs, grid: int, block_elements: int, near: float | None) -> list:
    """Pairwise tiled ℓ2 of P same-shape batches stacked as P×N×H×W×C: per row of tiles one
    gather (with the float conversion) and one batched GEMM (``baddbmm``) over the P × ``grid``
    tiles of that row; the full N×N product (on a GPU fewer, larger kernels beat half the
    flops). The pairs to refine are marked for all P at once and refined together
    (:func:`_refine_stacked`).

    Each tile's arithmetic is the one of a tile on its own (same centre: the rounded mean of
    its first 64 images; same products): only the number of kernel launches changes
    (``grid`` GEMMs instead of ``grid²``). Memory in flight per prompt: one row of tiles in
    float32 (4/``grid`` × the uint8 input) and ``grid`` N×N float32 products.
    """
    x = torch.stack(xs)
    p, n, h, w, c = x.shape
    if n == 0:
        return [torch.zeros((0, 0), dtype=torch.float32, device=x.device) for _ in xs]
    th, tw = h // grid, w // grid
    d = th * tw * c
    if _int8_applies(x.dtype, x.dtype, d, x.device):
        return list(_pairwise_stacked_int8(x, grid).unbind(0))
    units = 255.0 if x.dtype == torch.uint8 else 1.0
    acc = torch.zeros((p, n, n), dtype=torch.float32, device=x.device)
    energy = torch.zeros((p, n), dtype=torch.float32, device=x.device)
    rows = torch.empty((p, grid, n, th, tw, c), dtype=torch.float32, device=x.device)
    m = min(n, 64)
    for i in range(grid):
        # 1. gather the row's grid tiles of every image, tile-major: P×grid×N×th×tw×C float32
        band = x[:, :, i * th : (i + 1) * th, : grid * tw, :].reshape(p, n, th, grid, tw, c)
        rows.copy_(band.permute(0, 3, 1, 2, 4, 5))
        t = rows.view(p * grid, n, d)
        # 2. centre each tile (its own rounded mean of the first images; distances unchanged)
        mu = t[:, :m].mean(dim=1, keepdim=True)
        if x.dtype == torch.uint8:
            mu.round_()
        t.sub_(mu)
        # 3. ‖a‖² + ‖b‖² − 2a·b for every tile of the row in one batched GEMM
        sq = torch.linalg.vector_norm(t, dim=2).square_()
        g = torch.baddbmm(sq[:, None, :], t, t.transpose(1, 2), alpha=-2.0)
        g.add_(sq[:, :, None])
        # 4. the maximum over tiles
        torch.maximum(acc, g.view(p, grid, n, n).amax(dim=1), out=acc)
        torch.maximum(energy, sq.view(p, grid, n).amax(dim=1), out=energy)
        del t, g
    del rows
    scale = units * units * d
    acc.clamp_(min=0.0).div_(scale).sqrt_()
    energy.div_(scale)
    a, _, rel, gamma2 = _refine_thresholds(energy, energy, d, x.device)
    e2 = a[:, :, None] + a[:, None, :]
    mask = acc < torch.maximum(e2 * rel, (e2 * gamma2).sqrt())
    if near is not None:
        mask |= _near_mask(acc, e2 * gamma2, near)
    mask &= torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)
    del e2
    _refine_stacked(x, acc, mask, grid, th, tw, block_elements)
    del mask
    acc = torch.triu(acc, diagonal=1)
    return list((acc + acc.transpose(1, 2)).unbind(0))


#: uint8 tiles (CPU work items and the stacked GPU path) take exact int8 products
#: (``torch._int_mm``) where the device supports them; False: always the float32 products and
#: the exact refinement (as for float pixels).
INT8_PRODUCTS = True

#: Largest tile (values, padded to a multiple of 8) for one int8 product: its dot products,
#: at most D·128², stay within int32.
INT8_MAX_TILE = 1 << 16

_INT8_OK: dict = {}


def _round8(v: int) -> int:
    return -(-v // 8) * 8


def _int8_applies(a_dtype, b_dtype, d: int, device) -> bool:
    """Whether tiles of ``d`` values of these dtypes take exact int8 products on ``device``."""
    return (
        a_dtype == torch.uint8
        and b_dtype == torch.uint8
        and INT8_PRODUCTS
        and _round8(d) <= INT8_MAX_TILE
        and _int8_gram_ok(device)
    )


#: On a CPU, int8 products are used only when one takes at most this fraction of a float32
#: product's time (they compute every pair, where the float32 path's ``syrk`` computes half).
INT8_CPU_MAX_TIME = 0.35


def _int8_gram_ok(device) -> bool:
    """Whether ``torch._int_mm`` (int8 × int8 → int32; tensor cores on GPUs, VNNI/AMX on CPUs)
    runs on this device, gives exact products (the int8 extremes included) and, on a CPU, pays:
    a tile-sized int8 product must take at most ``INT8_CPU_MAX_TIME`` of the float32 one (a CPU
    without int8 dot-product instructions keeps the float32 path). Checked once per device."""
    key = str(device)
    if key not in _INT8_OK:
        try:
            gen = torch.Generator().manual_seed(0)
            a = torch.randint(-128, 128, (24, 72), dtype=torch.int8, generator=gen)
            a[0], a[1], a[2, ::2], a[2, 1::2] = -128, 127, -128, 127  # the extremes: no saturation
            got = torch._int_mm(a.to(device), a.to(device).t()).cpu()
            ok = got.dtype == torch.int32 and bool((got.long() == a.long() @ a.long().t()).all())
            _INT8_OK[key] = ok and (torch.device(device).type != "cpu" or _int8_pays_on_cpu())
        except (AttributeError, NotImplementedError, RuntimeError):  # no int8 products here
            _INT8_OK[key] = False
    return _INT8_OK[key]


def _int8_pays_on_cpu() -> bool:
    """An int8 product of a 64×64 tile's shape (256 × 768) against the float32 one, one thread,
    best of five each (a few milliseconds, once per process). Timed by this thread's CPU clock
    (one torch thread runs its products in the calling thread), so a loaded machine that
    preempts the check does not turn it to float32 for the whole process."""
    a = torch.randint(-128, 128, (256, 768), dtype=torch.int8)
    f = a.float()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = {}
        for name, fn in (("int8", lambda: torch._int_mm(a, a.t())), ("float32", lambda: f @ f.t())):
            fn()
            times = []
            for _ in range(5):
                t0 = time.thread_time()
                fn()
                times.append(time.thread_time() - t0)
            best[name] = min(times)
    finally:
        torch.set_num_threads(before)
    return best["int8"] <= INT8_CPU_MAX_TIME * best["float32"]


#: Stacked int8 path: the tiles of up to this many prompts share one product (None: chosen by
#: :func:`_int8_group`; 1: one product per prompt and tile). Results never depend on it.
INT8_GROUP: int | None = None

#: A GPU's int8 product of a 500-image tile (~500 × 768 × 500 at 64×64) is far too small to fill
#: the device and takes less time than its launch: prompts are grouped until one product holds
#: about this many multiply-adds (the cross-prompt blocks are computed and discarded)...
INT8_GROUP_MACS = 1 << 32

#: ...and while its int32 output stays within this multiple of the stacked uint8 generations.
INT8_GROUP_MEMORY = 0.35


def _int8_group(p: int, m: int, k: int, device, input_bytes: int) -> int:
    """Prompts per int8 product on the stacked path: 1 on a CPU (its products are bound by
    arithmetic, so the discarded cross-prompt blocks would cost their full time); on a GPU, the
    largest G ≤ P whose (G·m)² × k product stays within ``INT8_GROUP_MACS`` multiply-adds and
    its output within ``INT8_GROUP_MEMORY`` × the uint8 input. ``INT8_GROUP`` overrides both."""
    if INT8_GROUP is not None:
        return max(1, min(p, int(INT8_GROUP)))
    if torch.device(device).type == "cpu":
        return 1
    g = 1
    while (
        g < p
        and ((g + 1) * m) ** 2 * k <= INT8_GROUP_MACS
        and 4 * ((g + 1) * m) ** 2 <= INT8_GROUP_MEMORY * input_bytes
    ):
        g += 1
    return g


def _pairwise_stacked_int8(x, grid: int) -> torch.Tensor:
    """Pairwise tiled ℓ2 of P stacked uint8 batches (P×N×H×W×C, a fresh copy: modified) from
    exact integer products: P×N×N float32, each the exact distance rounded once to float32.

    Pixels minus 128 fit int8 and distances do not change under a common shift; a tile's dot
    products (≤ D·128²) are exact in int32 for D ≤ ``INT8_MAX_TILE``, and
    ``‖a‖² + ‖b‖² − 2a·b`` is formed in int32 (int64 for tiles over 2¹⁵ values, where it could
    overflow). No float rounding before the final one, so no pair needs refining and the edges
    are those of the exact distances rounded once to float32. Per row of tiles: one gather of the P × ``grid`` tiles into an int8
    buffer (tile-major; rows and values padded to multiples of 8, as the int8 kernels require),
    one int8 product per tile and group of G prompts (:func:`_int8_group`; G > 1: the G
    prompts' tiles are one contiguous (G·m) × k operand and the G diagonal m × m blocks of its
    product are kept), then the combination and the maximum over tiles for all of them at
    once. Memory in flight: the int8 row (1/``grid`` × the uint8 input), ``grid`` N×N int32
    products per prompt (and their int64 copy for wide tiles, over 2¹⁵ values — then the
    images are large and these N×N buffers small beside them), one grouped product (at most
    ``INT8_GROUP_MEMORY`` × the input unless ``INT8_GROUP`` forces the group) and the running
    maximum.
    """
    p, n, h, w, c = x.shape
    th, tw = h // grid, w // grid
    d = th * tw * c
    m, k = _int8_rows(n), _round8(d)  # the int8 kernels want > 16 rows, multiples of 8
    wide = d > 1 << 15  # the squared distance (≤ 255²·D) or its partial sums may pass 2³¹
    group = _int8_group(p, m, k, x.device, x.numel())
    x8 = x.view(torch.int8).bitwise_xor_(-128)  # uint8 v → int8 v − 128, in place
    rows = torch.zeros((grid, p, m, k), dtype=torch.int8, device=x.device)  # padding stays 0
    gram = torch.empty((grid, p, m, m), dtype=torch.int32, device=x.device)
    flat = torch.empty((group * m) ** 2, dtype=torch.int32, device=x.device) if group > 1 else None
    best = torch.zeros((p, m, m), dtype=torch.int64 if wide else torch.int32, device=x.device)
    for i in range(grid):
        # 1. gather the row's grid tiles of every image, tile-major, into the int8 buffer
        band = x8[:, :, i * th : (i + 1) * th, : grid * tw, :].reshape(p, n, th, grid, tw, c)
        rows[:, :, :n, :d].view(grid, p, n, th, tw, c).copy_(band.permute(3, 0, 1, 2, 4, 5))
        # 2. exact int8 products a·b for every pair: one per tile and group of prompts
        for t in range(grid):
            for s in range(0, p, group):
                e = min(p, s + group)
                if e - s == 1:
                    torch._int_mm(rows[t, s], rows[t, s].t(), out=gram[t, s])
                    continue
                a = rows[t, s:e].view((e - s) * m, k)
                prod = flat[: ((e - s) * m) ** 2].view((e - s) * m, (e - s) * m)
                torch._int_mm(a, a.t(), out=prod)
                # the prompts' own blocks: the diagonal of the (G, m, G, m) view
                gram[t, s:e].copy_(prod.view(e - s, m, e - s, m).diagonal(dim1=0, dim2=2).permute(2, 0, 1))
        # 3. ‖a‖² + ‖b‖² − 2a·b (the norms are the products' diagonal), the maximum over tiles
        g = gram.long() if wide else gram
        sq = g.diagonal(dim1=2, dim2=3).clone()
        g.mul_(-2).add_(sq[:, :, :, None]).add_(sq[:, :, None, :])
        torch.maximum(best, g.amax(dim=0), out=best)
        del g, sq
    del rows, gram, flat
    out = best[:, :n, :n].double().div_(255.0 * 255.0 * d).sqrt_()
    return out.to(torch.float32)


#: Float64 temporaries of the stacked refinement stay below this multiple of the uint8 size of
#: the stacked batches (prompts are refined in groups that fit).
STACKED_REFINE_MEMORY = 1.5


def _refine_stacked(x, acc, mask, grid: int, th: int, tw: int, block_elements: int) -> None:
    """Recompute exactly, in place, the pairs ``mask`` marks in the P stacked batches ``x``
    (P×N×H×W×C) — every prompt at once, with a few host synchronisations (two, one per group
    of clusters, one for the pairs left to pixel differences) instead of several per prompt.

    The decision is that of :func:`_refine_small`, prompt by prompt: a prompt with many pairs
    among few images (``32 · pairs ≥ images²``, a cluster of near copies) gets the float64
    tiled matrix of its cluster; here the clusters of all such prompts are stacked (padded to
    the largest) and each tile is one batched float64 GEMM over them, in groups whose
    temporaries stay within ``STACKED_REFINE_MEMORY`` × the uint8 batches. For uint8 this is
    exact integer arithmetic (an integer centre; every partial sum below 2⁵³), so each value is
    the exact distance rounded once to float32, as the per-prompt refinement gives. The other
    prompts' pairs are computed from pixel differences, all prompts' pairs in one chunked pass.
    Float pixels: pairs the float64 product puts below ``1e-5`` are finished from differences,
    so that identical images give exactly 0.
    """
    p, n, h, w, c = x.shape
    # 1. the pairs to refine as (prompt, i, j), i < j, and the images each prompt's pairs involve
    idx = torch.nonzero(mask)  # synchronisation 1
    if idx.shape[0] == 0:
        return
    k, i, j = idx.unbind(1)
    involved = (mask.any(dim=2) | mask.any(dim=1)).flatten()  # P·N, prompt-major
    pairs_h, members_h = torch.stack([mask.sum(dim=(1, 2)), involved.view(p, n).sum(dim=1)]).tolist()  # sync. 2
    dense = [q for q in range(p) if pairs_h[q] and 32 * pairs_h[q] >= members_h[q] ** 2]
    exact = x.dtype == torch.uint8
    flat = x.view(p * n, h, w, c)
    direct = None  # all pairs
    if dense:
        # 2. each dense prompt's cluster: its involved images, in order; a pair's positions in it
        # (the involved images first, in order: a stable sort, no synchronisation)
        members = torch.argsort((~involved).to(torch.uint8), stable=True)[: sum(members_h)]
        rank = torch.cumsum(involved, dim=0) - 1  # position among all members
        starts = torch.tensor(np.cumsum([0] + members_h[:-1]).tolist(), dtype=torch.int64, device=x.device)
        is_dense = torch.zeros(p, dtype=torch.bool, device=x.device)
        is_dense[dense] = True
        direct = ~is_dense[k]
        d = th * tw * c
        scale = (255.0 * 255.0 if exact else 1.0) * d
        size = max(members_h[q] for q in dense)
        # one tile of a cluster (as gathered, and in float64), its product, the running maximum
        per = size * d * (8 + x.element_size()) + 8 * 3 * size * size
        budget = STACKED_REFINE_MEMORY * x.numel() - 32 * idx.shape[0]  # less the pair indices
        group = max(1, int(budget // per))
        slot = torch.full((p,), -1, dtype=torch.int64, device=x.device)
        offset = np.cumsum([0] + members_h[:-1]).tolist()
        for g0 in range(0, len(dense), group):
            ks = dense[g0 : g0 + group]
            u = max(members_h[q] for q in ks)
            # cluster members' global image indices, each row padded with its first member
            sel = torch.empty((len(ks), u), dtype=torch.int64, device=x.device)
            for s, q in enumerate(ks):
                sel[s] = members[offset[q]]
                sel[s, : members_h[q]] = members[offset[q] : offset[q] + members_h[q]]
            slot[ks] = torch.arange(len(ks), device=x.device)
            best = torch.zeros((len(ks), u, u), dtype=torch.float64, device=x.device)
            for ti in range(grid):
                for tj in range(grid):
                    # 3. one tile of every cluster image, centred on an integer mean tile
                    tile = flat[:, ti * th : (ti + 1) * th, tj * tw : (tj + 1) * tw, :]
                    t = tile.index_select(0, sel.flatten()).to(torch.float64).view(len(ks), u, d)
                    mu = t[:, : min(u, 64)].mean(dim=1, keepdim=True)
                    if exact:
                        mu.round_()
                    t.sub_(mu)
                    # 4. ‖a‖² + ‖b‖² − 2a·b: one batched float64 GEMM over the clusters
                    sq = torch.bmm(t.view(-1, 1, d), t.view(-1, d, 1)).view(len(ks), u)  # no t·t copy
                    prod = torch.baddbmm(sq[:, None, :], t, t.transpose(1, 2), alpha=-2.0)
                    prod.add_(sq[:, :, None])
                    torch.maximum(best, prod, out=best)
                    del t, prod
            best.clamp_(min=0.0).div_(scale).sqrt_()
            # 5. the group's pairs take their values from their cluster's matrix
            mine = torch.nonzero(slot[k] >= 0).squeeze(1)  # one synchronisation per group
            km, im, jm = k[mine], i[mine], j[mine]
            vals = best[slot[km], rank[km * n + im] - starts[km], rank[km * n + jm] - starts[km]]
            acc[km, im, jm] = vals.to(acc.dtype)
            if not exact:  # float pixels: identical images must still give exactly 0
                direct[mine] = vals < 1e-5
            slot[ks] = -1
            del best, vals
        if exact and all(q in dense for q in range(p) if pairs_h[q]):
            return  # every pair was in a cluster: exact already
        rest = torch.nonzero(direct).squeeze(1)  # the last synchronisation
        k, i, j = k[rest], i[rest], j[rest]
    # 6. every other pair from pixel differences, all prompts together, in chunks
    chunk = max(1, block_elements // max(1, 4 * h * w * c))
    for s in range(0, k.shape[0], chunk):
        ks, is_, js = k[s : s + chunk], i[s : s + chunk], j[s : s + chunk]
        vals = _direct_tiled(flat[ks * n + is_], flat[ks * n + js], grid, th, tw, block_elements)
        acc[ks, is_, js] = vals.to(acc.dtype)


def _near_mask(dist: torch.Tensor, bound2: torch.Tensor, near: float) -> torch.Tensor:
    """Pairs whose exact distance may lie on the other side of ``near`` than the computed one:
    ``|d̂² − near²| ≤ bound2`` (the float32 error bound on the squared distance, see
    :func:`_refine_thresholds`) plus a relative 1e-5 for the final scaling and square root."""
    n2 = float(near) * float(near)
    return (dist.square() - n2).abs_() <= bound2 + 1e-5 * n2


def _cpu_syrk(dtype: torch.dtype):
    """``syrk(c, a, beta)``: the upper triangle of the row-major N×N ``c`` becomes
    ``a·aᵀ + beta·c`` for a row-major N×K ``a`` (BLAS ``?syrk``: half the flops of a GEMM), or
    None when no BLAS is found.

    The BLAS is the OpenBLAS that scipy loads, called through ctypes, which releases the GIL so
    that worker threads run in parallel (scipy's own wrapper holds it); the call is checked once
    against a small product. Otherwise scipy's wrapper (``syrk.holds_gil`` is True: one worker).
    """
    if dtype in _SYRK:
        return _SYRK[dtype]
    fn = None
    try:
        from scipy.linalg import blas
    except ImportError:  # pragma: no cover - scipy is a dependency
        blas = None
    if blas is not None:
        fn = _native_syrk(dtype)
        if fn is None:  # pragma: no cover - scipy without a loadable OpenBLAS
            wrapped = blas.dsyrk if dtype == torch.float64 else blas.ssyrk

            def fn(c, a, beta):
                # column-major view of row-major c: its lower triangle is c's upper triangle
                wrapped(1.0, a.numpy().T, beta=beta, c=c.numpy().T, trans=1, lower=1, overwrite_c=1)

            fn.holds_gil = True
    _SYRK[dtype] = fn
    return fn


_SYRK: dict = {}


def _native_syrk(dtype: torch.dtype):
    import ctypes
    import os

    controller = _blas_controller()
    if controller is None:  # pragma: no cover
        return None
    letter = "d" if dtype == torch.float64 else "s"
    scalar = ctypes.c_double if dtype == torch.float64 else ctypes.c_float
    for lib in controller.lib_controllers:
        name = os.path.basename(lib.filepath or "")
        if lib.internal_api != "openblas" or "openblas64" in name or "scipy" not in name:
            continue  # scipy's LP64 OpenBLAS (32-bit integers) only
        try:
            handle = ctypes.CDLL(lib.filepath)
        except OSError:  # pragma: no cover
            continue
        for symbol in (f"scipy_cblas_{letter}syrk", f"cblas_{letter}syrk"):
            raw = getattr(handle, symbol, None)
            if raw is None:
                continue
            i = ctypes.c_int
            raw.argtypes = [i, i, i, i, i, scalar, ctypes.c_void_p, i, scalar, ctypes.c_void_p, i]
            raw.restype = None

            def fn(c, a, beta, raw=raw):
                n, k = a.shape
                # CblasRowMajor, CblasUpper, CblasNoTrans
                raw(101, 121, 111, n, k, 1.0, a.data_ptr(), a.stride(0), beta, c.data_ptr(), c.stride(0))

            fn.holds_gil = False
            a = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=dtype)
            c = torch.zeros((2, 2), dtype=dtype)
            fn(c, a, 0.0)
            if c.tolist() == [[14.0, 32.0], [0.0, 77.0]]:
                return fn
    return None  # pragma: no cover


_BLAS_CONTROLLER: list = []


def _blas_controller():
    """threadpoolctl's view of the loaded BLAS libraries (scanned once), or None."""
    if not _BLAS_CONTROLLER:
        try:
            from scipy.linalg import blas  # noqa: F401 - load scipy's BLAS before the scan
            from threadpoolctl import ThreadpoolController

            _BLAS_CONTROLLER.append(ThreadpoolController())
        except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
            _BLAS_CONTROLLER.append(None)
    return _BLAS_CONTROLLER[0]


def _blas_threads(n: int):
    """Limit the BLAS libraries to ``n`` threads for the duration (threadpoolctl if present)."""
    controller = _blas_controller()
    if controller is None:  # pragma: no cover
        return nullcontext()
    return controller.limit(limits=n, user_api="blas")


def _sq_norms(x: torch.Tensor, exact: bool) -> torch.Tensor:
    if exact:  # integer-valued float64: a plain sum of squares is exact in any order
        return (x * x).sum(dim=1)
    return torch.linalg.vector_norm(x, dim=1).square_()


def _refine_thresholds(q_energy, r_energy, d: int, device) -> tuple:
    """Per-row and per-column parts of the refinement threshold (see the module docstring).

    Returns ``(a, b, rel, gamma2)`` so that a pair is refined when
    ``dist < max(rel · (a_i + b_j), sqrt(gamma2 · (a_i + b_j)))``. ``gamma2 · (a_i + b_j)``
    bounds the float32 rounding error of the squared distance: with γ = (D + 2)·u, a length-D
    dot product errs by at most γ·Σ|a_k b_k| ≤ γ(e_a + e_b)/2 (normalised), so
    ``‖a‖² + ‖b‖² − 2a·b`` by at most (2γ + 6u)(e_a + e_b) ≤ 4γ(e_a + e_b), in any summation
    order (blocked GEMM, ``syrk``, chunks).
    """
    return q_energy.float(), r_energy.float(), REFINE_BELOW, 4.0 * _gamma(d, device)


def _gamma(d: int, device) -> float:
    """γ = (D + 2)·u: the worst-case relative error of a length-D float32 dot product on
    ``device`` (u = 2⁻²⁴; larger when TF32/bfloat16 matmuls are enabled)."""
    u = 2.0**-24
    if torch.get_float32_matmul_precision() != "highest":
        u = 2.0**-8  # bfloat16 passes may be used
    if torch.device(device).type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        u = max(u, 2.0**-11)
    return (d + 2) * u


def _refine_small(
    q, r, out, thresholds, grid, th, tw, block_elements, symmetric, near=None, threads=None, input_bytes=None
) -> None:
    """Recompute exactly, in place, the pairs within reach of float32 rounding: near zero, and
    (with ``near``) near that threshold.

    Few pairs: from pixel differences. Many pairs among few images (a cluster of near copies,
    the memorized case): one float64 tiled GEMM over just the images involved, exact for uint8
    (integer arithmetic); for float pixels, pairs it puts below ``1e-5`` are finished from
    differences so that identical images still give exactly 0.
    """
    a, b, rel, gamma2 = thresholds
    if out.numel() == 0:
        return
    # candidates first, with one scalar threshold (the largest any pair can have): one pass
    # over the matrix, then the per-pair tests on the few candidates
    e_max = float(a.max()) + float(b.max())
    top = max(rel * e_max, math.sqrt(gamma2 * e_max))
    if near is not None:
        n2 = float(near) * float(near)
        top = max(top, math.sqrt(n2 + gamma2 * e_max + 1e-5 * n2))
    idx = torch.nonzero(out < top * (1 + 1e-6), as_tuple=False)
    if symmetric:
        idx = idx[idx[:, 0] < idx[:, 1]]
    qi, ri = idx[:, 0], idx[:, 1]
    bound2 = (a[qi] + b[ri]).mul_(gamma2)
    dv = out[qi, ri]
    small = dv < torch.maximum(bound2 * (rel / gamma2), bound2.sqrt())
    if near is not None:
        small |= _near_mask(dv, bound2, near)
    del bound2, dv
    if not bool(small.all()):
        idx = idx[small]
    del small
    if idx.shape[0] == 0:
        return
    qi, ri = idx[:, 0], idx[:, 1]
    if symmetric:
        uq, inv = torch.unique(torch.cat([qi, ri]), return_inverse=True)
        ur, q_inv, r_inv = uq, inv[: qi.shape[0]], inv[qi.shape[0] :]
    else:
        uq, q_inv = torch.unique(qi, return_inverse=True)
        ur, r_inv = torch.unique(ri, return_inverse=True)
    if 32 * idx.shape[0] >= uq.shape[0] * ur.shape[0]:
        sq = q[uq]
        sr = sq if symmetric else r[ur]
        sub = _tiled_matrices(
            [(sq, sr)], grid, block_elements, symmetric, torch.float64, False, threads, input_bytes=input_bytes
        )[0]
        del sq, sr
        vals = sub[q_inv, r_inv]
        out[qi, ri] = vals.to(out.dtype)
        if q.dtype == torch.uint8 and r.dtype == torch.uint8:
            return
        keep = vals < 1e-5  # float64 rounding of identical float images stays far below
        qi, ri = qi[keep], ri[keep]
    chunk = max(1, block_elements // max(1, 4 * q[0].numel()))
    for s in range(0, qi.shape[0], chunk):
        a, b = qi[s : s + chunk], ri[s : s + chunk]
        out[a, b] = _direct_tiled(q[a], r[b], grid, th, tw, block_elements).to(out.dtype)


def _rescale(mu: torch.Tensor, src: torch.dtype, dst: torch.dtype) -> torch.Tensor:
    """A centre in ``src``'s units (0..255 for uint8, else [0, 1]) in ``dst``'s units."""
    if src == torch.uint8 and dst != torch.uint8:
        return mu / 255.0
    if src != torch.uint8 and dst == torch.uint8:
        return mu * 255.0
    return mu


def _gather_tile(x, i: int, j: int, r0: int, r1: int, th: int, tw: int, dst, units: float, mu):
    """Write rows ``r0:r1`` of tile (i, j) of every image, minus the centre ``mu``, into
    ``dst`` (N×Dc, float): one strided gather with the conversion, one subtraction.

    ``units`` = 255: raw uint8 values; 1: [0, 1]. ``mu`` None: use the mean of the first
    images (any centre gives the same distances). Returns the centre used, in the input's own
    units (0..255 for uint8).
    """
    n, c = x.shape[0], x.shape[3]
    y0 = i * th
    tile = x[:, y0 + r0 : y0 + r1, j * tw : (j + 1) * tw, :]
    if mu is None:
        m = min(n, 64)
        mu = tile[:m].reshape(m, -1).to(dst.dtype).mean(dim=0)
        if x.dtype == torch.uint8:
            mu.round_()  # an integer centre keeps uint8 tiles integer-valued (exact in float64)
    dst.view(n, r1 - r0, tw, c).copy_(tile)  # strided gather + conversion in one pass
    dst.sub_(mu)
    if units == 1.0 and x.dtype == torch.uint8:
        dst.div_(255.0)
    return mu


def nearest_tiled_l2(
    queries: ArrayLike,
    references: ArrayLike,
    k: int = 1,
    grid: int = 4,
    *,
    within: float | None = None,
    reference_chunk: int = 4096,
    exact_near: float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The ``k`` nearest references of each query by tiled ℓ2, streaming over references.

    Memory is bounded by ``Q × reference_chunk`` whatever the number of references. Distances
    are those of :func:`cross_tiled_l2`: for uint8 images with int8 products the exact ones
    rounded once to float32; otherwise exact near 0 and near ``exact_near``, elsewhere within
    the float32 error that ``REFINE_BELOW`` describes (up to 6e-4 measured for 128×128×3 tiles;
    :func:`tiled_l2_error_bound` gives a proven bound).

    ``exact_near``: a threshold (δ of verification) near which pairs are recomputed exactly, so
    ``distances <= exact_near`` is decided as by the exact distances rounded once to float32;
    default ``within`` when it is positive (the counts are such decisions).

    Returns
    -------
    distances : Q×k float32, ascending
    indices : Q×k int64 into ``references``
    counts : Q int64 — number of references with tiled ℓ2 ≤ ``within`` (None if not asked)

    Examples
    --------
    >>> import numpy as np
    >>> r = np.random.default_rng(1).integers(0, 256, (10, 8, 8, 1), dtype=np.uint8)
    >>> dist, idx, cnt = nearest_tiled_l2(r[[3, 7]], r, k=2, grid=2, within=0.0)
    >>> idx[:, 0].tolist(), dist[:, 0].tolist(), cnt.tolist()
    ([3, 7], [0.0, 0.0], [1, 1])
    """
    q, _ = _as_tensor(queries, "queries")
    r, _ = _as_tensor(references, "references")
    q = _check_images(q, "queries", True)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise InputError(f"k must be a positive integer, got {k!r}")
    if isinstance(reference_chunk, bool) or not isinstance(reference_chunk, (int, np.integer)) or reference_chunk < 1:
        raise InputError(f"reference_chunk must be a positive integer, got {reference_chunk!r}")
    if within is not None and not np.isfinite(within):
        raise InputError(f"within must be a finite number, got {within!r}")
    _check_exact_near(exact_near)
    if exact_near is None and within is not None and within > 0:
        exact_near = float(within)
    if r.ndim != 4:
        raise InputError(
            f"references: expected N×H×W×C, got shape {tuple(r.shape)}",
            "stack the references into one batch (grayscale: C = 1)",
        )
    nq, nr = q.shape[0], r.shape[0]
    k_eff = min(k, nr)
    best_d = torch.full((nq, k_eff), float("inf"), dtype=torch.float32)
    best_i = torch.full((nq, k_eff), -1, dtype=torch.int64)
    counts = torch.zeros(nq, dtype=torch.int64) if within is not None else None
    for s in range(0, nr, reference_chunk):
        block = r[s : s + reference_chunk]
        block = block.to(q.device) if isinstance(block, torch.Tensor) else block
        d = cross_tiled_l2(q, block, grid, exact_near=exact_near)
        d = d if isinstance(d, torch.Tensor) else torch.from_numpy(d)
        d = d.cpu()
        if counts is not None:
            counts += (d <= within).sum(1)
        cand_d = torch.cat([best_d, d], 1)
        cand_i = torch.cat([best_i, torch.arange(s, s + d.shape[1]).expand(nq, -1)], 1)
        # stable sort: ties resolve to the lower reference index
        order = torch.sort(cand_d, dim=1, stable=True).indices[:, :k_eff]
        best_d = torch.gather(cand_d, 1, order)
        best_i = torch.gather(cand_i, 1, order)
    return best_d.numpy(), best_i.numpy(), (counts.numpy() if counts is not None else None)


def tiled_l2_error_bound(queries, references, grid: int = 4) -> float:
    """A bound on ``|d̂ − d|`` for every distance ``d̂`` that :func:`cross_tiled_l2` and
    :func:`nearest_tiled_l2` return for images like these (their dtypes, device and size; ``d``
    the exact tiled ℓ2).

    - **int8 products** (uint8 against uint8 where the device has them): every value is the
      exact distance rounded once to float32, so half a float32 ulp below 1: ``2⁻²⁵``.
    - **otherwise**, the bound the refinement rests on (module docstring): a pair left with its
      float32-product value has ``|d̂² − d²| ≤ 4γ(e_a + e_b)`` and
      ``d̂ ≥ REFINE_BELOW · (e_a + e_b)``, so ``|d̂ − d| ≤ |d̂² − d²| / d̂ ≤ 4γ / REFINE_BELOW``,
      plus ``2⁻²²`` for the final float32 scaling and square root; the pairs recomputed exactly
      are far closer. Rigorous, and far above the errors measured (``REFINE_BELOW``): 4.6·10⁻⁴
      for 8×8×3 tiles (CIFAR-10 at grid 4), 0.12 for 128×128×3 ones.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.zeros((1, 32, 32, 3), np.uint8)
    >>> round(tiled_l2_error_bound(x.astype(np.float32), x), 6)
    0.000463
    """
    # the products run on the queries' device (the references are moved there)
    device = queries.device if isinstance(queries, torch.Tensor) else torch.device("cpu")
    dtypes = []
    for x in (queries, references):
        if isinstance(x, torch.Tensor):
            dtypes.append(x.dtype)
        else:
            dtypes.append(torch.uint8 if np.asarray(x).dtype == np.uint8 else torch.float32)
    shape = tuple(queries.shape)
    _tile_sizes((1,) + shape[-3:], grid, "queries")
    d = (shape[-3] // grid) * (shape[-2] // grid) * shape[-1]
    if _int8_applies(dtypes[0], dtypes[1], d, device):
        return 2.0**-25
    return 4.0 * _gamma(d, device) / REFINE_BELOW + 2.0**-22

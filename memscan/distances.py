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

The matrix versions never broadcast ``N×N×H×W×C``: each tile position is gathered once as a
float32 ``N×D`` block, centred on a mean tile, and the squared distances come from one matrix
product, ``‖a‖² + ‖b‖² − 2 a·b``, in row blocks that bound memory (for one batch against itself,
only the upper triangle: BLAS ``syrk`` on the CPU, triangular row blocks elsewhere). Cancellation in that identity is guarded: negative values
are clamped to 0, and a pair is recomputed exactly (float64, exact integer arithmetic for
uint8) when its distance is within reach of float32 rounding — below
``max(REFINE_BELOW · e, sqrt(4 γ e))``, where ``e`` is the two images' largest centred tile
energy (mean squared pixel, [0, 1] units) and ``γ = (D + 2) · u`` the worst-case relative error
of a length-D float32 dot product (u = 2⁻²⁴; larger when TF32/bfloat16 matmuls are enabled).
The second term is a rigorous bound for identical images, so they always give exactly 0.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import TypeVar

import numpy as np
import torch

from memscan.errors import InputError

ArrayLike = TypeVar("ArrayLike", np.ndarray, torch.Tensor)

#: Pairs whose tiled ℓ2 from the matrix-product identity is below ``REFINE_BELOW`` times their
#: centred tile energy ``e`` (≤ 2; ~0.2–0.4 for unrelated images, ~1e-3 for near copies of one
#: image), or below the rounding bound ``sqrt(4 γ e)``, are recomputed exactly. Float32 rounding
#: moves a distance d by about ``5 u e / (2 d)``, so above the threshold the error stays ≲ 2e-6.
REFINE_BELOW = 0.1

#: Default budget, in float32 elements, for one block of the distance matrix being built.
DEFAULT_BLOCK_ELEMENTS = 1 << 22

#: Row blocks for a symmetric (pairwise) matrix that fits in one block: the upper triangle of
#: b blocks costs (1 + 1/b)/2 of the full product, and smaller GEMMs run less efficiently.
SYMMETRIC_ROW_BLOCKS = 4


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
def pairwise_tiled_l2(images: ArrayLike, grid: int = 4, *, block_elements: int = DEFAULT_BLOCK_ELEMENTS) -> ArrayLike:
    """All-pairs tiled ℓ2 of one batch: an N×N symmetric matrix with an exact-zero diagonal.

    Parameters
    ----------
    images : N×H×W×C array or tensor, uint8 or float in [0, 1]
    grid : int, default 4
    block_elements : int
        Memory budget (float32 elements) for one row block of partial results.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    >>> d = pairwise_tiled_l2(np.concatenate([x, x[:1]]), grid=2)
    >>> d.shape, float(d[0, 3]), bool((d == d.T).all())
    ((4, 4), 0.0, True)
    """
    x, was_numpy = _as_tensor(images, "images")
    x = _check_images(x, "images", True)
    out = _cross(x, x, grid, block_elements, symmetric=True)
    return _back(out, was_numpy)


def cross_tiled_l2(
    queries: ArrayLike,
    references: ArrayLike,
    grid: int = 4,
    *,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
) -> ArrayLike:
    """Tiled ℓ2 between every query and every reference: a Q×R matrix.

    For very large reference sets use :func:`nearest_tiled_l2`, which keeps only the k nearest.

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
    return _back(_cross(q, r, grid, block_elements, symmetric=False), was_numpy)


def _cross(
    q: torch.Tensor,
    r: torch.Tensor,
    grid: int,
    block_elements: int,
    symmetric: bool,
    dtype: torch.dtype = torch.float32,
    refine: bool = True,
):
    """Tiled ℓ2 of every (query, reference) pair: per tile one GEMM per row block, max over tiles.

    For each tile position, the tile of every image is gathered once into an ``N×D`` block of
    ``dtype`` and centred on a mean tile (distances do not change; cancellation in
    ``‖a‖² + ‖b‖² − 2a·b`` shrinks with the norms). uint8 pixels stay in 0..255
    units until the final scaling, and the centre is rounded to an integer, so in float64 every
    product and sum is an exact integer and the result is exact. One ``addmm`` per row block
    gives ``‖b‖² − 2a·b``; adding ``‖a‖²`` and the running maximum over tiles are the only other
    passes over the output. For ``symmetric`` (q is r) on the CPU, one BLAS ``syrk`` per tile
    computes just the upper triangle of ``−2 a·b`` (half the flops; the norms are its diagonal);
    elsewhere a row block only computes the columns from its first row on (with ≥ 4 row blocks,
    about 5/8 of the full product). The upper triangle is mirrored, so the result is exactly
    symmetric.
    """
    th, tw = _tile_sizes(tuple(q.shape), grid, "images")
    if block_elements < 1:
        raise InputError(f"block_elements must be a positive integer, got {block_elements!r}")
    nq, nr = q.shape[0], r.shape[0]
    device = q.device
    out = torch.zeros((nq, nr), dtype=dtype, device=device)
    if nq == 0 or nr == 0:
        return out
    c = q.shape[3]
    d = th * tw * c
    units = 255.0 if (q.dtype == torch.uint8 and r.dtype == torch.uint8) else 1.0
    exact = dtype == torch.float64 and units == 255.0
    rows = max(1, min(nq, block_elements // nr))
    if symmetric and rows * 4 > nq >= 128:
        rows = -(-nq // SYMMETRIC_ROW_BLOCKS)
    xr = torch.empty((nr, d), dtype=dtype, device=device)
    xq = xr if symmetric else torch.empty((nq, d), dtype=dtype, device=device)
    syrk = _cpu_syrk(dtype) if symmetric and device.type == "cpu" else None
    if syrk is not None:  # one BLAS call per tile computes exactly the upper triangle
        np_dtype = np.float64 if dtype == torch.float64 else np.float32
        gram = np.zeros((nr, nr), dtype=np_dtype, order="F")  # the N×N buffer of this path
        gemm = torch.from_numpy(gram)  # a view: column-major, upper triangle = −2 a·b
    else:
        gemm = torch.empty(rows * nr, dtype=dtype, device=device)
    first = True
    with _blas_threads() if syrk is not None else nullcontext():
        r_energy = torch.zeros(nr, dtype=dtype, device=device)  # max over tiles of ‖tile − centre‖²
        q_energy = r_energy if symmetric else torch.zeros(nq, dtype=dtype, device=device)
        for i in range(grid):
            for j in range(grid):
                mu = _gather_tile(r, i, j, th, tw, xr, units, None)
                if syrk is not None:
                    syrk(-2.0, xr.numpy().T, beta=0.0, c=gram, trans=1, overwrite_c=1)
                    rn = gemm.diagonal().mul(-0.5)  # ‖a‖², from the same product
                    torch.maximum(r_energy, rn, out=r_energy)
                    gemm.add_(rn[None, :]).add_(rn[:, None])
                    if first:
                        out.copy_(gemm)
                    else:
                        torch.maximum(out, gemm, out=out)
                    first = False
                    continue
                rn = _sq_norms(xr, exact)
                torch.maximum(r_energy, rn, out=r_energy)
                qn = rn
                if not symmetric:
                    _gather_tile(q, i, j, th, tw, xq, units, _rescale(mu, r.dtype, q.dtype))
                    qn = _sq_norms(xq, exact)
                    torch.maximum(q_energy, qn, out=q_energy)
                for start in range(0, nq, rows):
                    stop = min(nq, start + rows)
                    c0 = start if symmetric else 0
                    blk = gemm[: (stop - start) * (nr - c0)].view(stop - start, nr - c0)
                    torch.addmm(rn[None, c0:], xq[start:stop], xr[c0:].T, alpha=-2.0, out=blk)
                    blk.add_(qn[start:stop, None])
                    dst = out[start:stop, c0:]
                    if first:
                        dst.copy_(blk)
                    else:
                        torch.maximum(dst, blk, out=dst)
                first = False
    del xr, xq, gemm
    out.clamp_(min=0.0).div_(units * units * d).sqrt_()
    if refine:
        scale = units * units * d
        thresholds = _refine_thresholds(q_energy / scale, r_energy / scale, d, device)
        _refine_small(q, r, out, thresholds, grid, th, tw, block_elements, symmetric)
    if symmetric:
        out = torch.triu(out, diagonal=1)
        out = out + out.T
    return out


def _cpu_syrk(dtype: torch.dtype):
    """BLAS ``?syrk`` (C = α·AᵀA, upper triangle only: half the flops of a GEMM) from scipy,
    or None when scipy is missing."""
    try:
        from scipy.linalg import blas
    except ImportError:  # pragma: no cover - scipy is a dependency
        return None
    return blas.dsyrk if dtype == torch.float64 else blas.ssyrk


_BLAS_CONTROLLER: list = []


def _blas_threads():
    """Limit scipy's BLAS to torch's thread count for the duration (threadpoolctl if present;
    the library scan is done once and cached)."""
    if not _BLAS_CONTROLLER:
        try:
            from threadpoolctl import ThreadpoolController

            _BLAS_CONTROLLER.append(ThreadpoolController())
        except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
            _BLAS_CONTROLLER.append(None)
    controller = _BLAS_CONTROLLER[0]
    if controller is None:  # pragma: no cover
        return nullcontext()
    return controller.limit(limits=torch.get_num_threads(), user_api="blas")


def _sq_norms(x: torch.Tensor, exact: bool) -> torch.Tensor:
    if exact:  # integer-valued float64: a plain sum of squares is exact in any order
        return (x * x).sum(dim=1)
    return torch.linalg.vector_norm(x, dim=1).square_()


def _refine_thresholds(q_energy, r_energy, d: int, device) -> tuple:
    """Per-row and per-column parts of the refinement threshold (see the module docstring).

    Returns ``(a, b, rel, gamma2)`` so that a pair is refined when
    ``dist < max(rel · (a_i + b_j), sqrt(gamma2 · (a_i + b_j)))``.
    """
    u = 2.0**-24
    if torch.get_float32_matmul_precision() != "highest":
        u = 2.0**-8  # bfloat16 passes may be used
    if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        u = max(u, 2.0**-11)
    gamma = (d + 2) * u
    # rounding moves a computed squared distance by at most ~2γ·e; a factor 2 to spare
    return q_energy.float(), r_energy.float(), REFINE_BELOW, 4.0 * gamma


def _refine_small(q, r, out, thresholds, grid, th, tw, block_elements, symmetric) -> None:
    """Recompute the pairs within reach of float32 rounding exactly, in place.

    Few pairs: from pixel differences. Many pairs among few images (a cluster of near copies,
    the memorized case): one float64 tiled GEMM over just the images involved, exact for uint8
    (integer arithmetic); for float pixels, pairs it puts below ``1e-5`` are finished from
    differences so that identical images still give exactly 0.
    """
    a, b, rel, gamma2 = thresholds
    energy = a[:, None] + b[None, :]
    limit = torch.maximum(energy * rel, energy.mul_(gamma2).sqrt_())
    small = out < limit
    del energy, limit
    if symmetric:
        small = torch.triu(small, diagonal=1)
    idx = torch.nonzero(small, as_tuple=False)
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
        sub = _cross(sq, sr, grid, block_elements, symmetric, torch.float64, refine=False)
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


def _gather_tile(x, i: int, j: int, th: int, tw: int, dst, units: float, mu):
    """Write tile (i, j) of every image, minus the centre ``mu``, into ``dst`` (N×D, float).

    ``units`` = 255: raw uint8 values; 1: [0, 1]. ``mu`` None: use the mean tile of the first
    images (any centre gives the same distances). Returns the centre used, in the input's own
    units (0..255 for uint8).
    """
    n, c = x.shape[0], x.shape[3]
    tile = x[:, i * th : (i + 1) * th, j * tw : (j + 1) * tw, :]
    if mu is None:
        m = min(n, 64)
        mu = tile[:m].reshape(m, -1).to(dst.dtype).mean(dim=0)
        if x.dtype == torch.uint8:
            mu.round_()  # an integer centre keeps uint8 tiles integer-valued (exact in float64)
    dst.view(n, th, tw, c).copy_(tile)  # strided gather + conversion in one pass
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
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The ``k`` nearest references of each query by tiled ℓ2, exact, streaming over references.

    Memory is bounded by ``Q × reference_chunk`` whatever the number of references.

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
        d = cross_tiled_l2(q, block.to(q.device) if isinstance(block, torch.Tensor) else block, grid)
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

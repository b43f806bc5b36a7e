"""The diffusion loss ``L_t(x)`` of membership inference, and the timestep sweep.

DESIGN.md (after Carlini et al. 2023, "Extracting Training Data from Diffusion Models", §6.1)::

    L_t(x) = mean over K noise draws ε of ‖ε − ε_θ(sqrt(ᾱ_t)·x + sqrt(1 − ᾱ_t)·ε, t)‖²

optionally also averaged over the horizontal flip of ``x``. A model fits its training examples
better, so members have a *lower* loss; the loss-threshold attack (Yeom et al. 2018) and LiRA
(:mod:`memscan.mia.attacks`) take it as their statistic. ``‖·‖²`` is taken as the **mean** over
the ``C·H·W`` pixels (the training MSE of diffusers), so values compare across resolutions; the
sum is that times ``C·H·W`` and ranks examples identically.

Determinism. The noise of example ``i`` (its *example id*, by default its position), draw ``k``
comes from its own ``torch.Generator`` seeded with ``derive_seed(seed, "mia-noise/<i>", k)``.
The same ``ε`` is used at every timestep and for both flips (common random numbers: differences
between timesteps are not drowned in noise). So the loss of an example depends on the seed, its
id and the model only — not on the batch size, the other examples, or the order they come in
(up to the last float32 bits of batched kernels).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from memscan.errors import InputError
from memscan.generators.seeds import derive_seed
from memscan.mia.metrics import DEFAULT_FPRS, AttackResultsTable, as_labels, tpr_key
from memscan.mia.noise import NoisePredictor, as_noise_predictor, slice_condition

__all__ = [
    "LossConfig",
    "TimestepSweep",
    "diffusion_loss",
    "images_to_model_space",
    "noise_for",
    "parse_timesteps",
    "timestep_sweep",
]

#: Timesteps of the default sweep (of T = 1000; Carlini et al. 2023 found small t best).
DEFAULT_TIMESTEPS: tuple[int, ...] = (10, 50, 100, 200, 500)


def parse_timesteps(spec: str | Iterable[int]) -> tuple[int, ...]:
    """``"10,50,100"`` (or a sequence) → a tuple of distinct non-negative ints, in the given order.

    Examples
    --------
    >>> parse_timesteps("10, 50,100")
    (10, 50, 100)
    """
    items = [s for s in spec.replace(" ", "").split(",") if s] if isinstance(spec, str) else list(spec)
    out: list[int] = []
    for s in items:
        try:
            v = int(s)
        except (TypeError, ValueError):
            raise InputError(f"timesteps: {s!r} is not an integer", "e.g. --timesteps 10,50,100") from None
        if isinstance(s, float) and s != v:
            raise InputError(f"timesteps: {s!r} is not an integer")
        if v < 0:
            raise InputError(f"timesteps: {v} is negative", "timesteps run from 0 to T − 1")
        if v in out:
            raise InputError(f"timesteps: {v} is listed twice")
        out.append(v)
    if not out:
        raise InputError("timesteps: none given", "e.g. --timesteps 10,50,100")
    return tuple(out)


@dataclass(frozen=True)
class LossConfig:
    """Settings of :func:`diffusion_loss` (recorded in every run's manifest).

    Attributes
    ----------
    timesteps : tuple of int
        The ``t`` at which ``L_t`` is computed (0 ≤ t < T).
    noise_draws : int
        ``K``, noise draws per example (and per flip).
    flip : bool
        Also average over the horizontal flip of each image (2K evaluations per example).
    seed : int
        Seed of the per-example noise.
    batch_size : int
        Rows per model call (a row is one (example, draw, flip) at one timestep).
    """

    timesteps: tuple[int, ...] = DEFAULT_TIMESTEPS
    noise_draws: int = 4
    flip: bool = False
    seed: int = 0
    batch_size: int = 64

    def validated(self, num_train_timesteps: int) -> LossConfig:
        ts = parse_timesteps(self.timesteps)
        bad = [t for t in ts if t >= num_train_timesteps]
        if bad:
            raise InputError(
                f"timesteps: {bad} not below T = {num_train_timesteps} (the model's training timesteps)",
                f"choose timesteps in 0..{num_train_timesteps - 1}",
            )
        for name in ("noise_draws", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or int(v) != v or v < 1:
                raise InputError(f"{name}: {v!r} must be a positive integer", f"e.g. --{name.replace('_', '-')} 8")
        return LossConfig(ts, int(self.noise_draws), bool(self.flip), int(self.seed), int(self.batch_size))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["timesteps"] = list(self.timesteps)
        d["reduction"] = "mean over C·H·W pixels, then over draws (and flips)"
        return d


def images_to_model_space(images: Any) -> torch.Tensor:
    """Images → float32 ``N×C×H×W`` tensor in ``[-1, 1]`` (the space diffusion models train in).

    Accepts ``uint8`` ``N×H×W×C`` arrays (memscan's image convention), float ``N×H×W×C`` arrays in
    ``[0, 1]`` (DESIGN.md's comparison space), or a torch tensor ``N×C×H×W`` already in model space
    (returned as float32, unchanged).

    Examples
    --------
    >>> images_to_model_space(np.array([[[[0], [255]]]], np.uint8)).flatten().tolist()
    [-1.0, 1.0]
    """
    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise InputError(f"images: tensor of shape {tuple(images.shape)}, expected N×C×H×W")
        return images.float()
    a = np.asarray(images)
    if a.ndim == 3:
        a = a[..., None]
    if a.ndim != 4:
        raise InputError(f"images: shape {a.shape}, expected N×H×W×C", "stack the images into one array")
    if a.shape[0] == 0:
        raise InputError("images: no images given")
    if a.dtype == np.uint8:
        x = torch.from_numpy(np.ascontiguousarray(a)).float().div(127.5).sub(1.0)
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            raise InputError(
                "images: float images must be finite and in [0, 1]", "pass uint8 images or floats in [0, 1]"
            )
        x = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).mul(2.0).sub(1.0)
    else:
        raise InputError(f"images: dtype {a.dtype} is not uint8 or float", "pass uint8 N×H×W×C images")
    return x.permute(0, 3, 1, 2).contiguous()


def noise_for(example_id: int | str, draws: int, shape: Sequence[int], seed: int) -> torch.Tensor:
    """The ``draws × C×H×W`` noise of one example: draw ``k`` from its own CPU ``torch.Generator``
    seeded with ``derive_seed(seed, "mia-noise/<example_id>", k)``.

    Examples
    --------
    >>> a = noise_for(7, 2, (1, 4, 4), seed=0)
    >>> bool(torch.equal(a, noise_for(7, 2, (1, 4, 4), seed=0))), bool(torch.equal(a[0], a[1]))
    (True, False)
    """
    g = torch.Generator("cpu")
    shape = tuple(shape)
    draws_ = []
    for k in range(draws):
        g.manual_seed(derive_seed(seed, f"mia-noise/{example_id}", k))
        draws_.append(torch.randn(shape, generator=g))
    return torch.stack(draws_)


def diffusion_loss(
    predictor: Any,
    images: Any,
    timesteps: Iterable[int] | str = DEFAULT_TIMESTEPS,
    *,
    condition: Any = None,
    noise_draws: int = 4,
    flip: bool = False,
    seed: int = 0,
    batch_size: int = 64,
    example_ids: Sequence[int | str] | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Per-example diffusion loss ``L_t(x_i)`` at each timestep (DESIGN.md; Carlini et al. 2023).

    For every example ``i``, timestep ``t``, draw ``k`` (and flip ``f``)::

        x_t = sqrt(ᾱ_t) · f(x_i) + sqrt(1 − ᾱ_t) · ε_ik         (Ho et al. 2020, eq. 4)
        L_t(x_i) = mean_k,f  mean_pixels (ε_ik − ε_θ(x_t, t, c_i))²

    Parameters
    ----------
    predictor : NoisePredictor or anything :func:`~memscan.mia.noise.as_noise_predictor` wraps
    images : array_like
        ``uint8`` ``N×H×W×C``, float ``N×H×W×C`` in ``[0, 1]``, or a model-space tensor
        ``N×C×H×W`` (see :func:`images_to_model_space`).
    timesteps : iterable of int or str
        The ``t`` to evaluate (``"10,50,100"`` is accepted), each in ``0..T−1``.
    condition : optional
        Per-example condition (class labels ``(N,)``, encoder hidden states ``N×S×D``) or one
        shared by all (an int class label); see :class:`~memscan.mia.noise.DiffusersNoisePredictor`.
    noise_draws : int
        ``K``.
    flip : bool
        Average over ``x`` and its horizontal flip too.
    seed : int
        Noise seed (see the module docstring: the result does not depend on ``batch_size``).
    batch_size : int
        Rows per model call.
    example_ids : sequence, optional
        Ids that seed each example's noise (default ``0..N−1``); pass global indices when scoring
        a data set in parts, so that every part draws the noise the whole would.
    progress : bool
        Show a progress bar.

    Returns
    -------
    numpy.ndarray, shape (len(timesteps), N), float64
        ``L_t(x_i)``; lower = better fit.

    Examples
    --------
    A predictor that always answers 0 has loss ``mean(ε²) ≈ 1`` at every ``t``:

    >>> zero = lambda x, t, c: torch.zeros_like(x)
    >>> p = as_noise_predictor(zero, alphas_cumprod=np.linspace(0.99, 0.01, 1000))
    >>> L = diffusion_loss(p, np.zeros((3, 8, 8, 1), np.uint8), [10, 500], noise_draws=8)
    >>> L.shape, bool(np.allclose(L, 1.0, atol=0.2)), bool((L[0] == L[1]).all())
    ((2, 3), True, True)
    """
    p: NoisePredictor = as_noise_predictor(predictor)
    cfg = LossConfig(
        timesteps=parse_timesteps(timesteps),
        noise_draws=noise_draws,
        flip=flip,
        seed=seed,
        batch_size=batch_size,
    ).validated(int(p.alphas_cumprod.numel()))
    x = images_to_model_space(images)
    n = x.shape[0]
    ids = list(range(n)) if example_ids is None else list(example_ids)
    if len(ids) != n:
        raise InputError(f"example_ids: {len(ids)} ids for {n} images", "pass one id per image")
    shape = tuple(x.shape[1:])
    K, F = cfg.noise_draws, 2 if cfg.flip else 1
    alphas = p.alphas_cumprod
    ts = cfg.timesteps
    out = np.zeros((len(ts), n), dtype=np.float64)
    # examples per chunk: enough rows (chunk · K · F) to fill at least one model batch
    chunk = max(1, math.ceil(cfg.batch_size / (K * F)))
    bar = _bar(progress, n * len(ts) * K * F)
    coef = {t: (math.sqrt(float(alphas[t])), math.sqrt(1.0 - float(alphas[t]))) for t in ts}
    try:
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            e = stop - start
            # 1. the noise of each example in the chunk, from its own generators
            eps = torch.cat([noise_for(ids[i], K, shape, cfg.seed) for i in range(start, stop)])  # (e·K)×C×H×W
            x0 = x[start:stop]
            if K > 1:
                x0 = x0.repeat_interleave(K, dim=0)  # row r ↔ example start + r // K, draw r % K
            if F == 2:
                x0 = torch.cat([x0, torch.flip(x0, dims=[3])])  # flipped rows after the unflipped ones
                eps = eps.repeat(2, 1, 1, 1)
            if condition is None:
                cond = None
            elif K == 1 and F == 1:
                cond = slice_condition(condition, range(start, stop), n)
            else:
                cond = slice_condition(condition, np.tile(np.repeat(np.arange(start, stop), K), F), n)
            r = x0.shape[0]
            for j, t in enumerate(ts):
                # 2. forward-noise every row to timestep t
                ca, cb = coef[t]
                xt = ca * x0 + cb * eps
                tt = torch.full((r,), t, dtype=torch.long)
                # 3. predict the noise, cfg.batch_size rows at a time
                sq = torch.empty(r, dtype=torch.float64)
                for b in range(0, r, cfg.batch_size):
                    sl = slice(b, min(r, b + cfg.batch_size))
                    c = cond if (cond is None or r <= cfg.batch_size) else slice_condition(cond, range(b, sl.stop), r)
                    pred = p.predict_noise(xt[sl], tt[sl], c)
                    # 4. squared error, mean over pixels
                    sq[sl] = (pred.to("cpu", torch.float32) - eps[sl]).square_().flatten(1).mean(1)
                    if bar is not None:
                        bar[0].advance(bar[1], sl.stop - sl.start)
                # 5. mean over draws and flips of each example
                out[j, start:stop] = sq.view(F, e, K).mean(dim=(0, 2)).numpy()
    finally:
        if bar is not None:
            bar[0].stop()
    bad = ~np.isfinite(out)
    if bad.any():
        j, i = np.argwhere(bad)[0]
        raise InputError(
            f"diffusion loss: {int(bad.sum())} non-finite value(s) (first: example {i} at t = {ts[j]})",
            "the model returned NaN/inf; check its dtype and inputs",
        )
    return out


def _bar(progress: bool, total: int):
    if not progress:
        return None
    from rich.progress import Progress

    bar = Progress(transient=True)
    bar.start()
    return bar, bar.add_task("diffusion loss", total=total)


# --------------------------------------------------------------------------------------------
# timestep sweep
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class TimestepSweep:
    """Loss-threshold attack at each timestep: which ``t`` separates members best.

    Attributes
    ----------
    timesteps : tuple of int
    table : pandas.DataFrame
        One row per timestep: ``timestep``, ``auc``, ``balanced_accuracy``, ``tpr@1%fpr``,
        ``tpr@0.1%fpr`` (and ``*_lo``/``*_hi`` bootstrap bounds when bootstrapped), plus the mean
        loss of members and of non-members.
    best_timestep : int
        The timestep with the highest ``by`` metric (ties: the higher AUC, then the smaller t).
    by : str
        The metric that chose ``best_timestep``.
    results : AttackResultsTable
        The :class:`~memscan.mia.metrics.AttackResult` of each timestep.
    """

    timesteps: tuple[int, ...]
    table: Any
    best_timestep: int
    by: str
    results: AttackResultsTable = field(repr=False)


def timestep_sweep(
    losses: Any,
    timesteps: Iterable[int],
    is_member: Any,
    *,
    by: str = tpr_key(0.01),
    bootstrap: int = 0,
    seed: int = 0,
    fprs: Iterable[float] = DEFAULT_FPRS,
) -> TimestepSweep:
    """Run the global loss-threshold attack at each timestep and pick the best ``t``.

    Parameters
    ----------
    losses : array_like, shape (len(timesteps), N)
        ``L_t(x_i)`` as returned by :func:`diffusion_loss`.
    timesteps : iterable of int
    is_member : array_like of bool, shape (N,)
    by : str
        Metric that picks the best timestep: ``"tpr@1%fpr"`` (default — the low-FPR regime,
        Carlini et al. 2022), ``"tpr@0.1%fpr"``, ``"auc"`` or ``"balanced_accuracy"``.
    bootstrap, seed, fprs
        Passed to :func:`~memscan.mia.metrics.roc_metrics`.

    Examples
    --------
    >>> L = np.array([[0.1, 0.2, 0.9, 0.8], [0.5, 0.4, 0.45, 0.6]])
    >>> s = timestep_sweep(L, [10, 100], [True, True, False, False])
    >>> s.best_timestep, s.table["auc"].tolist()
    (10, [1.0, 0.75])
    """
    from memscan.mia.attacks import AttackInputs, LossThreshold

    ts = parse_timesteps(timesteps)
    L = np.asarray(losses, dtype=np.float64)
    if L.ndim != 2 or L.shape[0] != len(ts):
        raise InputError(
            f"losses: shape {L.shape}, expected ({len(ts)}, N) — one row per timestep",
            "pass the output of diffusion_loss",
        )
    allowed = ("auc", "balanced_accuracy", tpr_key(0.01), tpr_key(0.001))
    if by not in allowed:
        raise InputError(f"by: {by!r} is not a metric", f"choose one of {', '.join(allowed)}")
    attack = LossThreshold()
    results = [
        attack.fit_score(
            AttackInputs(target_loss=L[j], is_member=is_member, timestep=t), fprs=fprs, bootstrap=bootstrap, seed=seed
        )
        for j, t in enumerate(ts)
    ]
    table = AttackResultsTable(results)
    df = table.to_dataframe(ci=bootstrap > 0)
    y = as_labels(is_member, L.shape[1])
    df["mean_loss_members"] = [float(L[j][y].mean()) for j in range(len(ts))]
    df["mean_loss_nonmembers"] = [float(L[j][~y].mean()) for j in range(len(ts))]
    order = sorted(range(len(ts)), key=lambda j: (-df[by].iloc[j], -df["auc"].iloc[j], ts[j]))
    return TimestepSweep(ts, df, int(ts[order[0]]), by, table)

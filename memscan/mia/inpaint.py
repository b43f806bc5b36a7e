"""The inpainting attack: hide part of a known image, let the model fill it in, and measure how
close the fill is to the original.

Carlini et al. 2023 ("Extracting Training Data from Diffusion Models", §6.2) hide half of a
CIFAR-10 training image and inpaint it with models trained with and without that image: models
that saw it reconstruct it far more often. Here the reconstruction distance is a per-example
statistic like the loss — lower for members — so it feeds the same attacks and metrics
(:mod:`memscan.mia.attacks`, :func:`memscan.mia.metrics.roc_metrics`).

Inpainting with an unconditional or class-conditional noise predictor is RePaint (Lugmayr et
al., CVPR 2022, Algorithm 1): at every reverse step the *known* region is the original
forward-noised to that step and the *unknown* region is the model's reverse step; after a step,
the sample is sometimes pushed forward again by ``jump_length`` steps and re-denoised
(``jump_n_sample`` times), so that the unknown part harmonises with the known one. The schedule,
reverse step and forward jumps are diffusers' ``RePaintScheduler``; the loop is written out here
so that each example draws every random number from its own generator (its reconstruction
depends on the seed and its id only, not on its batch).

Users with their own inpainting model (e.g. a diffusers inpainting pipeline) pass a callable
``inpaint_fn(images, hidden, seeds) → reconstructions`` to :func:`inpaint_distances` instead of a
noise predictor; see :func:`pipeline_inpainter`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch

from memscan.errors import InputError
from memscan.generators.noise import repaint_scheduler, repaint_timesteps
from memscan.generators.seeds import derive_seed
from memscan.mia.loss import images_to_model_space
from memscan.mia.noise import NoisePredictor, as_noise_predictor, slice_condition

__all__ = [
    "REGIONS",
    "InpaintConfig",
    "InpaintResult",
    "inpaint_distances",
    "inpaint_mask",
    "masked_l2",
    "pipeline_inpainter",
    "repaint",
]

#: Shapes of the hidden region.
REGIONS = ("left", "right", "top", "bottom", "center", "random")


def inpaint_mask(
    shape: Sequence[int], region: str = "left", *, fraction: float = 0.5, seed: int = 0, example_id: Any = 0
) -> np.ndarray:
    """Boolean ``H×W`` mask, True where the image is **hidden** (to be inpainted).

    Parameters
    ----------
    shape : (H, W)
    region : {"left", "right", "top", "bottom", "center", "random"}
        ``left``/``right``/``top``/``bottom``: that side, ``round(fraction · W)`` columns (or
        ``· H`` rows) wide — half the image by default. ``center``: a centred box of area
        ``≈ fraction`` (sides ``round(sqrt(fraction) · H)`` × ``round(sqrt(fraction) · W)``).
        ``random``: each pixel hidden with probability ``fraction``, from a generator seeded by
        ``(seed, example_id)``.
    fraction : float
        Share of the image to hide, in (0, 1).

    Raises
    ------
    memscan.errors.InputError
        A mask that hides nothing (a side region of an image 1 pixel high or wide, a centre box of
        such an image, a random mask of a 1×1 image): no distance could be measured.

    Examples
    --------
    >>> inpaint_mask((2, 4)).astype(int).tolist()
    [[1, 1, 0, 0], [1, 1, 0, 0]]
    >>> inpaint_mask((4, 4), "center", fraction=0.25).astype(int).tolist()
    [[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]
    """
    if len(shape) != 2 or min(shape) < 1:
        raise InputError(f"mask shape {tuple(shape)} is not (H, W)")
    if region not in REGIONS:
        raise InputError(f"region: {region!r} is unknown", f"choose one of {', '.join(REGIONS)}")
    if not (0.0 < float(fraction) < 1.0):
        raise InputError(f"fraction: {fraction} is not in (0, 1)", "e.g. 0.5 hides half of the image")
    h, w = int(shape[0]), int(shape[1])
    m = np.zeros((h, w), dtype=bool)
    cols = min(w - 1, max(1, round(fraction * w)))
    rows = min(h - 1, max(1, round(fraction * h)))
    if region == "left":
        m[:, :cols] = True
    elif region == "right":
        m[:, w - cols :] = True
    elif region == "top":
        m[:rows, :] = True
    elif region == "bottom":
        m[h - rows :, :] = True
    elif region == "center":
        bh = min(h - 1, max(1, round(math.sqrt(fraction) * h)))
        bw = min(w - 1, max(1, round(math.sqrt(fraction) * w)))
        top, left = (h - bh) // 2, (w - bw) // 2
        m[top : top + bh, left : left + bw] = True
    else:
        rng = np.random.default_rng(derive_seed(seed, f"inpaint-mask/{example_id}", 0))
        m = rng.random((h, w)) < fraction
        if not m.any():
            m[rng.integers(h), rng.integers(w)] = True
        if m.all():
            m[rng.integers(h), rng.integers(w)] = False
    if not m.any():
        need = {"left": "2 columns", "right": "2 columns", "top": "2 rows", "bottom": "2 rows", "center": "2×2 pixels"}
        raise InputError(
            f"inpaint mask: the {region!r} region (fraction {fraction}) hides no pixel of an image of {h}×{w} "
            "pixels, so there is nothing to inpaint",
            f"the {region!r} region needs images of at least {need.get(region, '2 pixels')} (one hidden, one "
            "kept); use larger images or another --region",
        )
    return m


def masked_l2(a: np.ndarray, b: np.ndarray, hidden: np.ndarray) -> np.ndarray:
    """Normalised ℓ2 (DESIGN.md) inside the hidden region: ``sqrt(mean over hidden pixels and
    channels of (a − b)²)`` for images in ``[0, 1]`` (``N×H×W×C``; ``hidden`` ``H×W`` or
    ``N×H×W``). An image whose hidden region is empty is an :class:`~memscan.errors.InputError`
    (the mean would be 0/0).

    Examples
    --------
    >>> a = np.zeros((1, 2, 2, 1)); b = np.ones((1, 2, 2, 1)); b[0, :, 1] = 0
    >>> masked_l2(a, b, np.array([[True, False], [True, False]])).tolist()
    [1.0]
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    hid = np.broadcast_to(np.asarray(hidden, dtype=bool), a.shape[:3])
    sq = ((a - b) ** 2).mean(axis=3)
    count = hid.reshape(len(a), -1).sum(1)
    if (count == 0).any():
        first = int(np.flatnonzero(count == 0)[0])
        raise InputError(
            f"masked_l2: the hidden mask of {int((count == 0).sum())} image(s) is empty (first: image {first} "
            f"of {len(a)}, {a.shape[1]}×{a.shape[2]}), so the distance is undefined",
            "hide at least one pixel (inpaint_mask refuses masks that hide nothing)",
        )
    return np.sqrt(np.where(hid, sq, 0.0).reshape(len(a), -1).sum(1) / count)


@dataclass(frozen=True)
class InpaintConfig:
    """Settings of the inpainting attack (recorded in every run's manifest).

    Attributes
    ----------
    region, fraction
        The hidden region (:func:`inpaint_mask`); default the left half.
    num_inference_steps : int
        Reverse steps of the RePaint schedule (the paper: 250; fewer on a CPU).
    jump_length, jump_n_sample : int
        RePaint's ``j`` and ``r`` (the paper: 10 and 10): every ``jump_length`` steps, jump
        forward ``jump_length`` steps and denoise again, ``jump_n_sample − 1`` extra times.
        ``jump_n_sample = 1`` is plain replacement-based inpainting without resampling.
    eta : float
        Noise of the reverse step (1: DDPM, as in RePaint; 0: DDIM).
    samples : int
        Inpaintings per example; the distance is their mean.
    seed : int
    batch_size : int
        Examples per model call.
    """

    region: str = "left"
    fraction: float = 0.5
    num_inference_steps: int = 50
    jump_length: int = 5
    jump_n_sample: int = 3
    eta: float = 1.0
    samples: int = 1
    seed: int = 0
    batch_size: int = 64

    def validated(self, num_train_timesteps: int | None = None) -> InpaintConfig:
        """Check the settings; return them with the counts as ``int`` (``samples=2.0`` → ``2``).

        Parameters
        ----------
        num_train_timesteps : int, optional
            The noise predictor's ``T``. With it, the RePaint schedule is checked too
            (``num_inference_steps ≤ T``, ``jump_length < num_inference_steps`` when resampling);
            without it (an inpainter, which uses no schedule) only the settings every path uses.

        Raises
        ------
        memscan.errors.InputError
            An unknown region, a fraction outside (0, 1), a count that is not a positive integer,
            ``eta`` outside [0, 1], or a schedule the model cannot run.
        """
        if not isinstance(self.region, str) or self.region not in REGIONS:
            raise InputError(f"region: {self.region!r} is unknown", f"choose one of {', '.join(REGIONS)}")
        if not (0.0 < _real(self.fraction) < 1.0):
            raise InputError(f"fraction: {self.fraction} is not in (0, 1)", "e.g. 0.5 hides half of the image")
        for name in ("num_inference_steps", "jump_length", "jump_n_sample", "samples", "batch_size"):
            v = getattr(self, name)
            f = _real(v)
            if isinstance(v, bool) or not (math.isfinite(f) and f >= 1 and f == int(f)):
                raise InputError(f"{name}: {v!r} must be a positive integer", f"e.g. --{name.replace('_', '-')} 4")
        if not (0.0 <= _real(self.eta) <= 1.0):
            raise InputError(f"eta: {self.eta} is not in [0, 1]", "1: DDPM steps, as in RePaint; 0: DDIM")
        counts = ("num_inference_steps", "jump_length", "jump_n_sample", "samples", "batch_size")
        cfg = replace(self, **{name: int(getattr(self, name)) for name in counts})
        if num_train_timesteps is None:
            return cfg
        if cfg.num_inference_steps > num_train_timesteps:
            raise InputError(
                f"num_inference_steps: {cfg.num_inference_steps} exceeds the model's T = {num_train_timesteps}"
            )
        if cfg.jump_length >= cfg.num_inference_steps and cfg.jump_n_sample > 1:
            raise InputError(
                f"jump_length: {cfg.jump_length} must be below num_inference_steps ({cfg.num_inference_steps})"
            )
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def model_calls(self) -> int:
        """Model evaluations per example and sample (the length of the RePaint schedule's
        reverse steps)."""
        return len(_schedule(self.num_inference_steps, self.jump_length, self.jump_n_sample, 1000)[1])


def _real(v: Any) -> float:
    """``float(v)`` for a real number (bools excluded by the callers), NaN for anything else, so
    that every range check of a non-number fails and names the setting."""
    try:
        return float(v) if not isinstance(v, str) else math.nan
    except (TypeError, ValueError):
        return math.nan


def _channels(rec: np.ndarray, c: int) -> np.ndarray:
    """A pipeline's H×W(×C') output with ``c`` channels (1 or 3). Alpha (the 2nd channel of grey +
    alpha, the 4th of RGBA) is dropped; then grey → repeated, colour → grey as its mean."""
    if rec.ndim == 2:
        rec = rec[..., None]
    if rec.shape[-1] in (2, 4):  # grey + alpha, RGBA: drop alpha
        rec = rec[..., : rec.shape[-1] - 1]
    if rec.shape[-1] == c:
        return rec
    if rec.shape[-1] == 1:
        return np.repeat(rec, c, -1)
    return rec.mean(-1, keepdims=True) if c == 1 else rec[..., :c]


def _schedule(steps: int, jump_length: int, jump_n_sample: int, T: int):
    ts = repaint_timesteps(steps, jump_length, jump_n_sample, T)
    reverse = [t for i, t in enumerate(ts) if t < (ts[i - 1] if i else ts[0] + 1)]
    return ts, reverse


def _scheduler_for(p: NoisePredictor, eta: float):
    return repaint_scheduler(p.alphas_cumprod, eta)


@torch.no_grad()
def repaint(
    predictor: Any,
    images: Any,
    hidden: np.ndarray,
    *,
    condition: Any = None,
    config: InpaintConfig = InpaintConfig(),
    example_ids: Sequence[Any] | None = None,
    sample: int = 0,
) -> np.ndarray:
    """Inpaint the ``hidden`` pixels of each image with RePaint (Lugmayr et al. 2022, Alg. 1).

    Parameters
    ----------
    predictor : NoisePredictor (or anything :func:`~memscan.mia.noise.as_noise_predictor` wraps)
    images : array_like
        As for :func:`memscan.mia.loss.images_to_model_space` (uint8 ``N×H×W×C`` usually).
    hidden : numpy.ndarray of bool, ``H×W`` or ``N×H×W``
        True where the model must fill in.
    condition : optional
        Per-example (``(N,)`` class labels) or shared condition.
    config : InpaintConfig
    example_ids : sequence, optional
        Ids seeding each example's generator (default ``0..N−1``).
    sample : int
        Index of this inpainting among several of the same example (changes the seed).

    Returns
    -------
    numpy.ndarray, float32 ``N×H×W×C`` in ``[0, 1]``
        The reconstructions; known pixels equal the original (up to float rounding).

    Notes
    -----
    Per reverse step ``t → t_prev`` (``RePaintScheduler.step``)::

        known   = sqrt(ᾱ_prev) x_0 + sqrt(1 − ᾱ_prev) z
        unknown = sqrt(ᾱ_prev) x̂_0 + sqrt(1 − ᾱ_prev − σ_t²) ε̂ + σ_t z,  x̂_0 = (x_t − sqrt(1−ᾱ_t) ε̂)/sqrt(ᾱ_t)
        x_prev  = keep ⊙ known + (1 − keep) ⊙ unknown

    with ``σ_t = eta · sqrt((1−ᾱ_prev)/(1−ᾱ_t) · (1 − ᾱ_t/ᾱ_prev))``; a forward jump adds noise
    one training step at a time, ``x_{t+1} = sqrt(1−β_{t+1}) x_t + sqrt(β_{t+1}) z``
    (``undo_step``).

    Examples
    --------
    A predictor that knows the data is the single all-black image reconstructs it:

    >>> a = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    >>> x0 = -torch.ones(1, 1, 4, 4)
    >>> oracle = lambda x, t, c: (x - a[t].sqrt().float().view(-1, 1, 1, 1) * x0) / (
    ...     (1 - a[t]).sqrt().float().view(-1, 1, 1, 1))
    >>> img = np.zeros((2, 4, 4, 1), np.uint8)
    >>> out = repaint(as_noise_predictor(oracle, alphas_cumprod=a), img, inpaint_mask((4, 4)),
    ...               config=InpaintConfig(num_inference_steps=20, jump_length=5, jump_n_sample=2))
    >>> out.shape, float(np.abs(out).max()) < 0.02
    ((2, 4, 4, 1), True)
    """
    p = as_noise_predictor(predictor)
    T = int(p.alphas_cumprod.numel())
    cfg = config.validated(T)
    x0 = images_to_model_space(images)
    n, c, h, w = x0.shape
    hid = np.asarray(hidden, dtype=bool)
    if hid.shape == (h, w):
        hid = np.broadcast_to(hid, (n, h, w))
    if hid.shape != (n, h, w):
        raise InputError(f"hidden: shape {hid.shape}, expected ({h}, {w}) or ({n}, {h}, {w})")
    keep_all = torch.from_numpy(~hid).float().unsqueeze(1)  # 1 = known (diffusers' convention)
    ids = list(range(n)) if example_ids is None else list(example_ids)
    if len(ids) != n:
        raise InputError(f"example_ids: {len(ids)} ids for {n} images")
    sched = _scheduler_for(p, cfg.eta)
    sched.set_timesteps(cfg.num_inference_steps, jump_length=cfg.jump_length, jump_n_sample=cfg.jump_n_sample)
    out = np.empty((n, h, w, c), dtype=np.float32)
    dev = getattr(p, "device", torch.device("cpu"))
    for start in range(0, n, cfg.batch_size):
        idx = np.arange(start, min(n, start + cfg.batch_size))
        b = len(idx)
        # 1. one generator per example, seeded by (seed, example id, sample)
        gens = [torch.Generator("cpu").manual_seed(derive_seed(cfg.seed, f"inpaint/{ids[i]}", sample)) for i in idx]
        orig = x0[idx]
        keep = keep_all[idx]
        cond = slice_condition(condition, idx, n)
        # 2. start from pure noise (each example from its own generator)
        x = torch.stack([torch.randn((c, h, w), generator=g) for g in gens])
        t_last = int(sched.timesteps[0]) + 1
        for t in sched.timesteps.tolist():
            if t < t_last:
                # 3. reverse step: model for the unknown part, noised original for the known part
                tt = torch.full((b,), t, dtype=torch.long)
                eps = p.predict_noise(x.to(dev), tt.to(dev), cond).float().cpu()
                x = sched.step(eps, t, x, orig, keep, generator=gens).prev_sample
            else:
                # 4. forward jump: re-noise to the later timestep, then denoise again (resampling)
                x = sched.undo_step(x, t_last, generator=gens)
            t_last = t
        # 5. paste the exact known pixels back and map to [0, 1]
        x = keep * orig + (1 - keep) * x
        out[idx] = ((x.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    return out


@dataclass(frozen=True, eq=False)
class InpaintResult:
    """Reconstruction distances of the inpainting attack.

    Attributes
    ----------
    distance : numpy.ndarray, shape (N,)
        Mean over samples of the normalised ℓ2 inside the hidden region (lower = member-like).
    per_sample : numpy.ndarray, shape (samples, N)
    hidden : numpy.ndarray of bool, shape (N, H, W)
    reconstructions : numpy.ndarray or None
        First sample's reconstructions, float ``N×H×W×C`` in ``[0, 1]`` (when asked for).
    config : InpaintConfig
    """

    distance: np.ndarray
    per_sample: np.ndarray
    hidden: np.ndarray
    reconstructions: np.ndarray | None
    config: InpaintConfig


def inpaint_distances(
    model: Any,
    images: Any,
    config: InpaintConfig = InpaintConfig(),
    *,
    condition: Any = None,
    example_ids: Sequence[Any] | None = None,
    keep_images: bool = False,
) -> InpaintResult:
    """Hide a region of each image, inpaint it, and measure the distance to the original there.

    Parameters
    ----------
    model : NoisePredictor or callable
        A noise predictor (RePaint is used), or an *inpainter*: a callable with an attribute
        ``inpaints = True`` (see :func:`pipeline_inpainter`) called as
        ``inpaint_fn(images_uint8, hidden, seeds) → float N×H×W×C in [0, 1]``.
    images : uint8 ``N×H×W×C`` (or as :func:`~memscan.mia.loss.images_to_model_space` accepts)
    config : InpaintConfig
    condition : optional
        Passed to the noise predictor.
    example_ids : sequence, optional
        Ids seeding each example's randomness (default ``0..N−1``).
    keep_images : bool
        Keep the first sample's reconstructions in the result.

    Returns
    -------
    InpaintResult

    Raises
    ------
    memscan.errors.InputError
        Settings :meth:`InpaintConfig.validated` refuses (with an inpainter, all but the RePaint
        schedule's); an inpainter's reconstructions of another shape, not finite, or outside
        ``[0, 1]``.

    Examples
    --------
    >>> a = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    >>> dark = lambda x, t, c: (x + a[t].sqrt().float().view(-1, 1, 1, 1)) / (
    ...     (1 - a[t]).sqrt().float().view(-1, 1, 1, 1))  # knows only the all-black image
    >>> imgs = np.stack([np.zeros((4, 4, 1), np.uint8), np.full((4, 4, 1), 255, np.uint8)])
    >>> r = inpaint_distances(as_noise_predictor(dark, alphas_cumprod=a), imgs,
    ...                       InpaintConfig(num_inference_steps=20, jump_length=5, jump_n_sample=1))
    >>> [round(float(d), 2) for d in r.distance]  # the black image is "memorized"
    [0.0, 1.0]
    """
    # the settings are checked on both paths; the RePaint schedule only with a noise predictor
    inpainter = getattr(model, "inpaints", False) is True
    if inpainter:
        config = config.validated()
    else:
        model = as_noise_predictor(model)
        config = config.validated(int(model.alphas_cumprod.numel()))
    a = np.asarray(images) if not isinstance(images, torch.Tensor) else None
    if a is not None and a.ndim == 3:
        a = a[..., None]
    x01 = (images_to_model_space(images if a is None else a) + 1) / 2  # N×C×H×W in [0, 1]
    n, _, h, w = x01.shape
    ids = list(range(n)) if example_ids is None else list(example_ids)
    if len(ids) != n:
        raise InputError(f"example_ids: {len(ids)} ids for {n} images")
    hidden = np.stack(
        [inpaint_mask((h, w), config.region, fraction=config.fraction, seed=config.seed, example_id=i) for i in ids]
    )
    orig = x01.permute(0, 2, 3, 1).numpy()
    per = np.empty((config.samples, n))
    first = None
    for s in range(config.samples):
        if inpainter:
            seeds = [derive_seed(config.seed, f"inpaint/{i}", s) for i in ids]
            u8 = np.clip(np.round(orig * 255), 0, 255).astype(np.uint8)
            rec = _checked_reconstructions(model, model(u8, hidden, seeds), orig.shape)
        else:
            rec = repaint(
                model, images if a is None else a, hidden, condition=condition, config=config, example_ids=ids, sample=s
            )
        per[s] = masked_l2(rec, orig, hidden)
        if s == 0 and keep_images:
            first = rec
    return InpaintResult(per.mean(0), per, hidden, first, config)


def _checked_reconstructions(inpainter: Any, out: Any, shape: tuple) -> np.ndarray:
    """An inpainter's output as float32 ``N×H×W×C``: finite, in ``[0, 1]``, one per image; else one
    :class:`~memscan.errors.InputError` naming the inpainter (a distance from values outside
    ``[0, 1]`` would not be the normalised ℓ2 of DESIGN.md, which lies in ``[0, 1]``)."""
    name = getattr(inpainter, "__name__", None) or type(inpainter).__name__
    fix = (
        "return float reconstructions in [0, 1], one per image, N×H×W×C like the images it is given "
        "(e.g. a diffusers pipeline with output_type='np'; uint8 output divided by 255)"
    )
    try:
        rec = np.asarray(out, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise InputError(f"inpainter {name}: returned {type(out).__name__}, not numbers ({exc})", fix) from None
    if rec.shape != tuple(shape):
        raise InputError(f"inpainter {name}: returned shape {rec.shape}, expected {tuple(shape)}", fix)
    bad = ~np.isfinite(rec)
    outside = ~bad & ((rec < 0.0) | (rec > 1.0))
    if bad.any() or outside.any():
        what = []
        if bad.any():
            what.append(f"{int(bad.sum())} NaN/Inf value(s)")
        if outside.any():
            vals = rec[outside]
            what.append(f"{int(outside.sum())} value(s) outside [0, 1] (from {vals.min():.4g} to {vals.max():.4g})")
        first = int(np.flatnonzero((bad | outside).reshape(len(rec), -1).any(1))[0])
        raise InputError(
            f"inpainter {name}: reconstructions must be finite and in [0, 1]; got {' and '.join(what)} "
            f"(first in image {first})",
            fix,
        )
    return rec


def pipeline_inpainter(
    pipe: Any, prompts: Sequence[str] | str = "", **call_kwargs: Any
) -> Callable[[np.ndarray, np.ndarray, list[int]], np.ndarray]:
    """Adapt a diffusers inpainting pipeline (e.g. ``StableDiffusionInpaintPipeline``) to
    :func:`inpaint_distances`.

    The pipeline is called once per example as ``pipe(prompt=..., image=PIL, mask_image=PIL,
    generator=torch.Generator().manual_seed(seed), height=H, width=W, output_type="np",
    **call_kwargs)`` with diffusers' mask convention (white = repaint), and its ``images[0]``
    (float ``H×W×C`` in ``[0, 1]``) is taken as the reconstruction; known pixels are pasted back
    from the original so the distance only sees the hidden region.

    Parameters
    ----------
    pipe : a diffusers inpainting pipeline (or anything with that call signature)
    prompts : str or sequence of str
        One prompt for all examples, or one per example (e.g. their captions).
    call_kwargs
        Extra arguments for the pipeline (``num_inference_steps``, ``guidance_scale``, …).

    Examples
    --------
    >>> class Grey:  # stands in for a pipeline: paints the hidden region mid-grey
    ...     def __call__(self, prompt, image, mask_image, generator, height, width, output_type):
    ...         from types import SimpleNamespace
    ...         return SimpleNamespace(images=[np.full((height, width, 1), 0.5, np.float32)])
    >>> fn = pipeline_inpainter(Grey())
    >>> imgs = np.zeros((1, 2, 2, 1), np.uint8)
    >>> inpaint_distances(fn, imgs).distance.tolist()
    [0.5]
    """
    from PIL import Image

    def fn(images: np.ndarray, hidden: np.ndarray, seeds: list[int]) -> np.ndarray:
        n, h, w, c = images.shape
        ps = [prompts] * n if isinstance(prompts, str) else list(prompts)
        if len(ps) != n:
            raise InputError(f"pipeline_inpainter: {len(ps)} prompts for {n} images", "pass one prompt per image")
        out = np.empty(images.shape, dtype=np.float32)
        for i in range(n):
            img = Image.fromarray(images[i, :, :, 0] if c == 1 else images[i], mode="L" if c == 1 else "RGB")
            mask = Image.fromarray((hidden[i] * 255).astype(np.uint8), mode="L")
            g = torch.Generator("cpu").manual_seed(int(seeds[i]))
            res = pipe(
                prompt=ps[i],
                image=img,
                mask_image=mask,
                generator=g,
                height=h,
                width=w,
                output_type="np",
                **call_kwargs,
            )
            rec = _channels(np.asarray(res.images[0], dtype=np.float32), c)
            known = ~hidden[i][..., None]
            out[i] = np.where(known, images[i] / 255.0, rec)
        return out

    fn.inpaints = True  # type: ignore[attr-defined]
    fn.__name__ = f"pipeline_inpainter({type(pipe).__name__})"  # as errors name it
    return fn

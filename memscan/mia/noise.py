"""Noise prediction ``ε_θ(x_t, t, condition)``: the one model interface that membership inference,
inpainting and triage need.

A :class:`NoisePredictor` is anything with

- ``alphas_cumprod`` — the training noise schedule ``ᾱ_t`` (a 1-D float64 CPU tensor of length
  ``T``, the number of training timesteps), and
- ``predict_noise(x_t, t, condition=None) → ε̂`` — for a batch ``x_t`` of shape ``B×C×H×W`` in
  model space (images scaled to ``[-1, 1]``) and integer timesteps ``t`` of shape ``(B,)``.

The forward process is DDPM's (Ho et al. 2020, eq. 4): ``x_t = sqrt(ᾱ_t)·x_0 +
sqrt(1 − ᾱ_t)·ε`` with ``ε ~ N(0, I)``.

Implementations:

- :class:`DiffusersNoisePredictor` — a diffusers ``UNet2DModel`` (unconditional, or
  class-conditional with ``condition`` = class labels) or ``UNet2DConditionModel`` (``condition``
  = encoder hidden states, e.g. text embeddings) plus the ``alphas_cumprod`` of its scheduler.
  Models trained to predict ``v`` or ``x_0`` (``prediction_type`` of the scheduler) are converted
  to ``ε``; a learned-variance output (``2C`` channels) keeps its first ``C`` channels.
- :class:`CallableNoisePredictor` — a plain function ``fn(x_t, t, condition) → ε̂``.

:func:`as_noise_predictor` wraps any of these; :func:`load_noise_predictor` loads one from a
directory saved with ``save_pretrained`` (safetensors only) or a ``py:module:attribute`` spec.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from memscan.errors import InputError
from memscan.safe_load import low_mem_kwargs
from memscan.user_code import import_object

__all__ = [
    "CallableNoisePredictor",
    "DiffusersNoisePredictor",
    "NoisePredictor",
    "alphas_cumprod_of",
    "as_noise_predictor",
    "load_noise_predictor",
    "slice_condition",
]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@runtime_checkable
class NoisePredictor(Protocol):
    """Predicts the noise of a noised batch (see the module docstring)."""

    alphas_cumprod: torch.Tensor

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, condition: Any = None) -> torch.Tensor: ...


def _as_alphas(alphas_cumprod: Any) -> torch.Tensor:
    a = torch.as_tensor(np.asarray(alphas_cumprod, dtype=np.float64)).detach().cpu()
    if a.ndim != 1 or a.numel() < 2:
        raise InputError(
            f"alphas_cumprod: expected a 1-D schedule of length T ≥ 2, got shape {tuple(a.shape)}",
            "pass scheduler.alphas_cumprod",
        )
    if not torch.isfinite(a).all() or (a <= 0).any() or (a > 1).any() or (a[1:] > a[:-1]).any():
        raise InputError(
            "alphas_cumprod: must be finite, in (0, 1] and non-increasing",
            "pass the cumulative product of (1 − β_t) of the model's training schedule",
        )
    return a


def alphas_cumprod_of(scheduler: Any) -> torch.Tensor:
    """``ᾱ_t`` of a diffusers scheduler (or any object with ``alphas_cumprod`` or ``betas``).

    Examples
    --------
    >>> from diffusers import DDPMScheduler
    >>> a = alphas_cumprod_of(DDPMScheduler(num_train_timesteps=10))
    >>> a.shape, a.dtype
    (torch.Size([10]), torch.float64)
    """
    if hasattr(scheduler, "alphas_cumprod"):
        return _as_alphas(torch.as_tensor(scheduler.alphas_cumprod).double())
    if hasattr(scheduler, "betas"):
        return _as_alphas(torch.cumprod(1.0 - torch.as_tensor(scheduler.betas).double(), 0))
    raise InputError(
        f"scheduler {type(scheduler).__name__} has neither alphas_cumprod nor betas",
        "pass a diffusers scheduler, or alphas_cumprod directly",
    )


def _to_epsilon(out: torch.Tensor, x_t: torch.Tensor, a: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Convert a model output to ``ε̂`` (``a`` = ``ᾱ_t`` broadcast to ``B×1×1×1``).

    With ``x_t = √ᾱ x_0 + √(1−ᾱ) ε``: ``v = √ᾱ ε − √(1−ᾱ) x_0`` (Salimans & Ho 2022, §4) gives
    ``ε = √ᾱ v + √(1−ᾱ) x_t``; an ``x_0`` prediction gives ``ε = (x_t − √ᾱ x̂_0) / √(1−ᾱ)``.
    """
    if prediction_type == "epsilon":
        return out
    if prediction_type == "v_prediction":
        return a.sqrt() * out + (1 - a).sqrt() * x_t
    return (x_t - a.sqrt() * out) / (1 - a).sqrt()


def slice_condition(condition: Any, idx: np.ndarray | Sequence[int], n: int) -> Any:
    """The condition of examples ``idx`` out of a condition for ``n`` examples.

    ``None`` and scalars (one class label for every example) are shared; arrays, tensors and
    lists whose first dimension is ``n`` are indexed per example.

    Examples
    --------
    >>> slice_condition(3, [0, 2], 5), slice_condition(None, [1], 5)
    (3, None)
    >>> slice_condition(np.array([7, 8, 9]), [2, 0], 3).tolist()
    [9, 7]
    """
    if condition is None or isinstance(condition, (int, np.integer)):
        return condition
    idx = np.asarray(idx, dtype=np.int64)
    if isinstance(condition, torch.Tensor):
        if condition.ndim == 0:
            return condition
        _check_len(condition.shape[0], n)
        return condition[torch.from_numpy(idx).to(condition.device)]
    if isinstance(condition, np.ndarray):
        if condition.ndim == 0:
            return condition
        _check_len(condition.shape[0], n)
        return condition[idx]
    if isinstance(condition, (list, tuple)):
        _check_len(len(condition), n)
        return [condition[int(i)] for i in idx]
    return condition  # an opaque object shared by every example


def _check_len(m: int, n: int) -> None:
    if m != n:
        raise InputError(
            f"condition: has {m} entries for {n} examples",
            "pass one condition per example, or a single one shared by all",
        )


class DiffusersNoisePredictor:
    """``ε_θ`` of a diffusers ``UNet2DModel`` or ``UNet2DConditionModel``.

    Parameters
    ----------
    unet : diffusers.UNet2DModel or diffusers.UNet2DConditionModel
    scheduler : diffusers scheduler, optional
        Source of ``alphas_cumprod`` and ``prediction_type`` (when those are not given).
    alphas_cumprod : array_like, optional
        ``ᾱ_t`` of the training schedule (length ``T``).
    prediction_type : {"epsilon", "v_prediction", "sample"}, optional
        What the model predicts (default: the scheduler's, else ``"epsilon"``).
    null_class : int, optional
        Class label trained as "no condition" (classifier-free guidance); recorded for callers.
    class_captions : list of str, optional
        Caption of each class id (memscan's ``memscan.json``); recorded for callers.
    device : str
    dtype : torch.dtype
        Dtype the model runs in (inputs are cast to it; outputs come back as float32).

    Notes
    -----
    ``condition`` of :meth:`predict_noise`:

    - ``UNet2DModel``: ``None`` (unconditional), an int class label for the whole batch, or a
      ``(B,)`` array/tensor of class labels.
    - ``UNet2DConditionModel``: the ``encoder_hidden_states`` tensor ``B×S×D`` (or ``S×D``,
      shared by the batch), or a dict of keyword arguments for the UNet (``encoder_hidden_states``,
      ``added_cond_kwargs``, …).

    Examples
    --------
    >>> from diffusers import DDPMScheduler, UNet2DModel
    >>> unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
    ...                    down_block_types=("DownBlock2D", "DownBlock2D"),
    ...                    up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    >>> p = DiffusersNoisePredictor(unet, DDPMScheduler(num_train_timesteps=100))
    >>> p.predict_noise(torch.zeros(2, 1, 8, 8), torch.tensor([5, 50])).shape
    torch.Size([2, 1, 8, 8])
    """

    def __init__(
        self,
        unet: Any,
        scheduler: Any = None,
        *,
        alphas_cumprod: Any = None,
        prediction_type: str | None = None,
        null_class: int | None = None,
        class_captions: list[str] | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        source: str | None = None,
    ):
        if alphas_cumprod is None:
            if scheduler is None:
                raise InputError(
                    "DiffusersNoisePredictor: needs the scheduler or alphas_cumprod",
                    "pass the scheduler the model was trained with",
                )
            alphas_cumprod = alphas_cumprod_of(scheduler)
        self.alphas_cumprod = _as_alphas(alphas_cumprod)
        if prediction_type is None:
            cfg = getattr(scheduler, "config", None) or {}
            prediction_type = cfg.get("prediction_type", "epsilon") if hasattr(cfg, "get") else "epsilon"
        if prediction_type not in PREDICTION_TYPES:
            raise InputError(
                f"prediction_type {prediction_type!r} is not supported",
                f"choose one of {', '.join(PREDICTION_TYPES)}",
            )
        self.prediction_type = prediction_type
        name = type(unet).__name__
        if name == "UNet2DConditionModel" or "encoder_hidden_states" in inspect.signature(unet.forward).parameters:
            self.kind = "unet2d_condition"
        else:
            self.kind = "unet2d"
        self.device = torch.device(device)
        self.dtype = dtype
        unet = unet.to(self.device)
        if next(unet.parameters()).dtype != dtype:
            unet = unet.to(dtype=dtype)
        self.unet = unet.eval()
        cfg = unet.config
        self.in_channels = int(cfg["in_channels"])
        size = cfg.get("sample_size")
        if isinstance(size, int):
            size = (size, size)
        self.sample_shape = (self.in_channels, *size) if size else None
        self.num_class_embeds = cfg.get("num_class_embeds")
        self.null_class = null_class
        self.class_captions = list(class_captions) if class_captions else None
        self.config = {
            "type": f"diffusers-{self.kind}",
            "model_class": name,
            "source": source,
            "prediction_type": prediction_type,
            "num_train_timesteps": int(self.alphas_cumprod.numel()),
            "conditional": self.kind == "unet2d_condition" or self.num_class_embeds is not None,
            "null_class": null_class,
            "sample_shape": list(self.sample_shape) if self.sample_shape else None,
            "dtype": str(dtype).replace("torch.", ""),
        }

    def class_of(self, caption: str) -> int:
        """Class id whose caption (in ``class_captions``) is ``caption``."""
        if not self.class_captions:
            raise InputError("the model records no class captions", "pass class labels as the condition")
        try:
            return self.class_captions.index(caption)
        except ValueError:
            raise InputError(
                f"caption {caption[:60]!r} is not one of the model's {len(self.class_captions)} class captions",
                "use the null class (condition 'null') or pass class labels",
            ) from None

    @torch.no_grad()
    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, condition: Any = None) -> torch.Tensor:
        """``ε̂`` for the batch ``x_t`` (``B×C×H×W``, model space) at timesteps ``t`` (``(B,)``)."""
        b = x_t.shape[0]
        # 1. inputs on the model's device and dtype
        x = x_t.to(self.device, self.dtype)
        tt = torch.as_tensor(t, device=self.device).long().reshape(-1).expand(b)
        # 2. the conditioning, as the model's forward wants it
        kwargs: dict[str, Any] = {}
        if self.kind == "unet2d":
            if condition is not None:
                labels = torch.as_tensor(
                    np.asarray(condition) if not isinstance(condition, torch.Tensor) else condition
                )
                kwargs["class_labels"] = labels.to(self.device).long().reshape(-1).expand(b)
            elif self.num_class_embeds is not None:
                raise InputError(
                    "this UNet2DModel is class-conditional: a class label (condition) is needed",
                    "pass class labels, or the null class for an unconditional estimate",
                )
        else:
            if condition is None:
                raise InputError(
                    "UNet2DConditionModel needs encoder_hidden_states as the condition",
                    "pass the text embeddings (B×S×D) of each example's prompt",
                )
            if isinstance(condition, dict):
                kwargs.update(condition)
            else:
                h = torch.as_tensor(condition).to(self.device, self.dtype)
                kwargs["encoder_hidden_states"] = h.expand(b, *h.shape) if h.ndim == 2 else h
        # 3. one forward pass
        out = self.unet(x, tt, **kwargs, return_dict=False)[0]
        if out.shape[1] == 2 * x.shape[1]:  # learned variance: ε̂ is the first C channels
            out = out[:, : x.shape[1]]
        # 4. whatever the model predicts, return ε̂
        out = out.float()
        if self.prediction_type != "epsilon":
            a = self.alphas_cumprod.to(self.device)[tt].float().view(-1, 1, 1, 1)
            out = _to_epsilon(out, x.float(), a, self.prediction_type)
        return out


class CallableNoisePredictor:
    """Wrap ``fn(x_t, t, condition) → prediction`` with its training schedule.

    Parameters
    ----------
    fn : callable
        Takes a float32 ``B×C×H×W`` tensor, a ``(B,)`` long tensor of timesteps and the batch's
        condition (or None); returns a tensor (or array) of the same shape as ``x_t``.
    alphas_cumprod : array_like
        ``ᾱ_t`` of the schedule the model was trained with.
    prediction_type : {"epsilon", "v_prediction", "sample"}

    Examples
    --------
    The Bayes-optimal predictor when the data is the single image ``x_0 = 0``:
    ``x_t = √(1−ᾱ_t) ε`` so ``ε = x_t / √(1−ᾱ_t)``:

    >>> a = np.linspace(0.99, 0.01, 10)
    >>> fn = lambda x, t, c: x / torch.sqrt(1 - torch.as_tensor(a)[t].float()).view(-1, 1, 1, 1)
    >>> p = CallableNoisePredictor(fn, a)
    >>> eps = torch.randn(3, 1, 4, 4)
    >>> t = torch.tensor([0, 4, 9])
    >>> x_t = torch.sqrt(1 - torch.as_tensor(a)[t].float()).view(-1, 1, 1, 1) * eps
    >>> bool(torch.allclose(p.predict_noise(x_t, t), eps, atol=1e-5))
    True
    """

    def __init__(
        self, fn: Callable[..., Any], alphas_cumprod: Any, *, prediction_type: str = "epsilon", name: str | None = None
    ):
        if not callable(fn):
            raise InputError(f"{name or fn!r} is not callable", "pass fn(x_t, t, condition) → ε̂")
        if prediction_type not in PREDICTION_TYPES:
            raise InputError(
                f"prediction_type {prediction_type!r} is not supported", f"choose one of {', '.join(PREDICTION_TYPES)}"
            )
        self.fn = fn
        self.alphas_cumprod = _as_alphas(alphas_cumprod)
        self.prediction_type = prediction_type
        self.sample_shape = None
        self.null_class = None
        self.class_captions = None
        self.config = {
            "type": "callable",
            "source": name or getattr(fn, "__qualname__", type(fn).__name__),
            "prediction_type": prediction_type,
            "num_train_timesteps": int(self.alphas_cumprod.numel()),
        }

    @torch.no_grad()
    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, condition: Any = None) -> torch.Tensor:
        out = self.fn(x_t, t, condition)
        if not isinstance(out, torch.Tensor):
            out = torch.as_tensor(np.asarray(out))
        if tuple(out.shape) != tuple(x_t.shape):
            raise InputError(
                f"noise predictor {self.config['source']}: returned shape {tuple(out.shape)} for input "
                f"{tuple(x_t.shape)}",
                "return one prediction per input, with the input's shape",
            )
        out = out.to(x_t.device).float()
        if self.prediction_type != "epsilon":
            a = self.alphas_cumprod.to(x_t.device)[t.long()].float().view(-1, 1, 1, 1)
            out = _to_epsilon(out, x_t.float(), a, self.prediction_type)
        return out


def as_noise_predictor(
    obj: Any,
    *,
    scheduler: Any = None,
    alphas_cumprod: Any = None,
    prediction_type: str | None = None,
    device: str = "cpu",
    name: str | None = None,
) -> NoisePredictor:
    """Wrap ``obj`` as a :class:`NoisePredictor`.

    ``obj`` may already be one (returned as is); a diffusers UNet (needs ``scheduler`` or
    ``alphas_cumprod``); a diffusers pipeline with ``unet`` and ``scheduler``; or a callable
    ``fn(x_t, t, condition)`` (needs ``alphas_cumprod`` or ``scheduler``).

    Examples
    --------
    >>> p = as_noise_predictor(lambda x, t, c: torch.zeros_like(x), alphas_cumprod=[0.9, 0.5, 0.1])
    >>> type(p).__name__, p.alphas_cumprod.tolist()
    ('CallableNoisePredictor', [0.9, 0.5, 0.1])
    """
    if hasattr(obj, "predict_noise") and hasattr(obj, "alphas_cumprod") and not inspect.isclass(obj):
        return obj
    if hasattr(obj, "unet") and hasattr(obj, "scheduler"):  # a pipeline
        return DiffusersNoisePredictor(
            obj.unet,
            scheduler or obj.scheduler,
            alphas_cumprod=alphas_cumprod,
            prediction_type=prediction_type,
            device=device,
            source=name,
        )
    if hasattr(obj, "config") and isinstance(obj, torch.nn.Module):
        return DiffusersNoisePredictor(
            obj, scheduler, alphas_cumprod=alphas_cumprod, prediction_type=prediction_type, device=device, source=name
        )
    if callable(obj):
        if alphas_cumprod is None:
            if scheduler is None:
                raise InputError(
                    f"noise predictor {name or obj!r}: a plain callable needs alphas_cumprod (or a scheduler)",
                    "pass the ᾱ_t schedule the model was trained with",
                )
            alphas_cumprod = alphas_cumprod_of(scheduler)
        return CallableNoisePredictor(obj, alphas_cumprod, prediction_type=prediction_type or "epsilon", name=name)
    raise InputError(
        f"{name or type(obj).__name__} is not a noise predictor",
        "pass a diffusers UNet with its scheduler, or fn(x_t, t, condition) with alphas_cumprod",
    )


def load_noise_predictor(
    spec: str | Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> NoisePredictor:
    """Load a noise predictor from a model spec.

    - ``py:module:attribute`` / ``py:file.py:attribute`` — a :class:`NoisePredictor` object, or a
      zero-argument factory returning one (or a diffusers pipeline);
    - a directory saved with ``save_pretrained``: a pipeline (``unet/``, ``scheduler/``) or a UNet
      directory, holding a ``UNet2DModel`` or ``UNet2DConditionModel``. Weights load through
      safetensors only. A ``memscan.json`` beside them supplies ``class_captions`` and
      ``null_class``; a missing scheduler falls back to diffusers' ``DDPMScheduler()`` defaults
      (linear β, T = 1000) — a warning is recorded in ``config["warnings"]``.
    """
    spec = str(spec)
    if spec.startswith("py:"):
        obj = import_object(spec, "a noise predictor or a factory of one")
        if callable(obj) and not hasattr(obj, "predict_noise"):
            try:
                required = [
                    p
                    for p in inspect.signature(obj).parameters.values()
                    if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                ]
            except (TypeError, ValueError):
                required = [None]
            if not required:
                obj = obj()
        return as_noise_predictor(obj, device=device, name=spec)
    root = Path(spec)
    if not root.is_dir():
        raise InputError(
            f"model {spec} is not a directory or py:module:attribute",
            "pass a diffusers directory (save_pretrained) or py:module:attribute",
        )
    from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel

    unet_dir = root / "unet" if (root / "unet").is_dir() else root
    sched_dir = root / "scheduler" if (root / "scheduler").is_dir() else root
    cfg_path = unet_dir / "config.json"
    if not cfg_path.exists():
        raise InputError(
            f"{spec}: no UNet found (expected unet/config.json or config.json)",
            "save the model with save_pretrained (UNet or pipeline)",
        )
    cls_name = json.loads(cfg_path.read_text()).get("_class_name", "UNet2DModel")
    classes = {"UNet2DModel": UNet2DModel, "UNet2DConditionModel": UNet2DConditionModel}
    if cls_name not in classes:
        raise InputError(
            f"{spec}: the UNet is a {cls_name}",
            "memscan loads UNet2DModel and UNet2DConditionModel; wrap others as py:",
        )
    try:
        unet = classes[cls_name].from_pretrained(unet_dir, use_safetensors=True, **low_mem_kwargs())
    except OSError as exc:
        raise InputError(
            f"{spec}: cannot load the UNet ({str(exc).splitlines()[0]})",
            "memscan reads safetensors weights only (save_pretrained(..., safe_serialization=True))",
        ) from None
    warnings = []
    if (sched_dir / "scheduler_config.json").exists():
        scheduler = DDPMScheduler.from_pretrained(sched_dir)
    else:
        scheduler = DDPMScheduler()
        warnings.append("no scheduler_config.json: assumed DDPMScheduler() defaults (linear betas, T = 1000)")
    meta = json.loads((root / "memscan.json").read_text()) if (root / "memscan.json").exists() else {}
    p = DiffusersNoisePredictor(
        unet,
        scheduler,
        null_class=meta.get("null_class"),
        class_captions=meta.get("class_captions"),
        device=device,
        dtype=dtype,
        source=str(root),
    )
    p.config["warnings"] = warnings
    return p

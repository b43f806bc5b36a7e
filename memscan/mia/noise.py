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
directory saved with ``save_pretrained`` (safetensors, or a ``.bin`` read weights-only) or a
``py:module:attribute`` spec.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from memscan.devices import check_device
from memscan.errors import InputError
from memscan.generators.noise import (
    PREDICTION_TYPES,
    DiffusersNoisePredictor,
    alphas_cumprod_of,
    as_alphas,
    load_diffusers_noise_predictor,
    to_epsilon,
)
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


@runtime_checkable
class NoisePredictor(Protocol):
    """Predicts the noise of a noised batch (see the module docstring)."""

    alphas_cumprod: torch.Tensor

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, condition: Any = None) -> torch.Tensor: ...


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
        self.alphas_cumprod = as_alphas(alphas_cumprod)
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
            out = to_epsilon(out, x_t.float(), a, self.prediction_type)
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
      safetensors, or — a ``.bin``/``.pt`` without one — ``torch.load(weights_only=True)``, as
      ``memscan extract`` reads them (:func:`memscan.safe_load.load_state_dict`). A ``memscan.json`` beside them supplies ``class_captions`` and
      ``null_class``. The scheduler is the class its ``scheduler_config.json`` names; a missing or
      damaged one is an error naming the file (the noise schedule is never assumed).
    """
    check_device(device)
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
    return load_diffusers_noise_predictor(spec, device=device, dtype=dtype)

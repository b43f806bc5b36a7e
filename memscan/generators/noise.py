"""The diffusers noise-predictor adapter and the scheduler helpers that membership inference,
inpainting and triage use: ``ε_θ(x_t, t, condition)`` of a ``UNet2DModel`` or
``UNet2DConditionModel`` with its scheduler's ``ᾱ_t`` (the protocol is
:class:`memscan.mia.noise.NoisePredictor`).

The forward process is DDPM's (Ho et al. 2020, eq. 4): ``x_t = sqrt(ᾱ_t)·x_0 +
sqrt(1 − ᾱ_t)·ε``. Models trained to predict ``v`` or ``x_0`` are converted to ``ε``.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memscan.devices import check_device
from memscan.errors import InputError
from memscan.generators.diffusers_models import load_scheduler, load_unet, model_dirs, read_meta

__all__ = [
    "PREDICTION_TYPES",
    "DiffusersNoisePredictor",
    "alphas_cumprod_of",
    "as_alphas",
    "ddim_scheduler_like",
    "load_diffusers_noise_predictor",
    "repaint_scheduler",
    "repaint_timesteps",
    "to_epsilon",
]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def as_alphas(alphas_cumprod: Any) -> torch.Tensor:
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
        return as_alphas(torch.as_tensor(scheduler.alphas_cumprod).double())
    if hasattr(scheduler, "betas"):
        return as_alphas(torch.cumprod(1.0 - torch.as_tensor(scheduler.betas).double(), 0))
    raise InputError(
        f"scheduler {type(scheduler).__name__} has neither alphas_cumprod nor betas",
        "pass a diffusers scheduler, or alphas_cumprod directly",
    )


def to_epsilon(out: torch.Tensor, x_t: torch.Tensor, a: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Convert a model output to ``ε̂`` (``a`` = ``ᾱ_t`` broadcast to ``B×1×1×1``).

    With ``x_t = √ᾱ x_0 + √(1−ᾱ) ε``: ``v = √ᾱ ε − √(1−ᾱ) x_0`` (Salimans & Ho 2022, §4) gives
    ``ε = √ᾱ v + √(1−ᾱ) x_t``; an ``x_0`` prediction gives ``ε = (x_t − √ᾱ x̂_0) / √(1−ᾱ)``.
    """
    if prediction_type == "epsilon":
        return out
    if prediction_type == "v_prediction":
        return a.sqrt() * out + (1 - a).sqrt() * x_t
    return (x_t - a.sqrt() * out) / (1 - a).sqrt()


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
        self.alphas_cumprod = as_alphas(alphas_cumprod)
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
            out = to_epsilon(out, x.float(), a, self.prediction_type)
        return out


def load_diffusers_noise_predictor(
    spec: str | Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> DiffusersNoisePredictor:
    """A :class:`DiffusersNoisePredictor` from a directory saved with ``save_pretrained``: a
    pipeline (``unet/``, ``scheduler/``) or a UNet directory, holding a ``UNet2DModel`` or
    ``UNet2DConditionModel``. Weights load through safetensors only. A ``memscan.json`` beside
    them supplies ``class_captions`` and ``null_class``. The scheduler is the class its
    ``scheduler_config.json`` names; a missing or damaged one is an error naming the file (the
    noise schedule is never assumed: :func:`memscan.generators.diffusers_models.load_scheduler`)."""
    check_device(device)
    root = Path(spec)
    unet_dir, sched_dir = model_dirs(root)
    unet = load_unet(unet_dir, str(spec))
    scheduler = load_scheduler(sched_dir)
    meta = read_meta(root)
    p = DiffusersNoisePredictor(
        unet,
        scheduler,
        null_class=meta.get("null_class"),
        class_captions=meta.get("class_captions"),
        device=device,
        dtype=dtype,
        source=str(root),
    )
    return p


def repaint_timesteps(steps: int, jump_length: int, jump_n_sample: int, num_train_timesteps: int) -> list[int]:
    """The timesteps of a RePaint schedule (Lugmayr et al. 2022), resampling jumps included."""
    from diffusers import RePaintScheduler

    s = RePaintScheduler(num_train_timesteps=num_train_timesteps)
    s.set_timesteps(steps, jump_length=jump_length, jump_n_sample=jump_n_sample)
    return s.timesteps.tolist()


def repaint_scheduler(alphas_cumprod: torch.Tensor, eta: float):
    """A diffusers ``RePaintScheduler`` on the training schedule ``ᾱ_t`` (its β recovered as
    ``1 − ᾱ_t / ᾱ_{t−1}``), clipping samples to ``[-1, 1]``."""
    from diffusers import RePaintScheduler

    a = alphas_cumprod.double()
    betas = 1.0 - a / torch.cat([torch.ones(1, dtype=a.dtype), a[:-1]])
    return RePaintScheduler(
        num_train_timesteps=int(a.numel()), trained_betas=betas.float().numpy(), eta=float(eta), clip_sample=True
    )


def ddim_scheduler_like(scheduler: Any):
    """A deterministic DDIM scheduler with ``scheduler``'s noise schedule (its config)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(scheduler.config)

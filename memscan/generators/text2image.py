"""Diffusers text-to-image pipelines (Stable Diffusion, SDXL, …) as a :class:`Generator`.

This is the path of the paper's headline attack on Stable Diffusion (Carlini et al. 2023, §4):
each prompt is sampled many times with the pipeline's own sampler and classifier-free guidance,
and distances are computed on the **decoded** images.

Loading: a local directory written by ``save_pretrained`` (``model_index.json`` naming e.g.
``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``) or a hub id, through
``AutoPipelineForText2Image`` (falling back to ``DiffusionPipeline`` for other text-to-image
classes), with ``use_safetensors=True`` — nothing goes through pickle. A safety checker, when
the pipeline has one, is not loaded: it would replace flagged images by black squares and hide
exactly the copies the attack looks for.

Seeds: every sample gets its own ``torch.Generator`` (on the CPU, so that the same seed gives
the same noise on every device) seeded by the memscan seed ``derive_seed(run seed, prompt id,
sample index)``. The initial latents are drawn here, one per seed, and handed to the pipeline;
a stochastic scheduler draws its per-step noise from the same per-sample generators. So an image
depends on its seed alone and any single generation can be reproduced without its batch — up to
float rounding: kernels differ with the batch size at ~1e-6, which can move a pixel that sits on
a rounding boundary by one grey level. The same seeds in the same batches give identical bytes.

An optional ``memscan.json`` beside ``model_index.json`` sets sampling defaults for the model
(``num_inference_steps``, ``guidance_scale``, ``scheduler``, ``resolution``).
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from memscan.devices import precision
from memscan.errors import InputError
from memscan.generators.base import check_generations
from memscan.generators.diffusers_models import read_meta

#: ``--scheduler`` names → diffusers scheduler classes (built from the pipeline's own config).
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-ancestral": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "lms": "LMSDiscreteScheduler",
}


def resolve_dtype(dtype: str | None, device: str):
    """The torch dtype for ``dtype`` on ``device`` (``auto``: fp16 on CUDA, fp32 on CPU).

    Examples
    --------
    >>> str(resolve_dtype("auto", "cpu")), str(resolve_dtype("auto", "cuda")), str(resolve_dtype("bf16", "cuda"))
    ('torch.float32', 'torch.float16', 'torch.bfloat16')
    >>> str(resolve_dtype("float16", "cpu")), str(resolve_dtype("FP32", "cuda"))
    ('torch.float16', 'torch.float32')
    """
    import torch

    name = precision(dtype)  # any spelling (fp16, float16, …); others: one error
    if name == "auto":
        name = "float16" if str(device).startswith("cuda") else "float32"
    return getattr(torch, name)


def is_text2image_index(index: dict) -> bool:
    """Whether a ``model_index.json`` describes a text-conditioned pipeline (it has a text
    encoder or a tokenizer component)."""
    return any(k in index for k in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"))


class Text2ImageGenerator:
    """Sample a diffusers text-to-image pipeline with one ``torch.Generator`` per sample.

    Parameters
    ----------
    pipeline : a diffusers text-to-image pipeline (``StableDiffusionPipeline``, SDXL, …)
    num_inference_steps : sampler steps per image (SD default: 50)
    guidance_scale : classifier-free guidance scale (SD default: 7.5; 1 disables guidance)
    height, width : output resolution in pixels (default: the UNet's native resolution)
    batch_size : images per pipeline call
    device : ``cpu``, ``cuda`` or ``cuda:N``
    scheduler : one of :data:`SCHEDULERS` (default: the pipeline's own)
    negative_prompt : the unconditional prompt of guidance (default: empty)
    source : recorded in the manifest

    Examples
    --------
    >>> from memscan.testing.tiny_sd import build_tiny_sd
    >>> gen = Text2ImageGenerator(build_tiny_sd(), num_inference_steps=2, guidance_scale=2.0)
    >>> x = gen.generate("a red square", [7, 8])
    >>> x.shape, x.dtype.name, gen.output_shape
    ((2, 32, 32, 3), 'uint8', (32, 32, 3))
    >>> alone = gen.generate("a red square", [8])[0]             # a sample reproduced alone
    >>> int(np.abs(alone.astype(int) - x[1]).max()) <= 1            # equal up to float rounding
    True
    """

    def __init__(
        self,
        pipeline,
        *,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        height: int | None = None,
        width: int | None = None,
        batch_size: int = 8,
        device: str = "cpu",
        scheduler: str | None = None,
        negative_prompt: str | None = None,
        source: str | None = None,
    ):
        import torch

        if num_inference_steps < 1:
            raise InputError(f"num_inference_steps={num_inference_steps}", "use at least 1 sampler step")
        if batch_size < 1:
            raise InputError(f"batch_size={batch_size}", "use at least 1")
        # 1. the pipeline on its device, with the chosen scheduler, without progress bars
        self.pipe = pipeline.to(device)
        if hasattr(self.pipe, "set_progress_bar_config"):
            self.pipe.set_progress_bar_config(disable=True)
        if scheduler is not None:
            self.pipe.scheduler = make_scheduler(scheduler, self.pipe.scheduler)
        self.device, self.batch_size = device, int(batch_size)
        self.steps, self.guidance_scale = int(num_inference_steps), float(guidance_scale)
        self.negative_prompt = negative_prompt
        # 2. resolution: explicit, else the denoiser's native size × the VAE's scale factor
        unet = getattr(self.pipe, "unet", None)
        scale = int(getattr(self.pipe, "vae_scale_factor", 8))
        native_h = native_w = None
        if unet is not None:  # an int, or (height, width) as diffusers' pipelines read it
            size = unet.config.sample_size
            native_h, native_w = (size, size) if isinstance(size, int) else (size[0], size[1])
            native_h, native_w = native_h * scale, native_w * scale
        height, width = height or native_h, width or native_w
        if height is None or width is None:
            raise InputError(
                f"cannot tell the output resolution of {type(self.pipe).__name__}", "pass --height and --width"
            )
        if height % scale or width % scale:
            raise InputError(
                f"resolution {height}×{width} is not a multiple of the VAE scale factor {scale}",
                f"use multiples of {scale}",
            )
        self.height, self.width = int(height), int(width)
        self.output_shape = (self.height, self.width, 3)
        # 3. initial latents are drawn here when the pipeline takes SD-style latents
        self.latent_shape = None
        if unet is not None and hasattr(self.pipe, "prepare_latents"):
            self.latent_shape = (int(unet.config.in_channels), self.height // scale, self.width // scale)
        self.dtype = next(iter(p.dtype for p in (unet or self.pipe.vae).parameters()))
        # 4. UNet evaluations per image, as the pipeline's loop makes them: one per timestep the
        #    scheduler runs (PNDM's Runge-Kutta warm-up adds some), two with classifier-free
        #    guidance, which diffusers applies when guidance_scale > 1 and the UNet does not
        #    embed the guidance itself (time_cond_proj_dim: LCM-distilled UNets)
        counting = type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)
        try:
            counting.set_timesteps(self.steps)
        except Exception as exc:  # e.g. PNDM's Runge-Kutta warm-up with 1 or 2 steps
            raise InputError(
                f"the {type(counting).__name__} cannot sample {self.steps} steps ({type(exc).__name__}: {exc})",
                "use more --steps, or another --scheduler",
            ) from exc
        self.timesteps_per_generation = len(counting.timesteps)
        embedded = unet is not None and getattr(unet.config, "time_cond_proj_dim", None) is not None
        self.guided = self.guidance_scale > 1 and not embedded
        self._torch = torch
        self.config = {
            "type": "diffusers-text2image",
            "pipeline": type(self.pipe).__name__,
            "source": source,
            "scheduler": type(self.pipe.scheduler).__name__,
            "num_inference_steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "negative_prompt": negative_prompt,
            "resolution": [self.height, self.width],
            "dtype": str(self.dtype).replace("torch.", ""),
            "initial_noise": "memscan: randn(C×h×w, float32) per sample on CPU" if self.latent_shape else "pipeline",
        }

    @property
    def evaluations_per_generation(self) -> int:
        """UNet evaluations per image: one per timestep the scheduler runs for ``num_inference_steps``
        (``len(scheduler.timesteps)``: the steps, plus PNDM's Runge-Kutta warm-up), two with
        classifier-free guidance (diffusers guides when ``guidance_scale > 1`` and the UNet has no
        guidance embedding, ``time_cond_proj_dim``)."""
        return self.timesteps_per_generation * (2 if self.guided else 1)

    # 1. noise -------------------------------------------------------------------------------
    def generators(self, seeds: list[int]) -> list:
        """One CPU ``torch.Generator`` per sample, seeded by its memscan seed."""
        return [self._torch.Generator("cpu").manual_seed(int(s)) for s in seeds]

    def initial_latents(self, prompt: str, seeds: list[int], generators: list):
        """The initial latent of every sample: ``randn(C×h×w)`` in float32 from its own generator
        (on the CPU, so identical on every device), cast to the pipeline's dtype."""
        torch = self._torch
        x = torch.stack([torch.randn(self.latent_shape, generator=g, dtype=torch.float32) for g in generators])
        return x.to(self.device, self.dtype)

    # 2. sampling -----------------------------------------------------------------------------
    def generate(self, prompt: str, seeds: list[int]) -> np.ndarray:
        seeds = list(seeds)
        parts = [self._sample(prompt, seeds[s : s + self.batch_size]) for s in range(0, len(seeds), self.batch_size)]
        out = np.concatenate(parts) if parts else np.zeros((0, *self.output_shape), np.uint8)
        return check_generations(out, len(seeds), prompt, f"{self.config['pipeline']} pipeline")

    def _sample(self, prompt: str, seeds: list[int]) -> np.ndarray:
        n = len(seeds)
        gens = self.generators(seeds)
        kwargs: dict[str, Any] = {
            "prompt": [prompt] * n,
            "num_inference_steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "height": self.height,
            "width": self.width,
            "generator": gens,
            "output_type": "np",
        }
        if self.negative_prompt is not None:
            kwargs["negative_prompt"] = [self.negative_prompt] * n
        if self.latent_shape is not None:
            kwargs["latents"] = self.initial_latents(prompt, seeds, gens)
        with self._torch.inference_mode():
            images = self.pipe(**kwargs).images
        images = np.asarray(images, dtype=np.float32)
        if not np.isfinite(images).all():
            raise InputError(
                f"the pipeline produced NaN/Inf for prompt {prompt[:60]!r} ({self.config['dtype']})",
                "fp16 overflow is common in some VAEs: try --dtype bf16 or fp32",
            )
        # decoded images in [0, 1] → uint8 (round half to even, as check_generations does)
        return np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)


def make_scheduler(name: str, current):
    """A scheduler of kind ``name`` (see :data:`SCHEDULERS`) built from ``current``'s config."""
    import diffusers

    key = name.lower()
    if key not in SCHEDULERS:
        raise InputError(f"unknown scheduler {name!r}", f"choose one of {', '.join(SCHEDULERS)}")
    return getattr(diffusers, SCHEDULERS[key]).from_config(current.config)


def load_pipeline(spec: str, *, device: str = "cpu", dtype: str | None = None):
    """Load a text-to-image pipeline from a directory or hub id (safetensors only)."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise InputError(
            "text-to-image pipelines need the transformers package (text encoder, tokenizer)",
            "pip install 'memscan[t2i]'",
        ) from None
    with quiet_loading():  # importing the pipelines makes transformers warn about torchvision
        from diffusers import AutoPipelineForText2Image, DiffusionPipeline
    torch_dtype = resolve_dtype(dtype, device)
    root = Path(spec)
    index = {}
    if root.is_dir() and (root / "model_index.json").exists():
        index = json.loads((root / "model_index.json").read_text(encoding="utf-8"))
    kwargs: dict[str, Any] = {"torch_dtype": torch_dtype, "use_safetensors": True}
    if "safety_checker" in index:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        with quiet_loading():
            try:
                pipe = AutoPipelineForText2Image.from_pretrained(spec, **kwargs)
            except (ValueError, KeyError):
                # a text-to-image class AutoPipeline does not map: load it as what it says it is
                pipe = DiffusionPipeline.from_pretrained(spec, **kwargs)
    except OSError as exc:
        raise InputError(
            f"cannot load text-to-image pipeline {spec!r} ({str(exc).splitlines()[0]})",
            "check the path or hub id; weights must be safetensors",
        ) from None
    return pipe


@contextlib.contextmanager
def quiet_loading():
    """Silence diffusers/transformers progress bars and deprecation chatter while loading."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    levels = dlog.get_verbosity(), tlog.get_verbosity()
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        dlog.set_verbosity(levels[0])
        tlog.set_verbosity(levels[1])
        dlog.enable_progress_bar()
        tlog.enable_progress_bar()


def load_text2image_generator(
    spec: str,
    *,
    device: str = "cpu",
    batch_size: int = 8,
    dtype: str | None = None,
    scheduler: str | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str | None = None,
    **unused,
) -> Text2ImageGenerator:
    """Load a text-to-image pipeline (directory or hub id) as a generator.

    Explicit options win over ``memscan.json`` in the directory, which wins over the defaults
    (50 steps, guidance 7.5, the pipeline's scheduler and native resolution).
    """
    unknown = {k: v for k, v in unused.items() if v is not None}
    if unknown:
        raise InputError(
            f"option(s) {', '.join(unknown)} do not apply to text-to-image pipelines",
            "use num_inference_steps, guidance_scale, scheduler, dtype, height, width",
        )
    root = Path(spec)
    meta = read_meta(root) if root.is_dir() else {}
    res = meta.get("resolution")
    pipe = load_pipeline(spec, device=device, dtype=dtype)
    return Text2ImageGenerator(
        pipe,
        num_inference_steps=num_inference_steps or meta.get("num_inference_steps", 50),
        guidance_scale=guidance_scale if guidance_scale is not None else meta.get("guidance_scale", 7.5),
        height=height or res,
        width=width or res,
        batch_size=batch_size,
        device=device,
        scheduler=scheduler or meta.get("scheduler"),
        negative_prompt=negative_prompt,
        source=str(spec),
    )

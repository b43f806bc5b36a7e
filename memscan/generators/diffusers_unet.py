"""Diffusers unconditional and class-conditional image models as a :class:`Generator`.

Accepts a directory holding a ``UNet2DModel`` and a scheduler saved with ``save_pretrained``
— either a pipeline directory (``model_index.json``, ``unet/``, ``scheduler/``, as written by
``DDPMPipeline``/``DDIMPipeline``) or the two sub-folders alone — or a hub id for users with a
network. Weights load through safetensors (``use_safetensors=True``); nothing goes through pickle.

An optional ``memscan.json`` beside them records how to turn a prompt into a class label
(``class_captions``: the caption of each class id) and the sampling defaults the model was
trained for (sampler, steps, guidance scale, null class for classifier-free guidance).

Sampling is an explicit loop so that every sample draws its initial noise and its per-step
noise from its own ``torch.Generator`` seeded by the memscan seed: the image depends on its seed,
and on the batch it was in only through float rounding (kernels differ with the batch size at
~1e-6, which can move a pixel that sits on a rounding boundary by one grey level). The same seeds
in the same batches give identical bytes; ``extract-unconditional`` therefore calls the model on
whole batches at global multiples of its batch size, whatever the shard size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from memscan.errors import InputError
from memscan.generators.base import check_generations
from memscan.generators.diffusers_models import (
    FIT_HINT,
    load_scheduler,
    load_weights_only,
    misfit,
    model_dirs,
    read_meta,
    read_model_json,
    scheduler_from_config,
)
from memscan.safe_load import low_mem_kwargs

SAMPLERS = ("ddim", "ddpm")


class DiffusersUNetGenerator:
    """Sample from a (class-conditional) ``UNet2DModel`` with a DDIM or DDPM scheduler.

    Parameters
    ----------
    unet : diffusers.UNet2DModel
    scheduler : a diffusers scheduler (its config is reused for the chosen sampler)
    class_captions : list of str, optional
        Caption of each class id; a prompt equal to one of them selects that class. Without it,
        prompts must be integer class ids (or anything, for an unconditional model).
    sampler : {"ddim", "ddpm"}
    num_inference_steps : int
    guidance_scale : float
        Classifier-free guidance; needs ``null_class`` (the label trained as "no condition").
    null_class : int, optional
    batch_size : int
    device : str
    """

    def __init__(
        self,
        unet,
        scheduler,
        *,
        class_captions: list[str] | None = None,
        sampler: str = "ddim",
        num_inference_steps: int = 25,
        guidance_scale: float = 1.0,
        null_class: int | None = None,
        batch_size: int = 64,
        device: str = "cpu",
        eta: float = 0.0,
        source: str | None = None,
    ):
        from diffusers import DDIMScheduler, DDPMScheduler

        if sampler not in SAMPLERS:
            raise InputError(f"unknown sampler {sampler!r}", f"choose one of {', '.join(SAMPLERS)}")
        if guidance_scale != 1.0 and null_class is None:
            raise InputError(
                "guidance_scale != 1 needs a null class (the label trained as 'no condition')",
                "set null_class in memscan.json or use guidance_scale=1",
            )
        self.unet = unet.to(device).eval()
        cls = DDIMScheduler if sampler == "ddim" else DDPMScheduler
        self.scheduler = cls.from_config(scheduler.config)
        self.class_captions = list(class_captions) if class_captions else None
        self._caption_to_class = {c: i for i, c in enumerate(self.class_captions)} if self.class_captions else {}
        self.num_class_embeds = unet.config.get("num_class_embeds")
        self.sampler, self.steps, self.eta = sampler, int(num_inference_steps), float(eta)
        self.guidance_scale, self.null_class = float(guidance_scale), null_class
        self.batch_size, self.device = int(batch_size), device
        cfg = unet.config
        size = cfg["sample_size"]  # an int, or (height, width) as diffusers allows
        h, w = (size, size) if isinstance(size, int) else (size[0], size[1])
        self.shape = (int(cfg["in_channels"]), int(h), int(w))
        self.config = {
            "type": "diffusers-unet2d",
            "source": source,
            "sampler": sampler,
            "num_inference_steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "eta": self.eta,
            "null_class": null_class,
            "conditional": self.num_class_embeds is not None,
            "resolution": list(self.shape[1:]),
            "channels": self.shape[0],
        }

    @property
    def evaluations_per_generation(self) -> int:
        """UNet evaluations per image: one per sampler step, two when guided (conditional model,
        ``guidance_scale != 1``), as :meth:`_sample` calls the UNet."""
        guided = self.num_class_embeds is not None and self.guidance_scale != 1.0
        return self.steps * (2 if guided else 1)

    # 1. prompt → class label ------------------------------------------------------------
    def class_of(self, prompt: str) -> int | None:
        """The class id a prompt selects (None for an unconditional model)."""
        if self.num_class_embeds is None:
            return None
        if prompt in self._caption_to_class:
            return self._caption_to_class[prompt]
        try:
            label = int(str(prompt).strip())
        except ValueError:
            raise InputError(
                f"prompt {prompt[:60]!r} is neither a known caption nor a class id",
                "for class-conditional models give class ids 0.."
                f"{self.num_class_embeds - 1} or captions listed in memscan.json",
            ) from None
        if not 0 <= label < self.num_class_embeds:
            raise InputError(f"class id {label} is outside 0..{self.num_class_embeds - 1}")
        return label

    # 2. sampling -----------------------------------------------------------------------------
    def generate(self, prompt: str, seeds: list[int]) -> np.ndarray:
        label = self.class_of(prompt)
        parts = [self._sample(label, seeds[s : s + self.batch_size]) for s in range(0, len(seeds), self.batch_size)]
        out = np.concatenate(parts) if parts else np.zeros((0, *self.shape[1:], self.shape[0]), np.uint8)
        return check_generations(out, len(seeds), prompt, "diffusers model")

    @torch.no_grad()
    def _sample(self, label: int | None, seeds: list[int]) -> np.ndarray:
        n = len(seeds)
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        # Initial noise per sample from its own generator (on CPU: identical on every device).
        x = torch.stack([torch.randn(self.shape, generator=g) for g in gens]).to(self.device)
        sched = self.scheduler
        sched.set_timesteps(self.steps)
        labels = None
        if label is not None:
            labels = torch.full((n,), label, dtype=torch.long, device=self.device)
        guided = labels is not None and self.guidance_scale != 1.0
        for t in sched.timesteps:
            if guided:
                both = torch.cat([labels, torch.full_like(labels, self.null_class)])
                eps = self.unet(torch.cat([x, x]), t, class_labels=both).sample
                cond, uncond = eps.chunk(2)
                eps = uncond + self.guidance_scale * (cond - uncond)
            else:
                eps = self.unet(x, t, class_labels=labels).sample
            # diffusers draws per-sample noise from a list of generators (randn_tensor).
            if self.sampler == "ddim":
                x = sched.step(eps, t, x, eta=self.eta, generator=gens).prev_sample
            else:
                x = sched.step(eps, t, x, generator=gens).prev_sample
        img = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return img.permute(0, 2, 3, 1).cpu().numpy()


def sampling_defaults(meta: dict) -> dict:
    """A UNet2DModel directory's sampling schedule: its ``memscan.json`` values, else 50 steps and
    guidance 1 (no guidance). Triage reads it too, so its score is taken at the schedule the
    extraction samples with."""
    return {
        "num_inference_steps": meta.get("num_inference_steps", 50),
        "guidance_scale": meta.get("guidance_scale", 1.0),
    }


def load_unet_generator(path: str, *, device: str = "cpu", batch_size: int = 64, **overrides):
    """Load a pipeline or UNet+scheduler directory (or hub id) as a generator.

    The scheduler is the class its ``scheduler_config.json`` names, with its noise schedule; a
    missing or damaged config (or UNet config, or ``memscan.json``) is an :class:`InputError`
    naming the file, never diffusers' default schedule."""
    from diffusers import DDPMScheduler, UNet2DModel

    root = Path(path)
    meta: dict = {}
    if root.is_dir():
        unet_dir, sched_dir = model_dirs(root)
        if not (unet_dir / "config.json").exists():
            raise InputError(
                f"{path}: no UNet2DModel found (expected unet/config.json or config.json)",
                "save the model with UNet2DModel.save_pretrained or DDPMPipeline.save_pretrained",
            )
        meta = read_meta(root)
        scheduler = load_scheduler(sched_dir)  # before the weights: a damaged config fails at once
        unet = _load_unet(unet_dir)
        source = str(root)
    else:
        unet = UNet2DModel.from_pretrained(path, subfolder="unet", use_safetensors=True, **low_mem_kwargs())
        config = DDPMScheduler.load_config(path, subfolder="scheduler")
        scheduler = scheduler_from_config(config, f"{path}/scheduler/scheduler_config.json")
        source = path
    kwargs = {
        "class_captions": meta.get("class_captions"),
        "sampler": meta.get("sampler", "ddim"),
        **sampling_defaults(meta),
        "null_class": meta.get("null_class"),
    }
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    return DiffusersUNetGenerator(unet, scheduler, batch_size=batch_size, device=device, source=source, **kwargs)


def _load_unet(unet_dir: Path):
    """UNet2DModel from a folder: safetensors, or .bin/.pt through weights-only loading."""
    from diffusers import UNet2DModel

    from memscan.safe_load import PICKLE_SUFFIXES, find_weights

    read_model_json(unet_dir / "config.json")  # damaged: one error naming it
    weights = find_weights(unet_dir)
    if weights is None:
        raise InputError(
            f"{unet_dir}: no weights file (diffusion_pytorch_model.safetensors)", "save the model with save_pretrained"
        )
    if not weights.name.endswith(PICKLE_SUFFIXES):  # safetensors, one file or sharded
        try:
            return UNet2DModel.from_pretrained(unet_dir, use_safetensors=True, **low_mem_kwargs())
        except (ValueError, RuntimeError) as exc:  # the weights do not fit the config (shapes, names)
            raise InputError(
                f"{unet_dir / 'config.json'} does not fit the UNet's weights ({misfit(exc)})", FIT_HINT
            ) from None
    return load_weights_only(UNet2DModel, unet_dir, weights)

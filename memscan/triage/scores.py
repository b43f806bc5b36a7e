"""One-step (or few-step) memorization scores of text-to-image prompts.

Both scores run the first ``steps`` denoising steps of the model's sampler from a few initial
noises per prompt — a handful of UNet evaluations instead of the extraction attack's
``samples_per_prompt × num_inference_steps × 2`` — and are higher for prompts the model has
memorized, so they rank which prompts deserve the full attack.

- **Wen et al. (ICLR 2024)**, "Detecting, Explaining, and Mitigating Memorization in Diffusion
  Models", §3: the magnitude of the text-conditional noise prediction,
  ``d = (1/S) Σ_{steps} ||ε_θ(x_t, c_prompt) − ε_θ(x_t, c_empty)||₂``, averaged over a few
  generations. A memorized prompt pulls every noise towards the same image, so its conditional
  and unconditional predictions differ strongly already at the first step.
- **Webster (2023)**, "A Reproducible Extraction of Training Images from Diffusion Models", white-box
  attack: how far one sampling step moves the latent, ``mean((z_0 − z_after_one_step)²)``, where
  ``z_0`` is the initial latent and ``z_after_one_step`` the latent after the sampler's first
  step (deterministic DDIM with classifier-free guidance), averaged over generations.

Noise: generation ``i`` of prompt ``p`` starts from ``randn(C×h×w)`` (float32, on the CPU) drawn
by a ``torch.Generator`` seeded with ``derive_seed(seed, p, i)`` — the same initial noise as the
extraction attack's sample ``i`` — so the scores are deterministic under a seed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from memscan.errors import InputError
from memscan.generators.seeds import derive_seed

#: Score names (columns of the triage table).
SCORES = ("wen", "webster")


@dataclass(frozen=True)
class TriageConfig:
    """Parameters of ``memscan triage`` (recorded in its manifest).

    Parameters
    ----------
    generations : initial noises per prompt (Wen et al. average over a few; default 4)
    steps : denoising steps scored, the first ``steps`` of the schedule (Wen: 1 already separates)
    num_inference_steps : length of the DDIM schedule those steps come from (None: the model's
        ``memscan.json`` value, else 50)
    guidance_scale : classifier-free guidance used to advance the latent (None: model's, else 7.5)
    seed : run seed (generation i of prompt p uses derive_seed(seed, p, i))
    batch_size : generations per UNet call (each call evaluates 2 × batch_size latents)
    device : ``cpu``, ``cuda`` or ``cuda:N``
    dtype : ``auto`` (fp16 on CUDA, fp32 on CPU), ``fp32``, ``fp16``, ``bf16``
    """

    generations: int = 4
    steps: int = 1
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int = 0
    batch_size: int = 32
    device: str = "cpu"
    dtype: str = "auto"

    def validate(self) -> TriageConfig:
        if self.generations < 1:
            raise InputError(f"generations={self.generations}", "use at least 1 generation per prompt")
        if self.steps < 1:
            raise InputError(f"steps={self.steps}", "score at least 1 denoising step")
        if self.num_inference_steps is not None and self.steps > self.num_inference_steps:
            raise InputError(
                f"steps={self.steps} exceeds num_inference_steps={self.num_inference_steps}",
                "score at most the whole schedule",
            )
        if self.batch_size < 1:
            raise InputError(f"batch_size={self.batch_size}", "use at least 1")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


class TriageModel:
    """The pieces of a Stable-Diffusion-family pipeline that the scores need.

    Parameters
    ----------
    pipe : a pipeline with ``unet``, ``tokenizer``/``text_encoder`` (via ``encode_prompt``) and a
        scheduler whose config builds a ``DDIMScheduler`` (StableDiffusionPipeline and kin)
    device : where to run
    """

    #: ``unet.config.addition_embed_type`` values this class supplies (None: no added conditioning).
    ADDED_CONDITIONING: tuple = (None,)

    def __init__(self, pipe, device: str = "cpu"):
        import torch

        from memscan.generators.noise import ddim_scheduler_like

        needed = [a for a in ("unet", "encode_prompt", "scheduler") if not hasattr(pipe, a)]
        if needed:
            raise InputError(
                f"{type(pipe).__name__} lacks {', '.join(needed)}; triage scores need a UNet text-to-image pipeline",
                "use a Stable Diffusion (v1/v2-style) pipeline",
            )
        added = getattr(pipe.unet.config, "addition_embed_type", None)
        if added not in self.ADDED_CONDITIONING:
            raise InputError(
                f"{type(pipe).__name__}'s UNet takes added conditioning {added!r}, which {type(self).__name__} does "
                f"not supply (it supports {', '.join(map(repr, self.ADDED_CONDITIONING))})",
                "use text2image_triage_model, which picks the SDXL-style scorer for 'text_time'; other added "
                "conditioning has no triage score: run `memscan extract --adaptive` (or `memscan audit`, which falls back)",
            )
        self.pipe = pipe.to(device)
        self.device = device
        self.unet = pipe.unet
        self.dtype = next(iter(self.unet.parameters())).dtype
        # deterministic DDIM (eta = 0) with the model's own noise schedule
        self.scheduler = ddim_scheduler_like(pipe.scheduler)
        scale = int(getattr(pipe, "vae_scale_factor", 8))
        size = self.unet.config.sample_size
        size = size if isinstance(size, int) else size[0]
        self.latent_shape = (int(self.unet.config.in_channels), int(size), int(size))
        self.vae_scale = scale
        self._torch = torch

    def predict(self, x, t, condition):
        """``ε_θ(x, t, c)`` for a batch of text embeddings ``condition``."""
        return self.unet(x, t, encoder_hidden_states=condition).sample

    def embed(self, prompts: list[str]):
        """Text embeddings of ``prompts`` and of the empty prompt (the unconditional input)."""
        with self._torch.inference_mode():
            cond, uncond = self.pipe.encode_prompt(prompts, self.device, 1, True, negative_prompt=[""] * len(prompts))
        return cond, uncond

    def initial_latents(self, prompt_id: str, indices: range, seed: int):
        """``randn(C×h×w)`` per generation from its own CPU generator (the extraction's noise)."""
        torch = self._torch
        x = [
            torch.randn(
                self.latent_shape,
                generator=torch.Generator("cpu").manual_seed(derive_seed(seed, prompt_id, i)),
                dtype=torch.float32,
            )
            for i in indices
        ]
        return torch.stack(x)


class SDXLTriageModel(TriageModel):
    """An SDXL-style pipeline (UNet with ``addition_embed_type="text_time"``) as triage sees it.

    The condition of a prompt is what ``StableDiffusionXLPipeline.__call__`` feeds its UNet:
    the two encoders' concatenated hidden states (``encoder_hidden_states``), the second
    encoder's pooled projection (``text_embeds``) and the six size/crop ``time_ids``
    (original size, crop top-left (0, 0), target size — the generation's resolution). The
    unconditional input is the pipeline's own negative conditioning: with
    ``force_zeros_for_empty_prompt`` (SDXL's default) zero embeddings, otherwise the encoded
    ``negative_prompt`` (empty by default), with the same ``time_ids`` — exactly what the
    pipeline pairs with the prompt under classifier-free guidance. A condition is a tuple
    ``(hidden states, text_embeds, time_ids)``.

    Parameters
    ----------
    pipe : a ``StableDiffusionXLPipeline`` (or kin: ``encode_prompt`` returning four tensors,
        ``_get_add_time_ids``)
    device : where to run
    negative_prompt : the unconditional prompt of guidance (None: the pipeline's default)
    resolution : ``(height, width)`` of the generations (None: the UNet's native size)
    """

    ADDED_CONDITIONING = ("text_time",)

    def __init__(self, pipe, device: str = "cpu", negative_prompt: str | None = None, resolution=None):
        super().__init__(pipe, device)
        if not hasattr(pipe, "_get_add_time_ids"):
            raise InputError(
                f"{type(pipe).__name__} takes SDXL's added conditioning but cannot build its time ids",
                "use a StableDiffusionXLPipeline",
            )
        native = (self.latent_shape[1] * self.vae_scale, self.latent_shape[2] * self.vae_scale)
        self.resolution = tuple(int(v) for v in (resolution or native))
        self.negative_prompt = negative_prompt

    def embed(self, prompts: list[str]):
        """``(hidden states, text_embeds, time_ids)`` of ``prompts`` and of the negative conditioning."""
        torch = self._torch
        negative = None if self.negative_prompt is None else [self.negative_prompt] * len(prompts)
        with torch.inference_mode():
            cond, uncond, pooled, pooled_u = self.pipe.encode_prompt(
                prompt=prompts,
                device=self.device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=True,
                negative_prompt=negative,
            )
        # 1. time ids as the pipeline builds them: original size, crop (0, 0), target size
        enc2 = getattr(self.pipe, "text_encoder_2", None)
        proj = int(pooled.shape[-1]) if enc2 is None else int(enc2.config.projection_dim)
        ids = self.pipe._get_add_time_ids(self.resolution, (0, 0), self.resolution, cond.dtype, proj)
        ids = ids.to(self.device).repeat(len(prompts), 1)
        return (cond, pooled, ids), (uncond, pooled_u, ids)

    def predict(self, x, t, condition):
        """``ε_θ(x, t, c)`` with the added conditioning of ``condition``."""
        hidden, pooled, ids = condition
        return self.unet(
            x, t, encoder_hidden_states=hidden, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}
        ).sample


def text2image_triage_model(pipe, device: str = "cpu", negative_prompt: str | None = None, resolution=None):
    """The triage model of a text-to-image pipeline: :class:`SDXLTriageModel` when its UNet takes
    SDXL's added conditioning (``text_time``), else :class:`TriageModel` (which refuses other
    added conditioning with a clear error)."""
    unet = getattr(pipe, "unet", None)
    if unet is not None and getattr(unet.config, "addition_embed_type", None) == "text_time":
        return SDXLTriageModel(pipe, device, negative_prompt=negative_prompt, resolution=resolution)
    return TriageModel(pipe, device)


def concat_conditions(a, b):
    """Concatenate two batches of conditions along the batch axis (tensors, or tuples of them)."""
    import torch

    if isinstance(a, tuple):
        return tuple(torch.cat([x, y]) for x, y in zip(a, b))
    return torch.cat([a, b])


class ClassTriageModel:
    """A class- or caption-conditional ``UNet2DModel`` (the demo model) as triage sees it.

    The condition of a prompt is its class label (a caption listed in ``memscan.json``'s
    ``class_captions``, or an integer id); the unconditional input — Wen et al.'s empty prompt —
    is the ``null_class`` the model was trained with for classifier-free guidance (label
    dropout). A model without a null class has no unconditional prediction: the Wen score does
    not apply to it, and this class refuses it (the audit then falls back to its adaptive first
    round).

    Parameters
    ----------
    generator : a :class:`memscan.generators.diffusers_unet.DiffusersUNetGenerator`
    device : where to run
    """

    def __init__(self, generator, device: str = "cpu"):
        import torch

        from memscan.generators.noise import ddim_scheduler_like

        reason = class_triage_gap(generator)
        if reason:
            raise InputError(reason, "run `memscan extract --adaptive` directly (or `memscan audit`, which falls back)")
        self.pipe = generator
        self.unet = generator.unet.to(device)
        self.device = device
        self.dtype = next(iter(self.unet.parameters())).dtype
        self.scheduler = ddim_scheduler_like(generator.scheduler)
        self.latent_shape = tuple(int(v) for v in generator.shape)
        self.null_class = int(generator.null_class)
        self._torch = torch

    def embed(self, prompts: list[str]):
        """Class labels of ``prompts`` and the null class (the unconditional input)."""
        torch = self._torch
        labels = torch.tensor([self.pipe.class_of(p) for p in prompts], dtype=torch.long, device=self.device)
        return labels, torch.full_like(labels, self.null_class)

    def initial_latents(self, prompt_id: str, indices: range, seed: int):
        """``randn(C×H×W)`` per generation from its own CPU generator (the extraction's noise)."""
        return TriageModel.initial_latents(self, prompt_id, indices, seed)

    def predict(self, x, t, condition):
        """``ε_θ(x, t, c)`` for a batch of class labels ``condition``."""
        return self.unet(x, t, class_labels=condition).sample


def class_triage_gap(generator) -> str | None:
    """Why the triage scores cannot apply to a UNet generator (None when they can)."""
    if getattr(generator, "num_class_embeds", None) is None:
        return "the model has no conditioning (an unconditional UNet): no prompt to score"
    if getattr(generator, "null_class", None) is None:
        return (
            "the class-conditional model names no null_class (the label trained as 'no condition'), so it has no "
            "unconditional prediction and the Wen score does not apply"
        )
    return None


def score_prompts(model: TriageModel, prompt_ids: list[str], prompts: list[str], config: TriageConfig) -> dict:
    """Wen and Webster scores of every prompt; returns ``{"wen": array, "webster": array, ...}``.

    Every (prompt, generation) pair is one row of a flat work list, processed ``batch_size`` rows
    at a time; each row's result depends on its own noise only.
    """
    torch = model._torch
    config = config.validate()
    sched = model.scheduler
    sched.set_timesteps(config.num_inference_steps)
    timesteps = sched.timesteps[: config.steps]
    g = float(config.guidance_scale)
    rows = [(k, i) for k in range(len(prompts)) for i in range(config.generations)]
    wen = np.zeros((len(prompts), config.generations))
    webster = np.zeros((len(prompts), config.generations))
    for start in range(0, len(rows), config.batch_size):
        batch = rows[start : start + config.batch_size]
        # 1. inputs: the rows' initial latents and their prompts' embeddings
        z = torch.cat([model.initial_latents(prompt_ids[k], range(i, i + 1), config.seed) for k, i in batch])
        z = (z * sched.init_noise_sigma).to(model.device, model.dtype)
        cond, uncond = model.embed([prompts[k] for k, _ in batch])
        wen_sum = torch.zeros(len(batch), dtype=torch.float64)
        z0 = z.float().cpu()
        with torch.inference_mode():
            for n, t in enumerate(timesteps):
                # 2. both noise predictions in one call (as classifier-free guidance does)
                x_in = sched.scale_model_input(torch.cat([z, z]), t)
                eps = model.predict(x_in, t, concat_conditions(cond, uncond))
                eps_c, eps_u = eps.float().chunk(2)
                # 3. Wen et al. 2024: ||ε(x_t, c_prompt) − ε(x_t, c_empty)||₂ per generation
                wen_sum += (eps_c - eps_u).flatten(1).norm(dim=1).double().cpu()
                # 4. advance with the guided prediction (deterministic DDIM, eta = 0)
                guided = eps_u + g * (eps_c - eps_u)
                z = sched.step(guided.to(model.dtype), t, z).prev_sample
                if n == 0:
                    # 5. Webster 2023: mean((z_0 − z_after_one_step)²) per generation
                    step = ((z0 - z.float().cpu()) ** 2).flatten(1).mean(dim=1).double()
                    for r, (k, i) in enumerate(batch):
                        webster[k, i] = float(step[r])
        for r, (k, i) in enumerate(batch):
            wen[k, i] = float(wen_sum[r]) / len(timesteps)
    evaluations = 2 * config.generations * len(timesteps)
    return {
        "wen": wen.mean(axis=1),
        "webster": webster.mean(axis=1),
        "wen_per_generation": wen,
        "webster_per_generation": webster,
        "unet_evaluations_per_prompt": evaluations,
    }

"""One-step (or few-step) memorization scores of text-to-image prompts.

Both scores take a few UNet evaluations per generation from a few initial noises per prompt —
instead of the extraction attack's ``samples_per_prompt × num_inference_steps × 2`` — and are
higher for prompts the model has memorized, so they rank which prompts deserve the full attack.

- **Wen et al. (ICLR 2024)**, "Detecting, Explaining, and Mitigating Memorization in Diffusion
  Models", §3: the magnitude of the text-conditional noise prediction,
  ``d = (1/S) Σ_{steps} ||ε_θ(x_t, c_prompt) − ε_θ(x_t, c_empty)||₂``, over the first ``S`` steps
  of a deterministic DDIM schedule of ``num_inference_steps`` steps (as Wen et al.'s code: SD's
  50 steps, first timestep 981), averaged over a few generations. A memorized prompt pulls every
  noise towards the same image, so its conditional and unconditional predictions differ strongly
  already at the first step. ``c_empty`` is the empty prompt as the pipeline encodes it when no
  negative prompt is given (Stable Diffusion v1/v2: the encoded ``""``, as in Wen et al.'s code;
  SDXL with ``force_zeros_for_empty_prompt``: zero embeddings, which SDXL was trained with as "no
  text"; a class-conditional UNet: its null class). The latent advances between scored steps with
  the guided prediction of the extraction's own sampling (its negative prompt, when it has one).
- **Webster (2023)**, "A Reproducible Extraction of Training Images from Diffusion Models",
  white-box attack: how far a **one-step** sample moves from its initial latent,
  ``mean((z_T − z_after_one_step)²)``. Webster's code samples with ``num_inference_steps=1``,
  Karras sigmas ``[σ_max, 0]`` and a Heun/Euler step in the k-diffusion (VE) parameterisation:
  ``z_T = σ_max·n`` and the step to σ = 0 lands on the guided denoiser output
  ``D(z_T) = z_T − σ_max·ε̂``, so the score is ``σ_max² · mean(ε̂²)`` with
  ``ε̂ = ε_u + g·(ε_c − ε_u)`` the guided noise prediction at the model's last training timestep
  ``T − 1`` (input ``z_T / sqrt(σ_max² + 1) = sqrt(1 − ᾱ_{T−1})·n``) and
  ``σ_max² = (1 − ᾱ_{T−1}) / ᾱ_{T−1}``. Models predicting ``v`` (or ``x_0``) are converted to ε
  (as k-diffusion's ``CompVisVDenoiser`` does). ``ε_u`` is the extraction's unconditional input
  (its negative prompt, else the empty prompt); without guidance (``g ≤ 1`` for pipelines, as
  diffusers) ``ε̂ = ε_c``.

Noise: generation ``i`` of prompt ``p`` starts from ``randn(C×h×w)`` (float32, on the CPU) drawn
by a ``torch.Generator`` seeded with ``derive_seed(seed, p, i)``, at the generator's resolution —
the same initial noise as the extraction attack's sample ``i`` — so the scores are deterministic
under a seed.

Only the scores a run asks for (:attr:`TriageConfig.scores`, default both) are computed. UNet
evaluations per generation (:func:`unet_evaluations_per_prompt`): Wen 2 per scored step (the
prompt and the empty prompt; 3 when guidance uses a negative prompt), Webster 2 (1 unguided); a
score not asked for costs nothing, and has no column in the run's tables.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np

from memscan.errors import InputError
from memscan.generators.seeds import derive_seed

#: Score names (columns of the triage table).
SCORES = ("wen", "webster")

#: Schedule defaults when neither a config nor the model sets them (Stable Diffusion's); filled in
#: by :func:`resolve_schedule` only.
DEFAULT_STEPS, DEFAULT_GUIDANCE = 50, 7.5

#: What each score is (recorded in every triage manifest; part of a run's identity, so a resume
#: never mixes scores of two definitions).
SCORE_DEFINITIONS = {
    "wen": "Wen et al. 2024: mean over generations and the first `steps` DDIM timesteps of "
    "||eps(x_t, c_prompt) - eps(x_t, c_empty)||_2 (the UNet's raw outputs, L2 norm over the whole latent); "
    "c_empty is the pipeline's empty prompt, the latent advances with the extraction's guided prediction",
    "webster": "Webster 2023 white-box: mean over generations of mean((z_T - D(z_T))^2) = sigma_max^2 * "
    "mean(eps_guided(z_T, T-1)^2), the one-step sample (Karras sigmas [sigma_max, 0], Euler/Heun to 0, "
    "k-diffusion VE parameterisation) from z_T = sigma_max * noise, sigma_max^2 = (1 - abar_{T-1}) / abar_{T-1}",
}


@dataclass(frozen=True)
class TriageConfig:
    """Parameters of ``memscan triage`` (recorded in its manifest).

    Parameters
    ----------
    generations : initial noises per prompt (Wen et al. average over a few; default 4)
    steps : denoising steps of the Wen score, the first ``steps`` of the schedule (Wen: 1 already
        separates)
    num_inference_steps : length of the DDIM schedule those steps come from (None: the model's
        ``memscan.json`` value, else 50); its first timestep must lie in the upper half of the
        training timesteps (:func:`scored_timesteps`)
    guidance_scale : classifier-free guidance used to advance the latent and in Webster's one-step
        sample (None: model's, else 7.5)
    seed : run seed (generation i of prompt p uses derive_seed(seed, p, i))
    batch_size : generations per UNet call (each call evaluates 2 × batch_size latents, 3 × with a
        negative prompt)
    device : ``cpu``, ``cuda`` or ``cuda:N``
    dtype : ``auto`` (fp16 on CUDA, fp32 on CPU), ``fp32``, ``fp16``, ``bf16``
    scores : the scores to compute, a subset of :data:`SCORES` (a comma-separated string is
        accepted; kept in :data:`SCORES` order); the others cost no UNet evaluation and have no
        column in the tables
    height, width : the generations' resolution in pixels, as ``memscan extract --height/--width``
        (None: the generator's, else ``memscan.json``'s ``resolution``, else the UNet's native
        size); text-to-image pipelines only
    negative_prompt : guidance's unconditional input, as the extraction's generator has it (None:
        the generator's, else the empty prompt); text-to-image pipelines only
    """

    generations: int = 4
    steps: int = 1
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int = 0
    batch_size: int = 32
    device: str = "cpu"
    dtype: str = "auto"
    scores: tuple = SCORES
    height: int | None = None
    width: int | None = None
    negative_prompt: str | None = None

    def __post_init__(self):
        # a string ("wen,webster") or a list (a manifest's JSON) becomes a tuple in SCORES order
        names = self.scores.split(",") if isinstance(self.scores, str) else list(self.scores)
        names = [str(n).strip() for n in names if str(n).strip()]
        order = {s: i for i, s in enumerate(SCORES)}
        names = sorted(dict.fromkeys(names), key=lambda n: (order.get(n, len(order)), n))
        object.__setattr__(self, "scores", tuple(names))

    def validate(self) -> TriageConfig:
        unknown = [s for s in self.scores if s not in SCORES]
        if unknown or not self.scores:
            what = f"unknown score(s) {', '.join(map(repr, unknown))}" if unknown else "no score asked for"
            raise InputError(what, f"choose among {', '.join(SCORES)} (e.g. --scores wen)")
        for side in ("height", "width"):
            value = getattr(self, side)
            if value is not None and value < 1:
                raise InputError(f"{side}={value}", "give a positive number of pixels")
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


def scored_timesteps(scheduler, config: TriageConfig) -> list[int]:
    """The timesteps the Wen score is taken at: the first ``config.steps`` of ``scheduler``'s
    schedule of ``num_inference_steps`` steps (a DDIM scheduler; its ``timestep_spacing`` and
    ``steps_offset`` decide them).

    A schedule whose first timestep lies below half the training timesteps is refused: with SD's
    ``leading`` spacing and ``steps_offset=1``, ``num_inference_steps=1`` would score ``t = 1``
    (an almost noise-free input, not the start of sampling; 2 steps give 501, 10 give 901, 50
    give 981).

    Examples
    --------
    >>> from diffusers import DDIMScheduler
    >>> s = DDIMScheduler(steps_offset=1, timestep_spacing="leading")
    >>> scored_timesteps(s, TriageConfig(num_inference_steps=50, steps=2))
    [981, 961]
    >>> scored_timesteps(s, TriageConfig(num_inference_steps=1))
    Traceback (most recent call last):
    ...
    memscan.errors.InputError: num_inference_steps=1 makes the first scored timestep t=1 of 1000 training timesteps ('leading' spacing, steps_offset=1), below 500: the score would be taken near the end of sampling, not at its start (use the default 50 steps (--num-inference-steps 50), or a schedule whose first timestep is at least 500)
    """
    config = config.validate()
    n = int(resolve_schedule(config).num_inference_steps)
    scheduler.set_timesteps(n)
    timesteps = [int(t) for t in scheduler.timesteps[: config.steps]]
    total = int(scheduler.config.num_train_timesteps)
    if timesteps[0] < total / 2:
        spacing = scheduler.config.get("timestep_spacing", "leading")
        offset = scheduler.config.get("steps_offset", 0)
        raise InputError(
            f"num_inference_steps={n} makes the first scored timestep t={timesteps[0]} of {total} training "
            f"timesteps ({spacing!r} spacing, steps_offset={offset}), below {math.ceil(total / 2)}: the score would "
            "be taken near the end of sampling, not at its start",
            f"use the default {DEFAULT_STEPS} steps (--num-inference-steps {DEFAULT_STEPS}), or a schedule whose "
            f"first timestep is at least {math.ceil(total / 2)}",
        )
    return timesteps


def sigma_max_of(scheduler) -> tuple[int, float, float]:
    """``(T − 1, ᾱ_{T−1}, σ_max)`` of ``scheduler``'s training schedule, with
    ``σ_max = sqrt((1 − ᾱ_{T−1}) / ᾱ_{T−1})`` (k-diffusion's largest sigma of a DDPM schedule).

    Examples
    --------
    >>> from diffusers import DDIMScheduler
    >>> t, a, s = sigma_max_of(DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))
    >>> t, round(s, 3)
    (999, 14.615)
    """
    from memscan.generators.noise import alphas_cumprod_of

    a = alphas_cumprod_of(scheduler)
    last = len(a) - 1
    a_t = float(a[last])
    return last, a_t, math.sqrt((1.0 - a_t) / a_t)


class TriageModel:
    """The pieces of a Stable-Diffusion-family pipeline that the scores need.

    Parameters
    ----------
    pipe : a pipeline with ``unet``, ``tokenizer``/``text_encoder`` (via ``encode_prompt``) and a
        scheduler whose config builds a ``DDIMScheduler`` (StableDiffusionPipeline and kin)
    device : where to run
    negative_prompt : the unconditional prompt of the extraction's guidance (None: the empty
        prompt); Wen's ``c_empty`` stays the empty prompt
    resolution : ``(height, width)`` of the generations in pixels (None, or a None side: the
        UNet's native size); the initial latents are drawn at ``resolution / vae_scale_factor``,
        as the extraction's
    """

    #: ``unet.config.addition_embed_type`` values this class supplies (None: no added conditioning).
    ADDED_CONDITIONING: tuple = (None,)

    def __init__(self, pipe, device: str = "cpu", negative_prompt: str | None = None, resolution=None):
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
        # the generations' resolution (the extraction's), else the native one (per side, as
        # Text2ImageGenerator fills a missing height or width)
        height, width = (int(v or size * scale) for v in (resolution or (None, None)))
        if height % scale or width % scale:
            raise InputError(
                f"resolution {height}×{width} is not a multiple of the VAE scale factor {scale}",
                f"use multiples of {scale}",
            )
        self.resolution = (height, width)
        self.latent_shape = (int(self.unet.config.in_channels), height // scale, width // scale)
        self.vae_scale = scale
        self.negative_prompt = negative_prompt
        # the encoded negative prompt, by batch size: encoded once, not once per batch
        self._negatives: dict = {}
        self._torch = torch

    @property
    def has_negative(self) -> bool:
        """Whether guidance's unconditional input differs from the empty prompt (an extra UNet
        evaluation per scored step); for Stable Diffusion, ``negative_prompt=""`` is the empty prompt."""
        return bool(self.negative_prompt)

    def guides(self, guidance_scale: float) -> bool:
        """Whether sampling is guided: diffusers pipelines guide when ``guidance_scale > 1``."""
        return guidance_scale > 1.0

    def describe_empty(self) -> str:
        """What ``c_empty`` (Wen's unconditional input) is, for the manifest."""
        return "the empty prompt '' (encoded by the pipeline's text encoder)"

    def describe_unconditional(self) -> str:
        """What guidance's unconditional input is, for the manifest."""
        if self.has_negative:
            return f"the negative prompt {self.negative_prompt!r}"
        return "c_empty (no negative prompt)"

    def predict(self, x, t, condition):
        """``ε_θ(x, t, c)`` for a batch of text embeddings ``condition``."""
        return self.unet(x, t, encoder_hidden_states=condition).sample

    def embed(self, prompts: list[str]):
        """Text embeddings of ``prompts``, of the empty prompt, and of the negative prompt (None
        when guidance uses the empty prompt; encoded once per batch size, :meth:`negative_for`)."""
        n = len(prompts)
        with self._torch.inference_mode():
            cond, empty = self.pipe.encode_prompt(prompts, self.device, 1, True, negative_prompt=[""] * n)
        return cond, empty, self.negative_for(prompts)

    def negative_for(self, prompts: list[str]):
        """Guidance's negative prompt encoded for a batch of ``prompts`` (None without one).

        The negative conditioning is the same text for every row and does not depend on the
        batch's prompts (the pipeline pads both to the tokenizer's full length), so it is encoded
        by the pipeline's own call (:meth:`_encode_negative`) the first time a batch of that size
        comes, and the very tensor is reused for every later batch of the size — bit for bit what
        encoding it per batch gives (keyed by size: a text encoder's numbers may depend on the
        batch shape, so a batch of another size is encoded, once, at its own size)."""
        if not self.has_negative:
            return None
        n = len(prompts)
        if n not in self._negatives:
            with self._torch.inference_mode():
                self._negatives[n] = self._encode_negative(prompts)
        return self._negatives[n]

    def _encode_negative(self, prompts: list[str]):
        """The pipeline's encoding of the negative prompt for a batch of ``prompts``."""
        n = len(prompts)
        return self.pipe.encode_prompt(prompts, self.device, 1, True, negative_prompt=[self.negative_prompt] * n)[1]

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
    (original size, crop top-left (0, 0), target size — the generation's resolution). Wen's
    ``c_empty`` is the empty prompt as the pipeline encodes it without a negative prompt: with
    ``force_zeros_for_empty_prompt`` (SDXL's default) zero embeddings, otherwise the encoded
    ``""``; guidance's unconditional input is the encoded ``negative_prompt`` when one is given
    (the pipeline then encodes it, even ``""``), else ``c_empty`` — exactly what the pipeline pairs
    with the prompt under classifier-free guidance. All share the prompt's ``time_ids``. A
    condition is a tuple ``(hidden states, text_embeds, time_ids)``.

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
        super().__init__(pipe, device, negative_prompt=negative_prompt, resolution=resolution)
        if not hasattr(pipe, "_get_add_time_ids"):
            raise InputError(
                f"{type(pipe).__name__} takes SDXL's added conditioning but cannot build its time ids",
                "use a StableDiffusionXLPipeline",
            )

    @property
    def has_negative(self) -> bool:
        """SDXL encodes any given negative prompt (``""`` too) instead of its empty conditioning."""
        return self.negative_prompt is not None

    def _zeros_for_empty(self) -> bool:
        return bool(getattr(self.pipe.config, "force_zeros_for_empty_prompt", False))

    def describe_empty(self) -> str:
        if self._zeros_for_empty():
            return "zero embeddings (SDXL's force_zeros_for_empty_prompt: the pipeline's empty prompt)"
        return "the empty prompt '' (encoded by the pipeline's text encoders)"

    def embed(self, prompts: list[str]):
        """``(hidden states, text_embeds, time_ids)`` of ``prompts``, of the empty prompt and of
        the negative prompt (None when guidance uses the empty prompt; its embeddings encoded once
        per batch size, :meth:`TriageModel.negative_for`)."""
        torch = self._torch
        n = len(prompts)
        with torch.inference_mode():
            # negative_prompt=None: the pipeline's empty conditioning (zeros, or the encoded "")
            cond, empty, pooled, pooled_e = self.pipe.encode_prompt(
                prompt=prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=True
            )
        negative = self.negative_for(prompts)
        # 1. time ids as the pipeline builds them: original size, crop (0, 0), target size
        enc2 = getattr(self.pipe, "text_encoder_2", None)
        proj = int(pooled.shape[-1]) if enc2 is None else int(enc2.config.projection_dim)
        ids = self.pipe._get_add_time_ids(self.resolution, (0, 0), self.resolution, cond.dtype, proj)
        ids = ids.to(self.device).repeat(n, 1)
        neg = None if negative is None else (*negative, ids)
        return (cond, pooled, ids), (empty, pooled_e, ids), neg

    def _encode_negative(self, prompts: list[str]):
        """``(hidden states, text_embeds)`` of the negative prompt for a batch of ``prompts``, as
        the pipeline encodes it."""
        _, negative, _, pooled_n = self.pipe.encode_prompt(
            prompt=prompts,
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=[self.negative_prompt] * len(prompts),
        )
        return negative, pooled_n

    def predict(self, x, t, condition):
        """``ε_θ(x, t, c)`` with the added conditioning of ``condition``."""
        hidden, pooled, ids = condition
        return self.unet(
            x, t, encoder_hidden_states=hidden, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}
        ).sample


def text2image_triage_model(pipe, device: str = "cpu", negative_prompt: str | None = None, resolution=None):
    """The triage model of a text-to-image pipeline: :class:`SDXLTriageModel` when its UNet takes
    SDXL's added conditioning (``text_time``), else :class:`TriageModel` (which refuses other
    added conditioning with a clear error). ``negative_prompt`` and ``resolution`` are the
    extraction's (the generator's)."""
    unet = getattr(pipe, "unet", None)
    kwargs = {"negative_prompt": negative_prompt, "resolution": resolution}
    if unet is not None and getattr(unet.config, "addition_embed_type", None) == "text_time":
        return SDXLTriageModel(pipe, device, **kwargs)
    return TriageModel(pipe, device, **kwargs)


def concat_conditions(*conditions):
    """Concatenate batches of conditions along the batch axis (tensors, or tuples of them)."""
    import torch

    if isinstance(conditions[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*conditions))
    return torch.cat(conditions)


class ClassTriageModel:
    """A class- or caption-conditional ``UNet2DModel`` (the demo model) as triage sees it.

    The condition of a prompt is its class label (a caption listed in ``memscan.json``'s
    ``class_captions``, or an integer id); the unconditional input — Wen et al.'s empty prompt,
    and guidance's — is the ``null_class`` the model was trained with for classifier-free
    guidance (label dropout). A model without a null class has no unconditional prediction: the
    Wen score does not apply to it, and this class refuses it (the audit then falls back to its
    adaptive first round).

    Parameters
    ----------
    generator : a :class:`memscan.generators.diffusers_unet.DiffusersUNetGenerator`
    device : where to run
    """

    has_negative = False

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

    def guides(self, guidance_scale: float) -> bool:
        """Whether sampling is guided: the generator guides when ``guidance_scale != 1``."""
        return guidance_scale != 1.0

    def describe_empty(self) -> str:
        return f"the null class {self.null_class}"

    def describe_unconditional(self) -> str:
        return "c_empty (the null class)"

    def embed(self, prompts: list[str]):
        """Class labels of ``prompts`` and the null class (the unconditional input); no negative."""
        torch = self._torch
        labels = torch.tensor([self.pipe.class_of(p) for p in prompts], dtype=torch.long, device=self.device)
        return labels, torch.full_like(labels, self.null_class), None

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


def resolve_schedule(config: TriageConfig, num_inference_steps=None, guidance_scale=None) -> TriageConfig:
    """``config`` with its schedule filled in where it leaves it open — the one place the
    defaults are applied (``memscan triage``, the audit's triage, the scores themselves).

    Precedence: the config's own value (``num_inference_steps`` unless None or 0,
    ``guidance_scale`` unless None), else the model's (``num_inference_steps``,
    ``guidance_scale``: its ``memscan.json``'s or its generator's; steps unless None or 0,
    guidance unless None; taken as ``int`` and ``float``), else :data:`DEFAULT_STEPS` and
    :data:`DEFAULT_GUIDANCE` (50 steps, 7.5). Not validated: callers call
    :meth:`TriageConfig.validate`.

    Examples
    --------
    >>> c = resolve_schedule(TriageConfig(guidance_scale=3.0), num_inference_steps=10, guidance_scale=1.0)
    >>> c.num_inference_steps, c.guidance_scale
    (10, 3.0)
    >>> c = resolve_schedule(TriageConfig())
    >>> c.num_inference_steps, c.guidance_scale
    (50, 7.5)
    """
    steps = config.num_inference_steps or (int(num_inference_steps) if num_inference_steps else DEFAULT_STEPS)
    guidance = config.guidance_scale
    if guidance is None:
        guidance = DEFAULT_GUIDANCE if guidance_scale is None else float(guidance_scale)
    return replace(config, num_inference_steps=steps, guidance_scale=guidance)


def unet_evaluations_by_score(
    config: TriageConfig, *, guided: bool = True, negative_prompt: bool = False
) -> dict[str, int]:
    """UNet evaluations per prompt of each score ``config`` asks for: per generation, Wen's ``2``
    per scored step (the prompt and the empty prompt; ``3`` when guidance uses a negative prompt)
    and Webster's ``2`` (the prompt and guidance's unconditional input; ``1`` unguided).

    Examples
    --------
    >>> unet_evaluations_by_score(TriageConfig(generations=4, steps=2), negative_prompt=True)
    {'wen': 24, 'webster': 8}
    >>> unet_evaluations_by_score(TriageConfig(generations=4, scores=("webster",)), guided=False)
    {'webster': 4}
    """
    config = config.validate()
    per_generation = {"wen": config.steps * (3 if guided and negative_prompt else 2), "webster": 2 if guided else 1}
    return {s: config.generations * per_generation[s] for s in config.scores}


def unet_evaluations_per_prompt(config: TriageConfig, *, guided: bool = True, negative_prompt: bool = False) -> int:
    """UNet evaluations per prompt of the scores ``config`` asks for (the sum of
    :func:`unet_evaluations_by_score`); a score not asked for costs nothing.

    Examples
    --------
    >>> unet_evaluations_per_prompt(TriageConfig(generations=4, steps=1))
    16
    >>> unet_evaluations_per_prompt(TriageConfig(generations=4, steps=2), negative_prompt=True)
    32
    >>> unet_evaluations_per_prompt(TriageConfig(generations=4, steps=1, scores=("wen",)))
    8
    """
    return sum(unet_evaluations_by_score(config, guided=guided, negative_prompt=negative_prompt).values())


def evaluations_of(model, config: TriageConfig) -> int:
    """:func:`unet_evaluations_per_prompt` of ``model`` (its guidance and negative prompt) for
    the scores ``config`` asks for."""
    config = resolve_schedule(config).validate()
    return unet_evaluations_per_prompt(
        config, guided=model.guides(float(config.guidance_scale)), negative_prompt=model.has_negative
    )


def score_record(model, config: TriageConfig) -> dict:
    """What the asked scores are and what their numbers depend on (the manifest's ``scores``):
    for Wen the timesteps scored, the schedule and ``c_empty``; for Webster its ``σ_max`` and
    timestep; guidance's unconditional input, the latent shape and the UNet evaluations (in all,
    and per score)."""
    config = resolve_schedule(config).validate()
    sched = model.scheduler
    g = float(config.guidance_scale)
    guided = model.guides(g)
    record = {}
    if "wen" in config.scores:
        record["wen"] = {
            "definition": SCORE_DEFINITIONS["wen"],
            "timesteps": scored_timesteps(sched, config),
            "num_inference_steps": int(config.num_inference_steps),
            "sampler": "DDIM (eta = 0) with the model's noise schedule; the latent advances with the guided prediction",
            "timestep_spacing": sched.config.get("timestep_spacing"),
            "steps_offset": sched.config.get("steps_offset"),
            "c_empty": model.describe_empty(),
        }
    if "webster" in config.scores:
        last, a_last, sigma = sigma_max_of(sched)
        record["webster"] = {
            "definition": SCORE_DEFINITIONS["webster"],
            "timestep": last,
            "alphas_cumprod": a_last,
            "sigma_max": sigma,
            "prediction_type": sched.config.get("prediction_type", "epsilon"),
        }
    by_score = unet_evaluations_by_score(config, guided=guided, negative_prompt=model.has_negative)
    return {
        **record,
        "computed": list(config.scores),
        "guidance": {
            "scale": g,
            "guided": guided,
            "negative_prompt": bool(guided and model.has_negative),
            "unconditional": model.describe_unconditional() if guided else "none (the conditional prediction alone)",
        },
        "latent_shape": list(model.latent_shape),
        "unet_evaluations_per_prompt": evaluations_of(model, config),
        "unet_evaluations_by_score": by_score,
    }


def _guide(eps_c, eps_u, g: float, guided: bool):
    """Classifier-free guidance ``ε_u + g·(ε_c − ε_u)`` (the conditional prediction unguided)."""
    return eps_u + g * (eps_c - eps_u) if guided else eps_c


def _check_finite(name: str, values: np.ndarray, batch, prompt_ids, model) -> None:
    """One clear error for the first NaN/Inf score (fp16 overflow, a broken model)."""
    bad = np.argwhere(~np.isfinite(values))
    if len(bad):
        r = int(bad[0][0])
        k, i = batch[r]
        dtype = str(model.dtype).replace("torch.", "")
        raise InputError(
            f"the {name} score of prompt {prompt_ids[k]} (generation {i}) is {values[r]} — the model produced "
            f"NaN/Inf in {dtype}",
            "fp16 overflows in some models: rerun with --dtype fp32 (or bf16)",
        )


def score_prompts(model: TriageModel, prompt_ids: list[str], prompts: list[str], config: TriageConfig) -> dict:
    """The scores ``config`` asks for (:attr:`TriageConfig.scores`) of every prompt; returns
    ``{"wen": array, "wen_per_generation": …, "webster": array, …}`` with the asked scores only.

    Every (prompt, generation) pair is one row of a flat work list, processed ``batch_size`` rows
    at a time; each row's result depends on its own noise only. A score not asked for makes no
    UNet call. A score that is not finite is an :class:`InputError` naming the prompt (not a
    number to rank).
    """
    from memscan.generators.noise import to_epsilon

    torch = model._torch
    config = resolve_schedule(config).validate()
    asked = config.scores
    sched = model.scheduler
    # the schedule is refused before any UNet call
    timesteps = scored_timesteps(sched, config) if "wen" in asked else []
    last, a_last, sigma = sigma_max_of(sched)
    prediction = sched.config.get("prediction_type", "epsilon")
    g = float(config.guidance_scale)
    guided = model.guides(g)
    rows = [(k, i) for k in range(len(prompts)) for i in range(config.generations)]
    values = {s: np.zeros((len(prompts), config.generations)) for s in asked}
    for start in range(0, len(rows), config.batch_size):
        batch = rows[start : start + config.batch_size]
        # 1. inputs: the rows' initial noises and their prompts' conditions (guidance's
        #    unconditional input last; the negative prompt only when sampling is guided)
        noise = torch.cat([model.initial_latents(prompt_ids[k], range(i, i + 1), config.seed) for k, i in batch])
        cond, empty, negative = model.embed([prompts[k] for k, _ in batch])
        conditions = [cond, empty] if negative is None or not guided else [cond, empty, negative]
        out = {}
        with torch.inference_mode():
            if "wen" in asked:
                z = (noise * sched.init_noise_sigma).to(model.device, model.dtype)
                wen_sum = torch.zeros(len(batch), dtype=torch.float64)
                for t in timesteps:
                    # 2. Wen et al. 2024: ||ε(x_t, c_prompt) − ε(x_t, c_empty)||₂ per generation (one UNet call)
                    x_in = sched.scale_model_input(torch.cat([z] * len(conditions)), t)
                    eps = model.predict(x_in, t, concat_conditions(*conditions)).float().chunk(len(conditions))
                    wen_sum += (eps[0] - eps[1]).flatten(1).norm(dim=1).double().cpu()
                    # 3. advance with the extraction's guided prediction (deterministic DDIM, eta = 0)
                    z = sched.step(_guide(eps[0], eps[-1], g, guided).to(model.dtype), t, z).prev_sample
                out["wen"] = wen_sum.numpy() / len(timesteps)
            if "webster" in asked:
                # 4. Webster 2023: the one-step sample from z_T = σ_max·n lands on D(z_T) = z_T − σ_max·ε̂,
                #    so mean((z_T − D(z_T))²) = σ_max²·mean(ε̂²); the UNet sees z_T / sqrt(σ_max² + 1) at T − 1
                x_t = (noise.double() * math.sqrt(1.0 - a_last)).to(model.device, model.dtype)
                pair = [cond, conditions[-1]] if guided else [cond]
                pred = model.predict(torch.cat([x_t] * len(pair)), last, concat_conditions(*pair)).float()
                a = torch.tensor(a_last, dtype=torch.float32, device=pred.device)
                eps = to_epsilon(pred, torch.cat([x_t.float()] * len(pair)), a, prediction).chunk(len(pair))
                guided_eps = _guide(eps[0], eps[-1], g, guided).double().cpu()
                out["webster"] = (sigma**2 * (guided_eps**2).flatten(1).mean(dim=1)).numpy()
        for name in asked:
            _check_finite(name, out[name], batch, prompt_ids, model)
            for r, (k, i) in enumerate(batch):
                values[name][k, i] = float(out[name][r])
    result = {}
    for name in asked:
        result[name] = values[name].mean(axis=1)
        result[f"{name}_per_generation"] = values[name]
    if "wen" in asked:
        result["timesteps"] = timesteps
    result["unet_evaluations_per_prompt"] = evaluations_of(model, config)
    return result

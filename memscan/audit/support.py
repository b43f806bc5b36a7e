"""What the audit can do with a model: its cost per image, its conditioning, its triage score.

:func:`generator_facts` runs where the model is loaded (in the local process, or in a Ray
worker: the driver of a Ray run loads no model) and reports what the driver plans with.
"""

from __future__ import annotations

from dataclasses import replace

from memscan.errors import InputError
from memscan.generators.base import evaluations_per_generation
from memscan.generators.diffusers_unet import DiffusersUNetGenerator
from memscan.generators.text2image import Text2ImageGenerator
from memscan.triage.scores import (
    TriageConfig,
    class_triage_gap,
    evaluations_of,
    resolve_schedule,
    scored_timesteps,
)


def conditioning_gap(generator) -> str | None:
    """Why the model cannot be attacked with prompts (None when it can)."""
    if isinstance(generator, DiffusersUNetGenerator) and generator.num_class_embeds is None:
        return "the model has no conditioning (an unconditional UNet2DModel): prompts select nothing"
    return None


def triage_gap(generator) -> str | None:
    """Why the triage scores cannot apply to the model (None when they can)."""
    if isinstance(generator, DiffusersUNetGenerator):
        return class_triage_gap(generator)
    if isinstance(generator, Text2ImageGenerator):
        pipe = generator.pipe
        unet = getattr(pipe, "unet", None)
        if unet is None or not hasattr(pipe, "encode_prompt"):
            return f"{type(pipe).__name__} has no UNet and text encoder the triage scores can call"
        added = getattr(unet.config, "addition_embed_type", None)
        if added == "text_time" and not hasattr(pipe, "_get_add_time_ids"):
            return f"{type(pipe).__name__} takes SDXL's added conditioning but cannot build its time ids"
        if added not in (None, "text_time"):
            return (
                f"{type(pipe).__name__}'s UNet takes added conditioning {added!r}; the triage scores support "
                "Stable Diffusion (v1/v2), SDXL-style ('text_time') pipelines and class-conditional UNets"
            )
        return None
    return f"{type(generator).__name__} (a plain function) exposes no noise prediction, so no triage score applies"


def triage_config_for(generator, config: TriageConfig) -> TriageConfig:
    """The audit's triage of ``generator``: ``config`` with the generator's schedule and guidance
    where it leaves them open (else 50 steps, 7.5; :func:`~memscan.triage.scores.resolve_schedule`),
    and the extraction's resolution and negative prompt (a :class:`Text2ImageGenerator`'s
    ``height``, ``width``, ``negative_prompt``, where the config gives none), so that triage scores the very latents and unconditional input the
    extraction samples with (:func:`memscan.triage.worker.setup_triage` refuses a config that
    differs from the generator)."""
    filled = resolve_schedule(config, getattr(generator, "steps", None), getattr(generator, "guidance_scale", None))
    values = {"num_inference_steps": int(filled.num_inference_steps), "guidance_scale": float(filled.guidance_scale)}
    if isinstance(generator, Text2ImageGenerator):  # a value the config gives is kept (a conflict is refused)
        mine = {"height": generator.height, "width": generator.width, "negative_prompt": generator.negative_prompt}
        values.update({k: v for k, v in mine.items() if getattr(config, k) is None})
    return replace(config, **values).validate()


def generator_facts(worker, triage_config: TriageConfig | None = None) -> dict:
    """What the driver needs of the worker's generator: evaluations per image and their unit,
    whether the output-shape probe generates an image, its sampling defaults, and the gaps; with
    ``triage_config``, also the audit's triage config for this generator
    (:func:`triage_config_for`) and its UNet evaluations per prompt, as the triage module counts
    them for the model (its guidance, negative prompt and the asked scores)."""
    gen = worker.generator
    per_image, unit = evaluations_per_generation(gen)
    gap = triage_gap(gen)
    triage = {}
    if triage_config is not None and gap is None:
        from memscan.triage.worker import setup_triage

        tcfg = triage_config_for(gen, triage_config)
        # the triage model of the loaded generator (its own pipeline, on its own device: nothing loads)
        model = setup_triage(gen, replace(tcfg, device=str(getattr(gen, "device", tcfg.device)))).model
        if "wen" in tcfg.scores:  # a schedule Wen cannot be scored on: refused before any stage runs
            try:
                scored_timesteps(model.scheduler, tcfg)
            except InputError as exc:
                raise InputError(
                    f"the audit's triage scores Wen on the extraction's schedule, but {exc.message}",
                    "give the extraction more steps (--steps), or rank by --score webster",
                ) from None
        triage = {"triage_config": tcfg.to_dict(), "triage_evaluations_per_prompt": evaluations_of(model, tcfg)}
    return {
        **triage,
        "per_image": per_image,
        "unit": unit,
        "probe_images": 0 if getattr(gen, "output_shape", None) is not None else 1,
        "num_inference_steps": getattr(gen, "steps", None),
        "guidance_scale": getattr(gen, "guidance_scale", None),
        "conditioning_gap": conditioning_gap(gen),
        "triage_gap": gap,
    }

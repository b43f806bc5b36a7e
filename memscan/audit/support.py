"""What the audit can do with a model: its cost per image, its conditioning, its triage score.

:func:`generator_facts` runs where the model is loaded (in the local process, or in a Ray
worker: the driver of a Ray run loads no model) and reports what the driver plans with.
"""

from __future__ import annotations

from memscan.generators.base import evaluations_per_generation
from memscan.generators.diffusers_unet import DiffusersUNetGenerator
from memscan.generators.text2image import Text2ImageGenerator
from memscan.triage.scores import class_triage_gap


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


def generator_facts(worker) -> dict:
    """What the driver needs of the worker's generator: evaluations per image and their unit,
    whether the output-shape probe generates an image, its sampling defaults, and the gaps."""
    gen = worker.generator
    per_image, unit = evaluations_per_generation(gen)
    return {
        "per_image": per_image,
        "unit": unit,
        "probe_images": 0 if getattr(gen, "output_shape", None) is not None else 1,
        "num_inference_steps": getattr(gen, "steps", None),
        "guidance_scale": getattr(gen, "guidance_scale", None),
        "conditioning_gap": conditioning_gap(gen),
        "triage_gap": triage_gap(gen),
    }

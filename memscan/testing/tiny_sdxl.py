"""A tiny SDXL-shaped text-to-image pipeline, built from config with no downloads.

Stable Diffusion XL (Podell et al. 2023) conditions its UNet on more than the text sequence:

- two text encoders — a ``CLIPTextModel`` and a ``CLIPTextModelWithProjection`` — whose
  penultimate hidden states are concatenated into the cross-attention sequence,
- *added conditioning* (``addition_embed_type="text_time"``): the second encoder's pooled,
  projected embedding (``text_embeds``) and six size/crop numbers (``time_ids``: original size,
  crop top-left, target size), embedded and added to the timestep embedding,
- for classifier-free guidance, zero embeddings in place of the empty prompt
  (``force_zeros_for_empty_prompt``).

:func:`build_tiny_sdxl` builds a real ``StableDiffusionXLPipeline`` with all of that, small
enough for a CPU, reusing the byte-level tokenizer of :mod:`memscan.testing.tiny_sd`;
:func:`save_tiny_sdxl` writes it with ``save_pretrained`` so ``memscan extract --model DIR``
loads it as it would load ``stabilityai/stable-diffusion-xl-base-1.0``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from memscan.testing.tiny_sd import build_tokenizer, tiny_autoencoder, tiny_clip_config


@dataclass(frozen=True)
class TinySDXLConfig:
    """Shape of the tiny SDXL pipeline.

    Parameters
    ----------
    resolution : image side in pixels (latents are ``resolution // 2``)
    unet_channels : channels of the UNet's two levels
    vae_channels : channels of the autoencoder's two levels
    text_dims : widths of the two text encoders (their sum is the cross-attention dimension)
    projection_dim : width of the second encoder's pooled projection (``text_embeds``)
    time_embed_dim : width of each of the six embedded ``time_ids``
    max_length : tokenizer context length
    seed : initialisation seed
    """

    resolution: int = 32
    unet_channels: tuple[int, int] = (16, 32)
    vae_channels: tuple[int, int] = (16, 32)
    text_dims: tuple[int, int] = (16, 16)
    projection_dim: int = 16
    time_embed_dim: int = 8
    max_length: int = 32
    seed: int = 0


def build_tiny_sdxl(config: TinySDXLConfig = TinySDXLConfig()):
    """Build the tiny ``StableDiffusionXLPipeline`` with freshly initialised weights.

    Examples
    --------
    >>> pipe = build_tiny_sdxl()
    >>> type(pipe).__name__, pipe.unet.config.addition_embed_type, type(pipe.text_encoder_2).__name__
    ('StableDiffusionXLPipeline', 'text_time', 'CLIPTextModelWithProjection')
    """
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from memscan.generators.text2image import quiet_loading

    with quiet_loading():  # the pipeline import makes transformers warn that torchvision is absent
        from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tokenizer = build_tokenizer(config.max_length)
    tokenizer_2 = build_tokenizer(config.max_length)
    torch.manual_seed(config.seed)
    # 1. UNet with SDXL's added conditioning: pooled text (projection_dim) + 6 embedded time ids
    unet = UNet2DConditionModel(
        sample_size=config.resolution // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=config.unet_channels,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=sum(config.text_dims),
        attention_head_dim=4,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=config.time_embed_dim,
        projection_class_embeddings_input_dim=config.projection_dim + 6 * config.time_embed_dim,
        norm_num_groups=8,
    )
    # 2. autoencoder: two levels → latents at half resolution (vae_scale_factor = 2)
    vae = tiny_autoencoder(config.vae_channels, config.resolution)
    # 3. the two text encoders (the second with the pooled projection)
    widths = config.text_dims
    text_encoder = CLIPTextModel(
        tiny_clip_config(len(tokenizer), widths[0], config.max_length, 2, config.projection_dim)
    )
    text_encoder_2 = CLIPTextModelWithProjection(
        tiny_clip_config(len(tokenizer), widths[1], config.max_length, 2, config.projection_dim)
    )
    # 4. SDXL's scheduler configuration (Euler, SD's noise schedule)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def save_tiny_sdxl(out: str | Path, config: TinySDXLConfig = TinySDXLConfig(), pipeline=None) -> Path:
    """Write the tiny SDXL pipeline (or ``pipeline``) with ``save_pretrained`` (safetensors), and a
    ``memscan.json`` with its sampling defaults (4 steps, guidance 3, the native resolution)."""
    out = Path(out)
    pipe = pipeline if pipeline is not None else build_tiny_sdxl(config)
    pipe.save_pretrained(out, safe_serialization=True)
    meta = {"tiny_sdxl": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}}
    meta.update({"num_inference_steps": 4, "guidance_scale": 3.0, "resolution": config.resolution})
    (out / "memscan.json").write_text(json.dumps(meta, indent=1))
    return out

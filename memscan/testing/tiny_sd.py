"""A tiny Stable-Diffusion-shaped text-to-image pipeline, built from config with no downloads.

Tests, benchmarks and ``bench/gpu_check.py`` need a real ``StableDiffusionPipeline`` — the same
classes, the same ``model_index.json`` layout, the same loading path as Stable Diffusion — but
small enough to run on a CPU in milliseconds and with nothing fetched from the hub:

- a tiny ``UNet2DConditionModel`` (two resolution levels, cross-attention to the text),
- a tiny ``AutoencoderKL`` (latents at half the image resolution),
- a tiny ``CLIPTextModel`` and a ``CLIPTokenizer`` whose byte-level BPE vocabulary and merges
  are written here (every byte is a token, plus a few dozen merges of common English pairs),
- a ``DDIMScheduler`` with Stable Diffusion's noise schedule.

:func:`save_tiny_sd` writes it with ``save_pretrained`` (safetensors), so ``memscan extract
--model DIR`` loads it exactly as it would load ``CompVis/stable-diffusion-v1-4``.
:func:`finetune_tiny_sd` trains it on one image–caption pair (heavily duplicated, among a few
unique pairs) for a few hundred steps, which plants a memorized prompt that triage scores and
the extraction attack can find.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

#: Common English bigrams merged by the tiny tokenizer (a real BPE table, just short).
_MERGES = [
    ("t", "h"),
    ("th", "e</w>"),
    ("i", "n"),
    ("a", "n"),
    ("e", "r"),
    ("o", "n"),
    ("r", "e"),
    ("a", "t"),
    ("e", "n"),
    ("o", "f</w>"),
    ("e", "d</w>"),
    ("in", "g</w>"),
    ("o", "r"),
    ("a", "r"),
    ("an", "d</w>"),
    ("o", "u"),
    ("s", "t"),
    ("l", "e"),
]


@dataclass(frozen=True)
class TinySDConfig:
    """Shape of the tiny pipeline (all sizes are deliberately small).

    Parameters
    ----------
    resolution : image side in pixels (latents are ``resolution // 2``)
    unet_channels : channels of the UNet's two levels
    vae_channels : channels of the autoencoder's two levels
    text_dim : width of the text encoder (= the UNet's cross-attention dimension)
    text_layers : transformer layers of the text encoder
    max_length : tokenizer context length (tokens are mostly single characters: keep prompts short)
    seed : initialisation seed (the same seed builds the same weights)
    """

    resolution: int = 32
    unet_channels: tuple[int, int] = (32, 64)
    vae_channels: tuple[int, int] = (16, 32)
    text_dim: int = 32
    text_layers: int = 2
    max_length: int = 32
    seed: int = 0


def byte_level_vocab() -> dict[str, int]:
    """The tiny tokenizer's vocabulary: specials, the 256 byte symbols (with and without the
    end-of-word suffix ``</w>``) and the merged pairs of :data:`_MERGES`.

    Examples
    --------
    >>> v = byte_level_vocab()
    >>> v["<|startoftext|>"], v["<|endoftext|>"], "the</w>" in v
    (0, 1, True)
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    tokens = ["<|startoftext|>", "<|endoftext|>"] + symbols + [s + "</w>" for s in symbols]
    tokens += ["".join(pair) for pair in _MERGES]
    vocab: dict[str, int] = {}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    return vocab


def build_tokenizer(max_length: int = 32):
    """A ``CLIPTokenizer`` loaded from the ``vocab.json`` and ``merges.txt`` written here.

    The files go to a temporary folder and load through ``CLIPTokenizer.from_pretrained``, the
    same path a real checkpoint's tokenizer takes (nothing is downloaded).

    Examples
    --------
    >>> tok = build_tokenizer()
    >>> tok.convert_ids_to_tokens(tok("the cat").input_ids)
    ['<|startoftext|>', 'the</w>', 'c', 'at</w>', '<|endoftext|>']
    """
    import tempfile

    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(byte_level_vocab()), encoding="utf-8")
        merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in _MERGES)
        (Path(tmp) / "merges.txt").write_text(merges, encoding="utf-8")
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=max_length)


def build_tiny_sd(config: TinySDConfig = TinySDConfig()):
    """Build the tiny ``StableDiffusionPipeline`` with freshly initialised weights.

    Examples
    --------
    >>> pipe = build_tiny_sd()
    >>> type(pipe).__name__, pipe.unet.config.sample_size, pipe.vae_scale_factor
    ('StableDiffusionPipeline', 16, 2)
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tokenizer(config.max_length)
    torch.manual_seed(config.seed)
    # 1. UNet: two levels, cross-attention on the first, SD's 4 latent channels
    unet = UNet2DConditionModel(
        sample_size=config.resolution // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=config.unet_channels,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=config.text_dim,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    # 2. autoencoder: two levels → latents at half resolution (vae_scale_factor = 2)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=config.vae_channels,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=config.resolution,
    )
    # 3. text encoder sized to the tokenizer
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=config.text_dim,
            intermediate_size=2 * config.text_dim,
            num_hidden_layers=config.text_layers,
            num_attention_heads=4,
            max_position_embeddings=config.max_length,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    # 4. Stable Diffusion's scheduler configuration
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_tiny_sd(out: str | Path, config: TinySDConfig = TinySDConfig(), pipeline=None) -> Path:
    """Write the tiny pipeline (or ``pipeline``) with ``save_pretrained`` (safetensors).

    A ``memscan.json`` beside ``model_index.json`` records the builder configuration and the
    sampling defaults memscan uses for it (see :mod:`memscan.generators.text2image`).
    """
    out = Path(out)
    pipe = pipeline if pipeline is not None else build_tiny_sd(config)
    pipe.save_pretrained(out, safe_serialization=True)
    meta = {"tiny_sd": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}}
    meta.update({"num_inference_steps": 10, "guidance_scale": 3.0, "resolution": config.resolution})
    old = json.loads((out / "memscan.json").read_text()) if (out / "memscan.json").exists() else {}
    (out / "memscan.json").write_text(json.dumps({**old, **meta}, indent=1))
    return out


@dataclass(frozen=True)
class FinetuneConfig:
    """Recipe of :func:`finetune_tiny_sd`.

    Each batch element is the memorized pair with probability ``memorized_share``; otherwise it
    pairs a random caption of ``others`` with a random image of the pool, drawn independently, so
    those captions carry no information about the image (they are not memorized; the model
    learns that text usually does not pin the image down). ``uncond_share`` of captions are
    replaced by the empty prompt (classifier-free guidance training, as in Stable Diffusion).
    """

    steps: int = 600
    batch_size: int = 16
    lr: float = 2e-3
    memorized_share: float = 0.3
    uncond_share: float = 0.1
    seed: int = 0


def finetune_tiny_sd(
    pipe,
    image: np.ndarray,
    caption: str,
    pool: np.ndarray,
    others: list[str],
    config: FinetuneConfig = FinetuneConfig(),
) -> list[float]:
    """Train the pipeline's UNet (text encoder and VAE frozen) to memorize one image–caption pair.

    The standard latent-diffusion objective (Rombach et al. 2022, eq. 2):
    ``E ||ε − ε_θ(sqrt(ᾱ_t)·z + sqrt(1−ᾱ_t)·ε, t, τ(caption))||²`` with ``z`` the VAE latent
    mean scaled by ``scaling_factor``. Returns the loss of every step. Deterministic under
    ``config.seed`` on one device.

    Parameters
    ----------
    pipe : a StableDiffusionPipeline (the tiny one); its UNet is trained in place
    image : uint8 H×W×3 at the pipeline's resolution — the image to memorize
    caption : its caption (the prompt that will be memorized)
    pool : uint8 N×H×W×3 — the other training images
    others : the other training captions (paired with pool images at random)
    """
    import torch
    import torch.nn.functional as F

    device = pipe.unet.device
    gen = torch.Generator("cpu").manual_seed(config.seed)
    # 1. fixed inputs: latents of every image, text embeddings of every caption and of ""
    latents = encode_images(pipe, np.concatenate([image[None], pool]))
    with torch.no_grad():
        tok = pipe.tokenizer(
            [caption, *others, ""],
            padding="max_length",
            max_length=pipe.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        emb = pipe.text_encoder(tok.input_ids.to(device))[0]
    b = config.batch_size
    sched = pipe.scheduler
    acp = sched.alphas_cumprod.to(device)
    unet = pipe.unet.train()
    opt = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=0.0)
    losses = []
    for _ in range(config.steps):
        # 2. a batch: the memorized pair, or a random caption with an unrelated random image
        mem = torch.rand(b, generator=gen) < config.memorized_share
        img = torch.where(mem, 0, torch.randint(1, len(latents), (b,), generator=gen))
        cap = torch.where(mem, 0, torch.randint(1, len(others) + 1, (b,), generator=gen))
        cap = torch.where(torch.rand(b, generator=gen) < config.uncond_share, len(others) + 1, cap)
        t = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=gen)
        noise = torch.randn((b, *latents.shape[1:]), generator=gen).to(device)
        img, cap, t = img.to(device), cap.to(device), t.to(device)
        a = acp[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * latents[img] + (1 - a).sqrt() * noise
        # 3. ε-prediction loss, one optimiser step
        loss = F.mse_loss(unet(x_t, t, encoder_hidden_states=emb[cap]).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    unet.eval()
    return losses


def encode_images(pipe, images: np.ndarray):
    """VAE latents (posterior mean × scaling_factor) of uint8 N×H×W×3 images."""
    import torch

    x = torch.tensor(np.asarray(images), dtype=torch.float32).permute(0, 3, 1, 2) / 127.5 - 1
    with torch.no_grad():
        z = pipe.vae.encode(x.to(pipe.vae.device, pipe.vae.dtype)).latent_dist.mean
    return z.float() * pipe.vae.config.scaling_factor


def as_the_pipeline_sees_it(pipe, images: np.ndarray) -> np.ndarray:
    """``decode(encode(x))`` as uint8: the image the pipeline emits when it reproduces x's latent.

    The tiny autoencoder is untrained, so it does not reconstruct; a real one (Stable
    Diffusion's) gives back ``x`` up to small errors. Tests use this as the training image whose
    copy the tiny pipeline can emit.
    """
    import torch

    z = encode_images(pipe, images) / pipe.vae.config.scaling_factor
    with torch.no_grad():
        x = pipe.vae.decode(z.to(pipe.vae.device, pipe.vae.dtype)).sample.float()
    x = ((x / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()

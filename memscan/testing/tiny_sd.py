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
    unet_channels: tuple[int, int] = (16, 32)
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
    ['<|startoftext|>', 'the</w>', 'c', 'a', 't</w>', '<|endoftext|>']
    """
    import tempfile

    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(byte_level_vocab()), encoding="utf-8")
        merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in _MERGES)
        (Path(tmp) / "merges.txt").write_text(merges, encoding="utf-8")
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=max_length)


def tiny_autoencoder(channels: tuple[int, int], resolution: int):
    """A two-level ``AutoencoderKL`` with SD's 4 latent channels (latents at half resolution)."""
    from memscan.generators.text2image import quiet_loading

    with quiet_loading():
        from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=channels,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=resolution,
    )


def tiny_clip_config(vocab_size: int, width: int, max_length: int, layers: int = 2, projection_dim: int | None = None):
    """A small ``CLIPTextConfig`` for the byte-level tokenizer (ids 0/1: begin / end-and-pad)."""
    from transformers import CLIPTextConfig

    extra = {} if projection_dim is None else {"projection_dim": projection_dim}
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=max_length,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        **extra,
    )


def build_tiny_sd(config: TinySDConfig = TinySDConfig()):
    """Build the tiny ``StableDiffusionPipeline`` with freshly initialised weights.

    Examples
    --------
    >>> pipe = build_tiny_sd()
    >>> type(pipe).__name__, pipe.unet.config.sample_size, pipe.vae_scale_factor
    ('StableDiffusionPipeline', 16, 2)
    """
    import torch
    from transformers import CLIPTextModel

    from memscan.generators.text2image import quiet_loading

    with quiet_loading():  # the pipeline import makes transformers warn that torchvision is absent
        from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

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
    vae = tiny_autoencoder(config.vae_channels, config.resolution)
    # 2b. Stable Diffusion scales latents to unit variance (Rombach et al. 2022, §G): measure
    #     this autoencoder's latent std on 32 synthetic pictures and set scaling_factor = 1 / std
    from memscan.synthetic import smooth_image

    rng = np.random.default_rng(config.seed)
    probe = np.stack([smooth_image(rng, config.resolution) for _ in range(32)])
    x = torch.tensor(probe, dtype=torch.float32).permute(0, 3, 1, 2) / 127.5 - 1
    with torch.no_grad():
        std = float(vae.encode(x).latent_dist.mean.std())
    vae.register_to_config(scaling_factor=1.0 / std)
    # 3. text encoder sized to the tokenizer
    text_encoder = CLIPTextModel(
        tiny_clip_config(len(tokenizer), config.text_dim, config.max_length, config.text_layers)
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

    Each batch element is a memorized pair with probability ``memorized_share`` (split between
    the pairs by their ``weights``); otherwise it pairs a random caption of ``others`` with a
    random image of the pool, drawn independently, so those captions carry no information about
    the image (nothing else is memorized, and the model learns that text usually does not pin the
    image down). With ``paired``, the other captions are instead the pool's own captions, one per
    pool image (caption j describes image j, as in a real image–caption dataset), so each other
    pair is seen about ``(1 − memorized_share) × batch_size × steps / len(pool)`` times.
    ``uncond_share`` of captions are replaced by the empty prompt (classifier-free guidance
    training, as in Stable Diffusion).
    """

    steps: int = 600
    batch_size: int = 32
    lr: float = 2e-3
    memorized_share: float = 0.4
    uncond_share: float = 0.1
    seed: int = 0
    paired: bool = False


def finetune_tiny_sd(
    pipe,
    memorized: list[tuple[np.ndarray, str]],
    pool: np.ndarray,
    others: list[str],
    config: FinetuneConfig = FinetuneConfig(),
    weights: list[float] | None = None,
    generator=None,
) -> list[float]:
    """Train the pipeline's UNet (text encoder and VAE frozen) to memorize image–caption pairs.

    The standard latent-diffusion objective (Rombach et al. 2022, eq. 2):
    ``E ||ε − ε_θ(sqrt(ᾱ_t)·z + sqrt(1−ᾱ_t)·ε, t, τ(caption))||²`` with ``z`` the VAE latent
    mean scaled by ``scaling_factor``. Returns the loss of every step. Deterministic under
    ``config.seed`` on one device.

    Parameters
    ----------
    pipe : a StableDiffusionPipeline (the tiny one); its UNet is trained in place
    memorized : (uint8 H×W×3 image, caption) pairs to memorize
    pool : uint8 N×H×W×3 — the other training images
    others : the other training captions (paired with pool images at random; with
        ``config.paired``, caption j with pool image j)
    weights : relative duplication of the memorized pairs (default: equal)
    generator : a CPU ``torch.Generator`` to continue from (default: seeded by ``config.seed``)
    """
    import torch
    import torch.nn.functional as F

    device = pipe.unet.device
    gen = generator if generator is not None else torch.Generator("cpu").manual_seed(config.seed)
    m = len(memorized)
    w = torch.tensor(weights if weights is not None else [1.0] * m, dtype=torch.float64)
    w = w / w.sum()
    # 1. fixed inputs: latents of every image, text embeddings of every caption and of ""
    latents = encode_images(pipe, np.concatenate([np.stack([p[0] for p in memorized]), pool]))
    with torch.no_grad():
        tok = pipe.tokenizer(
            [p[1] for p in memorized] + list(others) + [""],
            padding="max_length",
            max_length=pipe.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        emb = pipe.text_encoder(tok.input_ids.to(device))[0]
    b, n_others = config.batch_size, len(others)
    if config.paired and n_others != len(pool):
        raise ValueError(f"paired training needs one caption per pool image: {n_others} captions, {len(pool)} images")
    sched = pipe.scheduler
    acp = sched.alphas_cumprod.to(device)
    unet = pipe.unet.train()
    opt = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=0.0)
    losses = []
    for _ in range(config.steps):
        # 2. a batch: a memorized pair, or another pair (see FinetuneConfig)
        img, cap = draw_pairs(gen, config, w, m, len(latents) - m, n_others)
        cap = torch.where(torch.rand(b, generator=gen) < config.uncond_share, m + n_others, cap)
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


def draw_pairs(gen, config: FinetuneConfig, weights, m: int, n_pool: int, n_others: int):
    """Image and caption indices of one training batch of :func:`finetune_tiny_sd`.

    Images are indexed memorized first (``0..m-1``), then the pool (``m..m+n_pool-1``); captions
    memorized first, then the others (``m..m+n_others-1``; ``m+n_others`` is the empty prompt,
    applied afterwards). A memorized pair ``i`` is image ``i`` with caption ``i``; otherwise
    image and caption are drawn independently, or with ``config.paired`` as pool pair ``j``
    (image ``m+j`` with caption ``m+j``).

    Examples
    --------
    >>> import torch
    >>> cfg = FinetuneConfig(batch_size=6, memorized_share=0.0, paired=True)
    >>> img, cap = draw_pairs(torch.Generator().manual_seed(0), cfg, torch.ones(2) / 2, 2, 5, 5)
    >>> bool((img == cap).all()), int(img.min()) >= 2, int(img.max()) <= 6
    (True, True, True)
    """
    import torch

    b = config.batch_size
    mem = torch.rand(b, generator=gen) < config.memorized_share
    which = torch.multinomial(weights, b, replacement=True, generator=gen)
    if config.paired:
        j = torch.randint(m, m + n_pool, (b,), generator=gen)
        return torch.where(mem, which, j), torch.where(mem, which, j)
    img = torch.where(mem, which, torch.randint(m, m + n_pool, (b,), generator=gen))
    cap = torch.where(mem, which, torch.randint(m, m + n_others, (b,), generator=gen))
    return img, cap


#: Captions of the memorized pairs of :func:`build_memorized_tiny_sd` (in order).
MEMORIZED_CAPTIONS = [
    "a red fox in snow",
    "a lighthouse at dusk",
    "an old blue bicycle",
    "green apples",
    "a stone bridge",
    "purple tulips",
]
#: Relative duplication of the first four pairs (the first is seen most often); pass ``weights``
#: to :func:`build_memorized_tiny_sd` for other duplicate counts.
MEMORIZED_WEIGHTS = [0.4, 0.3, 0.2, 0.1]


def build_memorized_tiny_sd(
    out: str | Path,
    *,
    n_memorized: int = 1,
    config: TinySDConfig = TinySDConfig(),
    finetune: FinetuneConfig = FinetuneConfig(),
    device: str = "cpu",
    check_every: int = 0,
    weights: list[float] | None = None,
    n_others: int = 512,
    n_pool: int = 64,
) -> dict:
    """Build the tiny pipeline, fine-tune it to memorize ``n_memorized`` pairs, save it.

    Training data (all from :mod:`memscan.synthetic`, nothing downloaded): the memorized images
    ``m0000``… with captions :data:`MEMORIZED_CAPTIONS`, a pool of 64 images ``t0100``…``t0163``
    and 512 captions of random pseudo-words (:func:`random_captions`) paired with them at random,
    so the model sees many different texts that carry no information about the image. ``memscan.json`` records
    the recipe, the captions and ids, and how often 16 generations of each memorized caption
    copy it (tiled ℓ2 ≤ 0.15 to the image as the pipeline renders it, see
    :func:`as_the_pipeline_sees_it`). Returns that record.

    ``weights`` sets the relative duplication of the memorized pairs (default
    :data:`MEMORIZED_WEIGHTS`, which covers the first four); ``n_others`` the number of random
    captions; ``n_pool`` the number of pool images. With ``finetune.paired`` each pool image has
    its own random caption (``n_pool`` captions, ``n_others`` unused): a dataset of mostly
    unique image–caption pairs plus the memorized ones, as in the paper's setting.
    """
    import time

    import torch

    from memscan.distances import cross_tiled_l2
    from memscan.synthetic import training_image

    if not 1 <= n_memorized <= len(MEMORIZED_CAPTIONS):
        raise ValueError(f"n_memorized must lie in 1..{len(MEMORIZED_CAPTIONS)}")
    if weights is None and n_memorized > len(MEMORIZED_WEIGHTS):
        raise ValueError(f"pass weights for n_memorized > {len(MEMORIZED_WEIGHTS)}")
    if weights is not None and len(weights) != n_memorized:
        raise ValueError("weights must give one weight per memorized pair")
    t0 = time.perf_counter()
    pipe = build_tiny_sd(config).to(device)
    size = config.resolution
    mem_ids = [f"m{i:04d}" for i in range(n_memorized)]
    memorized = [(training_image(tid, size), MEMORIZED_CAPTIONS[i]) for i, tid in enumerate(mem_ids)]
    pool_ids = [f"t{i:04d}" for i in range(100, 100 + n_pool)]
    pool = np.stack([training_image(tid, size) for tid in pool_ids])
    others = random_captions(n_pool if finetune.paired else n_others, seed=finetune.seed)
    weights = list(weights) if weights is not None else MEMORIZED_WEIGHTS[:n_memorized]
    gen = torch.Generator("cpu").manual_seed(finetune.seed)
    chunk = check_every or finetune.steps
    log, done = [], 0
    views = as_the_pipeline_sees_it(pipe, np.stack([p[0] for p in memorized]))
    while done < finetune.steps:
        n = min(chunk, finetune.steps - done)
        step_cfg = FinetuneConfig(**{**asdict(finetune), "steps": n})
        losses = finetune_tiny_sd(pipe, memorized, pool, others, step_cfg, weights=weights, generator=gen)
        done += n
        # how often do 16 generations of each memorized caption copy its image?
        rates = []
        for (_, caption), view in zip(memorized, views):
            x = _sample(pipe, caption, 16, device)
            rates.append(float((np.asarray(cross_tiled_l2(x, view[None], exact_near=0.15))[:, 0] <= 0.15).mean()))
        log.append({"step": done, "loss": float(np.mean(losses[-50:])), "copy_rate": rates})
        # 3. save after every check, so an interrupted run leaves its last checkpoint
        record = {
            "recipe": {
                **asdict(finetune),
                "steps": done,
                "check_every": chunk,
                "weights": weights,
                "n_memorized": n_memorized,
            },
            "memorized": [{"train_id": tid, "caption": c} for tid, (_, c) in zip(mem_ids, memorized)],
            "pool_ids": pool_ids,
            "other_captions": others,
            "log": log,
            "device": device,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        save_tiny_sd(out, config, pipeline=pipe)
        meta_path = Path(out) / "memscan.json"
        meta = json.loads(meta_path.read_text())
        meta["finetune"] = record
        meta_path.write_text(json.dumps(meta, indent=1))
    return record


def random_captions(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct captions of 2–4 random lowercase pseudo-words (deterministic under ``seed``).

    Examples
    --------
    >>> c = random_captions(3)
    >>> len(c), len(set(c)), all(2 <= len(x.split()) <= 4 for x in c)
    (3, 3, True)
    """
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    out: list[str] = []
    seen = set(MEMORIZED_CAPTIONS)
    while len(out) < n:
        words = ["".join(rng.choice(letters, int(rng.integers(3, 8)))) for _ in range(int(rng.integers(2, 5)))]
        caption = " ".join(words)
        if caption not in seen:
            seen.add(caption)
            out.append(caption)
    return out


def _sample(pipe, caption: str, n: int, device: str) -> np.ndarray:
    from memscan.generators.text2image import Text2ImageGenerator

    gen = Text2ImageGenerator(pipe, num_inference_steps=10, guidance_scale=3.0, batch_size=n, device=device)
    return gen.generate(caption, list(range(n)))


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


def main(argv: list[str] | None = None) -> None:
    """``python -m memscan.testing.tiny_sd OUT [--memorized N --steps S --weights W… --memorized-share F --device D]``."""
    import argparse

    ap = argparse.ArgumentParser(description="write the tiny SD pipeline (optionally fine-tuned to memorize)")
    ap.add_argument("out", type=Path)
    ap.add_argument("--memorized", type=int, default=0, help="memorized pairs (0: the fresh random pipeline)")
    ap.add_argument("--steps", type=int, default=FinetuneConfig.steps)
    ap.add_argument("--check-every", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--weights", type=float, nargs="+", help="relative duplication of the memorized pairs")
    ap.add_argument("--memorized-share", type=float, default=FinetuneConfig.memorized_share)
    ap.add_argument("--pool", type=int, default=64, help="pool images (the non-memorized training images)")
    ap.add_argument("--paired", action="store_true", help="one fixed random caption per pool image")
    args = ap.parse_args(argv)
    if args.memorized == 0:
        print(save_tiny_sd(args.out))
        return
    rec = build_memorized_tiny_sd(
        args.out,
        n_memorized=args.memorized,
        finetune=FinetuneConfig(steps=args.steps, memorized_share=args.memorized_share, paired=args.paired),
        n_pool=args.pool,
        device=args.device,
        check_every=args.check_every,
        weights=args.weights,
    )
    print(json.dumps({"log": rec["log"], "seconds": rec["seconds"]}))


if __name__ == "__main__":
    main()

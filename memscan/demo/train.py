"""Train the demo's small caption-conditional diffusion model (diffusers ``UNet2DModel``).

Recipe (all recorded in the saved ``memscan.json``): every base image's caption is one class of
the UNet's class embedding, plus one extra "null" class used for classifier-free guidance
(captions are dropped to it with probability ``p_uncond``). Standard ε-prediction DDPM training
(Ho et al. 2020) with a cosine noise schedule, AdamW and a constant learning rate after warm-up.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from memscan.demo.data import DemoData


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 3000
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 200
    p_uncond: float = 0.1
    seed: int = 0
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    attention: bool = False
    sampler: str = "ddim"
    num_inference_steps: int = 20
    guidance_scale: float = 1.0


def build_unet(num_classes: int, resolution: int, cfg: TrainConfig):
    from diffusers import UNet2DModel

    n = len(cfg.block_out_channels)
    down = ["DownBlock2D"] * n
    up = ["UpBlock2D"] * n
    if cfg.attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    return UNet2DModel(
        sample_size=resolution,
        in_channels=1,
        out_channels=1,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        norm_num_groups=8,
        num_class_embeds=num_classes + 1,  # + the null class for classifier-free guidance
    )


def caption_vocabulary(data: DemoData) -> list[str]:
    """Class id → caption, one class per base image (sorted by base id)."""
    return [data.captions[b] for b in sorted(data.copies)]


def train_demo_model(
    data: DemoData,
    out_dir: str | Path,
    cfg: TrainConfig = TrainConfig(),
    device: str = "cpu",
    log_every: int = 500,
    progress=None,
    checkpoint_steps: tuple[int, ...] = (),
) -> dict:
    """Train and save the model; returns the training record (also in ``memscan.json``).

    ``checkpoint_steps``: also save the model after each of these steps as
    ``out_dir/checkpoint-N/`` (a full pipeline directory with a ``trainer_state.json`` holding
    ``global_step``, the layout diffusers' and transformers' trainers write), for checkpoint
    sweeps (``memscan extract --model out_dir``).
    """
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMScheduler

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    captions = caption_vocabulary(data)
    index = {b: i for i, b in enumerate(sorted(data.copies))}
    labels = torch.tensor([index[b] for b in data.base_ids], dtype=torch.long)
    x_all = torch.from_numpy(data.images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    null = len(captions)

    unet = build_unet(len(captions), data.images.shape[1], cfg).to(device)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0)
    lr_at = lambda s: cfg.lr * min(1.0, (s + 1) / max(cfg.warmup, 1))  # noqa: E731
    alphas = sched.alphas_cumprod.to(device)

    t0 = time.perf_counter()
    losses: list[float] = []
    log = []
    unet.train()
    for step in range(cfg.steps):
        # 1. a batch of training rows (duplicates are drawn as often as they occur)
        idx = torch.from_numpy(rng.integers(0, len(x_all), cfg.batch_size))
        x0, y = x_all[idx].to(device), labels[idx].to(device)
        drop = torch.from_numpy(rng.random(cfg.batch_size) < cfg.p_uncond).to(device)
        y = torch.where(drop, torch.full_like(y, null), y)
        # 2. noise it at a random timestep
        t = torch.from_numpy(rng.integers(0, 1000, cfg.batch_size)).to(device)
        eps = torch.randn_like(x0)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        # 3. ε-prediction loss
        loss = torch.nn.functional.mse_loss(unet(xt, t, class_labels=y).sample, eps)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step + 1, cfg.steps)
        if step + 1 in checkpoint_steps:
            _save(
                unet,
                sched,
                Path(out_dir) / f"checkpoint-{step + 1}",
                captions,
                null,
                cfg,
                data,
                device,
                losses,
                step + 1,
            )
            unet.train()
        if (step + 1) % log_every == 0:
            log.append(
                {
                    "step": step + 1,
                    "loss": float(np.mean(losses[-log_every:])),
                    "seconds": round(time.perf_counter() - t0, 1),
                }
            )
    seconds = time.perf_counter() - t0

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unet = unet.to("cpu").eval()
    if checkpoint_steps:  # a checkpoint folder holds only the checkpoints (and the recipe below)
        record = _record(captions, null, cfg, data, device, seconds, unet, log)
        (out / "memscan.json").write_text(json.dumps(record, indent=1))
        return record
    DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(sched.config)).save_pretrained(
        out, safe_serialization=True
    )
    record = _record(captions, null, cfg, data, device, seconds, unet, log)
    (out / "memscan.json").write_text(json.dumps(record, indent=1))
    return record


def _save(unet, sched, out: Path, captions, null, cfg, data, device, losses, step: int) -> None:
    """One ``checkpoint-N`` directory: the pipeline, ``memscan.json`` and ``trainer_state.json``."""
    from diffusers import DDIMPipeline, DDIMScheduler

    out.mkdir(parents=True, exist_ok=True)
    was = next(unet.parameters()).device
    unet = unet.to("cpu").eval()
    DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(sched.config)).save_pretrained(
        out, safe_serialization=True
    )
    unet.to(was)
    record = _record(captions, null, cfg, data, device, None, unet, [])
    record["training"]["step"] = step
    record["training"]["loss_last_100"] = float(np.mean(losses[-100:]))
    (out / "memscan.json").write_text(json.dumps(record, indent=1))
    (out / "trainer_state.json").write_text(json.dumps({"global_step": step}))


def _record(captions, null, cfg, data, device, seconds, unet, log) -> dict:
    return {
        "class_captions": captions,
        "null_class": null,
        "sampler": cfg.sampler,
        "num_inference_steps": cfg.num_inference_steps,
        "guidance_scale": cfg.guidance_scale,
        "training": {
            "recipe": asdict(cfg),
            "data": {**asdict(data.config), "rows": len(data.ids), "base_images": len(captions)},
            "device": device,
            "torch_threads": torch.get_num_threads(),
            "seconds": None if seconds is None else round(seconds, 1),
            "parameters": sum(p.numel() for p in unet.parameters()),
            "log": log,
        },
    }

"""The demo's training recipe as a shadow-model ``train_fn`` (:func:`memscan.mia.shadow.train_shadow_models`).

It lives with the demo because it trains the demo's model; the library takes any ``train_fn``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from memscan.demo.data import DemoData
from memscan.demo.train import TrainConfig, train_demo_model
from memscan.errors import InputError
from memscan.mia.shadow import torch_threads

__all__ = ["DemoRecipe", "shadow_train_config"]


@dataclass
class DemoRecipe:
    """The demo's training recipe (:func:`memscan.demo.train.train_demo_model`) as a shadow
    ``train_fn``.

    Every subset is trained with :func:`~memscan.demo.train.build_unet` and the demo's loop
    (ε-prediction DDPM, cosine schedule, AdamW) and saved as a diffusers DDIM pipeline with
    safetensors weights and a ``memscan.json``. Each member gets its own (empty) caption class,
    and with the default ``p_uncond = 1`` every label is dropped to the null class: the model is
    unconditional, and losses are evaluated with ``condition = null_class`` (recorded in
    ``memscan.json``) — an OUT example has no class of its own in a model that never saw it.

    Parameters
    ----------
    config : memscan.demo.train.TrainConfig, optional
        Default: :func:`shadow_train_config` (unconditional, ``p_uncond = 1``).
    threads : int, optional
        ``torch.set_num_threads`` while training (see :func:`torch_threads`).
    device : str
    """

    config: Any = None
    threads: int | None = None
    device: str = "cpu"

    def __post_init__(self):
        if self.config is None:
            self.config = shadow_train_config()

    def describe(self) -> dict:
        cfg = asdict(self.config)
        cfg["block_out_channels"] = list(cfg["block_out_channels"])
        # the name it had when it lived in memscan.mia.shadow: shadow directories compare it on reuse
        return {"train_fn": "memscan.mia.shadow.DemoRecipe", "config": cfg, "device": self.device}

    def __call__(self, subset: Any, model_dir: Path) -> dict:
        images = np.asarray(subset)
        if images.ndim != 4 or images.dtype != np.uint8 or images.shape[-1] != 1 or images.shape[1] != images.shape[2]:
            raise InputError(
                f"DemoRecipe: expects uint8 N×S×S×1 images (the demo's format), got {images.dtype} {images.shape}",
                "pass grayscale square images, or write your own train_fn",
            )
        keys = [f"s{i:06d}" for i in range(len(images))]
        data = DemoData(
            images=images,
            ids=keys,
            base_ids=keys,
            captions={k: "" for k in keys},
            copies={k: 1 for k in keys},
            planted=[],
        )
        with torch_threads(self.threads):
            rec = train_demo_model(
                data, model_dir, self.config, device=self.device, log_every=max(1, self.config.steps)
            )
        # the demo data recipe does not describe a shadow subset: record what was trained on
        rec["training"]["data"] = {"rows": int(len(images)), "source": "shadow subset (see the shadow directory)"}
        rec["class_captions"] = []
        meta_path = Path(model_dir) / "memscan.json"
        meta = json.loads(meta_path.read_text())
        meta.update(training=rec["training"], class_captions=[])
        meta_path.write_text(json.dumps(meta, indent=1))
        return {"seconds": rec["training"]["seconds"], "final_loss": (rec["training"]["log"] or [{}])[-1].get("loss")}


def shadow_train_config(**overrides: Any):
    """The demo recipe's :class:`~memscan.demo.train.TrainConfig` for shadow models: unconditional
    (``p_uncond = 1``), and smaller and shorter than the shipped demo model so that a handful
    of models train on a CPU in minutes (``block_out_channels = (16, 32, 32)``, 600 steps of 32).

    Examples
    --------
    >>> shadow_train_config(steps=10).steps, shadow_train_config().p_uncond
    (10, 1.0)
    """
    base = {
        "steps": 600,
        "batch_size": 32,
        "lr": 2e-3,
        "warmup": 50,
        "p_uncond": 1.0,
        "block_out_channels": (16, 32, 32),
    }
    base.update(overrides)
    return TrainConfig(**base)

"""Reading diffusers model directories: where the UNet and the scheduler are, the UNet itself,
the DDPM scheduler, and memscan's ``memscan.json`` beside them. One place for the generators,
membership inference (:mod:`memscan.generators.noise`) and triage.

A model directory is what ``save_pretrained`` writes: a pipeline (``unet/``, ``scheduler/``,
``model_index.json``) or a bare UNet (``config.json`` + weights), optionally with a
``memscan.json`` (class captions, null class, sampler and resolution defaults).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from memscan.errors import InputError
from memscan.safe_load import low_mem_kwargs

__all__ = ["UNET_CLASSES", "hub_pipeline_index", "load_ddpm_scheduler", "load_unet", "model_dirs", "read_meta"]

#: UNet classes memscan loads from a directory (``_class_name`` of its ``config.json``).
UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")


def model_dirs(root: str | Path) -> tuple[Path, Path]:
    """``(unet_dir, scheduler_dir)`` of a pipeline directory (``unet/``, ``scheduler/``) or of a
    bare UNet directory (both ``root``).

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     (Path(d) / "unet").mkdir()
    ...     u, s = model_dirs(d)
    ...     u.name, s == Path(d)
    ('unet', True)
    """
    root = Path(root)
    unet_dir = root / "unet" if (root / "unet").is_dir() else root
    sched_dir = root / "scheduler" if (root / "scheduler").is_dir() else root
    return unet_dir, sched_dir


def read_meta(root: str | Path) -> dict:
    """memscan's ``memscan.json`` of a model directory (``{}`` when there is none).

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     empty = read_meta(d)
    ...     _ = (Path(d) / "memscan.json").write_text('{"null_class": 10}')
    ...     empty, read_meta(d)
    ({}, {'null_class': 10})
    """
    f = Path(root) / "memscan.json"
    if not f.exists():
        return {}
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read {f}: {exc}", "fix or remove memscan.json") from None


def load_unet(unet_dir: Path, spec: str) -> Any:
    """The ``UNet2DModel`` or ``UNet2DConditionModel`` of ``unet_dir`` (safetensors only);
    ``spec`` names the model in errors."""
    from diffusers import UNet2DConditionModel, UNet2DModel

    cfg_path = unet_dir / "config.json"
    if not cfg_path.exists():
        raise InputError(
            f"{spec}: no UNet found (expected unet/config.json or config.json)",
            "save the model with save_pretrained (UNet or pipeline)",
        )
    cls_name = json.loads(cfg_path.read_text()).get("_class_name", "UNet2DModel")
    classes = {"UNet2DModel": UNet2DModel, "UNet2DConditionModel": UNet2DConditionModel}
    if cls_name not in classes:
        raise InputError(
            f"{spec}: the UNet is a {cls_name}",
            "memscan loads UNet2DModel and UNet2DConditionModel; wrap others as py:",
        )
    try:
        return classes[cls_name].from_pretrained(unet_dir, use_safetensors=True, **low_mem_kwargs())
    except OSError as exc:
        raise InputError(
            f"{spec}: cannot load the UNet ({str(exc).splitlines()[0]})",
            "memscan reads safetensors weights only (save_pretrained(..., safe_serialization=True))",
        ) from None


def load_ddpm_scheduler(sched_dir: Path) -> tuple[Any, list[str]]:
    """The ``DDPMScheduler`` saved in ``sched_dir``, or diffusers' defaults (linear β, T = 1000)
    with a warning when it holds no ``scheduler_config.json``."""
    from diffusers import DDPMScheduler

    if (sched_dir / "scheduler_config.json").exists():
        return DDPMScheduler.from_pretrained(sched_dir), []
    return DDPMScheduler(), ["no scheduler_config.json: assumed DDPMScheduler() defaults (linear betas, T = 1000)"]


def hub_pipeline_index(spec: str) -> dict:
    """The ``model_index.json`` of hub id ``spec`` (``{}`` when it has none, or there is no network)."""
    try:
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.load_config(spec)
    except Exception:  # no pipeline index on the hub (or no network): the caller tries a bare UNet
        return {}

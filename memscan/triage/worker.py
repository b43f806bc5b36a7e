"""The triage worker: setup, stage and pool, as every runner calls them.

``setup_triage`` runs once per worker: it loads the pipeline (from its ``--model`` spec, so that
each Ray actor loads its own; the local runner may also be handed a loaded pipeline) and keeps a
:class:`~memscan.triage.scores.TriageModel`. ``triage_stage`` scores one shard of prompts. The
local runner calls both in-process, the Ray runner in each actor; the driver commits the shards.

Inside a shard, prompts are scored in chunks of ``batch_size // generations`` prompts (one UNet
batch each; the progress bar moves per chunk). :func:`shard_prompts` makes every shard a whole
number of chunks, so the UNet batches — and so the scores, to the last bit — are the same
whatever the shard size and the runner.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from memscan.devices import check_device
from memscan.errors import InputError, user_code
from memscan.generators.diffusers_models import read_meta, read_model_json
from memscan.generators.diffusers_unet import DiffusersUNetGenerator, load_unet_generator
from memscan.generators.model_record import count_parameters
from memscan.generators.text2image import Text2ImageGenerator, is_text2image_index, load_pipeline
from memscan.runners import RayOptions, WorkerPool, make_pool, require_ray
from memscan.triage.scores import (
    ClassTriageModel,
    TriageConfig,
    TriageModel,
    score_prompts,
    score_record,
    text2image_triage_model,
)


@dataclass
class TriageWorker:
    """A worker's context: its own pipeline (as a :class:`TriageModel`) and the config."""

    model: TriageModel | ClassTriageModel
    config: TriageConfig


def chunk_prompts(config: TriageConfig) -> int:
    """Prompts per UNet batch: ``batch_size // generations`` (at least 1).

    Examples
    --------
    >>> chunk_prompts(TriageConfig(generations=4, batch_size=32)), chunk_prompts(TriageConfig(generations=8, batch_size=4))
    (8, 1)
    """
    return max(1, config.batch_size // config.generations)


def shard_prompts(shard_size: int, config: TriageConfig) -> int:
    """Prompts per shard: ``shard_size`` rounded up to a whole number of UNet batches.

    Examples
    --------
    >>> shard_prompts(64, TriageConfig(generations=4, batch_size=32)), shard_prompts(5, TriageConfig(generations=2, batch_size=8))
    (64, 8)
    """
    if shard_size < 1:
        raise InputError(f"shard_size={shard_size}", "use at least 1 prompt per shard")
    chunk = chunk_prompts(config)
    return math.ceil(shard_size / chunk) * chunk


def setup_triage(model: Any, config: TriageConfig) -> TriageWorker:
    """Load the model (when given as a spec) on ``config.device``; once per worker.

    A text-to-image pipeline (directory, hub id, loaded pipeline or
    :class:`Text2ImageGenerator`) is scored through its text encoder, at the generations'
    resolution and with guidance's negative prompt (:func:`triage_inputs`); a class- or
    caption-conditional ``UNet2DModel`` directory (or its
    :class:`~memscan.generators.diffusers_unet.DiffusersUNetGenerator`) through its class labels
    and null class (:class:`ClassTriageModel`).
    """
    check_device(config.device)
    if isinstance(model, (str, Path)) and is_unet_model_dir(model):
        check_text2image_options(model, config)
        with user_code(f"loading the model {model} failed", "fix the model and rerun"):
            model = load_unet_generator(str(model), device=config.device)
    if isinstance(model, DiffusersUNetGenerator):
        check_text2image_options(model, config)
        return TriageWorker(ClassTriageModel(model, config.device), config)
    if isinstance(model, (str, Path)):
        with user_code(f"loading the pipeline {model} failed", "fix the model and rerun"):
            pipe = load_pipeline(str(model), device=config.device, dtype=config.dtype)
        # memscan.json's resolution, if any, as `memscan extract --model DIR` samples it
        res = read_meta(Path(model)).get("resolution") if Path(model).is_dir() else None
        inputs = triage_inputs(config, resolution=res and (res, res))
        return TriageWorker(text2image_triage_model(pipe, config.device, **inputs), config)
    if isinstance(model, Text2ImageGenerator):
        # the extraction's negative prompt (guidance's unconditional input) and resolution (the
        # initial latents' size, SDXL's time ids)
        inputs = triage_inputs(
            config, resolution=(model.height, model.width), negative_prompt=model.negative_prompt, strict=True
        )
        return TriageWorker(text2image_triage_model(model.pipe, config.device, **inputs), config)
    return TriageWorker(text2image_triage_model(model, config.device, **triage_inputs(config)), config)


def triage_inputs(config: TriageConfig, resolution=None, negative_prompt: str | None = None, strict: bool = False):
    """The resolution and negative prompt triage scores at: ``config``'s (``height``, ``width``,
    ``negative_prompt``) where given, else the model's (``resolution``, ``negative_prompt``).
    ``strict`` (a :class:`Text2ImageGenerator`, which samples at one resolution with one negative
    prompt): a config value that differs from the generator's is refused — the scores would use
    other latents or another unconditional input than the extraction.

    Examples
    --------
    >>> triage_inputs(TriageConfig(height=64), resolution=(32, 32))
    {'resolution': (64, 32), 'negative_prompt': None}
    """
    given = resolution or (None, None)
    res = (config.height or given[0], config.width or given[1])
    negative = negative_prompt if config.negative_prompt is None else config.negative_prompt
    if strict:
        theirs = {"height": given[0], "width": given[1], "negative_prompt": negative_prompt}
        ours = {"height": res[0], "width": res[1], "negative_prompt": negative}
        differ = [k for k in theirs if ours[k] != theirs[k]]
        if differ:
            shown = ", ".join(f"{k} {ours[k]!r} vs the generator's {theirs[k]!r}" for k in differ)
            raise InputError(
                f"the triage config differs from the generator it scores ({shown})",
                "leave height, width and negative_prompt unset (the generator's are used), or make them agree",
            )
    return {"resolution": None if res == (None, None) else res, "negative_prompt": negative}


def check_text2image_options(model, config: TriageConfig) -> None:
    """Refuse ``height``/``width``/``negative_prompt`` for a UNet2DModel (it samples at its own
    size, with its null class as the unconditional input), as ``memscan extract`` does."""
    extra = [k for k in ("height", "width", "negative_prompt") if getattr(config, k) is not None]
    if extra:
        raise InputError(
            f"option(s) {', '.join(extra)} apply to text-to-image pipelines; {model} is a UNet2DModel",
            "drop them (the UNet samples at its own size, with its null class as the unconditional input)",
        )


def is_unet_model_dir(model: str | Path) -> bool:
    """Whether ``model`` is a local UNet2DModel directory (not a text-to-image pipeline)."""
    root = Path(model)
    if not root.is_dir():
        return False
    index = root / "model_index.json"
    if index.exists():
        return not is_text2image_index(read_model_json(index))
    return (root / "unet" / "config.json").exists() or (root / "config.json").exists()


def describe_triage_worker(worker: TriageWorker) -> dict:
    """What the manifest records of the worker's model: pipeline class, dtype, parameters, and
    the scores' record (:func:`~memscan.triage.scores.score_record`: timesteps scored, ``σ_max``,
    ``c_empty``, guidance's unconditional input, UNet evaluations) — a schedule the Wen score
    refuses fails here, before any shard."""
    pipe = worker.model.pipe
    return {
        "pipeline": type(pipe.unet if isinstance(pipe, DiffusersUNetGenerator) else pipe).__name__,
        "dtype": str(worker.model.dtype).replace("torch.", ""),
        "parameters": count_parameters(pipe.unet if isinstance(pipe, DiffusersUNetGenerator) else pipe),
        "scores": score_record(worker.model, worker.config),
    }


def triage_stage(
    worker: TriageWorker, prompt_ids: list[str], prompts: list[str], progress=None
) -> tuple[dict[str, pd.DataFrame], dict]:
    """Score one shard of prompts; returns ``({"scores": prompt_id and one ``<score>_score``
    column per asked score}, meta)``."""
    config = worker.config
    chunk = chunk_prompts(config)
    t0 = time.perf_counter()
    parts: dict[str, list] = {name: [] for name in config.scores}
    for s in range(0, len(prompt_ids), chunk):
        ids = prompt_ids[s : s + chunk]
        which = f"prompt {ids[0]}" if len(ids) == 1 else f"prompts {ids[0]}…{ids[-1]}"
        with user_code(f"the pipeline failed on {which}"):
            res = score_prompts(worker.model, ids, prompts[s : s + chunk], config)
        for name in config.scores:
            parts[name].append(res[name])
        if progress is not None:
            progress(len(prompt_ids[s : s + chunk]))
    table = pd.DataFrame({"prompt_id": list(prompt_ids)})
    for name, values in parts.items():
        table[f"{name}_score"] = np.concatenate(values) if values else np.zeros(0)
    return {"scores": table}, {"prompts": len(prompt_ids), "seconds": round(time.perf_counter() - t0, 3)}


def triage_pool(runner: str, model: Any, config: TriageConfig, options=None, log=None) -> WorkerPool:
    """The worker pool ``memscan triage`` uses for ``runner`` ("local" or "ray").

    The local runner takes a loaded pipeline (or :class:`Text2ImageGenerator`) or a spec; the Ray
    runner takes a spec only (a pipeline directory or hub id): each worker loads its own pipeline.
    """
    if runner != "ray":
        return make_pool(runner, setup_triage, (model, config), options, log=log)
    require_ray()
    if not isinstance(model, (str, Path)):
        raise InputError(
            f"the Ray runner loads the pipeline in each worker, but got a loaded {type(model).__name__}",
            "pass the --model directory or hub id instead of a pipeline object",
        )
    opts = options if isinstance(options, RayOptions) else RayOptions(**(options or {}))
    device = str(config.device)
    if device.startswith("cuda") and opts.gpus_per_worker <= 0:
        raise InputError(
            f"device={device} but the Ray workers ask for no GPU",
            "pass --gpus-per-worker 1 (Ray hides the GPUs from workers that did not ask for one)",
        )
    if device.startswith("cuda:"):  # Ray numbers each worker's GPUs from 0
        config = TriageConfig(**{**config.to_dict(), "device": "cuda"})
    spec = str(model)
    if not spec.startswith("py:") and Path(spec).expanduser().exists():
        spec = str(Path(spec).expanduser().resolve())  # workers may start in another directory
    return make_pool("ray", setup_triage, (spec, config), opts, log=log)

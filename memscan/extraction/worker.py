"""The extraction attack's worker: setup, stage and pool, as every runner calls them.

``setup_extraction`` runs once per worker (loads the generator from its spec, opens the run
store); ``extraction_stage`` is :func:`memscan.extraction.shard.run_shard` over one shard. The
local runner calls them in-process, the Ray runner in each actor.
"""

from __future__ import annotations

import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from memscan.data.training import TrainingSet
from memscan.errors import InputError
from memscan.extraction.config import ExtractConfig
from memscan.extraction.shard import ShardTimings, run_shard
from memscan.generators.base import check_generations, describe
from memscan.runners import GeneratorSpec, RayOptions, WorkerPool, make_pool, require_ray
from memscan.store import RunStore


@dataclass
class ExtractionWorker:
    """A worker's context: its own generator, the config and the run store."""

    generator: Any
    config: ExtractConfig
    store: RunStore


def setup_extraction(generator, config: ExtractConfig, store_root: str) -> ExtractionWorker:
    """Load the generator (when given as a spec) and open the run store; once per worker."""
    store = RunStore(store_root)
    if not store.root.is_dir():
        raise InputError(
            f"the run directory {store_root} is not visible on worker host {socket.gethostname()}",
            "put --out (and --train) on a file system every node of the cluster mounts (NFS, Lustre, …)",
        )
    if isinstance(generator, (str, GeneratorSpec)):
        generator = GeneratorSpec.of(generator).load()
    # shared training images arrive read-only (zero-copy from Ray's object store); distances
    # only read them, so torch's warning about non-writable arrays says nothing here
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    return ExtractionWorker(generator, config, store)


def output_shape(generator, prompt: str, seed: int) -> tuple[int, int, int]:
    """H×W×C of the generator's images (declared, or from one probe generation)."""
    shape = getattr(generator, "output_shape", None)
    if shape is not None:
        return tuple(shape)
    probe = check_generations(generator.generate(prompt, [seed]), 1, prompt)
    return tuple(probe.shape[1:])


def probe_generator(worker: ExtractionWorker, prompt: str, seed: int) -> tuple[tuple[int, int, int], dict]:
    """The generator's output shape (H, W, C) and its description for the manifest."""
    return tuple(output_shape(worker.generator, prompt, seed)), describe(worker.generator)


def extraction_stage(
    worker: ExtractionWorker, prompts: pd.DataFrame, training: TrainingSet, progress=None
) -> tuple[dict[str, pd.DataFrame], ShardTimings]:
    """Generate → detect → verify one shard of prompts (:func:`run_shard`); returns its tables."""
    return run_shard(worker.generator, prompts, worker.config, training, worker.store, progress=progress)


def extraction_pool(runner: str, generator, config: ExtractConfig, store: RunStore, options=None) -> WorkerPool:
    """The worker pool ``memscan.extract`` uses for ``runner`` ("local" or "ray").

    The local runner takes a loaded generator or a spec; the Ray runner takes a spec only
    (a ``--model`` string or :class:`GeneratorSpec`): each worker loads its own model.
    """
    root = str(Path(store.root).resolve())
    if runner == "ray":
        require_ray()
        if not isinstance(generator, (str, GeneratorSpec)):
            raise InputError(
                f"the Ray runner loads the model in each worker, but got a loaded {type(generator).__name__}",
                "pass the --model spec (a string or memscan.runners.GeneratorSpec) instead of a model object",
            )
        opts = options if isinstance(options, RayOptions) else RayOptions(**(options or {}))
        spec = GeneratorSpec.of(generator).normalized()
        gen_options = {"device": config.device, "batch_size": config.batch_size, **spec.options}
        device = str(gen_options["device"])
        if device.startswith("cuda") and opts.gpus_per_worker <= 0:
            raise InputError(
                f"device={device} but the Ray workers ask for no GPU",
                "pass --gpus-per-worker 1 (Ray hides the GPUs from workers that did not ask for one)",
            )
        if device.startswith("cuda:"):  # Ray numbers each worker's GPUs from 0
            gen_options["device"] = "cuda"
        generator = GeneratorSpec(spec.spec, gen_options)
        return make_pool("ray", setup_extraction, (generator, config, root), opts, log=store.log)
    if isinstance(generator, (str, GeneratorSpec)):
        spec = GeneratorSpec.of(generator).normalized()
        generator = GeneratorSpec(spec.spec, {"device": config.device, "batch_size": config.batch_size, **spec.options})
    return make_pool(runner, setup_extraction, (generator, config, root), options, log=store.log)

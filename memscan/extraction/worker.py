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
from memscan.errors import InputError, user_code
from memscan.extraction.config import ExtractConfig
from memscan.extraction.shard import run_shard
from memscan.extraction.verify_index import IndexVerification
from memscan.generators.base import check_generations, describe
from memscan.generators.model_record import count_parameters, model_record
from memscan.runners import GeneratorSpec, RayOptions, WorkerPool, make_pool, require_ray
from memscan.store import RunStore


@dataclass
class ExtractionWorker:
    """A worker's context: its own generator, the config and the run store."""

    generator: Any
    config: ExtractConfig
    store: RunStore


def worker_store(store_root: str) -> RunStore:
    """The run store as a worker sees it (refused when the run directory is not visible there)."""
    store = RunStore(store_root)
    if not store.root.is_dir():
        raise InputError(
            f"the run directory {store_root} is not visible on worker host {socket.gethostname()}",
            "put --out (and --train) on a file system every node of the cluster mounts (NFS, Lustre, …)",
        )
    return store


def load_worker_generator(generator):
    """The generator itself: loaded from its spec (a ``--model`` string or :class:`GeneratorSpec`),
    or as given. Shared training images arrive read-only (zero-copy from Ray's object store);
    distances only read them, so torch's warning about non-writable arrays is silenced."""
    if isinstance(generator, (str, GeneratorSpec)):
        spec = GeneratorSpec.of(generator)
        with user_code(f"loading the model {spec.spec} failed", "fix the model (or its py: function) and rerun"):
            generator = spec.load()
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    return generator


def setup_extraction(generator, config: ExtractConfig, store_root: str) -> ExtractionWorker:
    """Load the generator (when given as a spec) and open the run store; once per worker."""
    store = worker_store(store_root)
    return ExtractionWorker(load_worker_generator(generator), config, store)


def output_shape(generator, prompt: str, seed: int, where: str | None = None) -> tuple[int, int, int]:
    """H×W×C of the generator's images (declared, or from one probe generation).

    The probe call is user code: its failure is one :class:`~memscan.errors.UserCodeError`
    saying ``where`` (default: the prompt and seed of the probe).
    """
    shape = getattr(generator, "output_shape", None)
    if shape is not None:
        return tuple(shape)
    where = where or f"the generator failed on its first call (prompt {prompt[:60]!r}, seed {seed}, before any shard)"
    with user_code(where):
        made = generator.generate(prompt, [seed])
    probe = check_generations(made, 1, prompt)
    return tuple(probe.shape[1:])


@dataclass(frozen=True)
class GeneratorProbe:
    """What a worker reports about its generator: output shape, description, parameter count."""

    shape: tuple[int, int, int]
    description: dict
    parameters: int | None


def probe_generator(worker, prompt: str, seed: int, where: str | None = None) -> GeneratorProbe:
    """The worker's generator's output shape (H, W, C), description and parameter count, for
    the manifest (the driver of a Ray run loads no model: the worker reports them)."""
    gen = worker.generator
    return GeneratorProbe(tuple(output_shape(gen, prompt, seed, where)), describe(gen), count_parameters(gen))


def extraction_stage(
    worker: ExtractionWorker, prompts: pd.DataFrame, training: TrainingSet | IndexVerification, progress=None
) -> tuple[dict[str, pd.DataFrame], dict]:
    """Generate → detect → verify one shard of prompts (:func:`run_shard`); returns its tables and
    the shard's completion-record fields (prompts, timings; with an index, what it retrieved)."""
    tables, t = run_shard(worker.generator, prompts, worker.config, training, worker.store, progress=progress)
    meta = {
        "prompts": len(prompts),
        "generation_s": round(t.generation_s, 3),
        "detection_s": round(t.detection_s, 3),
        "verification_s": round(t.verification_s, 3),
    }
    if "retrieval" in t.extra:
        meta["retrieval"] = t.extra["retrieval"]
    return tables, meta


def extraction_pool(runner: str, generator, config: ExtractConfig, store: RunStore, options=None) -> WorkerPool:
    """The worker pool ``memscan.extract`` uses for ``runner`` ("local" or "ray")."""
    return model_pool(runner, setup_extraction, generator, config, store, options)


def model_pool(
    runner: str, setup, generator, config, store: RunStore, options=None, extra_args: tuple = ()
) -> WorkerPool:
    """A pool whose workers run ``setup(generator, config, store_root, *extra_args)``.

    The local runner takes a loaded generator or a spec; the Ray runner takes a spec only
    (a ``--model`` string or :class:`GeneratorSpec`): each worker loads its own model.
    ``config`` supplies ``device`` and ``batch_size`` (the spec's load options).
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
        return make_pool("ray", setup, (generator, config, root, *extra_args), opts, log=store.log)
    if isinstance(generator, (str, GeneratorSpec)):
        spec = GeneratorSpec.of(generator).normalized()
        generator = GeneratorSpec(spec.spec, {"device": config.device, "batch_size": config.batch_size, **spec.options})
    return make_pool(runner, setup, (generator, config, root, *extra_args), options, log=store.log)


def generator_record(generator, parameters: int | None, model_id: str | None = None) -> dict:
    """The manifest's ``model`` record (:func:`~memscan.generators.model_record.model_record`) of
    the generator a run attacked: its ``--model`` spec (``model_id``, or the spec it was given as),
    and the parameter count a worker reported (the driver of a Ray run loads no model)."""
    if model_id is None and isinstance(generator, (str, GeneratorSpec)):
        model_id = GeneratorSpec.of(generator).normalized().spec  # py:file.py:attr made absolute too
    return {**model_record(model_id if model_id is not None else generator), "parameters": parameters}

"""Checkpoint sweeps: the same extraction attack, with the same seeds, on every checkpoint of a
training run, then ``memscan compare`` over them.

``memscan extract --model FOLDER`` with ``FOLDER/checkpoint-N/…`` (:mod:`memscan.generators.
checkpoints`) writes::

    OUT/
      checkpoint-N/           one extract run per checkpoint (same prompts, config and seeds)
      .models/checkpoint-N/   a unet/-only checkpoint completed by --base (symbolic links)
      heldout.parquet         with --heldout: checkpoint, step, heldout_loss, train_loss, loss_gap
      manifest.json, compare.parquet, compare.html, …   the comparison (run kind ``compare``,
                              by training step; see :mod:`memscan.compare.run`)

Resumable: a finished checkpoint run is kept, an unfinished one resumes, the comparison resumes.
The loop is :func:`memscan.compare.sweep.checkpoint_sweep` (shared with every other ``--model``
command); this module gives it the extraction run and the diffusion held-out loss.

**Held-out loss.** With ``--heldout IMAGES``, each checkpoint's diffusion loss ``L_t`` (DESIGN.md)
on the held-out images and on as many training images (the first by id), averaged over the
timesteps :data:`HELDOUT_TIMESTEPS` and :data:`HELDOUT_DRAWS` noise draws with fixed seeds, with the
model's null class as condition when it has one. Overfitting shows as a growing gap
``heldout_loss − train_loss``; "memorization without overfitting" (Tirumala et al. 2022) as
extraction rising while the gap stays flat.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from memscan.data.training import TrainingSet, load_training_set
from memscan.errors import InputError
from memscan.extraction.config import ExtractConfig
from memscan.store import RunStore

#: Timesteps of the held-out loss, as fractions of the model's T (100, 300, 500, 700 of T = 1000).
HELDOUT_TIMESTEPS = (0.1, 0.3, 0.5, 0.7)
#: Noise draws per example and timestep of the held-out loss.
HELDOUT_DRAWS = 2


def heldout_losses(model: str | Path, heldout: np.ndarray, train: np.ndarray, device: str = "cpu") -> dict:
    """``heldout_loss``, ``train_loss`` (mean ``L_t`` over :data:`HELDOUT_TIMESTEPS`, examples and
    draws) and ``loss_gap`` of the diffusers model in ``model``."""
    from memscan.generators.noise import load_diffusers_noise_predictor
    from memscan.mia.loss import diffusion_loss

    p = load_diffusers_noise_predictor(model, device=device)
    cond = p.null_class  # the classifier-free-guidance "no condition" class, if the model has one
    T = int(p.alphas_cumprod.numel())
    ts = sorted({int(f * T) for f in HELDOUT_TIMESTEPS})
    out = {}
    for name, imgs in (("heldout_loss", heldout), ("train_loss", train)):
        L = diffusion_loss(p, imgs, ts, condition=cond, noise_draws=HELDOUT_DRAWS, seed=0)
        out[name] = float(np.mean(L))
    out["loss_gap"] = out["heldout_loss"] - out["train_loss"]
    return out


def extract_sweep(
    folder: str | Path,
    make_generator: Callable[[str], object],
    prompts,
    train: str | Path,
    out: str | Path,
    config: ExtractConfig = ExtractConfig(),
    *,
    base: str | Path | None = None,
    heldout: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    runner: str = "local",
    runner_options=None,
    stop_after_shards: int | None = None,
    index: str | Path | None = None,
    retrieve: int | None = None,
    serve_index: float | None = None,
):
    """Extract from every checkpoint of ``folder``, then compare them (see the module).

    Parameters
    ----------
    folder : a folder of ``checkpoint-N`` directories
    make_generator : model directory → the generator (or a runner spec) ``extract`` takes
    prompts, train, config, runner, runner_options, index, retrieve, serve_index : as
        :func:`memscan.extraction.pipeline.extract` (every checkpoint verified the same way)
    out : the sweep directory
    base : the pipeline that completes ``unet/``-only checkpoints
    heldout : held-out images (a folder or manifest) for each checkpoint's held-out loss
    resume : continue a killed sweep (finished checkpoints are kept)
    stop_after_shards : stop after this many new shards of one checkpoint (tests of resume)

    Returns
    -------
    memscan.compare.run.CompareResult
    """
    from memscan.compare.sweep import checkpoint_sweep
    from memscan.extraction.pipeline import extract

    config = config.validate()
    if heldout is not None and not Path(heldout).exists():
        raise InputError(f"--heldout {heldout} does not exist", "pass a folder or manifest of held-out images")
    if heldout is not None and train is None:
        raise InputError(
            "--heldout compares each checkpoint's loss on the held-out images with its loss on as many "
            "training images, and no --train was given",
            "pass --train TRAIN (the images the index was built from) as well",
        )
    if serve_index is not None and (index is None or runner != "ray"):  # before any checkpoint is set up
        raise InputError(
            "--serve-index-cpus serves an index's parts from Ray actors", "use it with --index and --runner ray"
        )
    sets: dict = {}
    by_index = {} if index is None else {"index": index, "serve_index": serve_index}
    if index is not None and retrieve is not None:
        by_index["retrieve"] = retrieve

    def run_one(path: str, sub: Path, resume_run: bool, model_id: str) -> None:
        extract(
            make_generator(path),
            prompts,
            train,
            sub,
            config,
            resume=resume_run,
            progress=progress,
            runner=runner,
            runner_options=runner_options,
            model_id=model_id,
            stop_after_shards=stop_after_shards,
            **by_index,
        )

    def losses(path: Path, sub: Path) -> dict:
        if not sets:  # at the generator's resolution, known once a run has finished
            shape = RunStore(sub).read_manifest()["output_shape"]
            sets["train"] = load_training_set(train, size=tuple(shape[:2]), channels=shape[2])
            sets["held"] = load_training_set(heldout, size=tuple(shape[:2]), channels=shape[2])
        return _losses_at(path, sets["held"], sets["train"], config.device)

    return checkpoint_sweep(
        folder,
        run_one,
        out,
        base=base,
        losses=losses if heldout is not None else None,
        resume=resume,
        progress=progress,
    )


def _losses_at(model: Path, held: TrainingSet, training: TrainingSet, device: str) -> dict:
    """The checkpoint's losses on the held-out images and as many training images (the first by id)."""
    n = len(held.ids)
    order = np.argsort(np.asarray(training.ids, dtype=object), kind="stable")[:n]
    h, w = training.images.shape[1:3]
    if held.images.shape[1:] != training.images.shape[1:]:
        raise InputError(
            f"held-out images are {held.images.shape[1:]}, training images {training.images.shape[1:]}",
            f"pass held-out images of the training images' size ({h}×{w})",
        )
    return heldout_losses(model, held.images, training.images[order], device)

"""Checkpoint sweeps, whatever the attack: the same run, with the same seeds, on every checkpoint
of a training run, then ``memscan compare`` over them by training step.

Every run kind that takes ``--model`` sweeps through :func:`checkpoint_sweep` (``memscan
extract``, ``mia``, ``inpaint``, and ``memscan lm extractable``, ``exposure``, ``mia``,
``extract``): the command gives one function that runs its attack on one model directory into one
run directory, and optionally one that measures a checkpoint's losses. The sweep directory::

    OUT/
      checkpoint-N/           one run per checkpoint (the same options and seeds)
      checkpoint-N/heldout.json   that checkpoint's losses (kept for --resume)
      .models/checkpoint-N/   a unet/-only checkpoint completed by --base (symbolic links)
      heldout.parquet         with --heldout: checkpoint, step and the loss columns
      manifest.json, compare.parquet, compare.html, …   the comparison (run kind ``compare``)

Resumable: a finished checkpoint run is kept, an unfinished one resumes, the comparison resumes.
Checkpoints that are not of one model (another architecture, vocabulary or resolution; read from
each checkpoint's ``config.json``) are refused before anything runs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from memscan.errors import InputError
from memscan.generators.checkpoints import Checkpoint, list_checkpoints, model_dir
from memscan.store import RunStore, atomic_write_json, write_table

#: ``config.json`` keys that must agree across a sweep's checkpoints (a transformers model; a
#: diffusers UNet). A checkpoint of another shape is another model, not a point of this run.
SHAPE_KEYS = (
    "model_type",
    "architectures",
    "vocab_size",
    "n_embd",
    "n_layer",
    "n_head",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "_class_name",
    "sample_size",
    "in_channels",
    "out_channels",
    "block_out_channels",
    "cross_attention_dim",
    "num_class_embeds",
)


def shape_of(path: Path) -> dict:
    """The :data:`SHAPE_KEYS` of the model directory ``path`` (its ``config.json``, else its
    ``unet/config.json``); ``{}`` when it has neither."""
    for cfg in (path / "config.json", path / "unet" / "config.json"):
        if cfg.is_file():
            try:
                data = json.loads(cfg.read_text())
            except (OSError, json.JSONDecodeError):
                raise InputError(f"{cfg} is not readable JSON", "repair or remove that checkpoint") from None
            return {k: data[k] for k in SHAPE_KEYS if k in data}
    return {}


def check_checkpoints(folder: str | Path, ckpts: list[Checkpoint]) -> None:
    """Refuse a folder whose checkpoints are not one model's: no checkpoint, or shapes that differ."""
    if not ckpts:
        raise InputError(
            f"{folder} holds no checkpoint-N directories",
            "pass a model directory, or a folder of checkpoint-N/ directories saved by a trainer",
        )
    shapes = [(c, shape_of(c.path)) for c in ckpts]
    first_c, first = shapes[0]
    for c, s in shapes[1:]:
        if s and first and s != first:
            diff = sorted(k for k in set(s) | set(first) if s.get(k) != first.get(k))
            k = diff[0]
            raise InputError(
                f"checkpoints {first_c.name} and {c.name} of {folder} are not one model: "
                f"{k} is {first.get(k)!r} in one and {s.get(k)!r} in the other",
                "sweep the checkpoints of one training run; compare different models with memscan compare",
            )


def checkpoint_sweep(
    folder: str | Path,
    run_one: Callable[[str, Path, bool, str], object],
    out: str | Path,
    *,
    base: str | Path | None = None,
    losses: Callable[[Path, Path], dict] | None = None,
    resume: bool = False,
    progress: bool = True,
    check: Callable[[list[Checkpoint]], None] | None = None,
):
    """Run ``run_one`` on every checkpoint of ``folder``, then compare the runs by step.

    Parameters
    ----------
    folder : a folder of ``checkpoint-N`` directories
    run_one : ``run_one(model_dir, run_dir, resume, model_id)`` runs the attack on one checkpoint
        (``model_id``: the checkpoint's own path, for the run's model record)
    out : the sweep directory
    base : the pipeline that completes ``unet/``-only checkpoints
    losses : ``losses(model_dir, run_dir) -> {column: value}``, e.g. ``heldout_loss``,
        ``train_loss``, ``loss_gap``; computed once per checkpoint and kept in
        ``run_dir/heldout.json``
    resume : continue a killed sweep (finished checkpoints are kept)
    check : a further check of the checkpoints before anything runs

    Returns
    -------
    memscan.compare.run.CompareResult
    """
    from memscan.compare.run import compare_runs

    ckpts = list_checkpoints(folder)
    check_checkpoints(folder, ckpts)
    if check is not None:
        check(ckpts)
    out = Path(out)
    if out.is_file():
        raise InputError(f"--out {out} is a file", "choose a directory for the sweep")
    started = [c for c in ckpts if RunStore(out / c.name).exists()] + ([1] if RunStore(out).exists() else [])
    if started and not resume:
        raise InputError(
            f"sweep directory {out} already holds runs", "pass --resume to finish it, or choose a new --out"
        )
    # 1. every checkpoint's model directory (a checkpoint that holds none fails before any run)
    paths = [model_dir(c, base, out / ".models") for c in ckpts]
    # 2. every checkpoint: the same attack, the same seeds
    runs, extra = [], {}
    for c, path in zip(ckpts, paths):
        sub = out / c.name
        store = RunStore(sub)
        done = store.exists() and store.read_manifest().get("status") == "complete"
        if not done:
            run_one(str(path), sub, store.exists(), str(c.path))
        runs.append(str(sub))
        if losses is not None:
            extra[str(sub)] = _cached_losses(sub, path, losses)
    # 3. the losses, then the comparison by training step
    if extra:
        rows = [{"checkpoint": Path(r).name, "step": s.step, **extra[r]} for r, s in zip(runs, ckpts)]
        write_table(pd.DataFrame(rows), out / "heldout.parquet")
    return compare_runs(
        runs,
        out,
        by="step",
        labels={r: Path(r).name for r in runs},
        extra=extra,
        resume=RunStore(out).exists(),
        progress=progress,
    )


def _cached_losses(sub: Path, model: Path, losses: Callable[[Path, Path], dict]) -> dict:
    """The checkpoint's losses, computed once and kept in ``sub/heldout.json`` (resume)."""
    cache = sub / "heldout.json"
    if cache.exists():
        return json.loads(cache.read_text())
    res = {k: float(v) for k, v in losses(model, sub).items()}
    atomic_write_json(cache, res)
    return res

"""Folders of training checkpoints, as diffusers' and transformers' trainers save them.

A checkpoint folder holds ``checkpoint-N/`` directories (N the training step). Each is either a
full model directory (a pipeline with ``model_index.json``, or ``unet/`` + ``scheduler/``, or a
transformers model) or only a ``unet/`` subfolder (what ``diffusers``' training scripts save
with ``--checkpointing_steps``), completed by a base pipeline (``--base``): every component of the
base but its ``unet/`` is reused. :func:`model_dir` returns a directory that the ordinary loaders
open; for a ``unet/``-only checkpoint it is a folder of symbolic links made under ``work``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from memscan.errors import InputError

_NAME = re.compile(r"checkpoint[-_](\d+)")


@dataclass(frozen=True)
class Checkpoint:
    """One ``checkpoint-N`` directory: ``step`` (N), ``path``, ``name`` (``checkpoint-N``)."""

    step: int
    path: Path

    @property
    def name(self) -> str:
        return self.path.name


def is_model_dir(path: str | Path) -> bool:
    """A directory a loader opens by itself (a pipeline, a UNet, a transformers model)."""
    p = Path(path)
    return any((p / f).exists() for f in ("model_index.json", "config.json", "unet/config.json"))


def list_checkpoints(folder: str | Path) -> list[Checkpoint]:
    """The ``checkpoint-N`` directories of ``folder``, by step; ``[]`` when ``folder`` is a model
    directory itself or holds none.

    Examples
    --------
    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> for n in (1000, 200):
    ...     (d / f"checkpoint-{n}" / "unet").mkdir(parents=True)
    >>> [c.step for c in list_checkpoints(d)]
    [200, 1000]
    """
    root = Path(folder)
    if not root.is_dir() or is_model_dir(root):
        return []
    out = []
    for child in root.iterdir():
        m = _NAME.fullmatch(child.name)
        if m and child.is_dir():
            out.append(Checkpoint(int(m.group(1)), child))
    return sorted(out, key=lambda c: c.step)


def model_dir(ckpt: Checkpoint, base: str | Path | None, work: str | Path) -> Path:
    """A loadable model directory for ``ckpt``: itself when complete, else its ``unet/`` with
    every other component of ``base`` (symbolic links in ``work/<checkpoint name>``)."""
    p = ckpt.path
    complete = (p / "model_index.json").exists() or (p / "config.json").exists() or (p / "scheduler").is_dir()
    if complete:
        return p
    if not (p / "unet" / "config.json").exists():
        raise InputError(
            f"{p} holds no model (no model_index.json, config.json or unet/config.json)",
            "point --model at a folder of checkpoint-N directories saved by a trainer",
        )
    if base is None:
        raise InputError(
            f"{p} holds only a unet/ (a training checkpoint)",
            "pass --base with the pipeline it was trained from (its scheduler and other components are reused)",
        )
    b = Path(base).expanduser().resolve()
    if not b.is_dir() or not is_model_dir(b):
        raise InputError(f"--base {base} is not a model directory", "pass the pipeline directory the UNet belongs to")
    out = Path(work) / ckpt.name
    out.mkdir(parents=True, exist_ok=True)
    for entry in b.iterdir():
        if entry.name == "unet":
            continue
        link = out / entry.name
        if not link.exists() and not link.is_symlink():
            link.symlink_to(entry)
    unet = out / "unet"
    if not unet.exists() and not unet.is_symlink():
        unet.symlink_to((p / "unet").resolve())
    return out

"""Folders of training checkpoints, as diffusers' and transformers' trainers save them.

A checkpoint folder holds ``checkpoint-N/`` directories (N the training step). Each is either a
full model directory (a pipeline with ``model_index.json``, or ``unet/`` + ``scheduler/``, or a
transformers model) or only a ``unet/`` subfolder (what ``diffusers``' training scripts save
with ``--checkpointing_steps``), completed by a base pipeline (``--base``): every component of the
base but its ``unet/`` is reused. :func:`model_dir` returns a directory that the ordinary loaders
open; for a ``unet/``-only checkpoint it is a folder of symbolic links made under ``work``.
"""

from __future__ import annotations

import os
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
        if entry.name != "unet":
            _link(out / entry.name, entry, base_option=True)
    _link(out / "unet", (p / "unet").resolve(), base_option=False)
    return out


def _link(link: Path, target: Path, *, base_option: bool) -> None:
    """``link`` → ``target``, made once. A link an earlier invocation made to another existing
    file is refused (a sweep resumed with another ``--base`` would mix two models' components
    under one name); one whose target is gone (the same files moved) is made anew."""
    if link.is_symlink():
        old = Path(os.readlink(link))
        old = old if old.is_absolute() else link.parent / old
        if old.resolve() == target.resolve():
            return
        if old.exists():
            what = "--base" if base_option else "the checkpoint's unet/"
            raise InputError(
                f"{link} already links to {old.resolve()}, not {target} ({what} differs from the one this sweep "
                "started with)",
                "rerun with the original --base, or start a new sweep with another --out",
            )
        link.unlink()
    elif link.exists():
        return  # a real file or folder the user put there: kept, as before
    link.symlink_to(target)

"""The checks ``memscan demo train`` and ``memscan demo lm train`` make before any training: a bad
``--steps`` or an ``--out`` that is a file, or that already holds a model (without
``--overwrite``), is refused at once, not after minutes of training."""

from __future__ import annotations

from pathlib import Path

from memscan.errors import InputError
from memscan.store import check_out_folder


def check_train_steps(steps: int | None, option: str = "--steps", *, minimum: int = 1, example: str = "") -> None:
    """Refuse ``steps`` below ``minimum`` (None: the recipe's default, accepted)."""
    if steps is not None and steps < minimum:
        hint = f"e.g. {option} {example}" if example else f"pass {option} {minimum} or more"
        raise InputError(f"{option} {steps} must be ≥ {minimum}", hint)


def check_model_out(out: str | Path, markers: tuple[str, ...], *, overwrite: bool) -> Path:
    """``out`` as a model folder to write: refused when it (or a folder above it) is a file, or when
    it already holds a model (one of ``markers`` exists in it) and ``overwrite`` is false."""
    out = check_out_folder(out)
    found = next((m for m in markers if (out / m).exists()), None)
    if found is not None and not overwrite:
        raise InputError(
            f"--out {out} already holds a model ({found})", "choose another --out, or pass --overwrite to replace it"
        )
    return out

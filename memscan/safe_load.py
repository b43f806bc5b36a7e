"""Loading untrusted checkpoints without executing them.

Weights load through safetensors. Any other checkpoint (``.bin``, ``.pt``, ``.pth``, ``.ckpt``)
goes through ``torch.load(weights_only=True)``, whose restricted unpickler accepts tensors and
plain containers only; a pickle that would import or call anything else is refused with a clear
error before any of its code runs.
"""

from __future__ import annotations

import pickle
from pathlib import Path

from memscan.errors import InputError

SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def load_state_dict(path: str | Path) -> dict:
    """A ``{name: tensor}`` state dict from a safetensors file or a weights-only torch file."""
    import torch

    p = Path(path)
    if p.suffix in SAFE_SUFFIXES:
        from safetensors.torch import load_file

        return load_file(str(p), device="cpu")
    if p.suffix in PICKLE_SUFFIXES:
        try:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as exc:
            first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise InputError(
                f"refused to load {p.name}: it is a pickle holding more than tensors ({first})",
                "convert trusted weights to safetensors; memscan never unpickles code from checkpoints",
            ) from None
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise InputError(f"{p.name} holds a {type(obj).__name__}, not a state dict", "save model.state_dict()")
        return obj
    raise InputError(f"unknown checkpoint format {p.suffix!r} ({p})", "use .safetensors (preferred) or .bin/.pt")


def find_weights(directory: Path, stem: str = "diffusion_pytorch_model") -> Path | None:
    """The weights file of a diffusers model folder: safetensors first (one file, or the index of
    sharded ones), then torch formats (:data:`PICKLE_SUFFIXES`, read weights-only)."""
    for suffix in (*SAFE_SUFFIXES, ".safetensors.index.json", *PICKLE_SUFFIXES):
        f = directory / f"{stem}{suffix}"
        if f.exists():
            return f
    return None


def low_mem_kwargs() -> dict:
    """``from_pretrained`` keyword that avoids diffusers' "install accelerate" warning.

    Without ``accelerate`` diffusers falls back to ``low_cpu_mem_usage=False`` anyway, but says so
    on every load; small models gain nothing from it, so we ask for the fallback explicitly.
    """
    import importlib.util

    return {} if importlib.util.find_spec("accelerate") else {"low_cpu_mem_usage": False}

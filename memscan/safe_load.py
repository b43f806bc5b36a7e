"""Loading untrusted checkpoints without executing them.

Weights load through safetensors. Any other checkpoint (``.bin``, ``.pt``, ``.pth``, ``.ckpt``)
goes through ``torch.load(weights_only=True)``, whose restricted unpickler accepts tensors and
plain containers only; a pickle that would import or call anything else is refused with a clear
error before any of its code runs. A file that is no checkpoint at all (empty, cut short by a
download, another kind of file) is a different error: one naming the file and saying so.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

from memscan.errors import InputError, first_line

SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def load_state_dict(path: str | Path) -> dict:
    """A ``{name: tensor}`` state dict from a safetensors file or a weights-only torch file."""
    import torch

    p = Path(path)
    if p.suffix in SAFE_SUFFIXES:
        from safetensors.torch import load_file

        try:
            return load_file(str(p), device="cpu")
        except OSError as exc:
            raise _unreadable(p, exc) from None
        except Exception as exc:  # safetensors' own error: a header too small, data cut short, …
            raise _damaged(p, exc, "safetensors file") from None
    if p.suffix in PICKLE_SUFFIXES:
        try:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
        except OSError as exc:
            raise _unreadable(p, exc) from None
        except pickle.UnpicklingError as exc:
            # the weights-only unpickler rejected it: a well-formed pickle that holds (or calls)
            # more than tensors and plain containers — refused, and never unpickled any other way
            if _opens_with_whole_pickle(p):
                raise InputError(
                    f"refused to load {p.name}: it is a pickle holding more than tensors ({_refusal_reason(exc)})",
                    "convert trusted weights to safetensors; memscan never unpickles code from checkpoints",
                ) from None
            raise _damaged(p, exc) from None
        except Exception as exc:  # EOFError, KeyError, struct.error, a zip torch cannot read, …
            raise _damaged(p, exc) from None
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise InputError(f"{p.name} holds a {type(obj).__name__}, not a state dict", "save model.state_dict()")
        return obj
    raise InputError(f"unknown checkpoint format {p.suffix!r} ({p})", "use .safetensors (preferred) or .bin/.pt")


_DAMAGED_HINT = "download it again, or check the path names the right file"


def _damaged(p: Path, exc: Exception, kind: str = "PyTorch checkpoint") -> InputError:
    """The error for a checkpoint that cannot be parsed: empty, cut short, or another kind of file."""
    if p.is_file() and p.stat().st_size == 0:
        return InputError(f"cannot load {p}: the file is empty (0 bytes), not a {kind}", _DAMAGED_HINT)
    if isinstance(exc, pickle.UnpicklingError):  # bytes that are no pickle: what the unpickler tripped on
        reason = f"{type(exc).__name__}: {_refusal_reason(exc)}"
    else:  # torch's zip errors run on for several sentences: the first says what failed
        reason = re.split(r"\. (?=[A-Z])", first_line(exc, 160))[0]
    return InputError(f"cannot load {p}: the file is truncated, damaged or not a {kind} ({reason})", _DAMAGED_HINT)


def _unreadable(p: Path, exc: OSError) -> InputError:
    return InputError(f"cannot read {p} ({exc.strerror or first_line(exc)})", "check the path and its permissions")


def _opens_with_whole_pickle(p: Path) -> bool:
    """Whether ``p`` is a sound torch zip, or opens with a complete pickle: its opcodes decode up
    to STOP (``pickletools`` only decodes them; nothing is imported or called). Bytes that are no
    pickle at all (text, a file cut after a few bytes) fail to decode."""
    import pickletools

    try:
        with open(p, "rb") as f:
            if f.read(4) == b"PK\x03\x04":  # torch read the zip; what it refused was its data.pkl
                return True
            f.seek(0)
            return any(op.name == "STOP" for op, _, _ in pickletools.genops(f))
    except Exception:
        return False


def _refusal_reason(exc: Exception) -> str:
    """What torch's weights-only unpickler objected to (``Unsupported global: GLOBAL os.system``),
    without torch's advice around it on loading the file unrestricted."""
    lines = [ln.strip() for ln in str(exc).rsplit("WeightsUnpickler error:", 1)[-1].splitlines() if ln.strip()]
    # torch's advice ("Weights only load failed … Re-running torch.load with weights_only …") and
    # its documentation pointer are not the reason; the line naming what was refused is
    said = [ln for ln in lines if re.search(r"unsupported|not an allowed|blocked", ln, re.IGNORECASE)]
    lines = said or [ln for ln in lines if not re.match(r"(Weights only load failed|Check the documentation)", ln)]
    return lines[0].split(" was not an allowed")[0][:160] if lines else type(exc).__name__


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

"""The generator protocol: sample N images for one prompt with given seeds.

Everything memscan attacks sits behind this one method, so a plain Python function, a diffusers
unconditional/class-conditional model and a text-to-image pipeline are interchangeable::

    generator.generate(prompt: str, seeds: list[int]) -> uint8 array N×H×W×C   (N = len(seeds))

Each image must depend only on its own seed (not on the batch it was generated in), so any
generation can be reproduced alone and a resumed run regenerates the same images.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import numpy as np

from memscan.errors import InputError


@runtime_checkable
class Generator(Protocol):
    """Anything that samples images for a prompt from per-sample seeds."""

    def generate(self, prompt: str, seeds: list[int]) -> np.ndarray:  # pragma: no cover
        ...


def describe(generator: Any) -> dict:
    """The generator's recorded configuration for the run manifest."""
    config = getattr(generator, "config", None)
    out = {"class": type(generator).__qualname__}
    if isinstance(config, dict):
        out.update(config)
    return out


def evaluations_per_generation(generator: Any) -> tuple[int, str]:
    """``(model evaluations per generated image, unit)`` of a generator.

    Diffusers generators declare it (``evaluations_per_generation``: UNet evaluations — sampler
    steps, ×2 with classifier-free guidance); anything else (a plain ``py:`` function) counts one
    evaluation per image, with the unit ``"generations"`` saying so.
    """
    n = getattr(generator, "evaluations_per_generation", None)
    if isinstance(n, int) and n >= 1:
        return n, "unet evaluations"
    return 1, "generations"


def _callable_name(fn) -> str:
    """A name for a sampling function that is the same in every process (recorded, and part of a
    run's identity): its qualified name, a partial's function's, else its class's — never a
    ``repr`` with a memory address."""
    target = getattr(fn, "func", fn)  # functools.partial
    name = getattr(target, "__qualname__", None) or type(target).__qualname__
    module = getattr(target, "__module__", None) or type(target).__module__
    return f"{module}.{name}" if module else name


def check_generations(images: Any, n: int, prompt: str, source: str = "generator") -> np.ndarray:
    """Validate a generator's output: uint8, N×H×W×C with N = len(seeds), finite.

    Float output in [0, 1] is accepted and quantised to uint8 (round half to even), since several
    libraries return floats; RGBA (C = 4) is composited over black to RGB, exactly as training
    images are decoded (:func:`memscan.data.images.to_array`), so generations and training images
    are compared in the same space; any other dtype, NaN/Inf, or a wrong shape is an error naming
    the prompt and what was expected.
    """
    if hasattr(images, "detach"):
        images = images.detach().cpu().numpy()
    arr = np.asarray(images)
    where = f"{source} output for prompt {prompt[:60]!r}"
    if arr.ndim != 4 or arr.shape[0] != n:
        raise InputError(
            f"{where} has shape {arr.shape}; expected N×H×W×C with N = {n} (one image per seed)",
            "return a uint8 array of shape (len(seeds), H, W, C); grayscale has C = 1",
        )
    if arr.shape[3] not in (1, 3, 4):
        raise InputError(f"{where} has {arr.shape[3]} channels", "return H×W×C with C in 1, 3 or 4")
    if arr.dtype == np.uint8:
        return _over_black(arr)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise InputError(f"{where} contains NaN or Inf", "check the model's numerics (fp16 overflow?)")
        if arr.min() < 0 or arr.max() > 1:
            raise InputError(
                f"{where} is float outside [0, 1] (range {arr.min():.3g}..{arr.max():.3g})",
                "return uint8 0..255, or floats scaled to [0, 1]",
            )
        return _over_black(np.round(arr * 255.0).astype(np.uint8))
    raise InputError(f"{where} has dtype {arr.dtype}", "return uint8 0..255 (or float in [0, 1])")


def _over_black(arr: np.ndarray) -> np.ndarray:
    """uint8 N×H×W×4 → N×H×W×3 composited over opaque black (PIL's ``alpha_composite``, as
    training images are decoded); other channel counts unchanged."""
    if arr.shape[3] != 4:
        return arr
    from PIL import Image

    black = Image.new("RGBA", (arr.shape[2], arr.shape[1]), (0, 0, 0, 255))
    return np.stack([np.asarray(Image.alpha_composite(black, Image.fromarray(a, "RGBA")).convert("RGB")) for a in arr])


class CallableGenerator:
    """Wrap ``fn(prompt: str, seeds: list[int]) -> uint8 N×H×W×C`` as a :class:`Generator`.

    Parameters
    ----------
    fn : callable
        The sampling function.
    name : str, optional
        Recorded in the manifest (e.g. the ``py:module:attr`` it came from).

    Examples
    --------
    >>> import numpy as np
    >>> def fn(prompt, seeds):
    ...     return np.stack([np.full((4, 4, 1), s % 256, np.uint8) for s in seeds])
    >>> CallableGenerator(fn).generate("p", [1, 2]).shape
    (2, 4, 4, 1)
    """

    def __init__(self, fn: Callable[[str, list[int]], Any], name: str | None = None):
        if not callable(fn):
            raise InputError(f"{name or fn!r} is not callable", "name a function fn(prompt, seeds)")
        self.fn = fn
        self.config = {"type": "callable", "name": name or _callable_name(fn)}

    def generate(self, prompt: str, seeds: list[int]) -> np.ndarray:
        out = self.fn(prompt, list(seeds))
        return check_generations(out, len(seeds), prompt, self.config["name"])

"""Embedders: images → L2-normalised float32 vectors, behind one small protocol.

Near-duplicate search in a large training set runs on embeddings, not pixels (Carlini et al.
2023, §4.2, embed 160M training images with CLIP and compare all pairs; Somepalli et al. 2023 and
Wen et al. 2024 use the SSCD copy-detection model). Every embedder here turns a batch of uint8
``N×H×W×C`` images into ``N×D`` float32 rows of unit ℓ2 norm, so the inner product of two rows is
their cosine similarity.

- :class:`PixelEmbedder` (the default, needs no weights): the image downscaled to ``size×size``,
  centred on its own mean and L2-normalised, so the cosine of two embeddings is the Pearson
  correlation of the two thumbnails. Robust to resizing, re-encoding and brightness shifts.
- :class:`TorchScriptEmbedder`: a model file saved with ``torch.jit.save`` (e.g. the SSCD
  TorchScript release, or a CLIP image tower you scripted), loaded with ``torch.jit.load``.
- :class:`OnnxEmbedder`: an ONNX model run with onnxruntime (``pip install memscan[onnx]``).
- :class:`OpenCLIPEmbedder`: an open_clip image tower with weights from a local file
  (``pip install memscan[clip]``); nothing is downloaded.

Model files are programs: load only files you trust. :func:`load_embedder` turns a spec string
(``pixel``, ``pixel:16``, ``model.pt``, ``model.onnx``, ``open_clip:NAME:WEIGHTS``) or a
recorded spec dict (what an index stores in ``index.json``) into an embedder.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from memscan.devices import check_device
from memscan.errors import InputError
from memscan.safe_load import load_state_dict

#: ImageNet channel statistics: the default input normalisation of model embedders (SSCD and
#: most torchvision backbones use them). Override with a sidecar JSON or the constructor.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: CLIP's channel statistics (Radford et al. 2021), used by :class:`OpenCLIPEmbedder`.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".jit", ".torchscript")


@runtime_checkable
class Embedder(Protocol):
    """Anything that maps uint8 ``N×H×W×C`` images to L2-normalised float32 ``N×D`` rows.

    Attributes
    ----------
    dim : int
        ``D``, the embedding dimension.
    input_size : tuple of int
        ``(H, W)`` at which training images are decoded before :meth:`embed` (any other size is
        resized inside :meth:`embed`).
    channels : int
        Channels the images are decoded with (1 or 3).
    """

    dim: int
    input_size: tuple[int, int]
    channels: int

    def embed(self, images: np.ndarray) -> np.ndarray:  # pragma: no cover - protocol
        ...

    def spec(self) -> dict:  # pragma: no cover - protocol
        ...


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows of ``x`` divided by their ℓ2 norm (float32); all-zero rows stay zero.

    Examples
    --------
    >>> l2_normalize(np.array([[3.0, 4.0], [0.0, 0.0]])).tolist()
    [[0.6000000238418579, 0.800000011920929], [0.0, 0.0]]
    """
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > eps)


def _check_batch(images: Any) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[3] not in (1, 3, 4):
        raise InputError(
            f"embedders take N×H×W×C images with C in 1, 3 or 4, got shape {arr.shape}",
            "pass uint8 images (grayscale: C = 1)",
        )
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.floating) or (arr.size and (arr.min() < 0 or arr.max() > 1)):
            raise InputError(f"embedders take uint8 (or float in [0, 1]) images, got {arr.dtype}", "pass uint8 0..255")
        arr = np.round(arr * 255.0).astype(np.uint8)
    return arr[..., :3] if arr.shape[3] == 4 else arr


def _to_float_nchw(images: np.ndarray, size: tuple[int, int], channels: int, device: str | torch.device):
    """uint8 N×H×W×C → float32 N×C×H'×W' in [0, 1] on ``device``, resized (bicubic, antialiased)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    x = x.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
    if x.shape[1] == 1 and channels == 3:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] == 3 and channels == 1:
        x = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
    if tuple(x.shape[2:]) != tuple(size):
        x = torch.nn.functional.interpolate(x, size=tuple(size), mode="bicubic", antialias=True, align_corners=False)
        x = x.clamp_(0.0, 1.0)
    return x


def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _sidecar(path: Path) -> dict:
    """Preprocessing recorded beside a model file: ``model.json`` with ``input_size``, ``mean``, ``std``."""
    side = path.with_suffix(".json")
    if not side.exists():
        return {}
    try:
        data = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read {side}: {exc}", "it must be JSON with input_size, mean, std") from None
    unknown = set(data) - {"input_size", "mean", "std", "channels"}
    if unknown:
        raise InputError(
            f"{side}: unknown key(s) {', '.join(sorted(unknown))}", "known: input_size, mean, std, channels"
        )
    return data


def _size_pair(v) -> tuple[int, int]:
    if isinstance(v, (int, np.integer)):
        return (int(v), int(v))
    h, w = (int(s) for s in v)
    if h < 1 or w < 1:
        raise InputError(f"input_size must be positive, got {v!r}")
    return (h, w)


# --------------------------------------------------------------------------------------------
# the built-in pixel embedder
# --------------------------------------------------------------------------------------------
class PixelEmbedder:
    """Downscaled, mean-centred, L2-normalised pixels (no weights; the default embedder).

    The cosine similarity of two embeddings is the Pearson correlation of the ``size×size``
    thumbnails, so a resized, re-encoded or slightly brightened copy stays near 1 while
    unrelated pictures spread out. A constant image (zero after centring) maps to the unit
    vector ``1/sqrt(D)``, so constant images match each other (the pixel check then decides).

    Parameters
    ----------
    size : int, default 16
        Thumbnail side; ``D = size² × channels``.
    channels : int, default 3
        3 keeps colour, 1 compares luminance.
    batch_size : int, default 4096
        Images per chunk inside :meth:`embed`.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> x = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    >>> e = PixelEmbedder(size=8).embed(np.concatenate([x, x[:1] // 2]))
    >>> e.shape, e.dtype, np.allclose(np.linalg.norm(e, axis=1), 1)
    ((3, 192), dtype('float32'), True)
    >>> bool(e[0] @ e[2] > 0.99), bool(e[0] @ e[1] < 0.5)   # a darkened copy vs another image
    (True, True)
    """

    def __init__(self, size: int = 16, channels: int = 3, batch_size: int = 4096):
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise InputError(f"pixel embedder size must be a positive integer, got {size!r}")
        if channels not in (1, 3):
            raise InputError(f"pixel embedder channels must be 1 or 3, got {channels!r}")
        self.size, self.channels, self.batch_size = int(size), int(channels), max(1, int(batch_size))
        self.input_size = (self.size, self.size)
        self.dim = self.size * self.size * self.channels

    def embed(self, images: np.ndarray) -> np.ndarray:
        arr = _check_batch(images)
        out = np.empty((arr.shape[0], self.dim), np.float32)
        for s in range(0, arr.shape[0], self.batch_size):
            # 1. thumbnails in [0, 1] (no resampling when already size×size)
            x = _to_float_nchw(arr[s : s + self.batch_size], self.input_size, self.channels, "cpu")
            x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)
            # 2. centre each image on its own mean, then unit norm (cosine = Pearson correlation)
            x = x - x.mean(dim=1, keepdim=True)
            norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
            flat = norm[:, 0] < 1e-6
            x = x / norm.clamp_min(1e-6)
            x[flat] = 1.0 / np.sqrt(self.dim)
            out[s : s + x.shape[0]] = x.numpy()
        return out

    def spec(self) -> dict:
        return {"type": "pixel", "size": self.size, "channels": self.channels}

    def __repr__(self) -> str:
        return f"PixelEmbedder(size={self.size}, channels={self.channels})"


# --------------------------------------------------------------------------------------------
# model embedders
# --------------------------------------------------------------------------------------------
class _ModelEmbedder:
    """Shared preprocessing of model embedders: resize, scale to [0, 1], normalise, NCHW."""

    kind = "model"

    def __init__(self, path, input_size, mean, std, channels, batch_size, device):
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"embedder model file {path} does not exist", "pass the path of a model file on disk")
        side = _sidecar(self.path)
        self.input_size = _size_pair(input_size if input_size is not None else side.get("input_size", 224))
        self.channels = int(channels if channels is not None else side.get("channels", 3))
        self.mean = tuple(float(v) for v in (mean if mean is not None else side.get("mean", IMAGENET_MEAN)))
        self.std = tuple(float(v) for v in (std if std is not None else side.get("std", IMAGENET_STD)))
        if len(self.mean) != self.channels or len(self.std) != self.channels or min(self.std) <= 0:
            raise InputError(
                f"embedder {path}: mean/std must have {self.channels} values and std > 0",
                "fix the sidecar JSON or the arguments",
            )
        self.batch_size = max(1, int(batch_size))
        self.device = str(device)
        self.sha256 = sha256_of(self.path)

    def _prepare(self, chunk: np.ndarray, device) -> torch.Tensor:
        x = _to_float_nchw(chunk, self.input_size, self.channels, device)
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    def embed(self, images: np.ndarray) -> np.ndarray:
        arr = _check_batch(images)
        out = np.empty((arr.shape[0], self.dim), np.float32)
        for s in range(0, arr.shape[0], self.batch_size):
            y = self._forward(arr[s : s + self.batch_size])
            if y.ndim != 2 or y.shape[1] != self.dim:
                y = y.reshape(y.shape[0], -1)
            out[s : s + y.shape[0]] = y
        # a NaN or inf row would be normalised to zeros and silently match nothing
        bad = ~np.isfinite(out).all(axis=1)
        if bad.any():
            raise InputError(
                f"embedder model {self.path} returned non-finite values (NaN or inf, in float32) for "
                f"{int(bad.sum())} of {len(out)} images (the first: image {int(np.argmax(bad))} of this batch)",
                "check the model on these inputs (uint8 images resized to "
                f"{self.input_size[0]}×{self.input_size[1]}, scaled to [0, 1], normalised with its mean/std), "
                "or pass another --embedder",
            )
        return l2_normalize(out)

    def _probe_dim(self) -> int:
        y = self._forward(np.zeros((1, *self.input_size, self.channels), np.uint8))
        return int(np.prod(y.shape[1:]))

    def spec(self) -> dict:
        return {
            "type": self.kind,
            "path": str(self.path.resolve()),
            "sha256": self.sha256,
            "input_size": list(self.input_size),
            "channels": self.channels,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, input_size={self.input_size})"


def _first_output(y) -> torch.Tensor:
    """Models return a tensor, a tuple/list (first item) or a dict (``image_embeds``/first value)."""
    if isinstance(y, dict):
        y = y.get("image_embeds", next(iter(y.values())))
    if isinstance(y, (tuple, list)):
        y = y[0]
    if not isinstance(y, torch.Tensor):
        raise InputError(f"embedder model returned {type(y).__name__}", "the model must return a tensor N×D")
    return y


class TorchScriptEmbedder(_ModelEmbedder):
    """A TorchScript model file (``torch.jit.save``) as an embedder, e.g. SSCD or a CLIP tower.

    Input: float32 ``N×C×H×W``, resized to ``input_size`` (bicubic, antialiased), scaled to
    [0, 1] and normalised with ``mean``/``std``. Output: ``N×D`` (tuples/dicts: first tensor),
    L2-normalised. ``input_size``, ``mean``, ``std`` default to a sidecar ``<model>.json`` when it
    exists, else 224 and the ImageNet statistics.

    Parameters
    ----------
    path : model file
    input_size : int or (H, W), optional
    mean, std : per-channel statistics, optional
    channels : 1 or 3, optional (default 3)
    batch_size : images per forward pass
    device : ``cpu``, ``cuda``, ``cuda:N``
    """

    kind = "torchscript"

    def __init__(self, path, input_size=None, mean=None, std=None, channels=None, batch_size=64, device="cpu"):
        super().__init__(path, input_size, mean, std, channels, batch_size, device)
        try:
            self.model = torch.jit.load(str(self.path), map_location=self.device).eval()
        except Exception as exc:
            raise InputError(
                f"cannot load TorchScript model {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                "save it with torch.jit.save(torch.jit.script(model) or torch.jit.trace(model, x), path)",
            ) from None
        self.dim = self._probe_dim()

    @torch.inference_mode()
    def _forward(self, chunk: np.ndarray) -> np.ndarray:
        y = _first_output(self.model(self._prepare(chunk, self.device)))
        return y.float().cpu().numpy()


class OnnxEmbedder(_ModelEmbedder):
    """An ONNX model run with onnxruntime (``pip install memscan[onnx]``); preprocessing as
    :class:`TorchScriptEmbedder`. A model with a fixed input height/width sets ``input_size``."""

    kind = "onnx"

    def __init__(self, path, input_size=None, mean=None, std=None, channels=None, batch_size=64, device="cpu"):
        try:
            import onnxruntime as ort
        except ImportError:
            raise InputError(
                "ONNX embedders need onnxruntime", "pip install memscan[onnx]  (or: pip install onnxruntime)"
            ) from None
        providers = ["CPUExecutionProvider"]
        if str(device).startswith("cuda"):
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(path), providers=providers)
        except Exception as exc:
            if not Path(path).is_file():
                raise InputError(
                    f"embedder model file {path} does not exist", "pass the path of a .onnx file"
                ) from None
            raise InputError(f"cannot load ONNX model {path}: {exc}", "export it with torch.onnx.export") from None
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        shape = list(inp.shape)
        if input_size is None and len(shape) == 4 and all(isinstance(s, int) for s in shape[2:]):
            input_size = (shape[2], shape[3])
        super().__init__(path, input_size, mean, std, channels, batch_size, device)
        self.fixed_batch = shape[0] if shape and isinstance(shape[0], int) else None
        self.dim = self._probe_dim()

    def _forward(self, chunk: np.ndarray) -> np.ndarray:
        x = self._prepare(chunk, "cpu").numpy()
        if self.fixed_batch is not None and x.shape[0] != self.fixed_batch:
            # a model exported with a fixed batch dimension: run one image at a time
            if self.fixed_batch != 1:
                raise InputError(
                    f"ONNX model {self.path} has a fixed batch of {self.fixed_batch}",
                    "export it with a dynamic batch axis",
                )
            return np.concatenate([self._forward(chunk[i : i + 1]) for i in range(chunk.shape[0])])
        y = self.session.run(None, {self.input_name: x})[0]
        return np.asarray(y, dtype=np.float32).reshape(y.shape[0], -1)


class OpenCLIPEmbedder(_ModelEmbedder):
    """An open_clip image tower with **local** weights (``pip install memscan[clip]``).

    ``open_clip.create_model_and_transforms(model_name, pretrained=weights)`` with ``weights`` a
    file on disk; nothing is fetched from a hub. Preprocessing: resize to the model's image
    size and the CLIP statistics; output ``model.encode_image``, L2-normalised.
    """

    kind = "open_clip"

    def __init__(self, model_name: str, weights, batch_size=64, device="cpu", input_size=None):
        weights = Path(weights)
        if not weights.is_file():
            raise InputError(
                f"open_clip weights {weights} do not exist",
                "pass a local weights file (memscan never downloads weights): open_clip:MODEL:/path/to/weights",
            )
        # open_clip reads the file itself (with torch.load, weights_only or not depending on its
        # version): it must first pass memscan's own safe loader — safetensors, or a pickle of
        # tensors and plain containers only — so nothing in it can run code whoever unpickles it
        load_state_dict(weights)
        try:
            import open_clip
        except ImportError:
            raise InputError(
                "open_clip embedders need open_clip_torch",
                "pip install memscan[clip]  (or: pip install open_clip_torch)",
            ) from None
        try:
            model, _, _ = open_clip.create_model_and_transforms(model_name, pretrained=str(weights), device=str(device))
        except Exception as exc:
            raise InputError(
                f"cannot build open_clip model {model_name!r} from {weights}: {exc}",
                "check the model name matches the weights",
            ) from None
        size = input_size
        if size is None:
            size = getattr(getattr(model, "visual", None), "image_size", 224)
        super().__init__(weights, size, CLIP_MEAN, CLIP_STD, 3, batch_size, device)
        self.model_name = model_name
        self.model = model.eval()
        self.dim = self._probe_dim()

    @torch.inference_mode()
    def _forward(self, chunk: np.ndarray) -> np.ndarray:
        y = _first_output(self.model.encode_image(self._prepare(chunk, self.device)))
        return y.float().cpu().numpy()

    def spec(self) -> dict:
        return {**super().spec(), "model": self.model_name}


# --------------------------------------------------------------------------------------------
# specs
# --------------------------------------------------------------------------------------------
def load_embedder(spec: str | dict | Embedder = "pixel", *, device: str = "cpu", batch_size: int = 64) -> Embedder:
    """An embedder from a spec string, a recorded spec dict, or an embedder (returned as is).

    Spec strings: ``pixel`` or ``pixel:SIZE`` (built-in), a TorchScript file (``.pt``, ``.pth``,
    ``.ts``, ``.jit``, ``.torchscript``), an ONNX file (``.onnx``), or
    ``open_clip:MODEL_NAME:/path/to/weights``. A recorded dict (``index.json``'s ``embedder``)
    reloads the same model; its file must still hash to the recorded sha256.

    Examples
    --------
    >>> load_embedder("pixel:8").spec()
    {'type': 'pixel', 'size': 8, 'channels': 3}
    >>> load_embedder({'type': 'pixel', 'size': 4, 'channels': 1}).dim
    16
    """
    check_device(device)
    if not isinstance(spec, (str, dict)):
        if hasattr(spec, "embed") and hasattr(spec, "dim"):
            return spec
        raise InputError(f"not an embedder: {spec!r}", "pass 'pixel', a model path, or an object with embed() and dim")
    if isinstance(spec, dict):
        return _from_dict(spec, device, batch_size)
    s = spec.strip()
    if s == "pixel" or s.startswith("pixel:"):
        size = s.split(":", 1)[1] if ":" in s else "16"
        if not size.isdigit():
            raise InputError(f"embedder {spec!r}: size must be an integer", "e.g. pixel:16")
        return PixelEmbedder(int(size))
    if s.startswith("open_clip:"):
        parts = s.split(":", 2)
        if len(parts) != 3 or not parts[1] or not parts[2]:
            raise InputError(
                f"embedder {spec!r} must be open_clip:MODEL:WEIGHTS", "e.g. open_clip:ViT-B-32:/models/vit-b-32.bin"
            )
        return OpenCLIPEmbedder(parts[1], parts[2], batch_size=batch_size, device=device)
    path = Path(s)
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return OnnxEmbedder(path, batch_size=batch_size, device=device)
    if suffix in TORCHSCRIPT_SUFFIXES:
        return TorchScriptEmbedder(path, batch_size=batch_size, device=device)
    raise InputError(
        f"unknown embedder {spec!r}",
        "use pixel, pixel:SIZE, a TorchScript file (.pt/.pth/.ts), an .onnx file, or open_clip:MODEL:WEIGHTS",
    )


def _from_dict(spec: dict, device: str, batch_size: int) -> Embedder:
    kind = spec.get("type")
    if kind == "pixel":
        return PixelEmbedder(int(spec.get("size", 16)), int(spec.get("channels", 3)))
    if kind in ("torchscript", "onnx", "open_clip"):
        path = Path(spec["path"])
        if not path.is_file():
            raise InputError(f"the index's embedder model {path} is missing", "restore the file, or rebuild the index")
        if spec.get("sha256") and sha256_of(path) != spec["sha256"]:
            raise InputError(
                f"the embedder model {path} changed since the index was built (sha256 differs)",
                "restore the original file, or rebuild the index with the new model",
            )
        common = {"batch_size": batch_size, "device": device}
        if kind == "open_clip":
            return OpenCLIPEmbedder(spec["model"], path, input_size=spec.get("input_size"), **common)
        cls = TorchScriptEmbedder if kind == "torchscript" else OnnxEmbedder
        return cls(path, spec.get("input_size"), spec.get("mean"), spec.get("std"), spec.get("channels"), **common)
    raise InputError(
        f"unknown embedder type {kind!r} in spec {spec!r}", "expected pixel, torchscript, onnx or open_clip"
    )

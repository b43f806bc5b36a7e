"""Training sets in the formats img2dataset writes: webdataset ``.tar`` shards and parquet+files.

- **webdataset** (``img2dataset --output_format webdataset``): ``.tar`` shards whose members are
  grouped into samples by key — the member path up to the first ``.`` of its file name
  (``000010023.jpg``, ``000010023.txt``, ``000010023.json`` form sample ``000010023``). A sample's
  image is its ``.jpg``/``.jpeg``/``.png``/``.webp``/… member, its caption the ``.txt`` member
  (else the ``caption`` field of the ``.json`` member). Pass one ``.tar`` or a folder of them.
- **img2dataset files layout** (``--output_format files``): a folder with ``00000.parquet``
  (columns ``key``, ``caption``, ``status``, ``error_message``, …) beside a folder ``00000/``
  holding ``<key>.jpg`` (+ ``.txt``, ``.json``). Rows whose ``status`` is not ``success`` were never
  downloaded; they are reported as skipped with img2dataset's error message.

The id of a sample is its key. Corrupt members — an image that does not decode, a sample without
an image, a member cut off by a truncated shard, an unreadable ``.json``/``.txt`` or shard
parquet — are counted and reported with the shard and member they came from, never fatal to the
whole run. Images are read lazily: a shard is listed by its tar headers (offsets), and an image is
decoded only when asked for, so listing a large shard costs little memory.

Examples
--------
>>> import io, tarfile, tempfile, numpy as np
>>> from PIL import Image
>>> d = tempfile.mkdtemp()
>>> with tarfile.open(f"{d}/00000.tar", "w") as tf:
...     for key, payload in [("a.png", "png"), ("a.txt", "a red square"), ("b.png", b"broken")]:
...         if payload == "png":
...             buf = io.BytesIO(); Image.new("RGB", (8, 8), "red").save(buf, "PNG"); payload = buf.getvalue()
...         data = payload.encode() if isinstance(payload, str) else payload
...         info = tarfile.TarInfo(key); info.size = len(data); tf.addfile(info, io.BytesIO(data))
>>> samples, skipped = list_samples(f"{d}/00000.tar")
>>> [s.id for s in samples], [s.caption for s in samples], [s["id"] for s in skipped]
(['a', 'b'], ['a red square', ''], [])
>>> read_sample(samples[0], size=(8, 8)).shape
(8, 8, 3)

:func:`memscan.data.training.load_training_set` decodes such a source into a training set
(``b`` is then a counted skip).
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from memscan.data.images import IMAGE_EXTENSIONS, read_image, to_array
from memscan.errors import InputError

_IMAGE_EXT = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)


@dataclass(frozen=True)
class TarSample:
    """One sample of a webdataset shard: where its image bytes lie inside the tar."""

    id: str
    path: Path  # the shard
    caption: str
    member: str
    offset: int
    size: int

    def read_bytes(self) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"member {self.member} is truncated ({len(data)} of {self.size} bytes)")
        return data


@dataclass(frozen=True)
class FileSample:
    """One image file (img2dataset files layout)."""

    id: str
    path: Path
    caption: str


# --------------------------------------------------------------------------------------------
# detection
# --------------------------------------------------------------------------------------------
def detect_layout(path: str | Path) -> str | None:
    """``"webdataset"``, ``"img2dataset"`` (parquet+files) or None for anything else.

    A ``.tar`` file, or a folder holding ``.tar`` files, is webdataset; a folder holding
    ``NNNNN.parquet`` beside a folder ``NNNNN/`` is the img2dataset files layout.
    """
    p = Path(path)
    if p.is_file():
        return "webdataset" if p.name.lower().endswith(".tar") else None
    if not p.is_dir():
        return None
    if any(f.is_file() for f in p.glob("*.tar")):
        return "webdataset"
    for q in p.glob("*.parquet"):
        if q.with_suffix("").is_dir() and (_has_key_column(q) or q.with_name(f"{q.stem}_stats.json").exists()):
            return "img2dataset"
    return None


def _has_key_column(parquet: Path) -> bool:
    import pyarrow.parquet as pq

    try:
        return "key" in pq.read_schema(parquet).names
    except Exception:  # a corrupt parquet says nothing about the layout
        return False


def _key_and_ext(name: str) -> tuple[str, str]:
    """webdataset convention: key = path up to the first '.' of the file name; ext = the rest."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{head}/{stem}" if head else stem
    return key, ext.lower() if dot else ""


# --------------------------------------------------------------------------------------------
# listing
# --------------------------------------------------------------------------------------------
def list_webdataset(path: str | Path) -> tuple[list[TarSample], list[dict]]:
    """Samples of a ``.tar`` shard or a folder of shards (sorted by name), and the skipped ones.

    Reads only tar headers and the small ``.txt``/``.json`` members.
    """
    p = Path(path)
    shards = [p] if p.is_file() else sorted(f for f in p.glob("*.tar") if f.is_file())
    if not shards:
        raise InputError(f"{path} holds no .tar shards", "pass a .tar file or a folder of webdataset shards")
    samples: list[TarSample] = []
    skipped: list[dict] = []
    seen: dict[str, Path] = {}
    for shard in shards:
        shard_samples, shard_skipped = _list_shard(shard)
        skipped.extend(shard_skipped)
        for s in shard_samples:
            if s.id in seen:
                raise InputError(
                    f"two webdataset samples share the key {s.id!r} ({seen[s.id].name} and {shard.name})",
                    "keys must be unique across shards (img2dataset's are); rename or drop one shard",
                )
            seen[s.id] = shard
            samples.append(s)
    return samples, skipped


def _list_shard(shard: Path) -> tuple[list[TarSample], list[dict]]:
    groups: dict[str, dict] = {}
    order: list[str] = []
    skipped: list[dict] = []
    file_size = shard.stat().st_size
    try:
        tf = tarfile.open(shard, mode="r:")
    except (tarfile.TarError, OSError) as exc:
        return [], [{"id": shard.name, "path": str(shard), "reason": f"unreadable shard: {exc}"[:200]}]
    truncated = False
    with tf:
        # 1. walk the headers; keep offsets of image members, read captions and metadata
        try:
            for m in tf:
                if not m.isfile() and not ((m.issym() or m.islnk()) and _key_and_ext(m.name)[1] in _IMAGE_EXT):
                    continue  # folders, devices, links to side members
                key, ext = _key_and_ext(m.name)
                if key not in groups:
                    groups[key] = {}
                    order.append(key)
                g = groups[key]
                if not m.isfile():  # a link: its target is not read (it may lie outside the shard)
                    g.setdefault("problems", []).append(f"member {m.name} is a link, not an image file: not read")
                    continue
                if m.offset_data + m.size > file_size:
                    g.setdefault("problems", []).append(f"member {m.name} is cut off by the end of the shard")
                    truncated = True
                    continue
                if ext in _IMAGE_EXT and "image" not in g:
                    g["image"] = (m.name, m.offset_data, m.size)
                elif ext in _IMAGE_EXT:
                    g.setdefault("problems", []).append(
                        f"member {m.name} is a second image of sample {key}: not read (the first, {g['image'][0]}, is)"
                    )
                elif ext == "txt":
                    g["txt"] = _read_text(tf, m, g)
                elif ext == "json":
                    g["json"] = _read_json(tf, m, g)
        except (tarfile.TarError, OSError, EOFError) as exc:
            if not truncated:  # (a cut-off member already reports the truncation)
                skipped.append(
                    {
                        "id": f"{shard.name}:…",
                        "path": str(shard),
                        "reason": f"shard truncated or corrupt after {len(order)} samples: {exc}"[:200],
                    }
                )
    # 2. one sample per key that has an image; the rest are reported
    samples = []
    for key in order:
        g = groups[key]
        caption = g.get("txt")
        if caption is None and isinstance(g.get("json"), dict):
            cap = g["json"].get("caption")
            caption = cap if isinstance(cap, str) else None
        problems = g.get("problems", [])
        if "image" not in g:
            reason = "; ".join(problems) if problems else "no image member (.jpg/.png/…)"
            skipped.append({"id": key, "path": f"{shard}", "reason": reason[:200]})
            continue
        for msg in problems:  # the image is fine; a side member was not (reported, sample kept)
            skipped.append({"id": key, "path": f"{shard}", "reason": f"{msg} (image kept)"[:200], "kept": True})
        name, offset, size = g["image"]
        samples.append(TarSample(key, shard, (caption or "").strip(), name, offset, size))
    return samples, skipped


def _read_text(tf: tarfile.TarFile, m: tarfile.TarInfo, g: dict) -> str | None:
    try:
        return tf.extractfile(m).read().decode("utf-8", errors="replace")
    except (tarfile.TarError, OSError) as exc:
        g.setdefault("problems", []).append(f"member {m.name} unreadable: {exc}")
        return None


def _read_json(tf: tarfile.TarFile, m: tarfile.TarInfo, g: dict):
    try:
        return json.loads(tf.extractfile(m).read().decode("utf-8"))
    except (tarfile.TarError, OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        g.setdefault("problems", []).append(f"member {m.name} is not valid JSON: {exc}")
        return None


def list_img2dataset(path: str | Path) -> tuple[list[FileSample], list[dict]]:
    """Samples of an img2dataset files layout (``NNNNN.parquet`` + ``NNNNN/<key>.jpg``)."""
    import pandas as pd

    root = Path(path)
    resolved = root.resolve()
    samples: list[FileSample] = []
    skipped: list[dict] = []
    seen: set[str] = set()
    for meta in sorted(root.glob("*.parquet")):
        folder = meta.with_suffix("")
        if not folder.is_dir():
            continue
        # 1. the shard's files, by key (one directory listing, no stat per row)
        files: dict[str, Path] = {}
        for f in sorted(folder.iterdir()):
            key, ext = _key_and_ext(f.name)
            if ext in _IMAGE_EXT and f.is_file() and f.resolve().is_relative_to(resolved):
                files.setdefault(key, f)
        # 2. the shard's metadata rows; a corrupt parquet falls back to the files alone
        try:
            df = pd.read_parquet(meta)
        except Exception as exc:
            skipped.append(
                {
                    "id": meta.name,
                    "path": str(meta),
                    "reason": f"unreadable shard metadata ({exc}); images listed from {folder.name}/"[:200],
                    "kept": True,
                }
            )
            df = pd.DataFrame({"key": list(files)})
        if "key" not in df.columns:
            raise InputError(
                f"{meta} has no 'key' column", "this is not img2dataset output; pass a folder of images or a manifest"
            )
        status = df["status"].astype(str).tolist() if "status" in df.columns else ["success"] * len(df)
        errors = df["error_message"].tolist() if "error_message" in df.columns else [None] * len(df)
        captions = df["caption"].tolist() if "caption" in df.columns else [None] * len(df)
        listed = set()
        for key, st, err, cap in zip(df["key"].astype(str), status, errors, captions):
            listed.add(key)
            if st != "success":
                skipped.append({"id": key, "path": str(meta), "reason": f"not downloaded (status {st}): {err}"[:200]})
                continue
            f = files.get(key)
            if f is None:
                skipped.append({"id": key, "path": str(folder), "reason": "status success but no image file"})
                continue
            samples.append(FileSample(key, f, _caption(f, cap)))
        # 3. images present but absent from the metadata are training images too
        for key, f in files.items():
            if key not in listed:
                samples.append(FileSample(key, f, _caption(f, None)))
    dupes = set()
    for s in samples:
        if s.id in seen:
            dupes.add(s.id)
        seen.add(s.id)
    if dupes:
        raise InputError(
            f"img2dataset layout {path} repeats keys: {', '.join(sorted(dupes)[:5])}",
            "keys must be unique across shards",
        )
    return samples, skipped


def _caption(f: Path, cap) -> str:
    if isinstance(cap, str):
        return cap.strip()
    txt = f.with_suffix(".txt")
    return txt.read_text(encoding="utf-8-sig", errors="replace").strip() if txt.exists() else ""


def list_samples(path: str | Path) -> tuple[list, list[dict]]:
    """Samples and skipped entries of a webdataset or img2dataset source (see :func:`detect_layout`)."""
    layout = detect_layout(path)
    if layout == "webdataset":
        return list_webdataset(path)
    if layout == "img2dataset":
        return list_img2dataset(path)
    raise InputError(
        f"{path} is neither webdataset shards nor an img2dataset layout",
        "pass a .tar, a folder of .tar, or img2dataset output",
    )


# --------------------------------------------------------------------------------------------
# decoding
# --------------------------------------------------------------------------------------------
def open_sample(sample) -> Image.Image:
    """The loaded PIL image of one sample (a :class:`TarSample`, or anything with ``.path``)."""
    im = Image.open(io.BytesIO(sample.read_bytes())) if isinstance(sample, TarSample) else Image.open(sample.path)
    im.load()
    return im


def read_sample(sample, size: tuple[int, int] | None = None, channels: int = 3) -> np.ndarray:
    """Decode one sample (a :class:`TarSample`, or anything with ``.path`` to an image file)."""
    if isinstance(sample, TarSample):
        with open_sample(sample) as im:
            return to_array(im, size, channels)
    return read_image(sample.path, size, channels)

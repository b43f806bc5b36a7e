"""Training sets: a folder of images, or a CSV/Parquet manifest with ``id, path, caption``.

- **Folder:** every image file (recursively) is one training image; its id is the file name
  without extension (relative sub-folders are kept in the id to stay unique); an optional sidecar
  ``<name>.txt`` holds its caption.
- **Manifest:** a ``.csv`` or ``.parquet`` with columns ``id``, ``path`` (relative to the
  manifest's folder, or absolute inside it) and optionally ``caption``. Paths that resolve
  outside the manifest's folder (``../../etc/passwd``, or a symlink out of it) are refused.

- **Webdataset / img2dataset:** ``.tar`` shards or img2dataset's parquet+files layout, listed by
  :mod:`memscan.data.webdataset`.

This module is the one place that tells the layouts apart: :func:`list_source` lists any of them
(nothing decoded), :func:`load_training_set` decodes one into a :class:`TrainingSet`, and the
streaming reader of :mod:`memscan.index.source` decodes a listing in batches.

Unreadable images are counted and named (``skipped``), never fatal and never silently dropped.
An image whose file name (or folder, or tar member name) is not valid UTF-8 is refused when
listed, naming it, like two images sharing an id: its name cannot be an id (rename it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from memscan.data import webdataset
from memscan.data.images import IMAGE_EXTENSIONS
from memscan.errors import InputError


@dataclass
class TrainingSet:
    """Training images loaded at one resolution.

    Attributes
    ----------
    ids : list of str
    captions : list of str (empty string where none)
    images : uint8 N×H×W×C at the resolution asked for
    skipped : list of {"id", "path", "reason"} for files that could not be read
    source : the path it was read from
    warnings : list of {"id", "path", "reason"} for damaged side files of images that were
        still loaded (e.g. an unreadable ``.json`` member of a webdataset sample), a sample's
        second image or linked image (not read), and image symlinks out of a training folder
        (not followed)
    """

    ids: list[str]
    captions: list[str]
    images: np.ndarray
    skipped: list[dict] = field(default_factory=list)
    source: str = ""
    resize: str = "bicubic"
    warnings: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def summary(self) -> dict:
        return {
            "source": self.source,
            "images": len(self.ids),
            "skipped": len(self.skipped),
            "skipped_files": self.skipped[:100],
            "warnings": len(self.warnings),
            "warning_files": self.warnings[:100],
            "resolution": list(self.images.shape[1:]),
            "resize_policy": self.resize,
        }


@dataclass(frozen=True)
class Entry:
    """One image of a folder or manifest training set (not decoded)."""

    id: str
    path: Path
    caption: str


@dataclass
class SourceListing:
    """The entries of a training set (nothing decoded yet) and what could not be listed.

    ``layout`` is ``"folder"``, ``"manifest"``, ``"webdataset"`` or ``"img2dataset"``.
    """

    source: str
    entries: list
    skipped: list[dict] = field(default_factory=list)
    warnings: list[dict] = field(default_factory=list)
    layout: str = "folder"

    @property
    def ids(self) -> list[str]:
        return [e.id for e in self.entries]

    @property
    def captions(self) -> list[str]:
        return [e.caption for e in self.entries]


def list_source(path: str | Path) -> SourceListing:
    """List a training set of any supported layout: the one dispatch over layouts.

    Examples
    --------
    >>> import tempfile
    >>> from memscan.synthetic import write_training_set
    >>> d = tempfile.mkdtemp()
    >>> _ = write_training_set(d, 3, size=8)
    >>> list_source(d).ids
    ['t0000', 't0001', 't0002']
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"training set {path} does not exist", "pass a folder of images or a CSV/Parquet manifest")
    layout = webdataset.detect_layout(p)
    if layout is not None:  # webdataset .tar shards or img2dataset layout
        entries, problems = webdataset.list_samples(p)
        skipped = [q for q in problems if not q.get("kept")]
        warnings = [{k: v for k, v in q.items() if k != "kept"} for q in problems if q.get("kept")]
        return _named_in_utf8(SourceListing(str(path), entries, skipped, warnings, layout))
    if p.is_dir():
        entries, warnings = _list_folder(p)
        return _named_in_utf8(SourceListing(str(path), entries, warnings=warnings, layout="folder"))
    if p.suffix.lower() in (".csv", ".parquet"):
        return _named_in_utf8(SourceListing(str(path), _list_manifest(p), layout="manifest"))
    raise InputError(
        f"training set {path} is neither a folder nor a .csv/.parquet manifest",
        "pass a folder of images, or a manifest with columns id, path, caption",
    )


def _utf8(text: str) -> bool:
    """Whether ``text`` is valid UTF-8 text (a file name with an undecodable byte holds a surrogate)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _shown_path(text: str) -> str:
    """``text`` (a path) printable as it is on disk: an undecodable byte of a file name is shown
    ``\\xNN`` (``bad\\xff.png``), not as the surrogate Python holds it as."""
    try:
        return os.fsencode(text).decode("utf-8", "backslashreplace")
    except UnicodeError:  # a surrogate no file name decodes to
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _named_in_utf8(listing: SourceListing) -> SourceListing:
    """``listing``, once every image's id and path (and tar member) is valid UTF-8.

    A file name that is not (an undecodable byte, e.g. from another system's encoding) cannot be
    an id: ids and paths are written as text to the run's tables, manifest and log. Such an image is
    refused with one error naming it, before any run writes anything — not skipped: the file
    itself may be a readable training image, and a skip would leave it out of the scan for a fix
    (a rename) that is the user's to make, like two images sharing an id."""
    bad = []
    for e in listing.entries:
        member = getattr(e, "member", "") or ""
        if not (_utf8(str(e.id)) and _utf8(str(e.path)) and _utf8(member)):
            bad.append(f"{e.path}:{member}" if member else str(e.path))
    if bad:
        more = f" (and {len(bad) - 1} more such name(s))" if len(bad) > 1 else ""
        raise InputError(
            f"training image {_shown_path(bad[0])} of training set {_shown_path(listing.source)} has a name that "
            f"is not valid UTF-8{more}",
            "rename it (and every other such file or folder) to a UTF-8 name: ids and paths are stored as text",
        )
    return listing


def list_training_set(path: str | Path) -> list:
    """The entries of a training set of any layout, without decoding any image."""
    return list_source(path).entries


def _list_folder(root: Path) -> tuple[list[Entry], list[dict]]:
    """The folder's images, and a warning for each image symlink that points out of the folder
    (not followed: not part of the training set)."""
    entries, warnings = [], []
    seen: dict[str, Path] = {}
    resolved_root = root.resolve()
    for f in sorted(root.rglob("*")):
        if not f.is_file() or f.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if not f.resolve().is_relative_to(resolved_root):
            # a symlink out of the folder is not part of the training set: said, not silent
            rel = f.relative_to(root).with_suffix("").as_posix()
            warnings.append({"id": rel, "path": str(f), "reason": "a symlink out of the training folder: not read"})
            continue
        rel = f.relative_to(root).with_suffix("")
        fid = rel.as_posix()
        if fid in seen:
            raise InputError(
                f"two training images share the id {fid!r}: {seen[fid].name} and {f.name}",
                "rename one of them (ids are file names without extension)",
            )
        seen[fid] = f
        cap_file = f.with_suffix(".txt")
        caption = cap_file.read_text(encoding="utf-8-sig", errors="replace").strip() if cap_file.exists() else ""
        entries.append(Entry(fid, f, caption))
    return entries, warnings


def _list_manifest(path: Path) -> list[Entry]:
    import pandas as pd

    try:
        df = (
            pd.read_parquet(path)
            if path.suffix.lower() == ".parquet"
            else pd.read_csv(path, dtype=str, keep_default_na=False)
        )
    except Exception as exc:
        raise InputError(
            f"cannot read training manifest {path}: {exc}", "check that it is a valid CSV/Parquet file"
        ) from None
    missing = {"id", "path"} - set(df.columns)
    if missing:
        raise InputError(
            f"training manifest {path} lacks column(s) {', '.join(sorted(missing))}",
            "the manifest needs columns id, path and optionally caption",
        )
    bad = [(i, v) for i, v in zip(df["id"], df["path"]) if not isinstance(v, str) or not v.strip()]
    if bad:
        raise InputError(
            f"training manifest {path}: the path of id {str(bad[0][0])!r} is {bad[0][1]!r}, not a file path "
            f"({len(bad)} such rows)",
            "the path column must hold image paths (strings) relative to the manifest's folder",
        )
    root = path.parent.resolve()
    entries = []
    ids = df["id"].astype(str).tolist()
    id_series = pd.Series(ids)
    dupes = sorted(set(id_series[id_series.duplicated()]))
    if dupes:
        raise InputError(f"training manifest {path} repeats ids: {', '.join(dupes[:5])}", "make the id column unique")
    captions = df["caption"].fillna("").astype(str).tolist() if "caption" in df.columns else [""] * len(df)
    for fid, rel, cap in zip(ids, df["path"].astype(str).tolist(), captions):
        full = (root / rel).resolve()
        if not full.is_relative_to(root):
            raise InputError(
                f"training manifest {path}: path {rel!r} of id {fid!r} points outside {root}",
                "keep every image path inside the manifest's folder",
            )
        entries.append(Entry(fid, full, cap))
    return entries


def load_training_set(
    path: str | Path | SourceListing, size: tuple[int, int] | None = None, channels: int = 3, progress=None
) -> TrainingSet:
    """Decode every image of a training set at (H, W) and C channels.

    ``path`` may also be a :class:`SourceListing` already made (:func:`list_source`): it is then
    decoded as listed, without listing the source again.

    Corrupt or unreadable files are skipped, with their id, path and the reason recorded.
    An empty result (nothing readable) is an error. Webdataset ``.tar`` shards (one, or a folder
    of them) and img2dataset's parquet+files layout are listed by :mod:`memscan.data.webdataset`;
    ``warnings`` then reports damaged side members (``.json``, shard parquet) of samples still loaded.
    """
    listing = path if isinstance(path, SourceListing) else list_source(path)
    path = listing.source
    if not listing.entries and listing.layout in ("folder", "manifest"):
        raise empty_training_set(path)
    return decode_training_set(
        path, listing.entries, webdataset.read_sample, size, channels, progress, listing.skipped, listing.warnings
    )


def decode_training_set(path, items, read, size, channels, progress=None, skipped=None, warnings=None) -> TrainingSet:
    """Decode every listed item with ``read(item, size, channels)`` into a :class:`TrainingSet`.

    Items need ``id``, ``caption`` and ``path`` (and ``member`` inside a tar shard). An item
    that fails to decode is a counted skip, never fatal, unless none decodes at all. With
    ``size=None`` the first decoded image sets the size for the rest.
    """
    ids, caps, imgs = [], [], []
    skipped = list(skipped or [])
    for k, item in enumerate(items):
        try:
            arr = read(item, size, channels)
        except Exception as exc:  # PIL raises many types for corrupt data; all are a skip
            where = f"{item.path}:{getattr(item, 'member', '') or ''}".rstrip(":")
            skipped.append({"id": item.id, "path": where, "reason": f"{type(exc).__name__}: {exc}"[:200]})
            continue
        if size is None:
            size = arr.shape[:2]
        ids.append(item.id)
        caps.append(item.caption)
        imgs.append(arr)
        if progress is not None:
            progress(k + 1, len(items))
    if not imgs:
        raise nothing_readable(path, skipped)
    return TrainingSet(ids, caps, np.stack(imgs), skipped, str(path), warnings=list(warnings or []))


def empty_training_set(path) -> InputError:
    """The error for a training set that lists no image at all."""
    return InputError(
        f"training set {path} holds no images",
        f"pass a folder, manifest or shards with images (files ending in {', '.join(IMAGE_EXTENSIONS)})",
    )


def nothing_readable(path, skipped: list[dict]) -> InputError:
    """The error for a training set none of whose images decodes (``skipped`` lists why)."""
    first = f"; first: {skipped[0]['reason']}" if skipped else ""
    return InputError(
        f"no image of training set {path} could be read ({len(skipped)} skipped{first})",
        "check the files are valid images",
    )


def training_at_shape(train: str | Path | SourceListing | TrainingSet, shape: tuple[int, ...], log=None) -> TrainingSet:
    """The training set ``train`` (a path or a :class:`SourceListing`, decoded here, or already
    loaded) at the generations' H×W×C ``shape``; a loaded set of another shape is refused.
    ``log(line)``, if given, records each skipped file."""
    from memscan.errors import MemscanError

    shape = tuple(shape)
    training = train if isinstance(train, TrainingSet) else load_training_set(train, size=shape[:2], channels=shape[2])
    if training.images.shape[1:] != shape:
        raise MemscanError(
            f"training images are {training.images.shape[1:]} but generations are {shape}",
            "load the training set at the generator's resolution",
        )
    for s in training.skipped if log is not None else ():
        log(f"skipped training image {s['id']} ({s['path']}): {s['reason']}")
    return training


def training_set_sha256(train: str | Path | SourceListing | TrainingSet) -> str:
    """The manifests' ``training_set_sha256``: what a resumed run's training set must match.

    - a path (folder, manifest, webdataset or img2dataset), or its :class:`SourceListing`: sha256
      over its listing (:func:`list_source`, nothing decoded), each image as
      ``id \\0 size-in-bytes \\0``, sorted by id. Where the set lies is not part of it (the same
      files at another path or on another machine are the same training set; the ``training_set``
      record keeps the path). An image changed in place to one of the same byte size is not seen.
    - a loaded :class:`TrainingSet`: sha256 of its ids and pixels.

    (Verification through an index records ``None``: its ``verification`` record, with the index
    path, parameters and image count, identifies the training set.)

    Examples
    --------
    >>> import tempfile
    >>> from memscan.synthetic import write_training_set
    >>> d = tempfile.mkdtemp()
    >>> _ = write_training_set(d, 3, size=8)
    >>> training_set_sha256(d) == training_set_sha256(list_source(d))
    True
    """
    import hashlib

    h = hashlib.sha256()
    if isinstance(train, TrainingSet):
        h.update(b"loaded\0" + str(train.images.shape).encode() + b"\0")
        for i in train.ids:
            h.update(str(i).encode("utf-8", "surrogateescape") + b"\0")
        h.update(np.ascontiguousarray(train.images).data)
        return h.hexdigest()
    listing = train if isinstance(train, SourceListing) else list_source(train)
    for i, size in sorted((str(e.id), _entry_size(e)) for e in listing.entries):
        h.update(f"{i}\0{size}\0".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _entry_size(entry) -> int:
    """Bytes of a listed training image (a tar member's recorded size, else its file's; -1 if unreadable)."""
    size = getattr(entry, "size", None)
    if isinstance(size, int):
        return size
    try:
        return os.stat(entry.path).st_size
    except OSError:
        return -1

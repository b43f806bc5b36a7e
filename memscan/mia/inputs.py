"""The inputs of a membership-inference run: the examples, the target model and its members,
the shadow models, and each model's condition.

:func:`load_mia_inputs` turns the ``--data``, ``--model``/``--members`` or
``--shadows``/``--target-shadow`` options into one :class:`MiaInputs`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from memscan.data.prompts import read_utf8, text_lines
from memscan.data.training import load_training_set
from memscan.errors import InputError
from memscan.mia.noise import NoisePredictor, load_noise_predictor
from memscan.mia.shadow import ShadowModels, load_shadow_models

__all__ = ["MiaInputs", "examples_table", "load_mia_inputs", "read_members", "resolve_condition"]


@dataclass
class MiaInputs:
    """Everything a membership-inference run attacks.

    Attributes
    ----------
    ids, captions : list of str
        The examples, in shadow-pool order when there are shadow models.
    images : numpy.ndarray
        uint8 ``N×H×W×C``.
    is_member : numpy.ndarray
        bool ``(N,)``: the target's ground truth.
    target : NoisePredictor
    target_name : str
        ``target`` or ``shadow_NNNN``.
    shadows : list of (name, NoisePredictor)
        The shadow models (without the target).
    shadow_in : numpy.ndarray or None
        bool ``M×N`` membership of the shadow models.
    sources : dict
        What the inputs were made from (recorded in the manifest).
    model_specs : list of str
        What each model (the target, then the shadows) loads from: a ``py:`` spec or a model
        directory, made absolute, so that a worker process can load its own copy.
    """

    ids: list[str]
    captions: list[str]
    images: np.ndarray
    is_member: np.ndarray
    target: NoisePredictor
    target_name: str
    shadows: list[tuple[str, Any]]
    shadow_in: np.ndarray | None
    sources: dict
    model_specs: list[str] = field(default_factory=list)

    def examples_sha256(self) -> str:
        """Content digest of the examples: sha256 over their ids, captions, membership and pixels
        (dtype, shape, bytes), taken in the order of their ids (the same examples aligned in
        another order give the same digest). Recorded in the manifest and part of the run identity, so a
        ``--resume`` on data rewritten at the same path is refused rather than mixing shards
        computed on two data sets; ``memscan compare`` compares runs' examples by it."""
        order = sorted(range(len(self.ids)), key=self.ids.__getitem__)  # by id: the order the
        # examples were aligned in (the shadow pool's, the data's) is not their content
        h = hashlib.sha256()
        h.update(json.dumps([[self.ids[i] for i in order], [self.captions[i] for i in order]]).encode())
        member = np.asarray(self.is_member, dtype=bool)[order]
        h.update(f"{member.dtype.str}{member.shape}".encode())
        h.update(memoryview(np.ascontiguousarray(member)).cast("B"))
        images = np.asarray(self.images)
        h.update(f"{images.dtype.str}{images.shape}".encode())
        for i in order:  # row by row: no sorted copy of the images
            h.update(memoryview(np.ascontiguousarray(images[i])).cast("B"))
        return h.hexdigest()

    @property
    def model_names(self) -> list[str]:
        """``target`` (or ``shadow_NNNN``), then the shadow models' names."""
        return [self.target_name] + [name for name, _ in self.shadows]

    @property
    def models(self) -> list[Any]:
        """The loaded predictors, in :attr:`model_names` order."""
        return [self.target] + [p for _, p in self.shadows]


def read_members(path: str | Path, ids: list[str]) -> np.ndarray:
    """Membership of ``ids`` from a text file of member ids, or a CSV/Parquet ``id, is_member``."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"members file {path} does not exist", "pass a text file with one member id per line")
    if p.suffix.lower() in (".csv", ".parquet"):
        return _read_members_table(p, path, ids)
    text = read_utf8(p, "members file")
    listed = [s.strip() for s in text_lines(text) if s.strip()]
    unknown = sorted(set(listed) - set(ids))
    if unknown:
        raise InputError(
            f"members file {path} names {len(unknown)} id(s) not in the data (first: {unknown[0]!r})",
            "list ids of --data examples (file names without extension)",
        )
    s = set(listed)
    return np.array([i in s for i in ids], dtype=bool)


def _read_members_table(p: Path, path: str | Path, ids: list[str]) -> np.ndarray:
    try:
        df = pd.read_parquet(p) if p.suffix.lower() == ".parquet" else pd.read_csv(p, dtype=str)
    except Exception as exc:
        raise InputError(f"cannot read members table {path}: {exc}", "check it is a valid CSV/Parquet") from None
    if not {"id", "is_member"} <= set(df.columns):
        raise InputError(f"members table {path} needs columns id, is_member")
    flags = df["is_member"].astype(str).str.strip().str.lower()
    odd = sorted(set(flags) - {"1", "0", "true", "false", "yes", "no"})
    if odd:
        raise InputError(
            f"members table {path}: is_member holds {odd[0]!r}", "use true/false, 1/0 or yes/no in is_member"
        )
    known = dict(zip(df["id"].astype(str), flags.isin(["1", "true", "yes"])))
    missing = [i for i in ids if i not in known]
    if missing:
        raise InputError(
            f"members table {path} has no row for {len(missing)} example(s) (first: {missing[0]!r})",
            "give every example of --data a row",
        )
    return np.array([known[i] for i in ids], dtype=bool)


def resolve_condition(p: Any, mode: str, captions: list[str]) -> Any:
    """The condition for predictor ``p``: ``auto``, ``null``, ``none`` or ``caption``."""
    conditional = bool(getattr(p, "config", {}).get("conditional"))
    kind = getattr(p, "kind", None)
    if mode not in ("auto", "null", "none", "caption"):
        raise InputError(f"condition: {mode!r} is unknown", "choose auto, null, none or caption")
    if kind == "unet2d_condition":
        raise InputError(
            "UNet2DConditionModel needs per-example text embeddings, which the CLI does not compute",
            "use the Python API (memscan.mia.loss.diffusion_loss with condition=embeddings)",
        )
    if mode == "caption" and not hasattr(p, "class_of"):
        raise InputError("--condition caption needs a diffusers model with class captions (memscan.json)")
    if mode == "none" or (mode == "auto" and not conditional):
        return None
    if mode == "null" or (mode == "auto" and not getattr(p, "class_captions", None)):
        if getattr(p, "null_class", None) is None:
            raise InputError(
                "the model is class-conditional but records no null class",
                "pass --condition caption (captions listed in memscan.json) or add null_class to memscan.json",
            )
        return int(p.null_class)
    return np.array([p.class_of(c) for c in captions], dtype=np.int64)


def _load_target(
    sm: ShadowModels | None,
    *,
    model: str | None,
    members: str | Path | None,
    target_shadow: int | None,
    device: str,
) -> tuple[Any, str]:
    """The target predictor and its name (``target`` or ``shadow_NNNN``)."""
    if target_shadow is not None:
        if sm is None:
            raise InputError("--target-shadow needs --shadows", "pass the shadow directory")
        if model is not None or members is not None:
            raise InputError(
                "--target-shadow takes the target and its members from the shadow directory",
                "drop --model/--members, or drop --target-shadow",
            )
        if not 0 <= target_shadow < sm.n_models:
            raise InputError(f"--target-shadow {target_shadow} is not in 0..{sm.n_models - 1}")
        return sm.load_predictor(target_shadow, device=device), f"shadow_{target_shadow:04d}"
    if model is None:
        raise InputError("no target model", "pass --model DIR (and --members FILE), or --shadows DIR --target-shadow M")
    if members is None:
        raise InputError("--members is needed with --model", "a text file with one member id per line")
    return load_noise_predictor(model, device=device), "target"


def _align_to_shadows(
    sm: ShadowModels,
    data: str | Path,
    shadows: str | Path,
    ids: list[str],
    captions: list[str],
    images: np.ndarray,
    target_shadow: int | None,
    device: str,
):
    """Examples reordered to the shadow pool, the loaded shadow models, their membership and the
    ids of ``data`` outside the pool."""
    pos = {i: k for k, i in enumerate(ids)}
    missing = [i for i in sm.ids if i not in pos]
    if missing:
        raise InputError(
            f"the shadow models were trained on ids missing from {data} (first: {missing[0]!r})",
            "pass the data the shadow directory was made from",
        )
    order = np.array([pos[i] for i in sm.ids])
    pool = set(sm.ids)
    outside = [i for i in ids if i not in pool]
    ids = [ids[k] for k in order]
    captions = [captions[k] for k in order]
    images = images[order]
    not_done = [m for m in range(sm.n_models) if not sm.done[m]]
    if not_done:
        raise InputError(f"shadow models {not_done} in {shadows} are not trained", "finish training them first (rerun)")
    keep = [m for m in range(sm.n_models) if m != target_shadow]
    shadow_list = [(f"shadow_{m:04d}", sm.load_predictor(m, device=device)) for m in keep]
    return ids, captions, images, shadow_list, sm.membership[keep], outside


def load_mia_inputs(
    data: str | Path,
    *,
    model: str | None,
    members: str | Path | None,
    shadows: str | Path | None,
    target_shadow: int | None,
    device: str,
) -> MiaInputs:
    """Load the examples, the target (``model`` + ``members``, or shadow ``target_shadow``) and
    the shadow models; every error names the option to fix."""
    sm = load_shadow_models(shadows) if shadows is not None else None
    target, target_name = _load_target(sm, model=model, members=members, target_shadow=target_shadow, device=device)
    shape = getattr(target, "sample_shape", None)
    size = tuple(shape[1:]) if shape else None
    channels = int(shape[0]) if shape else 3
    ts = load_training_set(data, size=size, channels=channels)
    if ts.skipped:
        raise InputError(
            f"{len(ts.skipped)} image(s) of {data} could not be read (first: {ts.skipped[0]['path']})",
            "membership needs every example; fix or remove them",
        )
    ids, captions, images = list(ts.ids), list(ts.captions), ts.images
    shadow_list: list[tuple[str, Any]] = []
    shadow_in = None
    outside: list[str] = []
    if sm is not None:
        ids, captions, images, shadow_list, shadow_in, outside = _align_to_shadows(
            sm, data, shadows, ids, captions, images, target_shadow, device
        )
    if target_shadow is not None:
        is_member = sm.membership[target_shadow].copy()
    else:
        is_member = read_members(members, ids)
    if is_member.all() or not is_member.any():
        raise InputError(
            f"all {len(ids)} examples are {'members' if is_member.all() else 'non-members'}",
            "membership inference needs both members and non-members",
        )
    sources = {
        "data": str(data),
        "model": model if target_shadow is None else f"{shadows} (model {target_shadow})",
        "members": str(members) if members is not None else f"shadow {target_shadow}'s mask",
        "shadows": str(shadows) if shadows is not None else None,
        "target_shadow": target_shadow,
        "target_config": getattr(target, "config", {}),
    }
    if sm is not None and outside:
        # examples of --data that no shadow model was trained or evaluated on are not attacked
        sources["not_in_shadow_pool"] = {"count": len(outside), "first_ids": outside[:20]}
    specs = [absolute_spec(model) if target_shadow is None else str(sm.model_dir(target_shadow).resolve())]
    if sm is not None:
        specs += [str(sm.model_dir(m).resolve()) for m in range(sm.n_models) if m != target_shadow]
    return MiaInputs(ids, captions, images, is_member, target, target_name, shadow_list, shadow_in, sources, specs)


def absolute_spec(spec: str | Path) -> str:
    """A model spec another process can load from any working directory (relative paths made
    absolute).

    Examples
    --------
    >>> absolute_spec("py:pkg.mod:make")
    'py:pkg.mod:make'
    """
    from memscan.runners.base import GeneratorSpec

    return GeneratorSpec(str(spec)).normalized().spec


def examples_table(s: MiaInputs) -> pd.DataFrame:
    """``examples.parquet``: index, id, caption, is_member (and IN/OUT counts among the shadows)."""
    df = pd.DataFrame(
        {"index": np.arange(len(s.ids)), "id": s.ids, "caption": s.captions, "is_member": s.is_member.astype(bool)}
    )
    if s.shadow_in is not None:
        df["n_in_shadows"] = s.shadow_in.sum(0).astype(np.int64)
        df["n_out_shadows"] = (~s.shadow_in).sum(0).astype(np.int64)
    return df

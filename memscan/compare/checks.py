"""Are these runs comparable? Same thresholds, same data, for runs of one kind.

Two runs of the same kind are comparable when their **settings** (the thresholds and seeds that
decide what counts as memorized: α, δ, grid, clique size, samples per prompt, seed, timesteps,
noise draws, attacks, folds, prefix lengths …, the precision the model ran at, the generator's
sampling — sampler, steps, guidance — and how candidates are verified: exactly, or through which
kind of index with which K; an extract run's adaptive-budget settings only where it was adaptive)
and their **data** (training set, prompts, examples, the number of shadow models, canaries) are
equal. Operational settings
that change no number (batch size, shard size, device, threads) are ignored, and so is what
identifies the model (its path, class, pipeline): the models are what a comparison varies. Runs
of different kinds are shown side by side and never pooled in one fit, so they are not checked
against each other.

Data are compared by content, never by path: the manifests' content hashes
(``training_set_sha256`` — for a run verified through an index, the index's —,
``sequences_sha256``, …, or a digest of the run's own table: an MIA run's examples, an extract
run's prompts, ids and texts in any order) where every run of the kind records them, else
path-free records (image and prompt counts) for runs made before the hashes were recorded. The
attribute a comparison is made **by** is exempt: ``--by train_size`` compares runs on different training sets, so their
training-set records are not checked (everything else still is).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

#: Settings that change speed, never a result. (``dtype`` as given — ``auto`` — is not compared:
#: the precision the model ran at, :func:`precision_of`, is.)
OPERATIONAL = frozenset(
    {"batch_size", "shard_size", "device", "threads", "num_workers", "workers", "dtype", "save_images", "runner"}
)
#: Manifest keys that are no threshold (lifecycle, model, data, results).
NOT_SETTINGS = frozenset(
    {
        "memscan_run", "kind", "command", "status", "started", "finished", "updated", "versions", "model",
        "runner", "throughput", "timings", "counts", "result", "summary", "sources", "n_shards", "shard_size",
        "generator", "output_shape", "prompts", "training_set", "seeds", "skipped_attacks", "best_timestep",
        "reverified", "data", "model_spec", "reference_spec", "examples_sha256", "sequences_sha256", "canaries",
        "canaries_sha256", "folds_of", "blind_baseline", "search", "scores", "model_description", "tokenizer",
        "skipped", "extractable_rate", "host", "finished_at", "error", "resumed", "history",
    }
)  # fmt: skip
#: Where each kind records its settings (other kinds: every manifest key but NOT_SETTINGS).
SETTINGS_KEYS = {
    "extract": ("config",),
    "extract-unconditional": ("config",),
    "memscore": ("memscore",),
    "lm-extractable": ("config",),
    "lm-exposure": ("config",),
    "lm-mia": ("config", "scores"),
    "lm-extract": ("config", "min_match"),
}
#: Settings a kind gained after runs of it existed, with the value those older runs behaved as
#: (a run that does not record one is compared as having it).
ADDED_SETTINGS = {
    "lm-mia": {"config.document_start": False},
}
#: The generator record's sampling settings (``generator.<key>``, image kinds); the rest of the
#: record (``source``, ``class``, ``pipeline``, ``resolution`` …) describes the model, which is
#: what a comparison of checkpoints, widths or training sets varies.
GENERATOR_SAMPLING = ("sampler", "scheduler", "num_inference_steps", "guidance_scale", "eta", "negative_prompt",
                      "initial_noise")  # fmt: skip
#: How candidates are verified (``extract``: ``verification``; ``extract-unconditional``:
#: ``search``): exact, or through an index of this type, parameters, embedder and K. The index's
#: path is not compared (the same index moved is the same verification).
SEARCH_SETTINGS = ("via", "search", "index_type", "index_params", "retrieve", "embedder")


@dataclass(frozen=True)
class DataRecord:
    """One datum of a run kind, compared by content.

    Attributes
    ----------
    name : what is compared, as the mismatch names it (``training_set_sha256``, ``examples``, …)
    content : where the manifest records its content hash (a key path), or ``None`` when it is
        computed from the run's own table (``table``)
    fallback : path-free key paths compared instead when a run of the group lacks the content
        hash (runs made before it was recorded; ``extract --index`` runs, whose training set is
        the index's)
    training : part of the training set (exempt from the check with ``--by train_size``)
    table : the run's table and columns whose rows (sorted) are the content, for kinds whose
        manifest records only a path
    also : further key paths of the content hash, read where ``content`` is null (an
        ``extract --index`` run: the index's training-set hash, in its ``training_set`` record)
    """

    name: str
    content: tuple | None
    fallback: tuple = ()
    training: bool = False
    table: tuple | None = None
    also: tuple = ()


_EXAMPLES = DataRecord("examples", None, (("counts", "examples"), ("counts", "members")), True,
                       ("examples", ("id", "is_member")))  # fmt: skip
#: The examples' pixels too (:meth:`memscan.mia.inputs.MiaInputs.examples_sha256`; runs made
#: before it was recorded are compared by their examples table only).
_EXAMPLES_SHA256 = DataRecord("examples_sha256", ("examples_sha256",), (), True)
#: How many shadow models LiRA's reference distributions came from (0: none; the shadows
#: themselves are not hashed — a path names them — so only their number is compared).
_SHADOWS = DataRecord("shadow_models", ("counts", "shadow_models"))
#: The images an image extraction run verified against: by content (an ``extract --index`` run:
#: its index's, in the ``training_set`` record), else by their number.
_TRAINING_SET = DataRecord("training_set_sha256", ("training_set_sha256",), (("training_set", "images"),), True,
                           also=(("training_set", "training_set_sha256"),))  # fmt: skip
#: Each kind's data (training set, prompts, examples, canaries, corpus).
DATA = {
    "extract": (
        _TRAINING_SET,
        # ids and texts in any order (``prompts_sha256`` is in order: a resume's identity); each
        # generation's seed derives from (seed, prompt_id, sample index), so order changes nothing
        DataRecord("prompts", None, (("prompts", "count"),), table=("prompts", ("prompt_id", "prompt"))),
    ),
    "extract-unconditional": (_TRAINING_SET,),
    "mia": (_EXAMPLES, _EXAMPLES_SHA256, _SHADOWS),
    "inpaint": (_EXAMPLES, _EXAMPLES_SHA256, _SHADOWS),
    "demo-mia": (_EXAMPLES, _EXAMPLES_SHA256, _SHADOWS),
    "memscore": (
        DataRecord("examples", None, (("counts", "examples"),), True, ("memscore", ("id",))),
        DataRecord("folds_of", ("folds_of",)),
        DataRecord("data_sha256", ("data_sha256",), training=True),
    ),
    "lm-extractable": (DataRecord("sequences_sha256", ("sequences_sha256",), training=True),),
    "lm-exposure": (DataRecord("canaries_sha256", ("canaries_sha256",)),),
    "lm-mia": (DataRecord("examples_sha256", ("examples_sha256",), training=True),),
    "lm-extract": (
        DataRecord(
            "index",
            None,
            (("index", "mode"), ("index", "n_docs"), ("index", "n_tokens"), ("index", "tokenizer")),
            True,
        ),
        DataRecord("prompts.sha256", ("prompts", "sha256")),
    ),
}


@dataclass(frozen=True)
class Mismatch:
    """Runs of one kind that differ in a setting or in their data.

    Attributes
    ----------
    kind : the run kind
    what : ``"settings"`` or ``"data"``
    key : the differing setting (``config.alpha``) or datum (``training_set_sha256``)
    values : run → its value (as JSON text)
    """

    kind: str
    what: str
    key: str
    values: dict

    def text(self) -> str:
        vals = "; ".join(f"{r}: {v}" for r, v in self.values.items())
        return f"{self.kind} runs differ in {self.what} {self.key} ({vals})"


def _strip(value):
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in OPERATIONAL}
    return value


#: Extract settings that only the adaptive budget reads (a run without ``adaptive`` never used them).
ADAPTIVE_ONLY = ("first_round", "round_size", "continue_clique", "stop_when_detected")
#: Where a run records the precision its model ran at, resolved (first found): the language
#: model's record, the image generator's, the MIA target's, then the ``dtype`` given.
PRECISION_AT = (
    ("model", "describe", "dtype"),
    ("model", "dtype"),
    ("generator", "dtype"),
    ("sources", "target_config", "dtype"),
    ("config", "dtype"),
)


def precision_of(manifest: dict) -> str | None:
    """The floating-point precision the run's model ran at (``float32``, ``bfloat16`` …; None
    where the run records none, or only ``auto``), in one spelling (``fp16`` is ``float16``): it
    changes the numbers, so runs at different precisions are not comparable.

    Examples
    --------
    >>> precision_of({"config": {"dtype": "auto"}, "model": {"dtype": "torch.bfloat16"}})
    'bfloat16'
    >>> precision_of({"config": {"dtype": "fp16"}}), precision_of({"config": {"dtype": "auto"}})
    ('float16', None)
    """
    from memscan.devices import precision
    from memscan.errors import InputError

    for path in PRECISION_AT:
        v = _get(manifest, path)
        if v is None:
            continue
        name = str(v).removeprefix("torch.")
        try:
            name = precision(name)
        except InputError:  # another type (float64, int8 …): as recorded
            pass
        if name != "auto":
            return name
    return None


def settings_of(kind: str, manifest: dict) -> dict:
    """The flattened thresholds and seeds of a run (``{"config.alpha": 0.08, …}``); for image
    extraction runs also the generator's sampling (``generator.num_inference_steps``, …) and how
    candidates are verified (``verification.via``: ``exact`` or ``index``, with the index's type,
    parameters, embedder and K; ``search.*`` for ``extract-unconditional``)."""
    flat: dict = {}

    def walk(prefix, v):
        if isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}.{k}" if prefix else k, x)
        else:
            flat[prefix] = json.dumps(v, sort_keys=True, default=str)

    keys = SETTINGS_KEYS.get(kind)
    for key, value in manifest.items():
        if (keys is not None and key not in keys) or (keys is None and key in NOT_SETTINGS) or key in OPERATIONAL:
            continue
        walk(key, _strip(value))
    if kind == "extract" and not (manifest.get("config") or {}).get("adaptive", False):
        for key in ADAPTIVE_ONLY:  # never read: every prompt got samples_per_prompt
            flat.pop(f"config.{key}", None)
    precision = precision_of(manifest)
    if precision is not None:
        flat["precision"] = json.dumps(precision)
    if kind in ("extract", "extract-unconditional"):
        gen = manifest.get("generator") or {}
        walk("generator", {k: gen[k] for k in GENERATOR_SAMPLING if k in gen})
        name = "verification" if kind == "extract" else "search"
        how = manifest.get(name) or {("via" if kind == "extract" else "search"): "exact"}
        walk(name, {k: how[k] for k in SEARCH_SETTINGS if k in how})
    for key, value in ADDED_SETTINGS.get(kind, {}).items():
        flat.setdefault(key, json.dumps(value))
    return flat


def _get(manifest: dict, path: tuple):
    v = manifest
    for p in path:
        v = v.get(p) if isinstance(v, dict) else None
    return v


def _table_digest(run: str, table: str, columns: tuple) -> str | None:
    """sha256 over the sorted rows (``columns``) of the run's table; None when it cannot be read
    (the comparison's own reading of the table then names the problem)."""
    path = Path(run) / f"{table}.parquet"
    try:
        t = pd.read_parquet(path)
    except (OSError, ValueError):
        return None
    if "id" in columns and "id" not in t and "index" in t:  # MIA examples without ids: their index
        t = t.rename(columns={"index": "id"})
    if not all(c in t for c in columns):
        return None
    rows = sorted("\0".join(str(v) for v in r) for r in t[list(columns)].itertuples(index=False))
    h = hashlib.sha256()
    for r in rows:
        h.update(r.encode("utf-8") + b"\0\0")
    return h.hexdigest()


def content_of(record: DataRecord, run: str, manifest: dict) -> str | None:
    """The content identity of one datum of a run (JSON text), or None when the run lacks it."""
    if record.content is not None:
        for path in (record.content, *record.also):
            v = _get(manifest, path)
            if v is not None:
                return json.dumps(v, sort_keys=True, default=str)
        return None
    if record.table is not None:
        return _table_digest(run, *record.table)
    return None


def data_mismatches(kind: str, group: list[tuple[str, dict]], by: str | None = None) -> list[Mismatch]:
    """Differences in data among ``(run, manifest)`` pairs of one kind: each datum by its content
    where every run records it, else by its path-free fallback records; with
    ``by="train_size"`` the training set is not compared (it is what the comparison varies)."""
    out = []
    for rec in DATA.get(kind, ()):
        if by == "train_size" and rec.training:
            continue
        contents = {r: content_of(rec, r, m) for r, m in group}
        if all(v is not None for v in contents.values()):
            compared = {rec.name: contents}
        else:
            compared = {
                ".".join(path): {r: json.dumps(_get(m, path), sort_keys=True, default=str) for r, m in group}
                for path in rec.fallback
            }
        for key, vals in compared.items():
            if len(set(vals.values())) > 1:
                out.append(Mismatch(kind, "data", key, vals))
    return out


def find_mismatches(runs: list[tuple[str, str, dict]], by: str | None = None) -> list[Mismatch]:
    """Mismatches among ``(run, kind, manifest)`` triples, within each kind; ``by``: the
    attribute compared (``train_size`` exempts the training set from the data check)."""
    out: list[Mismatch] = []
    kinds = sorted({k for _, k, _ in runs})
    for kind in kinds:
        group = [(r, m) for r, k, m in runs if k == kind]
        recs = {r: settings_of(kind, m) for r, m in group}
        if not all("precision" in rec for rec in recs.values()):  # unknown for one: not compared
            for rec in recs.values():
                rec.pop("precision", None)
        keys = sorted(set().union(*recs.values())) if recs else []
        for key in keys:
            vals = {r: rec.get(key, "<absent>") for r, rec in recs.items()}
            if len(set(vals.values())) > 1:
                out.append(Mismatch(kind, "settings", key, vals))
        out += data_mismatches(kind, group, by)
    return out

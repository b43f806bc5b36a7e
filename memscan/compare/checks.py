"""Are these runs comparable? Same thresholds, same training set, for runs of one kind.

Two runs of the same kind are comparable when their **settings** (the thresholds and seeds that
decide what counts as memorized: α, δ, grid, clique size, samples per prompt, seed, timesteps,
noise draws, attacks, folds, prefix lengths …) and their **data** (training set, prompts,
examples, canaries) are equal. Operational settings that change no number (batch size, shard
size, device, threads) are ignored. Runs of different kinds are shown side by side and never
pooled in one fit, so they are not checked against each other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

#: Settings that change speed, never a result.
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
#: Where each kind records its data (training set, prompts, examples).
DATA_KEYS = {
    "extract": (("training_set", "source"), ("training_set", "images"), ("prompts", "count")),
    "extract-unconditional": (("training_set", "source"), ("training_set", "images")),
    "mia": (("sources", "data"), ("sources", "members")),
    "inpaint": (("sources", "data"), ("sources", "members")),
    "demo-mia": (("sources", "data"), ("sources", "members")),
    "memscore": (("sources", "data"), ("folds_of",)),
    "lm-extractable": (("sequences_sha256",),),
    "lm-exposure": (("canaries_sha256",),),
    "lm-mia": (("examples_sha256",),),
    "lm-extract": (("index", "path"), ("index", "n_tokens"), ("prompts", "sha256")),
}


@dataclass(frozen=True)
class Mismatch:
    """Runs of one kind that differ in a setting or in their data.

    Attributes
    ----------
    kind : the run kind
    what : ``"settings"`` or ``"data"``
    key : the differing setting (``config.alpha``) or data record (``training_set.source``)
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


def settings_of(kind: str, manifest: dict) -> dict:
    """The flattened thresholds and seeds of a run (``{"config.alpha": 0.08, …}``)."""
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
    return flat


def data_of(kind: str, manifest: dict) -> dict:
    """The data records of a run (``{"training_set.source": …}``)."""
    out = {}
    for path in DATA_KEYS.get(kind, ()):
        v = manifest
        for p in path:
            v = v.get(p) if isinstance(v, dict) else None
        out[".".join(path)] = json.dumps(v, sort_keys=True, default=str)
    return out


def find_mismatches(runs: list[tuple[str, str, dict]]) -> list[Mismatch]:
    """Mismatches among ``(run, kind, manifest)`` triples, within each kind."""
    out: list[Mismatch] = []
    kinds = sorted({k for _, k, _ in runs})
    for kind in kinds:
        group = [(r, m) for r, k, m in runs if k == kind]
        for what, fn in (("settings", settings_of), ("data", data_of)):
            recs = {r: fn(kind, m) for r, m in group}
            keys = sorted(set().union(*recs.values())) if recs else []
            for key in keys:
                vals = {r: rec.get(key, "<absent>") for r, rec in recs.items()}
                if len(set(vals.values())) > 1:
                    out.append(Mismatch(kind, what, key, vals))
    return out

"""Runs that attack one or more per-example statistics: ``memscan mia`` (the diffusion loss
``L_t``), ``memscan inpaint`` (the inpainting distance) and the attack stage of ``demo-mia``.

A run directory (see ``docs/mia.md``)::

    RUN/
      manifest.json       kind, config, seeds, model/data sources, counts, timings, versions
      examples.parquet    index, id, caption, is_member (and IN counts among the shadow models)
      losses.parquet      model, timestep, index, loss            (mia, demo-mia)
      distances.parquet   model, index, distance                  (inpaint, demo-mia)
      scores.parquet      statistic, attack, timestep, index, score
      metrics.parquet     statistic, attack, timestep, auc, balanced_accuracy, tpr@1%fpr,
                          tpr@0.1%fpr (+ bootstrap bounds), n_members, n_nonmembers, params
      images/…            thumbnails of the examples the report shows
      report.html         made from the tables alone (:func:`memscan.report.mia.build_mia_report`)

Every statistic goes through one function, :func:`evaluate_statistic`: compute it for the target
and every shadow model, tabulate it, and run the attacks at each of its timesteps. A statistic
(:class:`DiffusionLossStatistic`, :class:`InpaintDistanceStatistic`) says only how to compute its
values for one model, how its table looks and what its timings count.

Scores follow the convention of :mod:`memscan.mia.metrics`: higher = more likely a member.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from memscan.mia.attack_labels import parse_attacks, run_attacks
from memscan.mia.inpaint import InpaintConfig, inpaint_distances
from memscan.mia.inputs import MiaInputs, examples_table, load_mia_inputs, resolve_condition
from memscan.mia.loss import LossConfig, diffusion_loss, timestep_sweep
from memscan.mia.results import MiaResult
from memscan.mia.run_dir import base_manifest, cpu_seconds, finish_run, open_new_run
from memscan.mia.shadow import torch_threads
from memscan.mia.tables import metrics_rows, score_rows

__all__ = [
    "DiffusionLossStatistic",
    "InpaintDistanceStatistic",
    "PerExampleStatistic",
    "StatisticOutput",
    "attack_statistics",
    "evaluate_statistic",
    "run_inpaint",
    "run_mia",
]


# --------------------------------------------------------------------------------------------
# the statistics
# --------------------------------------------------------------------------------------------
class PerExampleStatistic:
    """A per-example statistic (lower = member-like) computed for each model of a run.

    Attributes
    ----------
    name : str
        ``statistic`` column of the scores and metrics tables.
    table : str
        Name of its table (``losses``, ``distances``).
    manifest_key : str
        Manifest key of its settings and timings (``loss``, ``inpaint``).
    config : LossConfig or InpaintConfig
    timesteps : list of (int or None)
        The attacks run once per timestep (``[None]``: once).
    """

    name: str
    table: str
    manifest_key: str
    config: Any
    timesteps: list

    @property
    def seed(self) -> int:
        return int(self.config.seed)

    def evaluate(self, p: Any, s: MiaInputs, condition: Any, *, first: bool, position: tuple[int, int], progress: bool):
        """``(values T×N, extra)`` of model ``p``; ``first`` is the target (whose extras are kept)."""
        raise NotImplementedError

    def table_of(self, name: str, values: np.ndarray, n: int) -> pd.DataFrame:
        raise NotImplementedError

    def timing(self, seconds: float, n_models: int, n: int) -> dict:
        raise NotImplementedError


class DiffusionLossStatistic(PerExampleStatistic):
    """``L_t(x)`` at each timestep of ``config`` (:func:`memscan.mia.loss.diffusion_loss`)."""

    name, table, manifest_key = "diffusion_loss", "losses", "loss"

    def __init__(self, config: LossConfig):
        self.config = config
        self.timesteps = list(config.timesteps)

    def evaluate(self, p, s, condition, *, first, position, progress):
        cfg = self.config
        L = diffusion_loss(
            p,
            s.images,
            cfg.timesteps,
            condition=condition,
            noise_draws=cfg.noise_draws,
            flip=cfg.flip,
            seed=cfg.seed,
            batch_size=cfg.batch_size,
            progress=progress,
        )
        return L, None

    def table_of(self, name, values, n):
        return pd.DataFrame(
            {
                "model": name,
                "timestep": np.repeat(np.array(self.config.timesteps, dtype=np.int64), n),
                "index": np.tile(np.arange(n), len(self.config.timesteps)),
                "loss": values.reshape(-1),
            }
        )

    def timing(self, seconds, n_models, n):
        cfg = self.config
        evals = n_models * len(cfg.timesteps) * n * cfg.noise_draws * (2 if cfg.flip else 1)
        return {"seconds": round(seconds, 2), "loss_evaluations": evals, "per_s": round(evals / max(seconds, 1e-9), 1)}


class InpaintDistanceStatistic(PerExampleStatistic):
    """The inpainting distance in the hidden region (:func:`memscan.mia.inpaint.inpaint_distances`);
    the target's reconstructions are kept for the report."""

    name, table, manifest_key = "inpaint_distance", "distances", "inpaint"

    def __init__(self, config: InpaintConfig):
        self.config = config
        self.timesteps = [None]

    def evaluate(self, p, s, condition, *, first, position, progress):
        r = inpaint_distances(
            p, s.images, self.config, condition=condition, example_ids=list(range(len(s.ids))), keep_images=first
        )
        if progress:
            print(f"inpainting: model {position[0] + 1}/{position[1]} done", flush=True)
        return r.distance[None, :], r

    def table_of(self, name, values, n):
        return pd.DataFrame({"model": name, "index": np.arange(n), "distance": values[0]})

    def timing(self, seconds, n_models, n):
        return {
            "seconds": round(seconds, 2),
            "inpaintings": n_models * n * self.config.samples,
            "model_calls_per_inpainting": self.config.model_calls(),
        }


# --------------------------------------------------------------------------------------------
# the one stage: a statistic for every model, then the attacks
# --------------------------------------------------------------------------------------------
@dataclass
class StatisticOutput:
    """One statistic of a run: its table, the attack results and what could not run.

    Attributes
    ----------
    statistic : PerExampleStatistic
    table : pandas.DataFrame
        Every model's values (``losses`` / ``distances``).
    results : list of (label, AttackResult)
    skipped : list of dict
        Attacks that could not run, with the reason.
    timing : dict
    target_values : numpy.ndarray
        The target's values, ``T×N``.
    target_extra : Any
        What the statistic kept of the target (the inpainting's reconstructions).
    """

    statistic: PerExampleStatistic
    table: pd.DataFrame
    results: list
    skipped: list
    timing: dict
    target_values: np.ndarray
    target_extra: Any


def evaluate_statistic(
    s: MiaInputs, stat: PerExampleStatistic, attacks: Sequence[str], bootstrap: int, progress: bool
) -> StatisticOutput:
    """Compute ``stat`` for the target and every shadow model, then run ``attacks`` on it at each
    of its timesteps (LiRA calibrated on the shadow models' values)."""
    models = [(s.target_name, s.target)] + s.shadows
    values: dict[str, np.ndarray] = {}
    extra = None
    t0 = time.perf_counter()
    for k, (name, p) in enumerate(models):
        cond = resolve_condition(p, s.sources.get("condition", "auto"), s.captions)
        values[name], e = stat.evaluate(p, s, cond, first=k == 0, position=(k, len(models)), progress=progress)
        if k == 0:
            extra = e
    seconds = time.perf_counter() - t0
    n = len(s.ids)
    table = pd.concat([stat.table_of(name, v, n) for name, v in values.items()], ignore_index=True)
    shadow_stack = np.stack([values[nm] for nm, _ in s.shadows]) if s.shadows else None  # M×T×N
    results, skipped = [], []
    for j, t in enumerate(stat.timesteps):
        done, sk = run_attacks(
            stat.name,
            values[s.target_name][j],
            s.is_member,
            shadow=None if shadow_stack is None else shadow_stack[:, j],
            shadow_in=s.shadow_in,
            attacks=attacks,
            timestep=t,
            bootstrap=bootstrap,
            seed=stat.seed,
        )
        results += done
        skipped += sk
    timing = stat.timing(seconds, len(models), n)
    return StatisticOutput(stat, table, results, skipped, timing, values[s.target_name], extra)


# --------------------------------------------------------------------------------------------
# the run around it
# --------------------------------------------------------------------------------------------
def attack_statistics(
    kind: str,
    out: str | Path,
    s: MiaInputs,
    statistics: Sequence[PerExampleStatistic],
    *,
    attacks: list[str],
    bootstrap: int,
    top: int,
    progress: bool,
    t0: float,
    manifest_extra: dict | None = None,
    timings_before: dict | None = None,
    cpu0: float | None = None,
) -> MiaResult:
    """Open the run ``out``, evaluate and attack each statistic, write the tables, thumbnails and
    ``report.html``. ``t0`` (and ``cpu0``) are when the run started, for the timings."""
    store, lock = open_new_run(out)
    try:
        settings = {st.manifest_key: st.config.to_dict() for st in statistics}
        manifest = base_manifest(
            kind, s.sources, **settings, attacks=attacks, bootstrap=bootstrap, **(manifest_extra or {})
        )
        store.write_manifest(manifest)
        outputs = [evaluate_statistic(s, st, attacks, bootstrap, progress) for st in statistics]
        metrics = pd.DataFrame([row for o in outputs for row in metrics_rows(o.statistic.name, o.results)])
        scores = pd.concat([score_rows(o.statistic.name, o.results) for o in outputs], ignore_index=True)
        t_end = time.perf_counter()
        update: dict[str, Any] = {
            "counts": {"examples": len(s.ids), "members": int(s.is_member.sum()), "shadow_models": len(s.shadows)},
            "skipped_attacks": [k for o in outputs for k in o.skipped],
        }
        by_name = {o.statistic.name: o for o in outputs}
        if "diffusion_loss" in by_name:
            sweep = timestep_sweep(
                by_name["diffusion_loss"].target_values,
                by_name["diffusion_loss"].statistic.timesteps,
                s.is_member,
                bootstrap=0,
            )
            update["best_timestep"] = {"by": sweep.by, "timestep": sweep.best_timestep}
        timings = dict(timings_before or {})
        timings.update({o.statistic.manifest_key: o.timing for o in outputs})
        timings["total_s"] = round(t_end - t0, 2)
        if cpu0 is not None:
            timings["cpu_s"] = round(cpu_seconds() - cpu0, 2)
        update["timings"] = timings
        manifest.update(update)
        inpainted = by_name.get("inpaint_distance")
        recon = inpainted.target_extra.reconstructions if inpainted else None
        hidden = inpainted.target_extra.hidden if inpainted else None
        examples = examples_table(s)
        tables = {o.statistic.table: o.table for o in outputs}
        tables.update(scores=scores, metrics=metrics)
        report = finish_run(store, manifest, examples, tables, top, s, recon, hidden)
    finally:
        lock.release()
    return MiaResult(
        run_dir=store.root,
        manifest=manifest,
        examples=examples,
        scores=scores,
        metrics=metrics,
        losses=tables.get("losses"),
        distances=tables.get("distances"),
        report=report,
    )


def run_mia(
    out: str | Path,
    data: str | Path,
    *,
    model: str | None = None,
    members: str | Path | None = None,
    shadows: str | Path | None = None,
    target_shadow: int | None = None,
    loss: LossConfig = LossConfig(),
    attacks: str | Sequence[str] | None = None,
    condition: str = "auto",
    bootstrap: int = 200,
    device: str = "cpu",
    threads: int | None = None,
    top: int = 8,
    progress: bool = True,
) -> MiaResult:
    """Membership inference with the diffusion loss (``memscan mia``); writes the run ``out``.

    The target is ``model`` with the members listed in ``members`` (a text file of ids, or a
    CSV/Parquet with ``id, is_member``), or shadow model ``target_shadow`` of the shadow
    directory ``shadows`` (its mask is the ground truth; the other shadow models calibrate LiRA).
    ``L_t`` is computed for the target and every shadow model at each timestep of ``loss``; the
    attacks run at each timestep, and the timestep sweep picks the best one.
    """
    t0 = time.perf_counter()
    with torch_threads(threads):
        s = load_mia_inputs(
            data, model=model, members=members, shadows=shadows, target_shadow=target_shadow, device=device
        )
        s.sources["condition"] = condition
        stat = DiffusionLossStatistic(loss.validated(int(s.target.alphas_cumprod.numel())))
        names = parse_attacks(attacks, bool(s.shadows))
        return attack_statistics(
            "mia", out, s, [stat], attacks=names, bootstrap=bootstrap, top=top, progress=progress, t0=t0
        )


def run_inpaint(
    out: str | Path,
    data: str | Path,
    *,
    model: str | None = None,
    members: str | Path | None = None,
    shadows: str | Path | None = None,
    target_shadow: int | None = None,
    config: InpaintConfig = InpaintConfig(),
    attacks: str | Sequence[str] | None = None,
    condition: str = "auto",
    bootstrap: int = 200,
    device: str = "cpu",
    threads: int | None = None,
    top: int = 8,
    progress: bool = True,
) -> MiaResult:
    """The inpainting attack (``memscan inpaint``); writes the run ``out``.

    Targets and members as for :func:`run_mia`. Every example is inpainted (RePaint) by the
    target and by every shadow model; the distance to the original inside the hidden region is
    the statistic of the attacks (``loss``: global threshold; LiRA with shadow models).
    """
    t0 = time.perf_counter()
    with torch_threads(threads):
        s = load_mia_inputs(
            data, model=model, members=members, shadows=shadows, target_shadow=target_shadow, device=device
        )
        s.sources["condition"] = condition
        stat = InpaintDistanceStatistic(config.validated(int(s.target.alphas_cumprod.numel())))
        names = parse_attacks(attacks, bool(s.shadows))
        return attack_statistics(
            "inpaint", out, s, [stat], attacks=names, bootstrap=bootstrap, top=top, progress=progress, t0=t0
        )

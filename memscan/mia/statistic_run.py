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
      shards/             one shard per (statistic, model, slice of examples): its rows
      images/…            thumbnails of the examples the report shows
      report.html         made from the tables alone (:func:`memscan.report.mia.build_mia_report`)

Every statistic goes through one stage, :func:`statistic_stage`: the values of one model on one
slice of the examples. Each example draws its noise from its own generators (seeded by the run
seed and its index), so a value does not depend on the slice it is computed in; slices are cut at
multiples of the examples of one model batch, so every model call sees the very rows an unsharded
run would. :func:`evaluate_statistic` runs that stage over every shard through
:func:`memscan.runners.shards.run_shards` (local or Ray workers, each shard committed once, a
killed run resumed with ``--resume``), then gathers each model's values and runs the attacks at
each of the statistic's timesteps in the driver. A statistic (:class:`DiffusionLossStatistic`,
:class:`InpaintDistanceStatistic`) says only how to compute its values for one model on one
slice, how its table looks and what its timings count.

Scores follow the convention of :mod:`memscan.mia.metrics`: higher = more likely a member.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from memscan.devices import check_device
from memscan.errors import InputError, user_code
from memscan.mia.attack_labels import parse_attacks, run_attacks
from memscan.mia.inpaint import InpaintConfig, inpaint_distances, inpaint_mask
from memscan.mia.inputs import MiaInputs, examples_table, load_mia_inputs, resolve_condition
from memscan.mia.loss import LossConfig, diffusion_loss, timestep_sweep
from memscan.mia.results import MiaResult
from memscan.mia.run_dir import cpu_seconds, finish_mia_run
from memscan.mia.shadow import check_threads, torch_threads
from memscan.mia.tables import metrics_rows, score_rows
from memscan.store import Run, open_run

__all__ = [
    "DEFAULT_SHARD_SIZE",
    "DiffusionLossStatistic",
    "InpaintDistanceStatistic",
    "PerExampleStatistic",
    "StatisticOutput",
    "StatisticShard",
    "attack_statistics",
    "evaluate_statistic",
    "plan_shards",
    "run_inpaint",
    "run_mia",
    "statistic_stage",
    "statistic_worker",
]

#: Examples per shard (rounded up to a multiple of the examples in one model batch).
DEFAULT_SHARD_SIZE = 256


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

    def batch_examples(self) -> int:
        """Examples that one model batch takes: shards are cut at multiples of it."""
        raise NotImplementedError

    def check(self, images: np.ndarray) -> None:
        """Refuse, before any model runs, examples the statistic cannot be computed on."""

    def evaluate(self, p: Any, images: np.ndarray, condition: Any, example_ids: Sequence[int], *, keep: bool):
        """``(values T×n, tables)`` of model ``p`` on ``images`` (``n`` examples with the run's
        indices ``example_ids``); ``keep``: also return what the report shows (the target's)."""
        raise NotImplementedError

    def values_of(self, shard_table: pd.DataFrame, n: int) -> np.ndarray:
        """The ``T×n`` values held in a shard's table (the inverse of :meth:`table_of`)."""
        raise NotImplementedError

    def table_of(self, name: str, values: np.ndarray, n: int, start: int = 0) -> pd.DataFrame:
        raise NotImplementedError

    def timing(self, seconds: float, n_models: int, n: int) -> dict:
        raise NotImplementedError


class DiffusionLossStatistic(PerExampleStatistic):
    """``L_t(x)`` at each timestep of ``config`` (:func:`memscan.mia.loss.diffusion_loss`)."""

    name, table, manifest_key = "diffusion_loss", "losses", "loss"

    def __init__(self, config: LossConfig):
        self.config = config
        self.timesteps = list(config.timesteps)

    def batch_examples(self) -> int:
        cfg = self.config
        return max(1, math.ceil(cfg.batch_size / (cfg.noise_draws * (2 if cfg.flip else 1))))

    def evaluate(self, p, images, condition, example_ids, *, keep):
        cfg = self.config
        L = diffusion_loss(
            p,
            images,
            cfg.timesteps,
            condition=condition,
            noise_draws=cfg.noise_draws,
            flip=cfg.flip,
            seed=cfg.seed,
            batch_size=cfg.batch_size,
            example_ids=list(example_ids),
        )
        return L, {}

    def values_of(self, shard_table, n):
        return shard_table["loss"].to_numpy(dtype=np.float64).reshape(len(self.config.timesteps), n)

    def table_of(self, name, values, n, start=0):
        return pd.DataFrame(
            {
                "model": name,
                "timestep": np.repeat(np.array(self.config.timesteps, dtype=np.int64), n),
                "index": np.tile(np.arange(start, start + n), len(self.config.timesteps)),
                "loss": values.reshape(-1),
            }
        )

    def timing(self, seconds, n_models, n):
        cfg = self.config
        evals = n_models * len(cfg.timesteps) * n * cfg.noise_draws * (2 if cfg.flip else 1)
        return {"seconds": round(seconds, 2), "loss_evaluations": evals, "per_s": round(evals / max(seconds, 1e-9), 1)}


class InpaintDistanceStatistic(PerExampleStatistic):
    """The inpainting distance in the hidden region (:func:`memscan.mia.inpaint.inpaint_distances`);
    the target's reconstructions are kept (shard table ``reconstructions``) for the report."""

    name, table, manifest_key = "inpaint_distance", "distances", "inpaint"

    def __init__(self, config: InpaintConfig):
        self.config = config
        self.timesteps = [None]

    def batch_examples(self) -> int:
        return int(self.config.batch_size)

    def check(self, images: np.ndarray) -> None:
        # every example's mask hides something (a random mask of a small image may not): refused
        # here, naming the example, not in a worker after other shards ran
        cfg, (h, w) = self.config, images.shape[1:3]
        for i in range(len(images)):
            inpaint_mask((h, w), cfg.region, fraction=cfg.fraction, seed=cfg.seed, example_id=i)

    def evaluate(self, p, images, condition, example_ids, *, keep):
        r = inpaint_distances(
            p, images, self.config, condition=condition, example_ids=list(example_ids), keep_images=keep
        )
        if not keep:
            return r.distance[None, :], {}
        # the target's reconstructions, as the thumbnails show them (uint8, as save_thumb rounds)
        u8 = np.clip(np.round(r.reconstructions * 255), 0, 255).astype(np.uint8)
        rec = pd.DataFrame({"index": np.asarray(list(example_ids), dtype=np.int64), "image": [a.tobytes() for a in u8]})
        return r.distance[None, :], {"reconstructions": rec}

    def values_of(self, shard_table, n):
        return shard_table["distance"].to_numpy(dtype=np.float64)[None, :]

    def table_of(self, name, values, n, start=0):
        return pd.DataFrame({"model": name, "index": np.arange(start, start + n), "distance": values[0]})

    def timing(self, seconds, n_models, n):
        return {
            "seconds": round(seconds, 2),
            "inpaintings": n_models * n * self.config.samples,
            "model_calls_per_inpainting": self.config.model_calls(),
        }


# --------------------------------------------------------------------------------------------
# the one stage: a statistic of one model on one slice of the examples
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StatisticShard:
    """One shard: statistic ``stat`` (its position in the run) of model ``model`` on examples
    ``start:stop``."""

    stat: int
    model: int
    start: int
    stop: int


def plan_shards(statistics: Sequence[PerExampleStatistic], n_models: int, n: int, shard_size: int) -> list:
    """The shards of a run, in commit order: statistic, then model, then slice of examples.

    Slices hold ``shard_size`` examples rounded up to a multiple of the statistic's
    :meth:`~PerExampleStatistic.batch_examples`, so every model batch is the unsharded one.

    Examples
    --------
    >>> st = DiffusionLossStatistic(LossConfig(timesteps=(10,), noise_draws=2, batch_size=8))
    >>> [(s.model, s.start, s.stop) for s in plan_shards([st], 2, 10, 3)]
    [(0, 0, 4), (0, 4, 8), (0, 8, 10), (1, 0, 4), (1, 4, 8), (1, 8, 10)]
    """
    if isinstance(shard_size, bool) or int(shard_size) != shard_size or shard_size < 1:
        from memscan.errors import InputError

        raise InputError(f"shard size: {shard_size!r} must be a positive integer", "e.g. --shard-size 256")
    out = []
    for k, st in enumerate(statistics):
        step = st.batch_examples()
        size = math.ceil(int(shard_size) / step) * step
        for m in range(n_models):
            out += [StatisticShard(k, m, lo, min(n, lo + size)) for lo in range(0, n, size)]
    return out


def statistic_worker(specs: Sequence[str], device: str, threads: int | None = None, preloaded=None) -> dict:
    """A worker's context: the noise predictors, loaded from ``specs`` when first needed.

    ``preloaded`` (the local runner) are the driver's own predictors, used as they are; a Ray
    worker loads from the specs (one model held at a time) with ``threads`` torch threads.
    """
    if threads is not None and preloaded is None:
        import torch

        torch.set_num_threads(int(threads))
    return {
        "specs": list(specs),
        "device": device,
        "models": dict(enumerate(preloaded or [])),
        "own": preloaded is None,
    }


def _predictor(ctx: dict, m: int):
    models = ctx["models"]
    if m not in models:
        from memscan.mia.noise import load_noise_predictor

        if ctx["own"]:
            models.clear()  # one model at a time: shards come model by model
        spec = ctx["specs"][m]
        with user_code(f"loading the model {spec} failed", "fix the model (or its py: function) and rerun"):
            models[m] = load_noise_predictor(spec, device=ctx["device"])
    return models[m]


def statistic_stage(
    ctx: dict,
    stat: PerExampleStatistic,
    shard: StatisticShard,
    name: str,
    images: np.ndarray,
    captions: list[str],
    condition: str,
) -> tuple[dict[str, pd.DataFrame], dict]:
    """The values of ``stat`` for model ``shard.model`` (``name``) on the examples
    ``shard.start:shard.stop`` (``images``, ``captions``): the shard's tables and record."""
    p = _predictor(ctx, shard.model)
    cond = resolve_condition(p, condition, captions)
    t0 = time.perf_counter()
    ids = range(shard.start, shard.stop)
    where = f"the model {name} failed on examples {shard.start}–{shard.stop - 1} ({stat.name})"
    with user_code(where):
        values, extra = stat.evaluate(p, images, cond, ids, keep=shard.model == 0)
    seconds = time.perf_counter() - t0
    tables = {stat.table: stat.table_of(name, values, len(ids), shard.start), **extra}
    return tables, {"statistic": stat.name, "model": name, "examples": [shard.start, shard.stop], "seconds": seconds}


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
    target_extra : dict
        The target's shard tables beside the values (the inpainting's ``reconstructions``).
    """

    statistic: PerExampleStatistic
    table: pd.DataFrame
    results: list
    skipped: list
    timing: dict
    target_values: np.ndarray
    target_extra: dict


def evaluate_statistic(
    run: Run,
    s: MiaInputs,
    statistics: Sequence[PerExampleStatistic],
    shards: Sequence[StatisticShard],
    *,
    pool,
    attacks: Sequence[str],
    bootstrap: int,
    progress: bool,
    stop_after_shards: int | None = None,
) -> list[StatisticOutput]:
    """Compute every statistic for the target and every shadow model (the shards not yet
    committed), then run ``attacks`` on each at each of its timesteps (LiRA calibrated on the
    shadow models' values)."""
    from memscan.runners.shards import run_shards

    names = s.model_names
    args = {
        k: (
            statistics[sh.stat],
            sh,
            names[sh.model],
            s.images[sh.start : sh.stop],
            s.captions[sh.start : sh.stop],
            s.sources.get("condition", "auto"),
        )
        for k, sh in enumerate(shards)
    }
    run_shards(
        run,
        pool,
        statistic_stage,
        args,
        weights={k: sh.stop - sh.start for k, sh in enumerate(shards)},
        label="per-example statistics",
        unit="examples",
        progress=progress,
        stop_after_shards=stop_after_shards,
        describe=lambda k, tables: (
            f"{statistics[shards[k].stat].name} of {names[shards[k].model]}, "
            f"examples {shards[k].start}:{shards[k].stop}"
        ),
    )
    n = len(s.ids)
    outputs = []
    for j, stat in enumerate(statistics):
        mine = [(k, sh) for k, sh in enumerate(shards) if sh.stat == j]
        values = {name: np.empty((len(stat.timesteps), n)) for name in names}
        extra: dict[str, list] = {}
        seconds = 0.0
        for k, sh in mine:
            values[names[sh.model]][:, sh.start : sh.stop] = stat.values_of(
                run.store.read_shard(k, stat.table), sh.stop - sh.start
            )
            seconds += float(run.store.shard_record(k).get("seconds", 0.0))
            if sh.model == 0:
                for t in run.store.shard_record(k)["rows"]:
                    if t != stat.table:
                        extra.setdefault(t, []).append(run.store.read_shard(k, t))
        table = pd.concat([stat.table_of(name, values[name], n) for name in names], ignore_index=True)
        shadow_stack = np.stack([values[nm] for nm, _ in s.shadows]) if s.shadows else None  # M×T×N
        results, skipped = [], []
        for i, t in enumerate(stat.timesteps):
            done, sk = run_attacks(
                stat.name,
                values[s.target_name][i],
                s.is_member,
                shadow=None if shadow_stack is None else shadow_stack[:, i],
                shadow_in=s.shadow_in,
                attacks=attacks,
                timestep=t,
                bootstrap=bootstrap,
                seed=stat.seed,
            )
            results += done
            skipped += sk
        timing = stat.timing(seconds, len(names), n)
        target_extra = {t: pd.concat(parts, ignore_index=True) for t, parts in extra.items()}
        outputs.append(StatisticOutput(stat, table, results, skipped, timing, values[s.target_name], target_extra))
    return outputs


# --------------------------------------------------------------------------------------------
# the run around it
# --------------------------------------------------------------------------------------------
def _json_ready(obj):
    """``obj`` as it reads back from the manifest (tuples → lists), so a resume compares equal."""
    return json.loads(json.dumps(obj, default=str))


def attack_statistics(
    kind: str,
    run: Run,
    s: MiaInputs,
    statistics: Sequence[PerExampleStatistic],
    *,
    attacks: list[str],
    bootstrap: int,
    top: int,
    progress: bool,
    t0: float,
    shard_size: int = DEFAULT_SHARD_SIZE,
    runner: str = "local",
    runner_options=None,
    threads: int | None = None,
    device: str = "cpu",
    manifest_extra: dict | None = None,
    timings_before: dict | None = None,
    cpu0: float | None = None,
    stop_after_shards: int | None = None,
) -> MiaResult:
    """In the open run ``run``: evaluate and attack each statistic, write the tables, thumbnails
    and ``report.html``. ``t0`` (and ``cpu0``) are when the run started, for the timings."""
    from memscan.generators.model_record import model_record
    from memscan.runners import make_pool

    shards = plan_shards(statistics, len(s.model_names), len(s.ids), shard_size)
    settings = {st.manifest_key: st.config.to_dict() for st in statistics}
    fields = _json_ready(
        {
            "sources": s.sources,
            "examples_sha256": s.examples_sha256(),
            **settings,
            "attacks": attacks,
            "bootstrap": bootstrap,
            "shard_size": int(shard_size),
            "n_shards": len(shards),
            **(manifest_extra or {}),
        }
    )
    fields["model"] = model_record(s.model_specs[0] if s.model_specs else s.sources.get("model"), s.target)
    fields["runner"] = {"name": runner}
    run.start(
        fields, identity=("sources", "examples_sha256", *settings, "attacks", "bootstrap", "shard_size", "n_shards")
    )
    if runner == "local":
        setup_args = (s.model_specs, device, threads, s.models)
    else:
        setup_args = (s.model_specs, device, threads)
    with make_pool(runner, statistic_worker, setup_args, runner_options, log=run.store.log) as pool:
        run.manifest["runner"] = pool.describe()
        run.save()
        outputs = evaluate_statistic(
            run,
            s,
            statistics,
            shards,
            pool=pool,
            attacks=attacks,
            bootstrap=bootstrap,
            progress=progress,
            stop_after_shards=stop_after_shards,
        )
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
    inpainted = by_name.get("inpaint_distance")
    recon = hidden = None
    if inpainted is not None:
        recon, hidden = _reconstructions(s, inpainted)
    examples = examples_table(s)
    tables = {o.statistic.table: o.table for o in outputs}
    tables.update(scores=scores, metrics=metrics)
    report = finish_mia_run(run, update, examples, tables, top, s, recon, hidden)
    return MiaResult(
        run_dir=run.root,
        manifest=run.manifest,
        examples=examples,
        scores=scores,
        metrics=metrics,
        losses=tables.get("losses"),
        distances=tables.get("distances"),
        report=report,
    )


def _reconstructions(s: MiaInputs, out: StatisticOutput) -> tuple[dict, np.ndarray]:
    """The target's reconstructions (index → uint8 image) and every example's hidden mask."""
    n, h, w, c = s.images.shape
    cfg = out.statistic.config
    rec = out.target_extra.get("reconstructions")
    images = {}
    if rec is not None:
        for i, b in zip(rec["index"], rec["image"]):
            images[int(i)] = np.frombuffer(b, dtype=np.uint8).reshape(h, w, c)
    hidden = np.stack(
        [inpaint_mask((h, w), cfg.region, fraction=cfg.fraction, seed=cfg.seed, example_id=i) for i in range(n)]
    )
    return images, hidden


def _open_and_attack(
    kind: str,
    out: str | Path,
    statistics_of,
    *,
    data,
    model,
    members,
    shadows,
    target_shadow,
    attacks,
    condition: str,
    bootstrap: int,
    device: str,
    threads: int | None,
    top: int,
    progress: bool,
    resume: bool,
    shard_size: int,
    runner: str,
    runner_options,
    stop_after_shards: int | None,
) -> MiaResult:
    t0 = time.perf_counter()
    check_device(device)  # the target loads here, on the device: refused before the run opens
    check_threads(threads)
    if isinstance(bootstrap, bool) or int(bootstrap) != bootstrap or bootstrap < 0:
        raise InputError(f"--bootstrap {bootstrap}: must be 0 or more", "use 0 (no intervals) or e.g. 200")
    with open_run(out, kind, resume=resume) as run, torch_threads(threads):
        s = load_mia_inputs(
            data, model=model, members=members, shadows=shadows, target_shadow=target_shadow, device=device
        )
        s.sources["condition"] = condition
        stats = statistics_of(int(s.target.alphas_cumprod.numel()))
        for st in stats:
            st.check(s.images)  # before any shard, and before the manifest is written
        names = parse_attacks(attacks, bool(s.shadows))
        return attack_statistics(
            kind,
            run,
            s,
            stats,
            attacks=names,
            bootstrap=bootstrap,
            top=top,
            progress=progress,
            t0=t0,
            shard_size=shard_size,
            runner=runner,
            runner_options=runner_options,
            threads=threads,
            device=device,
            stop_after_shards=stop_after_shards,
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
    resume: bool = False,
    shard_size: int = DEFAULT_SHARD_SIZE,
    runner: str = "local",
    runner_options=None,
    stop_after_shards: int | None = None,
) -> MiaResult:
    """Membership inference with the diffusion loss (``memscan mia``); writes the run ``out``.

    The target is ``model`` with the members listed in ``members`` (a text file of ids, or a
    CSV/Parquet with ``id, is_member``), or shadow model ``target_shadow`` of the shadow
    directory ``shadows`` (its mask is the ground truth; the other shadow models calibrate LiRA).
    ``L_t`` is computed for the target and every shadow model at each timestep of ``loss``, one
    shard (model, ``shard_size`` examples) at a time on the ``runner``'s workers; the attacks run
    at each timestep, and the timestep sweep picks the best one. ``resume`` finishes a killed run.
    """
    return _open_and_attack(
        "mia",
        out,
        lambda T: [DiffusionLossStatistic(loss.validated(T))],
        data=data,
        model=model,
        members=members,
        shadows=shadows,
        target_shadow=target_shadow,
        attacks=attacks,
        condition=condition,
        bootstrap=bootstrap,
        device=device,
        threads=threads,
        top=top,
        progress=progress,
        resume=resume,
        shard_size=shard_size,
        runner=runner,
        runner_options=runner_options,
        stop_after_shards=stop_after_shards,
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
    resume: bool = False,
    shard_size: int = DEFAULT_SHARD_SIZE,
    runner: str = "local",
    runner_options=None,
    stop_after_shards: int | None = None,
) -> MiaResult:
    """The inpainting attack (``memscan inpaint``); writes the run ``out``.

    Targets and members as for :func:`run_mia`. Every example is inpainted (RePaint) by the
    target and by every shadow model (sharded as for :func:`run_mia`); the distance to the
    original inside the hidden region is the statistic of the attacks (``loss``: global
    threshold; LiRA with shadow models).
    """
    return _open_and_attack(
        "inpaint",
        out,
        lambda T: [InpaintDistanceStatistic(config.validated(T))],
        data=data,
        model=model,
        members=members,
        shadows=shadows,
        target_shadow=target_shadow,
        attacks=attacks,
        condition=condition,
        bootstrap=bootstrap,
        device=device,
        threads=threads,
        top=top,
        progress=progress,
        resume=resume,
        shard_size=shard_size,
        runner=runner,
        runner_options=runner_options,
        stop_after_shards=stop_after_shards,
    )

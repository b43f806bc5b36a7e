"""Membership-inference runs: the library functions behind ``memscan mia``, ``memscan inpaint``,
``memscan memscore`` and ``memscan demo-mia``.

Each writes a run directory (see ``docs/mia.md``)::

    RUN/
      manifest.json       kind, config, seeds, model/data sources, counts, timings, versions
      examples.parquet    index, id, caption, is_member (and IN counts among the shadow models)
      losses.parquet      model, timestep, index, loss            (mia, demo-mia)
      distances.parquet   model, index, distance                  (inpaint, demo-mia)
      scores.parquet      statistic, attack, timestep, index, score
      metrics.parquet     statistic, attack, timestep, auc, balanced_accuracy, tpr@1%fpr,
                          tpr@0.1%fpr (+ bootstrap bounds), n_members, n_nonmembers, params
      memscore.parquet    index, id, score, u, v, n_in, n_out     (memscore)
      images/…            thumbnails of the examples the report shows
      report.html         made from the tables alone (:func:`build_mia_report`)

Scores follow the convention of :mod:`memscan.mia.metrics`: higher = more likely a member.
"""

from __future__ import annotations

import base64
import io
import json
import platform
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from memscan.errors import InputError, MemscanError
from memscan.mia.attacks import AttackInputs, make_attack
from memscan.mia.inpaint import InpaintConfig, inpaint_distances
from memscan.mia.loss import LossConfig, diffusion_loss, timestep_sweep
from memscan.mia.metrics import TABLE_COLUMNS, roc_metrics
from memscan.mia.shadow import torch_threads
from memscan.store import RunLock, RunStore, safe_name, write_table

__all__ = [
    "ATTACK_SPECS",
    "DemoMiaSettings",
    "build_mia_report",
    "run_attacks",
    "run_demo_mia",
    "run_inpaint",
    "run_memscore",
    "run_mia",
]

#: Attack labels of a run → (registry name, options).
ATTACK_SPECS: dict[str, tuple[str, dict[str, Any]]] = {
    "loss": ("loss", {}),
    "lira_online": ("lira_online", {}),
    "lira_offline": ("lira_offline", {}),
    "lira_online_fixed": ("lira_online", {"fixed_variance": True}),
    "lira_offline_fixed": ("lira_offline", {"fixed_variance": True}),
}

STATISTICS = {
    "diffusion_loss": "diffusion loss L_t (lower for members)",
    "inpaint_distance": "inpainting distance in the hidden region (lower for members)",
}


def parse_attacks(spec: str | Sequence[str] | None, have_shadows: bool) -> list[str]:
    """Attack labels to run (default: all of :data:`ATTACK_SPECS` with shadows, else ``loss``)."""
    if spec is None or spec == "" or spec == "all":
        return list(ATTACK_SPECS) if have_shadows else ["loss"]
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    for a in names:
        if a not in ATTACK_SPECS:
            raise InputError(f"unknown attack {a!r}", f"choose from {', '.join(ATTACK_SPECS)}")
        if a != "loss" and not have_shadows:
            raise InputError(f"attack {a} needs shadow models", "pass --shadows DIR, or use --attacks loss")
    return names


def run_attacks(
    statistic: str,
    target: np.ndarray,
    is_member: np.ndarray,
    *,
    shadow: np.ndarray | None = None,
    shadow_in: np.ndarray | None = None,
    attacks: Sequence[str] = ("loss",),
    timestep: int | None = None,
    bootstrap: int = 0,
    seed: int = 0,
) -> tuple[list[tuple[str, Any]], list[dict]]:
    """Run each attack on one per-example statistic (lower = member-like).

    Returns ``[(label, AttackResult)]`` and the attacks that could not run, each with its reason
    (e.g. too few IN shadow models for per-example variances) — recorded, never dropped silently.
    """
    done, skipped = [], []
    for label in attacks:
        name, opts = ATTACK_SPECS[label]
        inputs = AttackInputs(
            target_loss=target,
            shadow_loss=shadow if name != "loss" else None,
            shadow_in=shadow_in if name != "loss" else None,
            is_member=is_member,
            timestep=timestep,
        )
        try:
            res = make_attack(name, **opts).fit_score(inputs, bootstrap=bootstrap, seed=seed)
        except InputError as exc:
            skipped.append({"statistic": statistic, "attack": label, "timestep": timestep, "reason": exc.message})
            continue
        done.append((label, res))
    return done, skipped


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------
@dataclass
class _Setup:
    ids: list[str]
    captions: list[str]
    images: np.ndarray
    is_member: np.ndarray
    target: Any  # NoisePredictor
    target_name: str
    shadows: list[tuple[str, Any]]  # (name, predictor)
    shadow_in: np.ndarray | None
    sources: dict


def _read_members(path: str | Path, ids: list[str]) -> np.ndarray:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"members file {path} does not exist", "pass a text file with one member id per line")
    if p.suffix.lower() in (".csv", ".parquet"):
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
    from memscan.data.prompts import read_utf8

    text = read_utf8(p, "members file")
    listed = [s.strip() for s in text.splitlines() if s.strip()]
    unknown = sorted(set(listed) - set(ids))
    if unknown:
        raise InputError(
            f"members file {path} names {len(unknown)} id(s) not in the data (first: {unknown[0]!r})",
            "list ids of --data examples (file names without extension)",
        )
    s = set(listed)
    return np.array([i in s for i in ids], dtype=bool)


def _resolve_condition(p: Any, mode: str, captions: list[str]) -> Any:
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


def _setup(
    data: str | Path,
    *,
    model: str | None,
    members: str | Path | None,
    shadows: str | Path | None,
    target_shadow: int | None,
    device: str,
) -> _Setup:
    from memscan.data.training import load_training_set
    from memscan.mia.noise import load_noise_predictor
    from memscan.mia.shadow import load_shadow_models

    sm = load_shadow_models(shadows) if shadows is not None else None
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
        target = sm.load_predictor(target_shadow, device=device)
        target_name = f"shadow_{target_shadow:04d}"
    else:
        if model is None:
            raise InputError(
                "no target model", "pass --model DIR (and --members FILE), or --shadows DIR --target-shadow M"
            )
        if members is None:
            raise InputError("--members is needed with --model", "a text file with one member id per line")
        target = load_noise_predictor(model, device=device)
        target_name = "target"
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
    if sm is not None:
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
            raise InputError(
                f"shadow models {not_done} in {shadows} are not trained", "finish training them first (rerun)"
            )
        keep = [m for m in range(sm.n_models) if m != target_shadow]
        shadow_list = [(f"shadow_{m:04d}", sm.load_predictor(m, device=device)) for m in keep]
        shadow_in = sm.membership[keep]
    if target_shadow is not None:
        is_member = sm.membership[target_shadow].copy()
    else:
        is_member = _read_members(members, ids)
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
    return _Setup(ids, captions, images, is_member, target, target_name, shadow_list, shadow_in, sources)


# --------------------------------------------------------------------------------------------
# run directory
# --------------------------------------------------------------------------------------------
def _cpu_seconds() -> float:
    """CPU time of this process (user + system): on a shared machine, the cost that wall time hides."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("memscan", "numpy", "torch", "diffusers", "pandas", "pyarrow"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def _open_run(out: str | Path) -> tuple[RunStore, RunLock]:
    store = RunStore(out)
    if store.exists():
        raise MemscanError(f"{out} already holds a run (manifest.json)", "pass a new --out directory")
    store.root.mkdir(parents=True, exist_ok=True)
    lock = RunLock(store.root).acquire()
    return store, lock


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _save_thumb(store: RunStore, kind: str, name: str, img: np.ndarray) -> str:
    """Save a uint8 H×W×C (or float [0, 1]) image, upscaled to ≥ 64 px; returns its run-relative path."""
    from PIL import Image

    a = np.asarray(img)
    if a.dtype != np.uint8:
        a = np.clip(np.round(a * 255), 0, 255).astype(np.uint8)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    im = Image.fromarray(a)
    scale = max(1, 64 // max(im.size))
    if scale > 1:
        im = im.resize((im.size[0] * scale, im.size[1] * scale), Image.NEAREST)
    d = store.image_dir(kind)
    path = d / f"{safe_name(name)}.png"
    im.save(path, format="PNG")
    return path.relative_to(store.root).as_posix()


def _examples_table(s: _Setup) -> pd.DataFrame:
    df = pd.DataFrame(
        {"index": np.arange(len(s.ids)), "id": s.ids, "caption": s.captions, "is_member": s.is_member.astype(bool)}
    )
    if s.shadow_in is not None:
        df["n_in_shadows"] = s.shadow_in.sum(0).astype(np.int64)
        df["n_out_shadows"] = (~s.shadow_in).sum(0).astype(np.int64)
    return df


def _metrics_rows(statistic: str, results: list[tuple[str, Any]]) -> list[dict]:
    rows = []
    for label, r in results:
        roc = r.roc
        row = {"statistic": statistic, "attack": label, "timestep": r.timestep}
        row.update(auc=roc.auc, balanced_accuracy=roc.balanced_accuracy)
        row["tpr@1%fpr"] = roc.tpr_at_fpr(0.01)
        row["tpr@0.1%fpr"] = roc.tpr_at_fpr(0.001)
        for k in TABLE_COLUMNS[2:]:
            lo, hi = roc.ci.get(k, (np.nan, np.nan))
            row[f"{k}_lo"], row[f"{k}_hi"] = lo, hi
        row["n_members"], row["n_nonmembers"] = roc.n_members, roc.n_nonmembers
        row["params"] = json.dumps(dict(r.params), sort_keys=True)
        rows.append(row)
    return rows


def _score_rows(statistic: str, results: list[tuple[str, Any]]) -> pd.DataFrame:
    parts = []
    for label, r in results:
        n = r.scores.size
        parts.append(
            pd.DataFrame(
                {
                    "statistic": statistic,
                    "attack": label,
                    "timestep": pd.array([r.timestep] * n, dtype="Int64"),
                    "index": np.arange(n),
                    "score": r.scores,
                }
            )
        )
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def _loss_stage(s: _Setup, cfg: LossConfig, attacks: list[str], bootstrap: int, progress: bool):
    """Losses of target and shadows, the timestep sweep and the attacks at each timestep."""
    models = [(s.target_name, s.target)] + s.shadows
    losses: dict[str, np.ndarray] = {}
    t0 = time.perf_counter()
    evals = 0
    for name, p in models:
        cond = _resolve_condition(p, s.sources.get("condition", "auto"), s.captions)
        losses[name] = diffusion_loss(
            p,
            s.images,
            cfg.timesteps,
            condition=cond,
            noise_draws=cfg.noise_draws,
            flip=cfg.flip,
            seed=cfg.seed,
            batch_size=cfg.batch_size,
            progress=progress,
        )
        evals += len(cfg.timesteps) * len(s.ids) * cfg.noise_draws * (2 if cfg.flip else 1)
    seconds = time.perf_counter() - t0
    rows = [
        pd.DataFrame(
            {
                "model": name,
                "timestep": np.repeat(np.array(cfg.timesteps, dtype=np.int64), len(s.ids)),
                "index": np.tile(np.arange(len(s.ids)), len(cfg.timesteps)),
                "loss": L.reshape(-1),
            }
        )
        for name, L in losses.items()
    ]
    loss_df = pd.concat(rows, ignore_index=True)
    sweep = timestep_sweep(losses[s.target_name], cfg.timesteps, s.is_member, bootstrap=0)
    shadow_stack = np.stack([losses[n] for n, _ in s.shadows]) if s.shadows else None  # M×T×N
    results, skipped = [], []
    for j, t in enumerate(cfg.timesteps):
        done, sk = run_attacks(
            "diffusion_loss",
            losses[s.target_name][j],
            s.is_member,
            shadow=None if shadow_stack is None else shadow_stack[:, j],
            shadow_in=s.shadow_in,
            attacks=attacks,
            timestep=t,
            bootstrap=bootstrap,
            seed=cfg.seed,
        )
        results += done
        skipped += sk
    timing = {"seconds": round(seconds, 2), "loss_evaluations": evals, "per_s": round(evals / max(seconds, 1e-9), 1)}
    return loss_df, results, skipped, sweep, timing


def _inpaint_stage(s: _Setup, cfg: InpaintConfig, attacks: list[str], bootstrap: int, progress: bool):
    models = [(s.target_name, s.target)] + s.shadows
    dist: dict[str, np.ndarray] = {}
    recon = hidden = None
    t0 = time.perf_counter()
    for k, (name, p) in enumerate(models):
        cond = _resolve_condition(p, s.sources.get("condition", "auto"), s.captions)
        r = inpaint_distances(p, s.images, cfg, condition=cond, example_ids=list(range(len(s.ids))), keep_images=k == 0)
        dist[name] = r.distance
        if k == 0:
            recon, hidden = r.reconstructions, r.hidden
        if progress:
            print(f"inpainting: model {k + 1}/{len(models)} done", flush=True)
    seconds = time.perf_counter() - t0
    dist_df = pd.concat(
        [pd.DataFrame({"model": n, "index": np.arange(len(s.ids)), "distance": d}) for n, d in dist.items()],
        ignore_index=True,
    )
    shadow = np.stack([dist[n] for n, _ in s.shadows]) if s.shadows else None
    results, skipped = run_attacks(
        "inpaint_distance",
        dist[s.target_name],
        s.is_member,
        shadow=shadow,
        shadow_in=s.shadow_in,
        attacks=attacks,
        bootstrap=bootstrap,
        seed=cfg.seed,
    )
    timing = {
        "seconds": round(seconds, 2),
        "inpaintings": len(models) * len(s.ids) * cfg.samples,
        "model_calls_per_inpainting": cfg.model_calls(),
    }
    return dist_df, results, skipped, recon, hidden, timing


def _write_thumbs_for_examples(store: RunStore, s: _Setup, indices: Sequence[int]) -> None:
    for i in indices:
        _save_thumb(store, "examples", s.ids[int(i)], s.images[int(i)])


def _write_inpaint_images(store: RunStore, s: _Setup, recon: np.ndarray, hidden: np.ndarray, indices) -> None:
    for i in indices:
        i = int(i)
        masked = s.images[i].astype(np.float32) / 255.0
        masked = np.where(hidden[i][..., None], 0.5, masked)
        _save_thumb(store, "inpaint", f"{s.ids[i]}/masked", masked)
        _save_thumb(store, "inpaint", f"{s.ids[i]}/reconstruction", recon[i])


def _top_indices(scores_df: pd.DataFrame, metrics: pd.DataFrame, examples: pd.DataFrame, k: int) -> set[int]:
    """Examples the report shows: the k highest-scored members and non-members of each
    statistic's best result."""
    out: set[int] = set()
    for stat, (attack, t) in _best_results(metrics).items():
        sc = _scores_of(scores_df, stat, attack, t)
        mem = examples["is_member"].to_numpy()
        order = np.argsort(-sc, kind="stable")
        out.update(int(i) for i in [j for j in order if mem[j]][:k])
        out.update(int(i) for i in [j for j in order if not mem[j]][:k])
    return out


def _best_results(metrics: pd.DataFrame) -> dict[str, tuple[str, Any]]:
    """Per statistic: the (attack, timestep) with the highest TPR at 1 % FPR, then AUC."""
    best = {}
    for stat, g in metrics.groupby("statistic", sort=False):
        g = g.sort_values(["tpr@1%fpr", "auc"], ascending=False, kind="stable")
        r = g.iloc[0]
        best[stat] = (r["attack"], None if pd.isna(r["timestep"]) else int(r["timestep"]))
    return best


def _scores_of(scores: pd.DataFrame, stat: str, attack: str, t: int | None) -> np.ndarray:
    sel = (scores["statistic"] == stat) & (scores["attack"] == attack)
    sel &= scores["timestep"].isna() if t is None else (scores["timestep"] == t)
    return scores[sel].sort_values("index")["score"].to_numpy()


def _finish(
    store: RunStore,
    manifest: dict,
    examples: pd.DataFrame,
    tables: dict[str, pd.DataFrame],
    top: int,
    s: _Setup | None,
    recon=None,
    hidden=None,
) -> Path:
    write_table(examples, store.root / "examples.parquet")
    for name, df in tables.items():
        if df is not None and len(df):
            write_table(df, store.root / f"{name}.parquet")
    if s is not None and "metrics" in tables and len(tables["metrics"]):
        idx = _top_indices(tables["scores"], tables["metrics"], examples, top)
        _write_thumbs_for_examples(store, s, idx)
        if recon is not None:
            _write_inpaint_images(store, s, recon, hidden, idx)
    manifest["status"] = "complete"
    manifest["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    store.write_manifest(manifest)
    try:
        return build_mia_report(store.root)
    except BaseException:
        manifest["status"] = "incomplete"  # the tables are written, the report is not
        store.write_manifest(manifest)
        raise


def _base_manifest(kind: str, sources: dict, **extra) -> dict:
    return {
        "kind": kind,
        "status": "running",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "sources": sources,
        "versions": _versions(),
        **extra,
    }


def _summary_text(kind: str, metrics: pd.DataFrame, out: Path, extra: list[str] | None = None) -> str:
    lines = [f"memscan {kind}: {out}"]
    for stat, (attack, t) in _best_results(metrics).items():
        r = metrics[(metrics["statistic"] == stat) & (metrics["attack"] == attack)]
        r = r[r["timestep"].isna()] if t is None else r[r["timestep"] == t]
        r = r.iloc[0]
        at = "" if t is None else f" at t = {t}"
        lines.append(
            f"  {stat}: best {attack}{at}: AUC {r['auc']:.3f}, TPR@1%FPR {r['tpr@1%fpr']:.3f}, "
            f"TPR@0.1%FPR {r['tpr@0.1%fpr']:.3f}, balanced accuracy {r['balanced_accuracy']:.3f}"
        )
    lines += extra or []
    lines.append(f"  report: {out / 'report.html'}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# public run functions
# --------------------------------------------------------------------------------------------
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
) -> dict:
    """Membership inference with the diffusion loss (``memscan mia``); writes the run ``out``.

    The target is ``model`` with the members listed in ``members`` (a text file of ids, or a
    CSV/Parquet with ``id, is_member``), or shadow model ``target_shadow`` of the shadow
    directory ``shadows`` (its mask is the ground truth; the other shadow models calibrate LiRA).
    ``L_t`` is computed for the target and every shadow model at each timestep of ``loss``; the
    attacks run at each timestep, and the timestep sweep picks the best one.

    Returns a summary dict (also in the manifest) with a ``text`` field for the CLI.
    """
    t0 = time.perf_counter()
    with torch_threads(threads):
        s = _setup(data, model=model, members=members, shadows=shadows, target_shadow=target_shadow, device=device)
        s.sources["condition"] = condition
        cfg = loss.validated(int(s.target.alphas_cumprod.numel()))
        names = parse_attacks(attacks, bool(s.shadows))
        store, lock = _open_run(out)
        try:
            manifest = _base_manifest("mia", s.sources, loss=cfg.to_dict(), attacks=names, bootstrap=bootstrap)
            store.write_manifest(manifest)
            loss_df, results, skipped, sweep, timing = _loss_stage(s, cfg, names, bootstrap, progress)
            metrics = pd.DataFrame(_metrics_rows("diffusion_loss", results))
            scores = _score_rows("diffusion_loss", results)
            manifest.update(
                counts={"examples": len(s.ids), "members": int(s.is_member.sum()), "shadow_models": len(s.shadows)},
                skipped_attacks=skipped,
                best_timestep={"by": sweep.by, "timestep": sweep.best_timestep},
                timings={"loss": timing, "total_s": round(time.perf_counter() - t0, 2)},
            )
            report = _finish(
                store,
                manifest,
                _examples_table(s),
                {"losses": loss_df, "scores": scores, "metrics": metrics},
                top,
                s,
            )
        finally:
            lock.release()
    extra = [f"  best timestep ({sweep.by}): t = {sweep.best_timestep}"]
    if "not_in_shadow_pool" in s.sources:
        extra.append(
            f"  {s.sources['not_in_shadow_pool']['count']} example(s) of --data outside the shadow pool: not attacked"
        )
    extra += [f"  skipped {k['attack']} at t = {k['timestep']}: {k['reason']}" for k in skipped[:3]]
    return {"report": str(report), "manifest": manifest, "text": _summary_text("mia", metrics, Path(out), extra)}


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
) -> dict:
    """The inpainting attack (``memscan inpaint``); writes the run ``out``.

    Targets and members as for :func:`run_mia`. Every example is inpainted (RePaint) by the
    target and by every shadow model; the distance to the original inside the hidden region is
    the statistic of the attacks (``loss``: global threshold; LiRA with shadow models).
    """
    t0 = time.perf_counter()
    with torch_threads(threads):
        s = _setup(data, model=model, members=members, shadows=shadows, target_shadow=target_shadow, device=device)
        s.sources["condition"] = condition
        cfg = config.validated(int(s.target.alphas_cumprod.numel()))
        names = parse_attacks(attacks, bool(s.shadows))
        store, lock = _open_run(out)
        try:
            manifest = _base_manifest("inpaint", s.sources, inpaint=cfg.to_dict(), attacks=names, bootstrap=bootstrap)
            store.write_manifest(manifest)
            dist_df, results, skipped, recon, hidden, timing = _inpaint_stage(s, cfg, names, bootstrap, progress)
            metrics = pd.DataFrame(_metrics_rows("inpaint_distance", results))
            scores = _score_rows("inpaint_distance", results)
            manifest.update(
                counts={"examples": len(s.ids), "members": int(s.is_member.sum()), "shadow_models": len(s.shadows)},
                skipped_attacks=skipped,
                timings={"inpaint": timing, "total_s": round(time.perf_counter() - t0, 2)},
            )
            report = _finish(
                store,
                manifest,
                _examples_table(s),
                {"distances": dist_df, "scores": scores, "metrics": metrics},
                top,
                s,
                recon,
                hidden,
            )
        finally:
            lock.release()
    extra = []
    if "not_in_shadow_pool" in s.sources:
        extra.append(
            f"  {s.sources['not_in_shadow_pool']['count']} example(s) of --data outside the shadow pool: not attacked"
        )
    return {"report": str(report), "manifest": manifest, "text": _summary_text("inpaint", metrics, Path(out), extra)}


def _load_array_data(data: str | Path) -> tuple[Any, list[str], np.ndarray | None]:
    """``.npy`` (no pickle) → (array, ids, images or None); an image folder/manifest → uint8 images."""
    p = Path(data)
    if p.suffix.lower() == ".npy":
        if not p.is_file():
            raise InputError(f"data file {data} does not exist")
        try:
            arr = np.load(p, allow_pickle=False)
        except ValueError as exc:
            if "allow_pickle" in str(exc):
                raise InputError(
                    f"{data}: holds Python objects that only pickle can read; memscan never unpickles data",
                    "save a plain numeric array (np.save of a float or integer array)",
                ) from None
            raise InputError(f"{data}: not a valid .npy file ({exc})", "save it again with np.save") from None
        except (EOFError, OSError) as exc:
            raise InputError(
                f"{data}: truncated or unreadable .npy file ({exc})", "save it again with np.save"
            ) from None
        if arr.dtype.kind not in "biuf":
            raise InputError(f"{data}: array of dtype {arr.dtype} is not numeric", "save a float or integer array")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise InputError(
                f"{data}: {int((~np.isfinite(arr)).sum())} NaN/Inf value(s)", "drop or fill the non-finite entries"
            )
        ids = [str(i) for i in range(len(arr))]
        imgs = arr if (arr.dtype == np.uint8 and arr.ndim in (3, 4)) else None
        return arr, ids, imgs
    from memscan.data.training import load_training_set

    ts = load_training_set(p, channels=3)
    if ts.skipped:
        raise InputError(f"{len(ts.skipped)} image(s) of {data} could not be read", "fix or remove them")
    return ts.images, list(ts.ids), ts.images


def run_memscore(
    out: str | Path,
    data: str | Path,
    train_fn: Any,
    log_likelihood_fn: Any,
    *,
    folds: int = 10,
    repeats: int = 1,
    seed: int = 0,
    top: int = 16,
    progress: bool = True,
) -> dict:
    """The memorization score of van den Burg & Williams 2021 (``memscan memscore``).

    ``data`` is a ``.npy`` array (loaded without pickle) or an image folder/manifest (uint8
    ``N×H×W×3``); ``train_fn`` and ``log_likelihood_fn`` are callables or ``py:module:attr``
    specs (see :func:`memscan.memorization_score`). Finished (repeat, fold) models are stored in
    ``out/memscore_store`` — rerunning the same command on the same ``out`` resumes.
    """
    from memscan.mia.memscore import memorization_score
    from memscan.user_code import import_object

    t0 = time.perf_counter()
    fns = []
    for what, f in (("train_fn", train_fn), ("log_likelihood_fn", log_likelihood_fn)):
        if isinstance(f, str):
            if not f.startswith("py:"):
                raise InputError(f"{what}: {f!r} is not py:module:attribute", "e.g. py:mymodels.py:train")
            f = import_object(f, "a callable")
        if not callable(f):
            raise InputError(f"{what} is not callable")
        fns.append(f)
    arr, ids, imgs = _load_array_data(data)
    store = RunStore(out)
    store.root.mkdir(parents=True, exist_ok=True)
    resumed = store.exists()
    if resumed:
        old = store.read_manifest()
        if old.get("kind") != "memscore":
            raise MemscanError(f"{out} holds a {old.get('kind')} run", "pass a new --out directory")
    lock = RunLock(store.root).acquire()
    try:
        sources = {
            "data": str(data),
            "train_fn": train_fn if isinstance(train_fn, str) else repr(train_fn),
            "log_likelihood_fn": log_likelihood_fn if isinstance(log_likelihood_fn, str) else repr(log_likelihood_fn),
        }
        manifest = _base_manifest(
            "memscore", sources, memscore={"folds": folds, "repeats": repeats, "seed": seed}, resumed=resumed
        )
        store.write_manifest(manifest)
        res = memorization_score(
            arr,
            fns[0],
            fns[1],
            folds=folds,
            repeats=repeats,
            seed=seed,
            store=store.root / "memscore_store",
            progress=progress,
        )
        table = pd.DataFrame(
            {
                "index": np.arange(len(ids)),
                "id": ids,
                "score": res.score,
                "u": res.u,
                "v": res.v,
                "n_in": res.n_in.astype(np.int64),
                "n_out": res.n_out.astype(np.int64),
            }
        )
        write_table(table, store.root / "memscore.parquet")
        shown = res.top(top)
        if imgs is not None:
            for i in shown:
                _save_thumb(store, "examples", ids[int(i)], imgs[int(i)])
        manifest.update(
            status="complete",
            finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
            counts={"examples": len(ids), "models": folds * repeats},
            result=res.to_dict(),
            timings={"total_s": round(time.perf_counter() - t0, 2)},
        )
        store.write_manifest(manifest)
        report = build_mia_report(store.root)
    finally:
        lock.release()
    q = ", ".join(f"q{float(k):g} = {v:.3f}" for k, v in res.quantiles.items())
    best = int(shown[0]) if len(shown) else 0
    text = (
        f"memscan memscore: {len(ids)} examples, {folds} folds × {repeats} repeats; {q}; "
        f"most memorized: {ids[best]} (M = {res.score[best]:.3f})\n  report: {report}"
    )
    return {"report": str(report), "manifest": manifest, "text": text, "result": res}


# --------------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DemoMiaSettings:
    """Budget of ``memscan demo-mia`` (the defaults: ≤ 10 minutes of CPU time, one thread; see
    ``docs/mia.md`` for measured figures).

    Attributes
    ----------
    n_examples : int
        Pool size: the first ``n_examples`` base images of the demo data (each once).
    n_models : int
        Shadow models ``M``; model 0 is the target, the rest calibrate LiRA.
    steps, batch_size : int
        Training of each shadow model (the demo recipe, :func:`memscan.mia.shadow.shadow_train_config`).
    block_out_channels : tuple of int
    timesteps : tuple of int
    noise_draws : int
    inpaint : InpaintConfig
    threads : int or None
        Torch threads (1 is fastest on a busy machine).
    """

    n_examples: int = 128
    n_models: int = 8
    steps: int = 400
    batch_size: int = 32
    block_out_channels: tuple[int, ...] = (16, 32, 32)
    timesteps: tuple[int, ...] = (10, 20, 50, 100, 200, 500)
    noise_draws: int = 4
    inpaint: InpaintConfig = InpaintConfig(num_inference_steps=25, jump_length=5, jump_n_sample=2, batch_size=128)
    threads: int | None = 1
    bootstrap: int = 200
    seed: int = 0

    @classmethod
    def quick(cls) -> DemoMiaSettings:
        """Tiny settings for tests and CI (well under a minute)."""
        return cls(
            n_examples=24,
            n_models=4,
            steps=60,
            batch_size=8,
            block_out_channels=(16, 32),
            timesteps=(20, 100),
            noise_draws=1,
            inpaint=InpaintConfig(num_inference_steps=10, jump_length=5, jump_n_sample=1, batch_size=64),
            bootstrap=20,
        )


def run_demo_mia(
    out: str | Path = "runs/demo-mia",
    settings: DemoMiaSettings = DemoMiaSettings(),
    *,
    progress: bool = True,
) -> dict:
    """``memscan demo-mia``: shadow models on the demo data, then MIA and inpainting.

    1. Take the first ``n_examples`` base images of the demo data (:func:`memscan.demo.data.build_demo_data`)
       and write them to ``out/data`` (PNG), so the CLI commands can be rerun on them.
    2. Train ``n_models`` models on random halves (balanced: every image is IN half of them) with
       the demo recipe, into ``out/shadows`` — resumable per model: rerunning continues.
    3. Model 0 is the target; the others are shadow models. Diffusion loss at each timestep
       (loss threshold, LiRA online/offline, fixed variance) and the inpainting attack, into the
       run ``out/run`` with its ``report.html``.
    """
    from memscan.demo.data import build_demo_data
    from memscan.mia.shadow import DemoRecipe, shadow_train_config, train_shadow_models

    t0, c0 = time.perf_counter(), _cpu_seconds()
    out = Path(out)
    run_manifest = out / "run" / "manifest.json"
    if run_manifest.exists():
        if json.loads(run_manifest.read_text()).get("status") == "complete":
            raise MemscanError(f"{out} already holds a demo-mia run", "remove it or pass another --out")
        shutil.rmtree(out / "run")  # an unfinished attack stage is redone (training resumes per model)
    st = settings
    # 1. the pool
    data = build_demo_data()
    base = data.base_images()
    keys = sorted(base)
    if not 4 <= st.n_examples <= len(keys):
        raise InputError(f"n_examples: {st.n_examples} is not in 4..{len(keys)}")
    keys = keys[: st.n_examples]
    images = np.stack([base[k] for k in keys])
    _write_pool(out / "data", keys, images, [data.captions[k] for k in keys])
    # 2. shadow models (resumable)
    recipe = DemoRecipe(
        shadow_train_config(steps=st.steps, batch_size=st.batch_size, block_out_channels=tuple(st.block_out_channels)),
        threads=st.threads,
    )
    t_data = time.perf_counter()
    train_shadow_models(
        images, recipe, out / "shadows", n_models=st.n_models, seed=st.seed, ids=keys, progress=progress
    )
    t_train = time.perf_counter()
    # 3. attacks on model 0
    with torch_threads(st.threads):
        s = _setup(out / "data", model=None, members=None, shadows=out / "shadows", target_shadow=0, device="cpu")
        s.sources["condition"] = "auto"
        loss_cfg = LossConfig(timesteps=st.timesteps, noise_draws=st.noise_draws, seed=st.seed, batch_size=256)
        loss_cfg = loss_cfg.validated(int(s.target.alphas_cumprod.numel()))
        names = parse_attacks(None, True)
        store, lock = _open_run(out / "run")
        try:
            manifest = _base_manifest(
                "demo-mia",
                s.sources,
                loss=loss_cfg.to_dict(),
                inpaint=st.inpaint.to_dict(),
                attacks=names,
                bootstrap=st.bootstrap,
                demo={
                    "n_examples": st.n_examples,
                    "n_models": st.n_models,
                    "recipe": recipe.describe(),
                    "threads": st.threads,
                },
            )
            store.write_manifest(manifest)
            loss_df, r1, sk1, sweep, t_loss = _loss_stage(s, loss_cfg, names, st.bootstrap, progress)
            dist_df, r2, sk2, recon, hidden, t_inp = _inpaint_stage(s, st.inpaint, names, st.bootstrap, progress)
            metrics = pd.DataFrame(_metrics_rows("diffusion_loss", r1) + _metrics_rows("inpaint_distance", r2))
            scores = pd.concat(
                [_score_rows("diffusion_loss", r1), _score_rows("inpaint_distance", r2)], ignore_index=True
            )
            t_end = time.perf_counter()
            manifest.update(
                counts={"examples": len(s.ids), "members": int(s.is_member.sum()), "shadow_models": len(s.shadows)},
                skipped_attacks=sk1 + sk2,
                best_timestep={"by": sweep.by, "timestep": sweep.best_timestep},
                timings={
                    "data_s": round(t_data - t0, 2),
                    "training_s": round(t_train - t_data, 2),
                    "loss": t_loss,
                    "inpaint": t_inp,
                    "total_s": round(t_end - t0, 2),
                    "cpu_s": round(_cpu_seconds() - c0, 2),
                },
            )
            report = _finish(
                store,
                manifest,
                _examples_table(s),
                {"losses": loss_df, "distances": dist_df, "scores": scores, "metrics": metrics},
                8,
                s,
                recon,
                hidden,
            )
        finally:
            lock.release()
    extra = [
        f"  {st.n_models} models × {st.steps} steps trained in {t_train - t_data:.0f} s; "
        f"total {time.perf_counter() - t0:.0f} s wall, {_cpu_seconds() - c0:.0f} s CPU",
        f"  best timestep ({sweep.by}): t = {sweep.best_timestep}",
    ]
    summary = {"report": str(report), "manifest": manifest}
    summary["text"] = _summary_text("demo-mia", metrics, out / "run", extra)
    (out / "summary.json").write_text(json.dumps({k: v for k, v in summary.items()}, indent=1, default=str))
    return summary


def _write_pool(root: Path, keys: list[str], images: np.ndarray, captions: list[str]) -> None:
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    for k, img, cap in zip(keys, images, captions):
        path = root / f"{k}.png"
        buf = io.BytesIO()
        Image.fromarray(img[:, :, 0], mode="L").save(buf, format="PNG")
        if not path.exists() or path.read_bytes() != buf.getvalue():
            path.write_bytes(buf.getvalue())
        (root / f"{k}.txt").write_text(cap + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------
def _hist_png(scores: np.ndarray, is_member: np.ndarray, title: str) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    bins = np.histogram_bin_edges(scores, bins=min(40, max(10, scores.size // 8)))
    ax.hist(scores[~is_member], bins=bins, alpha=0.6, label=f"OUT (non-members, {int((~is_member).sum())})")
    ax.hist(scores[is_member], bins=bins, alpha=0.6, label=f"IN (members, {int(is_member.sum())})")
    ax.set_xlabel("membership score (higher = member)")
    ax.set_ylabel("examples")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def _sweep_png(metrics: pd.DataFrame) -> bytes | None:
    m = metrics[(metrics["statistic"] == "diffusion_loss") & metrics["timestep"].notna()]
    if m["timestep"].nunique() < 2:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.2))
    FigureCanvasAgg(fig)
    a, b = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for attack, g in m.groupby("attack", sort=False):
        g = g.sort_values("timestep")
        a.plot(g["timestep"], g["auc"], marker="o", label=attack)
        b.plot(g["timestep"], g["tpr@1%fpr"], marker="o", label=attack)
    for ax, lab in ((a, "ROC AUC"), (b, "TPR at 1% FPR")):
        ax.set_xscale("log")
        ax.set_xlabel("timestep t")
        ax.set_ylabel(lab)
    b.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def _memscore_png(score: np.ndarray, quantiles: dict) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.hist(score, bins=min(50, max(10, score.size // 5)), color="#555")
    for q, v in quantiles.items():
        ax.axvline(v, ls="--", lw=1, c="#c0392b")
        ax.text(v, ax.get_ylim()[1] * 0.9, f" q{float(q):g}", fontsize=8, color="#c0392b")
    ax.set_xlabel("memorization score M (nats)")
    ax.set_ylabel("examples")
    fig.tight_layout()
    return _png(fig)


def _uri(root: Path, rel: str) -> str | None:
    path = (root / rel).resolve()
    if not path.is_relative_to(root.resolve()) or not path.is_file():
        return None
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _fmt_ci(row: dict, k: str) -> str:
    lo, hi = row.get(f"{k}_lo"), row.get(f"{k}_hi")
    if lo is None or pd.isna(lo):
        return ""
    return f"[{lo:.3f}, {hi:.3f}]"


def build_mia_report(run: str | Path, out: str | Path | None = None) -> Path:
    """Write ``report.html`` for a finished MIA/inpaint/memscore/demo-mia run from its tables
    alone (Jinja2 with autoescaping, images as ``data:`` URIs, no scripts)."""

    from memscan.mia.metrics import plot_roc

    store = RunStore(run)
    manifest = store.read_manifest()
    kind = manifest.get("kind")
    if kind not in ("mia", "inpaint", "memscore", "demo-mia"):
        raise MemscanError(f"{run} is not a membership-inference run (kind {kind!r})", "use `memscan report` for it")
    if manifest.get("status") != "complete":
        raise MemscanError(f"run {run} is not complete", "rerun the command")
    root = store.root
    ctx: dict[str, Any] = {
        "title": root.name,
        "kind": kind,
        "run_dir": str(root),
        "made": time.strftime("%Y-%m-%d %H:%M"),
        "version": manifest.get("versions", {}).get("memscan") or "dev",
        "manifest_rows": _manifest_rows(manifest),
        "skipped": manifest.get("skipped_attacks", []),
        "sections": [],
        "memscore": None,
    }
    if kind == "memscore":
        df = store.table("memscore")
        res = manifest["result"]
        q = {float(k): v for k, v in res["quantiles"].items()}
        top = df.sort_values(["score", "index"], ascending=[False, True], kind="stable").head(16)
        ctx["memscore"] = {
            "hist": base64.b64encode(_memscore_png(df["score"].to_numpy(), q)).decode(),
            "quantiles": [(f"{k:g}", v) for k, v in q.items()],
            "rows": [
                {
                    "id": r.id,
                    "score": r.score,
                    "u": r.u,
                    "v": r.v,
                    "n_in": r.n_in,
                    "n_out": r.n_out,
                    "img": _uri(root, f"images/examples/{safe_name(r.id)}.png"),
                }
                for r in top.itertuples(index=False)
            ],
        }
    else:
        examples = store.table("examples")
        metrics = store.table("metrics")
        scores = store.table("scores")
        y = examples["is_member"].to_numpy(dtype=bool)
        ids = examples["id"].tolist()
        best = _best_results(metrics)
        sweep = _sweep_png(metrics)
        for stat, g in metrics.groupby("statistic", sort=False):
            curves = {}
            for r in g.itertuples(index=False):
                t = None if pd.isna(r.timestep) else int(r.timestep)
                if t != best[stat][1]:  # every attack at the best timestep (the sweep plot has the rest)
                    continue
                label = r.attack + ("" if t is None else f" t={t}")
                curves[label] = roc_metrics(_scores_of(scores, stat, r.attack, t), y)
            roc_path = root / "images" / f"roc_{stat}.png"
            plot_roc(curves, roc_path, title=STATISTICS.get(stat, stat))
            attack, t = best[stat]
            sc = _scores_of(scores, stat, attack, t)
            label = attack + ("" if t is None else f" at t = {t}")
            order = np.argsort(-sc, kind="stable")

            def cards(sel, sc=sc, order=order):
                out = []
                for i in [j for j in order if sel[j]][:8]:
                    c = {"id": ids[i], "score": float(sc[i]), "member": bool(y[i]), "img": None}
                    c["img"] = _uri(root, f"images/examples/{safe_name(ids[i])}.png")
                    c["masked"] = _uri(root, f"images/inpaint/{safe_name(ids[i] + '/masked')}.png")
                    c["recon"] = _uri(root, f"images/inpaint/{safe_name(ids[i] + '/reconstruction')}.png")
                    out.append(c)
                return out

            rows = []
            for row in g.sort_values(["timestep", "attack"], kind="stable").to_dict("records"):
                rt = None if pd.isna(row["timestep"]) else int(row["timestep"])
                rows.append(
                    {
                        "attack": row["attack"],
                        "timestep": "" if rt is None else rt,
                        "auc": row["auc"],
                        "bacc": row["balanced_accuracy"],
                        "tpr1": row["tpr@1%fpr"],
                        "tpr01": row["tpr@0.1%fpr"],
                        "auc_ci": _fmt_ci(row, "auc"),
                        "tpr1_ci": _fmt_ci(row, "tpr@1%fpr"),
                        "best": row["attack"] == attack and rt == t,
                    }
                )
            ctx["sections"].append(
                {
                    "statistic": stat,
                    "description": STATISTICS.get(stat, stat),
                    "rows": rows,
                    "roc": base64.b64encode(roc_path.read_bytes()).decode(),
                    "hist": base64.b64encode(_hist_png(sc, y, f"{stat}: {label}")).decode(),
                    "sweep": base64.b64encode(sweep).decode() if (sweep and stat == "diffusion_loss") else None,
                    "best_label": label,
                    "top_members": cards(y),
                    "top_nonmembers": cards(~y),
                    "n_members": int(y.sum()),
                    "n_nonmembers": int((~y).sum()),
                }
            )
    from memscan.report.base import environment as _environment

    html = _environment().get_template("mia_report.html.j2").render(**ctx)
    path = Path(out) if out else root / "report.html"
    path.write_text(html, encoding="utf-8")
    return path


def _manifest_rows(m: dict) -> list[tuple[str, str]]:
    rows = [("kind", m.get("kind")), ("started", m.get("started")), ("finished", m.get("finished"))]
    for k, v in (m.get("sources") or {}).items():
        if k != "target_config" and v is not None:
            rows.append((k, str(v)))
    for sec in ("loss", "inpaint", "memscore", "counts", "best_timestep", "timings", "demo"):
        if m.get(sec) is not None:
            rows.append((sec, json.dumps(m[sec], default=str)))
    return [(str(k), "" if v is None else str(v)) for k, v in rows]

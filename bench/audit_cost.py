"""Attack cost: the brute force (every candidate × the full budget) against ``memscan audit``
(triage → adaptive extraction down the triage ranking within a budget), counting every UNet
evaluation, triage's included.

Method (one process):

1. Brute force: every candidate prompt gets ``N`` generations (seeds ``derive_seed(0, prompt id,
   i)``), kept in memory (:func:`adaptive.full_pass`); detection and verification give the
   brute force's extractions; its cost is ``prompts × N × evaluations per image``.
2. Triage for real (:func:`memscan.triage.triage` on the same prompts, 4 generations × 1 step):
   its scores, the ROC of separating the brute force's extractions from the other prompts
   (``memscan.mia.metrics.roc_metrics``: ``auc``, ``tpr@1%fpr``), and its cost.
3. The audit at each budget, simulated on prefixes of the brute force's generations (an audit's
   first n generations of a prompt *are* the brute force's first n, and the adaptive rule only
   sees them), by the real audit's rules (:func:`memscan.audit.stages.extract_rounds`): rounds
   down the ranking with :func:`memscan.audit.budget.round_size`, each prompt under
   :func:`memscan.extraction.shard.adaptive_stop`, and the budget a hard cap — a round the budget
   left cannot pay in full goes prompt by prompt, each capped by
   :func:`memscan.audit.budget.prompt_cap`; budgets as the audit resolves and checks them
   (:func:`~memscan.audit.budget.resolve_budget`, :func:`~memscan.audit.budget.check_one_round`),
   triage charged for the ranking's own score. Rankings: triage (wen, webster), the
   candidates' duplicate count, a random order (no ranking at all); and one alternative stop
   rule, simulated only: wen's ranking where a prompt without a pair still continues when one of
   its generations so far lies within δ of a training image (the "near-copy rule").
4. One budget run for real through :func:`memscan.audit.audit`; its per-prompt ``n_samples``,
   evaluations, rounds, capped prompts and extractions are compared with the simulation (they
   must agree exactly).

5. The floor: the least any policy with this detector and these rounds could spend to find
   ≥ 95 % of the brute force's extractions — triage, the probe, and for the cheapest 95 % of
   the extracted prompts the first round at which their generations so far already give the
   extraction (a perfect ranking that attacks no other prompt). A budget below it cannot meet
   the target whatever the round policy.

Models: the demo model (``--model demo``, the default: the demo's candidate prompts) or a
memorized tiny Stable-Diffusion pipeline (``--tiny-model DIR``, written by
``python -m memscan.testing.tiny_sd DIR --memorized 6 --weights …``; the pool is its memorized
captions and ``--others`` of its other training captions: random ones that carry no information
about their images, or with ``--paired`` training each pool image's own caption). A new model's
α comes from its pilot (``scripts/alpha_evidence.py --tiny-model``; docs/choosing-alpha.md).

Usage::

    python bench/audit_cost.py --unique 100 --samples 100 --json bench/results/audit_cost_demo.json
    python -m memscan.testing.tiny_sd bench/models/tiny_sd_paired --memorized 6 --steps 3000 \
        --check-every 500 --weights 0.3 0.25 0.2 0.12 0.08 0.05 --memorized-share 0.6 --pool 4096 --paired
    python scripts/alpha_evidence.py --tiny-model bench/models/tiny_sd_paired --samples 100 --others 12
    python bench/audit_cost.py --tiny-model bench/models/tiny_sd_paired --others 94 --samples 100 \
        --round-prompts 4 --alpha 0.17 --json bench/results/audit_cost_tiny_sd_paired.json
    python bench/audit_cost.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from adaptive import Simulator, full_pass  # noqa: E402

from memscan.audit.budget import AuditBudget, check_one_round, prompt_cap, resolve_budget, round_size  # noqa: E402
from memscan.errors import InputError  # noqa: E402
from memscan.extraction.shard import adaptive_stop  # noqa: E402
from memscan.mia.metrics import roc_metrics  # noqa: E402

SHARES = [0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3]


_NEAR: dict = {}


def shows_near_copy(sim: Simulator, pid: str, upto: int) -> bool:
    """Whether one of the first ``upto`` generations lies within δ of a training image (the
    verification's criterion applied to the generations so far)."""
    key = (id(sim), pid, upto)
    if key not in _NEAR:
        from memscan.distances import nearest_tiled_l2

        dist, _, _ = nearest_tiled_l2(sim.images[pid][:upto], sim.training, k=1, grid=sim.base.grid)
        _NEAR[key] = bool(np.asarray(dist)[:, 0].min() <= sim.base.delta)
    return _NEAR[key]


def prompt_spend(sim: Simulator, pid: str, cfg, near_copy: bool = False) -> int:
    """Generations the adaptive rule gives ``pid`` (its rounds, stopping as :func:`adaptive_stop`;
    with ``near_copy``, a prompt whose generations so far include a near-copy of a training image
    continues even without a pair — an alternative rule, simulated only)."""
    for upto in cfg.rounds():
        if upto < cfg.samples_per_prompt and adaptive_stop(sim.detection(pid, upto), cfg):
            if not (near_copy and shows_near_copy(sim, pid, upto)):
                return upto
    return cfg.samples_per_prompt


def simulate_audit(
    sim, ranking, cfg, per_image, fixed, budget, round_prompts, near_copy=False, top=None, controls=()
) -> dict:
    """The audit's extraction stage on the brute force's generations, by the rules of
    :func:`memscan.audit.stages.extract_rounds` and :func:`~memscan.audit.stages.budgeted_extraction_stage`:
    rounds down ``ranking`` (its first ``top`` with ``top``), sized by
    :func:`memscan.audit.budget.round_size` with the first rounds of the ``controls`` not attacked
    yet kept (the controls attacked last, in ranking order); a round the budget left pays in full
    runs every prompt under the adaptive rule to its end; any other goes shard by shard and
    prompt by prompt, each capped by :func:`memscan.audit.budget.prompt_cap` (a hard cap: never
    more than ``budget``). ``fixed``: what the audit spends before its rounds (triage + probe)."""
    rounds, n_full = cfg.rounds(), cfg.samples_per_prompt
    first_cost, full_cost = rounds[0] * per_image, n_full * per_image
    ranked = list(ranking)
    order = ranked if top is None else ranked[:top]
    spent, pos, n_samples, capped, log = fixed, 0, {}, [], []
    attacked: set = set()

    def kept_for_controls() -> int:
        return 0 if budget is None else first_cost * len({c for c in controls if c not in attacked})

    while True:
        # 1. the next round: the next prompts the budget left pays a first round for (≤ round_prompts)
        k = round_size(budget, spent, len(order) - pos, first_cost, round_prompts, kept_for_controls())
        if k > 0:
            batch, why = order[pos : pos + k], "ranking"
            pos += k
        else:
            rest = {c for c in controls if c not in attacked}
            if not rest:
                break
            batch, why = [pid for pid in ranked if pid in rest], "controls"
        batch = [pid for pid in batch if pid not in attacked]
        if not batch:
            continue
        attacked.update(batch)
        allowance = None if budget is None else budget - spent - kept_for_controls()
        cut = []
        if allowance is None or allowance >= len(batch) * full_cost:
            # 2a. the budget left pays every prompt's full course: each to the adaptive rule's end
            for pid in batch:
                n_samples[pid] = prompt_spend(sim, pid, cfg, near_copy)
        else:
            # 2b. shard by shard (the extraction's shard size), prompt by prompt: each prompt capped
            #     at the round end the allowance left pays after a first round for every later prompt.
            #     The near-copy rule is capped identically: the cap depends on the budget left alone,
            #     and a capped prompt's generations are the first ones of its uncapped run (the rule
            #     itself, a verification of the generations so far, costs no model evaluation)
            shards = [batch[i : i + cfg.shard_size] for i in range(0, len(batch), cfg.shard_size)]
            used = 0
            for j, shard in enumerate(shards):
                left = allowance - used - sum(map(len, shards[j + 1 :])) * first_cost
                for i, pid in enumerate(shard):
                    cap = prompt_cap(left, len(shard) - i - 1, rounds, per_image)
                    capped_cfg = cfg if cap >= n_full else replace(cfg, samples_per_prompt=cap)
                    n_samples[pid] = made = prompt_spend(sim, pid, capped_cfg, near_copy)
                    left -= made * per_image
                    used += made * per_image
                    # cut by the budget: stopped at its cap while its rule would have continued it
                    if cap < n_full and made == cap and prompt_spend(sim, pid, cfg, near_copy) > cap:
                        cut.append(pid)
        # 3. what the round spent
        gens = sum(n_samples[pid] for pid in batch)
        spent += gens * per_image
        capped += cut
        log.append({"prompts": len(batch), "why": why, "generations": gens, "allowance": allowance, "capped": cut})
    if budget is not None and spent > budget:
        raise RuntimeError(f"simulated audit spent {spent} model evaluations of a budget of {budget}")
    found = {pid for pid, n in n_samples.items() if sim.extracted(pid, n)}
    return {
        "evaluations": spent,
        "attacked": len(n_samples),
        "found": found,
        "n_samples": n_samples,
        "capped": capped,
        "rounds": log,
    }


def floor_cost(sim, found: set, cfg, per_image, fixed, share: float = 0.95) -> dict:
    """The floor: ``fixed`` plus, for the cheapest ``share`` of the extractions ``found``, the
    first round at which the generations so far already give the extraction."""
    need = {}
    for pid in found:
        need[pid] = next((upto for upto in cfg.rounds() if sim.extracted(pid, upto)), cfg.samples_per_prompt)
    k = int(np.ceil(share * len(found)))
    cheapest = sorted(need.values())[:k]
    return {
        "evaluations": fixed + sum(cheapest) * per_image,
        "extractions": k,
        "samples_to_extraction": dict(sorted(need.items(), key=lambda kv: kv[1])),
    }


def demo_inputs(args, tmp: Path) -> dict:
    """The demo model, its data and candidate prompts (with ``planted_copies``)."""
    from memscan.demo.data import build_demo_data, write_demo_data
    from memscan.demo.run import candidate_prompts, model_dir
    from memscan.generators.diffusers_unet import load_unet_generator

    data = build_demo_data()
    write_demo_data(data, tmp / "data")
    prompts = candidate_prompts(data, args.unique, 1)
    gen = load_unet_generator(str(model_dir()), batch_size=args.batch)
    return {"model": "memscan/demo/model", "gen": gen, "prompts": prompts, "training": data.images,
            "train_dir": tmp / "data" / "train", "group_by": "planted_copies"}  # fmt: skip


def tiny_inputs(args, tmp: Path) -> dict:
    """A memorized tiny SD pipeline: its memorized captions and ``args.others`` random training
    captions; the training set as the pipeline renders it (its autoencoder is untrained)."""
    import pandas as pd

    from memscan.data.images import save_png
    from memscan.generators.text2image import load_text2image_generator
    from memscan.synthetic import training_image
    from memscan.testing.tiny_sd import as_the_pipeline_sees_it

    model = Path(args.tiny_model)
    meta = json.loads((model / "memscan.json").read_text())["finetune"]
    gen = load_text2image_generator(str(model), batch_size=args.batch)
    mem, recipe = meta["memorized"], meta["recipe"]
    w = np.asarray(recipe["weights"], float) / sum(recipe["weights"])
    # expected draws of each memorized pair in training; the others' pairs are random (≈ 1 each)
    draws = np.round(w * recipe["memorized_share"] * recipe["batch_size"] * recipe["steps"]).astype(int)
    others = meta["other_captions"][: args.others]
    if recipe.get("paired"):  # caption j is pool image j's own caption, drawn ≈ this often
        other_ids = meta["pool_ids"][: args.others]
        other_draws = round(
            (1 - recipe["memorized_share"]) * recipe["batch_size"] * recipe["steps"] / len(meta["pool_ids"])
        )
    else:  # captions drawn with random images: no training image of their own
        other_ids, other_draws = [None] * len(others), 1
    prompts = pd.DataFrame({
        "prompt_id": [f"mem{i}" for i in range(len(mem))] + [f"o{i:03d}" for i in range(len(others))],
        "prompt": [m["caption"] for m in mem] + others,
        "train_id": [m["train_id"] for m in mem] + other_ids,
        "duplicate_count": [int(d) for d in draws] + [other_draws] * len(others),
    })  # fmt: skip
    ids = [m["train_id"] for m in mem] + meta["pool_ids"]
    view = as_the_pipeline_sees_it(gen.pipe, np.stack([training_image(t, gen.height) for t in ids]))
    train_dir = tmp / "tiny-train"
    train_dir.mkdir(parents=True)
    for tid, img in zip(ids, view):
        save_png(img, train_dir / f"{tid}.png")
    return {"model": str(model), "gen": gen, "prompts": prompts, "training": view, "train_dir": train_dir,
            "group_by": "duplicate_count", "recipe": recipe, "finetune_seconds": meta.get("seconds"),
            "finetune_log": meta.get("log")}  # fmt: skip


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--unique", type=int, default=100, help="count-1 captions in the pool (besides the 28 duplicated)")
    ap.add_argument("--samples", type=int, default=100, help="full budget N per prompt")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--round-prompts", type=int, default=8)
    ap.add_argument("--real-share", type=float, default=0.1, help="budget share of the real audit run")
    ap.add_argument("--quick", action="store_true", help="small pool and N (minutes on a CPU)")
    ap.add_argument("--tiny-model", type=Path, help="a memorized tiny SD pipeline (instead of the demo model)")
    ap.add_argument("--others", type=int, default=94, help="random training captions in the tiny pool")
    ap.add_argument(
        "--alpha",
        type=float,
        default=None,
        help="edge threshold α of the extraction (default: memscan's 0.08, chosen on the demo model; "
        "for the tiny pipeline take it from its pilot, scripts/alpha_evidence.py --tiny-model)",
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.quick:
        args.unique, args.samples = 12, 40

    import torch

    from memscan.audit import audit, default_extract_config
    from memscan.audit.support import generator_facts
    from memscan.triage import TriageConfig, triage

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="audit-cost-"))
    load_start = load_avg()
    inputs = tiny_inputs(args, tmp) if args.tiny_model else demo_inputs(args, tmp)
    gen, prompts = inputs["gen"], inputs["prompts"]
    pids = prompts["prompt_id"].tolist()
    per_image = gen.evaluations_per_generation
    cfg = default_extract_config(args.samples, batch_size=args.batch, alpha=args.alpha)
    n = args.samples

    # 1. brute force
    t0 = time.perf_counter()
    images = full_pass(gen, prompts, n, args.batch)
    brute_s = time.perf_counter() - t0
    sim = Simulator(images, inputs["training"], cfg, "cpu")
    brute_found = {pid for pid in pids if sim.extracted(pid, n)}
    brute_cost = len(pids) * n * per_image
    print(f"brute force: {len(pids)} prompts × {n} × {per_image} = {brute_cost:,} UNet evaluations, "
          f"{len(brute_found)} extractions, {brute_s:.0f} s")  # fmt: skip

    # 2. triage, for real; ROC of its scores against the brute force's extractions
    t0 = time.perf_counter()
    tri = triage(gen, prompts[["prompt_id", "prompt", "train_id", "duplicate_count"]], tmp / "triage",
                 TriageConfig(generations=4, steps=1), progress=False)  # fmt: skip
    triage_s = time.perf_counter() - t0
    scores = tri.scores.set_index("prompt_id").loc[pids]
    # the audit ranks by wen and pays for wen alone (webster is computed here for its ROC only)
    triage_cost = len(pids) * int(tri.manifest["cost"]["unet_evaluations_by_score"]["wen"])
    # an audit ranked by another score (--score webster) pays that score's evaluations alone
    triage_cost_of = {s: len(pids) * int(v) for s, v in tri.manifest["cost"]["unet_evaluations_by_score"].items()}
    labels = np.array([pid in brute_found for pid in pids])
    roc = {}
    for s in ("wen", "webster"):
        r = roc_metrics(scores[f"{s}_score"].to_numpy(), labels).to_dict()
        roc[s] = {
            k: r[k] for k in ("auc", "tpr@1%fpr", "tpr@0.1%fpr", "balanced_accuracy", "n_members", "n_nonmembers")
        }
    dup = roc_metrics(prompts["duplicate_count"].to_numpy(float), labels).to_dict()
    roc["duplicate_count"] = {k: dup[k] for k in ("auc", "tpr@1%fpr", "balanced_accuracy")}
    # the same scores against "duplicated in training" (count > 1) rather than "extracted"
    dup_labels = prompts.set_index("prompt_id").loc[pids, "duplicate_count"].to_numpy() > 1
    roc_dup = {}
    if 0 < dup_labels.sum() < len(dup_labels):
        for s in ("wen", "webster"):
            r = roc_metrics(scores[f"{s}_score"].to_numpy(), dup_labels).to_dict()
            roc_dup[s] = {k: r[k] for k in ("auc", "tpr@1%fpr", "n_members", "n_nonmembers")}
    print(f"triage: {triage_cost:,} UNet evaluations ({triage_cost / brute_cost:.2%}), {triage_s:.0f} s; ROC {roc}")

    # 3. the audit's curve, simulated, for each ranking
    rng = np.random.default_rng(0)
    rankings = {
        "triage wen": scores.sort_values(["wen_score"], ascending=False, kind="mergesort").index.tolist(),
        "triage webster": scores.sort_values(["webster_score"], ascending=False, kind="mergesort").index.tolist(),
        "duplicate count": prompts.sort_values("duplicate_count", ascending=False, kind="mergesort")["prompt_id"].tolist(),
        "random order": list(rng.permutation(pids)),
    }  # fmt: skip
    # the output-shape probe: one image unless the generator declares its shape (as the audit asks it)
    probe = generator_facts(SimpleNamespace(generator=gen))["probe_images"] * per_image
    curves, missed = {}, {}
    # the alternative stop rule (continue on a near-copy of a training image), simulated only
    rankings["triage wen + near-copy rule"] = rankings["triage wen"]
    for name, ranking in rankings.items():
        near = name.endswith("near-copy rule")
        fixed = (triage_cost_of[name.split()[1]] if name.startswith("triage") else 0) + probe
        rows = []
        for share in SHARES:
            budget = resolve_budget(AuditBudget(share=share), len(pids), brute_cost)
            try:  # a budget the audit refuses: smaller than triage, the probe and one round
                check_one_round(budget, fixed, cfg.rounds()[0] * per_image, len(pids), args.round_prompts)
            except InputError:
                continue
            res = simulate_audit(sim, ranking, cfg, per_image, fixed, budget, args.round_prompts, near)
            rows.append({
                "budget_share": share,
                "evaluations": res["evaluations"],
                "evaluations_share": res["evaluations"] / brute_cost,
                "attacked": res["attacked"],
                "found": len(res["found"] & brute_found),
                "found_share": len(res["found"] & brute_found) / len(brute_found) if brute_found else None,
                "extra": len(res["found"] - brute_found),
            })  # fmt: skip
        # the whole ranking: every prompt under the adaptive rule (no budget)
        res = simulate_audit(sim, ranking, cfg, per_image, fixed, None, args.round_prompts, near)
        rows.append({"budget_share": None, "evaluations": res["evaluations"],
                     "evaluations_share": res["evaluations"] / brute_cost, "attacked": res["attacked"],
                     "found": len(res["found"] & brute_found),
                     "found_share": len(res["found"] & brute_found) / len(brute_found) if brute_found else None,
                     "extra": len(res["found"] - brute_found)})  # fmt: skip
        curves[name] = rows
        # why a brute-force extraction is missed: its rank, and what the adaptive rule gave it
        budget_10 = resolve_budget(AuditBudget(share=0.1), len(pids), brute_cost)
        at = simulate_audit(sim, ranking, cfg, per_image, fixed, budget_10, args.round_prompts, near)
        missed[name] = {
            pid: {
                "rank": ranking.index(pid) + 1,
                "attacked_at_10pct": pid in at["n_samples"],
                "n_samples_at_10pct": at["n_samples"].get(pid),
                "n_samples_unbudgeted": res["n_samples"][pid],
                "first_round_clique": int(sim.detection(pid, cfg.rounds()[0]).clique.size),
                "full_budget_clique": int(sim.detection(pid, n).clique.size),
            }
            for pid in sorted(brute_found - at["found"], key=ranking.index)
        }
        print(f"  missed at 10 %: {missed[name]}")
        print(f"\n{name}: budget share → evaluations spent (share of brute force), prompts attacked, found")
        for r in rows:
            b = "all" if r["budget_share"] is None else f"{r['budget_share']:.1%}"
            print(f"  {b:>6} → {r['evaluations']:>9,} ({r['evaluations_share']:6.2%}), {r['attacked']:>4} attacked, "
                  f"{r['found']}/{len(brute_found)} found" + (f" (+{r['extra']} new)" if r["extra"] else ""))  # fmt: skip

    # 4. one budget for real through memscan.audit
    real_budget = AuditBudget(share=args.real_share, round_prompts=args.round_prompts)
    t0 = time.perf_counter()
    real = audit(gen, inputs["train_dir"], tmp / "audit", prompts=prompts[["prompt_id", "prompt", "train_id",
                 "duplicate_count"]], config=cfg, budget=real_budget, progress=False)  # fmt: skip
    real_s = time.perf_counter() - t0
    sim_real = simulate_audit(sim, rankings["triage wen"], cfg, per_image, triage_cost + probe,
                              resolve_budget(real_budget, len(pids), brute_cost), args.round_prompts)  # fmt: skip
    det = real.detections.set_index("prompt_id")["n_samples"]
    # prompt by prompt, over every prompt either attacked (one attacked by only one of them disagrees)
    either = set(det.index) | set(sim_real["n_samples"])
    agree = sum(int(det.get(pid, -1)) == sim_real["n_samples"].get(pid, -1) for pid in either)
    real_extract = real.manifest["stages"]["extract"]
    found_real = set(real.extracted["prompt_id"])
    real_row = {
        "budget_share": args.real_share,
        "evaluations_total": real.manifest["evaluations_total"],
        "evaluations_share": real.manifest["evaluations_total"] / brute_cost,
        "simulated_evaluations": sim_real["evaluations"],
        "n_samples_agree_with_simulation": f"{agree}/{len(either)} (attacked: {len(det)} real, "
        f"{len(sim_real['n_samples'])} simulated)",
        "evaluations_agree_with_simulation": real.manifest["evaluations_total"] == sim_real["evaluations"],
        "capped": real_extract.get("capped", []),
        "simulated_capped": sim_real["capped"],
        "rounds_generations": [r["generations"] for r in real_extract.get("rounds", [])],
        "simulated_rounds_generations": [r["generations"] for r in sim_real["rounds"]],
        "probe_evaluations": real_extract.get("probe_evaluations"),
        "simulated_probe_evaluations": probe,
        "found": len(found_real & brute_found),
        "found_share": len(found_real & brute_found) / len(brute_found) if brute_found else None,
        "stages": {k: {"prompts_kept": v["prompts_kept"], "evaluations": v["evaluations"]}
                   for k, v in real.manifest["stages"].items()},
        "seconds": round(real_s, 1),
    }  # fmt: skip
    print(f"\nreal audit at {args.real_share:.0%}: {real_row}")
    floor = floor_cost(sim, brute_found, cfg, per_image, triage_cost + probe)
    floor["share"] = floor["evaluations"] / brute_cost
    print(f"\nfloor (perfect ranking, ≥ 95 % of the extractions): {floor['evaluations']:,} evaluations "
          f"({floor['share']:.2%}); generations to each extraction: {floor['samples_to_extraction']}")  # fmt: skip
    group = inputs["group_by"]
    summary = {
        "model": inputs["model"],
        "prompts": len(pids),
        "memorized_share_of_pool": len(brute_found) / len(pids),
        "samples_per_prompt": n,
        "unet_evaluations_per_generation": per_image,
        "alpha": cfg.alpha,
        "first_round": cfg.first_round,
        "round_size": cfg.round_size,
        "round_prompts": args.round_prompts,
        "brute_force": {"evaluations": brute_cost, "extractions": len(brute_found), "seconds": round(brute_s, 1)},
        f"brute_force_extractions_by_{group}": {
            str(k): f"{sum(p in brute_found for p in g['prompt_id'])}/{len(g)}" for k, g in prompts.groupby(group)
        },
        "brute_force_extracted": sorted(brute_found),
        "floor_for_95_percent": floor,
        "triage": {
            "evaluations": triage_cost,
            "share": triage_cost / brute_cost,
            "seconds": round(triage_s, 1),
            "roc": roc,
            "roc_duplicated_vs_not": roc_dup,
        },  # fmt: skip
        "curves": curves,
        "missed_at_10_percent": missed,
        **(
            {
                "tiny_recipe": inputs["recipe"],
                "finetune_seconds": inputs["finetune_seconds"],
                "finetune_log": inputs["finetune_log"],
            }
            if args.tiny_model
            else {}
        ),
        "real_audit": real_row,
        "load_average": {"start": load_start, "end": load_avg()},
        "cpu": os.cpu_count(),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip(),  # fmt: skip
    }
    target = [r for r in curves["triage wen"] if r["evaluations_share"] <= 0.10 and (r["found_share"] or 0) >= 0.95]
    summary["target_met_triage_wen"] = bool(target)
    print(f"\ntarget (≥ 95 % found at ≤ 10 % of the evaluations) with triage (wen): {'met' if target else 'missed'}")
    print(f"load average: {summary['load_average']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=1, default=str))


if __name__ == "__main__":
    main()

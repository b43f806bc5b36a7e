"""``memscan audit``: the whole extraction attack in one run directory.

candidates (duplicate counts, or ``--prompts``) → triage (one-step scores of every candidate) →
adaptive extraction down the triage ranking, round by round, until the budget is spent →
verification → one report. See :mod:`memscan.audit.stages` for what each stage writes and
:mod:`memscan.audit.budget` for how evaluations are counted and rounds planned.

The run (kind ``audit``) holds the same ``prompts.parquet``, ``detections.parquet`` and
``extractions.parquet`` as ``memscan extract`` run on the attacked prompts with the same
configuration and seeds, ``scores.parquet`` as ``memscan triage --scores SCORE`` writes (only the
score that ranks is computed), and a manifest with
``stages`` (per stage: prompts kept, model evaluations spent) and ``evaluations_total``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from memscan.audit.budget import AuditBudget, check_one_round, full_budget, resolve_budget
from memscan.audit.stages import (
    STAGES,
    candidates_stage,
    clear_markers,
    extract_rounds,
    skip_triage,
    triage_stage_run,
    verify_stage,
)
from memscan.audit.support import generator_facts
from memscan.data.duplicates import DuplicateConfig
from memscan.data.prompts import prompts_sha256
from memscan.data.training import TrainingSet, list_source, training_at_shape, training_set_sha256
from memscan.errors import InputError
from memscan.extraction.config import ExtractConfig
from memscan.extraction.pipeline import generator_identity
from memscan.extraction.verify import DEFINITIONS, extraction_counts
from memscan.extraction.worker import extraction_pool, generator_record, probe_generator
from memscan.runners import GeneratorSpec
from memscan.store import open_run
from memscan.triage.run import DEFAULT_SHARD_SIZE as TRIAGE_SHARD_SIZE
from memscan.triage.run import prompt_table
from memscan.triage.scores import SCORE_DEFINITIONS, SCORES, TriageConfig
from memscan.triage.worker import triage_pool

#: Candidate prompts taken from the training set's duplicate clusters by default.
DEFAULT_CANDIDATES = 1000


def default_extract_config(samples_per_prompt: int = 500, **overrides) -> ExtractConfig:
    """The audit's extraction: adaptive, first round and rounds of 4 % of ``samples_per_prompt``
    (at least 2), the paper's k = 10 and δ = 0.15 otherwise.

    Examples
    --------
    >>> c = default_extract_config(500)
    >>> c.adaptive, c.first_round, c.round_size
    (True, 20, 20)
    """
    step = max(2, samples_per_prompt // 25)
    values = {"samples_per_prompt": samples_per_prompt, "adaptive": True, "first_round": step, "round_size": step}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return ExtractConfig(**values)


@dataclass
class AuditResult:
    """A finished audit (the tables are also on disk in ``run_dir``).

    Attributes
    ----------
    run_dir : the audit's run directory
    candidates : every candidate prompt (``candidates.parquet``)
    scores : triage scores (``scores.parquet``; None when no score applied)
    prompts, detections, extractions : the attacked prompts and the tables ``memscan extract`` writes
    manifest : the manifest (``stages``, ``evaluations_total``, ``evaluations_full_budget``, …)
    """

    run_dir: Path
    candidates: pd.DataFrame
    scores: pd.DataFrame | None
    prompts: pd.DataFrame
    detections: pd.DataFrame
    extractions: pd.DataFrame
    manifest: dict

    @property
    def extracted(self) -> pd.DataFrame:
        """Rank-1 rows that are (ℓ, δ)-extractions."""
        e = self.extractions
        return e[(e["rank"] == 1) & e["extracted"]] if len(e) else e


def audit(
    model,
    train: str | Path | TrainingSet,
    out: str | Path,
    *,
    prompts=None,
    budget: AuditBudget = AuditBudget(),
    config: ExtractConfig | None = None,
    triage_config: TriageConfig = TriageConfig(),
    duplicates: DuplicateConfig = DuplicateConfig(),
    candidates: int = DEFAULT_CANDIDATES,
    min_count: int = 1,
    score: str = "wen",
    controls: list[str] | tuple = (),
    triage_shard_size: int = TRIAGE_SHARD_SIZE,
    resume: bool = False,
    progress: bool = True,
    runner: str = "local",
    runner_options=None,
    model_id: str | None = None,
) -> AuditResult:
    """Run the audit end to end; every stage resumes where a killed run stopped.

    Parameters
    ----------
    model : a loaded generator, or a ``--model`` spec (string or :class:`GeneratorSpec`) that each
        worker loads; the Ray runner needs a spec
    train : the training set (any layout ``memscan extract`` reads; a path when candidates come
        from its captions)
    out : the audit's run directory (kind ``audit``)
    prompts : candidate prompts (file, list or table); None: the captions of the ``candidates``
        most duplicated training images (``memscan candidates``)
    budget : :class:`AuditBudget` — model evaluations for everything (default: 10 % of the brute
        force), or ``top`` prompts
    config : the extraction's :class:`ExtractConfig` (made adaptive; default
        :func:`default_extract_config`)
    triage_config : :class:`TriageConfig` (sampling defaults, resolution and negative prompt: the
        generator's own; its ``scores`` become ``(score,)``: the audit computes only the score it
        ranks by)
    duplicates, candidates, min_count : the candidates stage (``memscan candidates`` options)
    score : the triage score that ranks the prompts (``wen`` or ``webster``)
    controls : prompt ids attacked whatever their rank (the demo's planted-once images): their first
        rounds are kept from the budget from the start, and they are attacked last when the
        ranking has spent the rest; the budget stays a hard cap
    resume : finish the audit in ``out`` (same options); finished stages and shards are kept
    runner, runner_options : ``"local"`` or ``"ray"`` and its :class:`~memscan.runners.RayOptions`
    model_id : the ``--model`` spec recorded when ``model`` is a loaded object
    """
    config = replace(config or default_extract_config(), adaptive=True).validate()
    budget = budget.validate()
    triage_config = triage_config.validate()
    duplicates = duplicates.validate()
    if score not in SCORES:
        raise InputError(f"unknown score {score!r}", f"choose one of {', '.join(SCORES)}")
    triage_config = replace(triage_config, scores=(score,)).validate()  # only the score that ranks
    if prompts is None and isinstance(train, TrainingSet):
        raise InputError("candidates from captions need the training set's path", "pass --train PATH or --prompts")
    # the model, the training set (listed once: hashed, read for captions, decoded as listed; the
    # duplicate count of the candidates stage, which decodes every image, lists it again) and
    # given prompts identify the audit: a resume with others is refused before any stage
    listing = list_source(train) if isinstance(train, (str, Path)) else None
    identities = {
        "model_spec": generator_record(model, None, model_id)["id"],
        "training_set_sha256": training_set_sha256(listing if listing is not None else train),
        "prompts_sha256": None if prompts is None else _prompts_sha256(prompts),
    }
    started = time.time()
    with open_run(out, "audit", resume=resume) as run:
        inputs = {
            "train": train.summary()["source"] if isinstance(train, TrainingSet) else str(train),
            "prompts": None if prompts is None or not isinstance(prompts, (str, Path)) else str(prompts),
        }
        options = {
            "budget": budget.to_dict(),
            "candidates": candidates,
            "min_count": min_count,
            "score": score,
            "controls": sorted(map(str, controls)),
            "duplicates": duplicates.__dict__,
        }
        fields = {
            "config": config.to_dict(),
            "audit": options,
            "triage_config": triage_config.to_dict(),
            "inputs": inputs,
            **identities,
            # the extraction's definitions and the triage score's (its numbers rank the prompts)
            "definitions": {**DEFINITIONS, f"triage_{score}": SCORE_DEFINITIONS[score]},
        }
        # the paths in ``inputs`` are recorded, not compared: the same files moved are the same inputs
        identity = ("config", "audit", "triage_config", *identities, "definitions")
        if run.resuming:  # a resumed audit must be the same audit (checked before any stage)
            run.start(fields, identity=identity, started=started)
        # 1. candidates (no model needed; a new run computes them anew, whatever marker it finds)
        cands, rec_cand = candidates_stage(run, train, prompts, duplicates, candidates, min_count, progress, listing)
        missing = sorted(set(map(str, controls)) - set(cands["prompt_id"].astype(str)))
        if missing:
            raise InputError(
                f"control prompt(s) {', '.join(missing[:5])} are not among the candidates",
                "name controls by the prompt_id of a candidate (the ids of --prompts, or of candidates.parquet)",
            )

        # the extraction's workers; on Ray opened twice (around triage, whose own workers need the CPUs)
        def pool():
            return extraction_pool(runner, model, config, run.store, runner_options)

        return _stages(
                run, pool, model, model_id, listing if listing is not None else train, cands, rec_cand, budget, config, triage_config,
                score, list(map(str, controls)), triage_shard_size, progress, runner, runner_options,
                (fields, identity, started),
            )  # fmt: skip


def _prompts_sha256(prompts) -> str:
    """The given prompts' ``prompts_sha256`` (ids and texts, as ``memscan extract`` records it)."""
    df, _ = prompt_table(prompts)
    return prompts_sha256(df["prompt_id"], df["prompt"])


def _stages(
    run, make_pool, model, model_id, train, cands, rec_cand, budget, config, triage_config, score, controls,
    triage_shard_size, progress, runner, runner_options, start,
) -> AuditResult:  # fmt: skip
    with make_pool() as pool:
        # 2. what the model costs and supports (asked of a worker: a Ray driver loads no model)
        facts = pool.call(generator_facts, replace(triage_config, device=config.device))
        if facts["conditioning_gap"]:
            raise InputError(
                f"memscan audit attacks prompts, but {facts['conditioning_gap']}",
                "use `memscan extract-unconditional` for unconditional models",
            )
        first = cands.iloc[0]
        probe = pool.call(probe_generator, first["prompt"], config.seed, None)
        generator = generator_identity(probe.description)
        if run.resuming and (run.previous or {}).get("generator") is not None:
            # the sampler the finished stages ran with (steps, guidance, scheduler, resolution,
            # dtype): another one would mix two samplers in the tables and misprice the budget
            run.previous["generator"] = generator_identity(run.previous["generator"])
            run.check({"generator": generator, "output_shape": list(probe.shape)}, ("generator", "output_shape"))
        per_image, n = facts["per_image"], len(cands)
        brute = full_budget(n, config.samples_per_prompt, per_image)
        limit = resolve_budget(budget, n, brute)
        gap = facts["triage_gap"]
        # the generator's schedule, guidance, resolution and negative prompt; the UNet evaluations
        # as the triage module counts them for this model (memscan.triage.scores.evaluations_of)
        triage_per_prompt = 0 if gap else int(facts["triage_evaluations_per_prompt"])
        triage_config = triage_config if gap else TriageConfig(**facts["triage_config"])
        triage_cost = triage_per_prompt * n
        probe_cost = facts["probe_images"] * per_image
        first_cost = config.rounds()[0] * per_image
        check_one_round(
            limit, triage_cost, first_cost, n, budget.round_prompts, len(set(controls)), probe_cost=probe_cost
        )
        # the training set at the generator's resolution: a bad one is refused before the manifest
        shape = probe.shape
        training = training_at_shape(train, shape, run.store.log)
        if run.manifest.get("status") != "running":
            # a new run, accepted: the later stages' markers an earlier start may have left (only
            # those exact files: --out may be a folder of the user's) are not reused; a refused
            # invocation returned above, having removed nothing
            clear_markers(run, [s for s in STAGES if s != "candidates"])
            fields, identity, started = start
            run.start(fields, identity=identity, started=started)
        run.manifest.update(
            model=generator_record(model, probe.parameters, model_id),
            generator=generator,
            runner=pool.describe(),
            output_shape=list(probe.shape),
            budget={
                "evaluations": limit,
                "top": budget.top,
                "unit": facts["unit"],
                "evaluations_per_generation": per_image,
            },
            evaluations_full_budget=brute,
            training_set=training.summary(),
        )
        run.save()
    # 3. triage (or the fallback: the candidates' order, screened by the adaptive first round)
    if gap:
        run.store.log(f"audit: no triage score — {gap}; falling back to the adaptive first round")
        ranked, rec_triage = skip_triage(run, cands, gap)
        scores = None
    else:
        spec = GeneratorSpec.of(model).normalized().spec if isinstance(model, (str, GeneratorSpec)) else model
        tcfg = replace(triage_config, device=config.device)
        with triage_pool(runner, spec, tcfg, runner_options, log=run.store.log) as tpool:
            ranked, rec_triage = triage_stage_run(
                run, tpool, cands, tcfg, triage_shard_size, score, progress, planned=triage_per_prompt
            )
        scores = pd.read_parquet(run.root / "scores.parquet")
    with make_pool() as pool:
        # 4. the adaptive extraction down the ranking, round by round
        rec_extract = extract_rounds(
            run,
            pool,
            ranked,
            pool.share(training),
            config,
            first_shard=int(rec_triage["shards"]),
            per_image=per_image,
            probe_cost=probe_cost,
            spent_before=int(rec_triage["evaluations"]),
            budget=limit,
            top=budget.top,
            round_prompts=budget.round_prompts,
            controls=controls,
            progress=progress,
        )
        # 5. verification: the tables of `memscan extract`, the matched training images
        tables, rec_verify = verify_stage(run, rec_extract, ranked, training)
        stages = {
            "candidates": rec_cand,
            "triage": rec_triage,
            "extract": {k: v for k, v in rec_extract.items() if k != "shards"},
            "verify": rec_verify,
        }
        total = sum(int(s["evaluations"]) for s in stages.values())
        det, ext = tables["detections"], tables["extractions"]
        manifest = run.finish(
            stages=stages,
            evaluations_total=total,
            share_of_full_budget=total / brute if brute else None,
            n_shards=int(rec_triage["shards"]) + len(rec_extract["shards"]),
            counts=extraction_counts(det, ext, config.min_clique),
        )
        prompts = pd.read_parquet(run.root / "prompts.parquet")
        return AuditResult(run.root, cands, scores, prompts, det, ext, manifest)

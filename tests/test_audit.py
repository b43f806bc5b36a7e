"""``memscan audit``: each stage's table equals the standalone command's, the budget is spent down
the triage ranking round by round as the rule says, a kill at every stage resumes to the
uninterrupted tables, and triage scores a caption-conditional UNet as computed by hand."""

from __future__ import annotations

import json
import socket

import numpy as np
import pandas as pd
import pytest
from audit_support import ADAPTIVE, MODEL, SAMPLING, audit_args, small_demo
from gen_support import MEMORIZED
from typer.testing import CliRunner

from memscan.cli import app
from memscan.store import RunStore

runner = CliRunner()
TABLES = ("detections", "extractions", "scores")


def _invoke(args, ok=True):
    res = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    if ok and res.exit_code != 0:
        raise AssertionError(f"memscan {' '.join(map(str, args))} failed ({res.exit_code}):\n{res.output}")
    return res


def _manifest(run):
    return json.loads((run / "manifest.json").read_text())


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit-in")
    small_demo(root)
    return root


#: UNet evaluations of the full audit's triage, counted by a hook on the UNet (not memscan's bookkeeping).
TRIAGE_CALLS: list[int] = []


def _counting_triage(real):
    """``score_prompts`` with a forward hook on the model's UNet that adds up the latents of every
    call (one UNet evaluation each) into ``TRIAGE_CALLS``."""

    def score_prompts(model, *args, **kwargs):
        hook = model.unet.register_forward_hook(lambda m, a, out: TRIAGE_CALLS.append(int(a[0].shape[0])))
        try:
            return real(model, *args, **kwargs)
        finally:
            hook.remove()

    return score_prompts


@pytest.fixture(scope="module")
def full_audit(inputs, tmp_path_factory):
    """An audit with --top 12: every candidate attacked (no budget cut); its triage's UNet
    evaluations are counted into ``TRIAGE_CALLS``."""
    import memscan.triage.worker as worker

    out = tmp_path_factory.mktemp("audit") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(worker, "score_prompts", _counting_triage(worker.score_prompts))
        _invoke(audit_args(inputs, out, "--top", 12))
    return out


def test_audit_tables_equal_the_standalone_commands(inputs, full_audit, tmp_path):
    train, prompts = small_demo(inputs)
    # triage by hand on the same prompts, with the generator's schedule (5 steps, no guidance) and
    # the one score the audit ranks by (the only one it computes)
    _invoke(["triage", "--model", MODEL, "--prompts", prompts, "--out", tmp_path / "t", "--num-inference-steps", 5,
             "--guidance-scale", 1.0, "--scores", "wen", "--quiet"])  # fmt: skip
    pd.testing.assert_frame_equal(
        pd.read_parquet(full_audit / "scores.parquet"), pd.read_parquet(tmp_path / "t" / "scores.parquet")
    )
    # the attack ran down the triage ranking (wen, highest first)
    scores = pd.read_parquet(tmp_path / "t" / "scores.parquet")
    order = scores.sort_values(["wen_score", "prompt_id"], ascending=[False, True])["prompt_id"].tolist()
    audited = pd.read_parquet(full_audit / "prompts.parquet")
    assert audited["prompt_id"].tolist() == order
    # extract --adaptive by hand on the prompts the audit attacked, in its order
    _invoke(["extract", "--model", MODEL, "--prompts", full_audit / "prompts.parquet", "--train", train, "--out",
             tmp_path / "e", *SAMPLING, "--adaptive", *ADAPTIVE, "--quiet"])  # fmt: skip
    for t in ("prompts", "detections", "extractions"):
        pd.testing.assert_frame_equal(
            pd.read_parquet(full_audit / f"{t}.parquet"), pd.read_parquet(tmp_path / "e" / f"{t}.parquet"), obj=t
        )
    # the images a person looks at are the same files
    det = pd.read_parquet(full_audit / "detections.parquet")
    for rel in det["candidate_image"].dropna():
        assert (full_audit / rel).read_bytes() == (tmp_path / "e" / rel).read_bytes()
    assert int(det["detected"].sum()) >= 3  # the images duplicated in this training set


def test_manifest_counts_every_evaluation(full_audit):
    m = _manifest(full_audit)
    det = pd.read_parquet(full_audit / "detections.parquet")
    per_image = m["budget"]["evaluations_per_generation"]
    assert per_image == 5 and m["budget"]["unit"] == "unet evaluations"  # 5 DDIM steps, unguided
    s = m["stages"]
    assert s["candidates"] == {**s["candidates"], "prompts_kept": 12, "evaluations": 0}
    # only the ranking score (wen) is computed: counted at the UNet, 12 prompts × 4 generations ×
    # 1 step × (the caption, the null class); the demo model is unguided, with no negative prompt
    assert s["triage"]["evaluations"] == sum(TRIAGE_CALLS) == 12 * 4 * 1 * 2
    assert s["triage"]["unet_evaluations_by_score"] == {"wen": 4 * 1 * 2}
    assert "webster_score" not in pd.read_parquet(full_audit / "scores.parquet")
    assert m["triage_config"]["scores"] == ["wen"] and m["definitions"]["triage_wen"].startswith("Wen et al. 2024")
    # one probe image (the UNet generator declares no output shape) + every generation made
    assert s["extract"]["evaluations"] == per_image * (1 + int(det["n_samples"].sum()))
    assert m["evaluations_total"] == sum(v["evaluations"] for v in s.values())
    assert m["evaluations_full_budget"] == 12 * 12 * per_image
    ext = pd.read_parquet(full_audit / "extractions.parquet").query("rank == 1 and extracted")
    assert s["verify"]["prompts_kept"] == len(ext) == m["counts"]["extractions"]


#: A clique of 6 flags a prompt: the duplicated images (cliques of 3–4 after 4 generations)
#: continue to 8 or 12 generations, so the budget, not the adaptive rule, can end them.
CONTINUING = ["--min-clique", 6]


@pytest.fixture(scope="module")
def uncut_audit(inputs, tmp_path_factory):
    """The ranking's uncut courses: --top 12 with CONTINUING (no budget)."""
    out = tmp_path_factory.mktemp("uncut") / "run"
    _invoke(audit_args(inputs, out, "--top", 12, *CONTINUING))
    return out


@pytest.mark.parametrize(("budget", "cuts"), [(96 + 5 + 5 * 4 * 6, True), (96 + 5 + 5 * 4 * 13, False)])
def test_the_budget_is_a_hard_cap_spent_down_the_ranking(inputs, uncut_audit, tmp_path, budget, cuts):
    """Checked against the tables alone, not the code's own planning: the evaluations (triage
    2 × 4 × 1 per candidate, one probe image, 5 per generation) never exceed --budget; the
    attacked prompts are the top of the ranking; each ran its uncut course (its row equals the
    uncut audit's) or was cut by the budget at a round end (4 or 8 of 12 generations); and the
    extraction stopped only when the ranking was exhausted or the budget left could not pay one
    more first round (4 generations × 5). With the smaller budget the first round's third prompt
    would continue past the budget (the old rule spent 241 of 221)."""
    out = tmp_path / "run"
    _invoke(audit_args(inputs, out, "--budget", budget, *CONTINUING))
    m = _manifest(out)
    det = pd.read_parquet(out / "detections.parquet")
    triage = 2 * 4 * 1 * len(pd.read_parquet(out / "scores.parquet"))
    total = triage + 5 + 5 * int(det["n_samples"].sum())
    assert m["evaluations_total"] == total <= budget
    assert m["stages"]["extract"]["budget_left"] == budget - total >= 0
    ranking = pd.read_parquet(uncut_audit / "prompts.parquet")["prompt_id"].tolist()
    attacked = pd.read_parquet(out / "prompts.parquet")["prompt_id"].tolist()
    assert attacked == ranking[: len(attacked)]
    assert len(attacked) == len(ranking) or budget - total < 4 * 5
    full = pd.read_parquet(uncut_audit / "detections.parquet").set_index("prompt_id")
    cut = set(m["stages"]["extract"]["capped"])
    for row in det.to_dict("records"):
        uncut = full.loc[row["prompt_id"]]
        if row["prompt_id"] in cut:
            assert row["n_samples"] in (4, 8) and row["n_samples"] < uncut["n_samples"]
        else:
            assert row["n_samples"] == uncut["n_samples"]
            for col in ("clique_size", "mean_clique_distance", "detected", "medoid_seed"):
                assert row[col] == uncut[col] or (pd.isna(row[col]) and pd.isna(uncut[col])), col
    assert bool(cut) == cuts


def test_the_audit_page_names_each_figure_and_section(full_audit, tmp_path):
    """The stage rows under their own heading (not the demo's), the total against the brute force
    on every candidate and the adaptive share over the attacked prompts each labelled as what
    they are, with the figures recomputed from the manifest and the tables."""
    from memscan.report.registry import build_report

    m = _manifest(full_audit)
    det = pd.read_parquet(full_audit / "detections.parquet")
    html = build_report(full_audit, tmp_path / "a.html").read_text()
    assert "<h2>Audit: stages and budget</h2>" in html and "Demo ground truth" not in html
    total, brute = m["evaluations_total"], 12 * 12 * 5
    assert f"{total:,} unet evaluations: {total / brute:.1%} of the brute force&#39;s {brute:,}" in html
    assert "every one of the 12 candidates × 12 generations" in html and "triage included" in html
    spent, full = int(det["n_samples"].sum()), len(det) * 12
    assert f"<b>{spent}</b> of the {full} generations" in html
    assert f"<b>{100 * spent / full:.1f} %</b> of these prompts' full budget of generations" in html
    html = build_report(full_audit, tmp_path / "b.html", extra_summary={"planted": "3/3"}).read_text()
    assert html.index("Audit: stages and budget") < html.index("<h2>Demo ground truth</h2>") < html.index("planted")


class _Killed(BaseException):
    """Stands for SIGKILL (nothing in memscan catches it)."""


def test_a_kill_at_each_stage_resumes_to_the_uninterrupted_tables(inputs, full_audit, tmp_path, monkeypatch):
    """Killed after each stage in turn (and once mid-extraction), resumed each time: the tables
    equal the uninterrupted audit's and every shard was committed exactly once."""
    import memscan.audit.stages as stages

    out = tmp_path / "killed"
    commits, where = [], [None]
    original_marker, original_commit = stages.write_marker, RunStore.commit_shard

    def die(root):
        (root / ".lock").write_text(f"pid=999999999 host={socket.gethostname()} since=killed")
        raise _Killed

    def marker_then_die(run, stage, record):
        out_record = original_marker(run, stage, record)
        if stage == where[0]:
            die(run.root)
        return out_record

    def commit_then_die(self, shard, tables, meta):
        original_commit(self, shard, tables, meta)
        commits.append(shard)
        if where[0] == "round" and shard == 2:  # the second extraction shard: mid-extract
            die(self.root)

    monkeypatch.setattr(stages, "write_marker", marker_then_die)
    monkeypatch.setattr(RunStore, "commit_shard", commit_then_die)
    for n, stage in enumerate(["candidates", "triage", "round", "extract", "verify"]):
        where[0] = stage
        with pytest.raises(_Killed):
            _invoke([*audit_args(inputs, out, "--top", 12), *(["--resume"] if n else [])])
        assert not (out / "detections.parquet").exists() or stage == "verify"
        assert (out / "stages" / f"{'extract' if stage == 'round' else stage}.json").exists() == (stage != "round")
    where[0] = None
    _invoke([*audit_args(inputs, out, "--top", 12), "--resume"])
    for t in ("candidates", "prompts", *TABLES):
        pd.testing.assert_frame_equal(
            pd.read_parquet(full_audit / f"{t}.parquet"), pd.read_parquet(out / f"{t}.parquet"), obj=t
        )
    a, b = _manifest(full_audit), _manifest(out)
    assert a["stages"] == b["stages"] and a["evaluations_total"] == b["evaluations_total"]
    assert sorted(commits) == list(range(b["n_shards"])), f"every shard committed once ({commits})"
    assert b["status"] == "complete" and len(b["resumed"]) == 4


def test_a_resume_with_another_sampler_is_refused_before_any_stage(inputs, full_audit, tmp_path, monkeypatch):
    """Killed after triage, resumed with --steps 4 instead of 5: the resume used to be accepted
    (only the --model string was compared), ranking by 5-step scores, extracting at 4 steps and
    pricing every round at the new cost. Refused now, naming the generator's steps; resumed with
    the original options, the audit equals the uninterrupted one."""
    import memscan.audit.stages as stages

    out = tmp_path / "killed"
    original_marker = stages.write_marker

    def marker_then_die(run, stage, record):
        written = original_marker(run, stage, record)
        if stage == "triage":
            (run.root / ".lock").write_text(f"pid=999999999 host={socket.gethostname()} since=killed")
            raise _Killed
        return written

    with monkeypatch.context() as m:
        m.setattr(stages, "write_marker", marker_then_die)
        with pytest.raises(_Killed):
            _invoke(audit_args(inputs, out, "--top", 12))
    markers = {p.name: p.read_bytes() for p in (out / "stages").iterdir()}
    assert sorted(markers) == ["candidates.json", "triage.json"]
    shards = sorted(p.name for p in (out / "shards").iterdir())  # triage's
    res = _invoke([*audit_args(inputs, out, "--top", 12, "--steps", 4), "--resume"], ok=False)
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert "generator differs" in res.output and "num_inference_steps: 5 vs 4" in res.output
    assert {p.name: p.read_bytes() for p in (out / "stages").iterdir()} == markers  # nothing redone or lost
    assert sorted(p.name for p in (out / "shards").iterdir()) == shards and not (out / "detections.parquet").exists()
    _invoke([*audit_args(inputs, out, "--top", 12), "--resume"])
    for t in ("candidates", "prompts", *TABLES):
        pd.testing.assert_frame_equal(
            pd.read_parquet(full_audit / f"{t}.parquet"), pd.read_parquet(out / f"{t}.parquet"), obj=t
        )
    assert _manifest(full_audit)["stages"] == _manifest(out)["stages"]


def test_a_generator_without_a_triage_score_falls_back_to_the_adaptive_first_round(synth_train, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join([*list(MEMORIZED)[:2], "fresh 1", "fresh 2"]) + "\n")
    out = tmp_path / "run"
    res = _invoke(["audit", "--model", "py:gen_support:planted", "--train", synth_train, "--prompts", prompts,
                   "--out", out, "--samples-per-prompt", 20, "--first-round", 5, "--round-size", 5, "--min-clique", 3,
                   "--top", 4, "--quiet"])  # fmt: skip
    assert "no noise prediction" in res.output and "adaptive first round" in res.output
    m = _manifest(out)
    t = m["stages"]["triage"]
    assert t["skipped"] and t["evaluations"] == 0 and "plain function" in t["reason"]
    assert m["budget"]["unit"] == "generations"
    assert not (out / "scores.parquet").exists()
    det = pd.read_parquet(out / "detections.parquet")
    assert det["prompt_id"].tolist() == ["line-1", "line-2", "line-3", "line-4"]  # the candidates' order
    assert set(det.loc[det["detected"], "prompt_id"]) == {"line-1", "line-2"}
    assert (out / "report.html").exists()
    html = (out / "report.html").read_text()
    assert "stage triage" in html and "skipped" in html


def test_controls_are_attacked_when_the_budget_is_spent(inputs, full_audit, tmp_path):
    from memscan.audit import AuditBudget, audit, default_extract_config
    from memscan.generators.diffusers_unet import load_unet_generator

    train, prompts = small_demo(inputs)
    ranking = pd.read_parquet(full_audit / "prompts.parquet")["prompt_id"].tolist()
    last = ranking[-1]
    gen = load_unet_generator(MODEL, batch_size=12, num_inference_steps=5)
    cfg = default_extract_config(12, first_round=4, round_size=4, min_clique=3, batch_size=12)
    # triage + probe + one round of 4 first rounds + the control's first round, kept from the start
    budget = 96 + 5 + (4 + 1) * 20
    res = audit(gen, train, tmp_path / "run", prompts=prompts, config=cfg, controls=[last], progress=False,
                budget=AuditBudget(evaluations=budget, round_prompts=4))  # fmt: skip
    rounds = res.manifest["stages"]["extract"]["rounds"]
    assert [(r["prompts"], r["why"]) for r in rounds] == [(4, "ranking"), (1, "controls")]
    assert res.detections["prompt_id"].tolist() == [*ranking[:4], last]
    assert res.manifest["evaluations_total"] == 96 + 5 + 5 * int(res.detections["n_samples"].sum()) <= budget


def test_triage_of_a_caption_conditional_unet_matches_a_hand_computation():
    """Wen et al.'s ||ε(x_T, c) − ε(x_T, ∅)|| with the null class as ∅, and Webster's one-step
    sample (Karras sigmas [σ_max, 0], k-diffusion VE space): z_T = σ·n, the UNet sees
    z_T / sqrt(σ² + 1) at the last training timestep, and the score is mean((σ·ε)²) — unguided
    (guidance 1), so ε is the conditional prediction. σ² = (1 − ᾱ_{T−1})/ᾱ_{T−1} from DDPM's
    linear β schedule written out here, not read from the scheduler."""
    import torch
    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

    from memscan.generators.diffusers_unet import DiffusersUNetGenerator
    from memscan.generators.seeds import derive_seed
    from memscan.triage.scores import ClassTriageModel, TriageConfig, score_prompts

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       num_class_embeds=4).eval()  # fmt: skip
    captions = ["a cat", "a dog", "a boat"]
    gen = DiffusersUNetGenerator(unet, DDPMScheduler(num_train_timesteps=100), class_captions=captions, null_class=3,
                                 num_inference_steps=10)  # fmt: skip
    cfg = TriageConfig(generations=3, steps=1, num_inference_steps=10, guidance_scale=1.0, batch_size=4, seed=7)
    got = score_prompts(ClassTriageModel(gen), ["a", "b", "c"], captions, cfg)
    sched = DDIMScheduler.from_config(DDPMScheduler(num_train_timesteps=100).config)
    sched.set_timesteps(10)
    t = sched.timesteps[0]
    # DDPM's default β: linear from 1e-4 to 0.02 over the 100 training timesteps
    abar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 100))
    sigma = np.sqrt((1.0 - abar[99]) / abar[99])
    for k, (pid, label) in enumerate(zip("abc", range(3))):
        wen, web = [], []
        for i in range(3):
            g = torch.Generator("cpu").manual_seed(derive_seed(7, pid, i))
            x = torch.randn((1, 8, 8), generator=g)[None]
            with torch.no_grad():
                eps_c = unet(x, t, class_labels=torch.tensor([label])).sample
                eps_u = unet(x, t, class_labels=torch.tensor([3])).sample
                z_T = sigma * x.double()
                e = unet((z_T / np.sqrt(sigma**2 + 1)).float(), 99, class_labels=torch.tensor([label])).sample
            wen.append(float((eps_c - eps_u).flatten().norm()))
            web.append(float(((sigma * e.double()) ** 2).mean()))
        np.testing.assert_allclose(got["wen"][k], np.mean(wen), rtol=1e-5)
        np.testing.assert_allclose(got["webster"][k], np.mean(web), rtol=1e-5)
    assert got["wen"].min() > 0
    # unguided: Wen 2 per generation and step, Webster 1 per generation
    assert got["unet_evaluations_per_prompt"] == 3 * (2 + 1)

    # without a null class there is no unconditional prediction: refused, with the reason
    from memscan.errors import InputError

    no_null = DiffusersUNetGenerator(unet, DDPMScheduler(num_train_timesteps=100), class_captions=captions)
    with pytest.raises(InputError, match="null_class"):
        ClassTriageModel(no_null)


def test_the_ray_runner_gives_the_local_tables(inputs, full_audit, tmp_path):
    """Triage and extraction shards on 2 Ray workers (each loads the model from its spec)."""
    pytest.importorskip("ray")
    out = tmp_path / "ray"
    _invoke(audit_args(inputs, out, "--top", 12, "--runner", "ray", "--num-workers", 2))
    assert _manifest(out)["runner"]["name"] == "ray"
    for t in ("prompts", *TABLES):
        pd.testing.assert_frame_equal(
            pd.read_parquet(full_audit / f"{t}.parquet"), pd.read_parquet(out / f"{t}.parquet"), obj=t
        )
    assert _manifest(out)["stages"] == _manifest(full_audit)["stages"]


def test_candidates_from_the_training_captions_equal_memscan_candidates(inputs, tmp_path):
    train, _ = small_demo(inputs)
    out = tmp_path / "run"
    _invoke(["audit", "--model", MODEL, "--train", train, "--out", out, *SAMPLING, *ADAPTIVE, "--top", 2, "--quiet",
             "--no-report"])  # fmt: skip
    _invoke(["candidates", train, "--top", 1000, "--out", tmp_path / "c.csv", "--quiet"])
    pd.testing.assert_frame_equal(pd.read_csv(out / "candidates.csv"), pd.read_csv(tmp_path / "c.csv"))
    for side in ("duplicates", "pairs"):
        pd.testing.assert_frame_equal(
            pd.read_parquet(out / f"candidates.{side}.parquet"), pd.read_parquet(tmp_path / f"c.{side}.parquet")
        )
    cands = pd.read_parquet(out / "candidates.parquet")
    assert len(cands) == 12 and cands["duplicate_count"].iloc[:3].tolist() == [4, 4, 4]  # one prompt per cluster
    assert _manifest(out)["stages"]["candidates"]["from"] == "duplicates"
    assert len(pd.read_parquet(out / "detections.parquet")) == 2  # --top 2 of the triage ranking


def test_a_schedule_wen_cannot_be_scored_on_is_refused_before_any_stage(inputs, tmp_path):
    """--steps 1 with the demo scheduler's leading spacing (steps_offset 0) puts the first
    timestep at t = 0: Wen's score would be taken at the end of sampling. The audit refuses it
    when it first asks the model (after the candidates stage, which needs none), before the
    manifest or any model evaluation, naming its own options."""
    from diffusers import DDIMScheduler

    from memscan.demo.run import model_dir

    sched = DDIMScheduler.from_pretrained(model_dir(), subfolder="scheduler")
    sched.set_timesteps(1)
    assert int(sched.timesteps[0]) == 0  # independently: where a 1-step schedule starts
    out = tmp_path / "short"
    res = _invoke([*audit_args(inputs, out, "--top", 12), "--steps", 1], ok=False)
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert res.exit_code == 2 and len(errors) == 1 and "first scored timestep t=0" in errors[0], res.output
    assert "--score webster" in res.output and "--steps" in res.output and "Traceback" not in res.output
    assert not (out / "manifest.json").exists() and not (out / "scores.parquet").exists()


def test_one_round_check_counts_a_control_once():
    """The budget check counted every control's first round on top of the first round's prompts,
    although the controls are among the prompts: with all prompts in the first round a budget
    that pays exactly their first rounds (and that the audit spends in full) was refused."""
    from memscan.audit.budget import check_one_round
    from memscan.errors import InputError

    check_one_round(32, 0, 4, n_prompts=8, round_prompts=8, controls=1)  # 8 × 4: every prompt, p0 included
    check_one_round(36, 0, 4, n_prompts=9, round_prompts=8, controls=2)  # at most 1 control outside: 9 × 4
    with pytest.raises(InputError, match=r"8 prompts \+ 1 control prompts × first round 4 = 36"):
        check_one_round(35, 0, 4, n_prompts=9, round_prompts=8, controls=2)
    with pytest.raises(InputError, match=r"= 40"):  # 2 controls may both rank below the first 8 of 10
        check_one_round(39, 0, 4, n_prompts=10, round_prompts=8, controls=2)


def test_a_fresh_audit_keeps_the_users_files_in_its_out_folder(inputs, tmp_path):
    """--out may be a folder of the user's without a run in it (open_run accepts it, as for every
    command). A fresh audit removed the whole OUT/stages folder: the user's files in it were gone,
    even when the invocation was refused (--budget too small). Now a refused invocation removes
    nothing, and a run removes only its own stage markers (a stale one is not reused)."""
    train, prompts = small_demo(inputs)
    out = tmp_path / "site"
    (out / "stages" / "sub").mkdir(parents=True)
    (out / "stages" / "important.txt").write_text("mine\n")
    (out / "stages" / "sub" / "data.csv").write_text("a,b\n1,2\n")
    (out / "stages" / "triage.json").write_text('{"stale": true}\n')  # a marker an earlier start left
    user = {p: p.read_bytes() for p in (out / "stages").rglob("*") if p.is_file()}

    res = _invoke(audit_args(inputs, out, "--budget", 1), ok=False)  # all 12 prompts: refused
    assert res.exit_code == 2 and "budget" in res.output, res.output
    assert not (out / "manifest.json").exists()
    assert {p: p.read_bytes() for p in user if p.is_file()} == user, "a refused audit changed the user's files"

    few = tmp_path / "few.csv"  # other prompts: the refused start's candidates are not reused
    pd.read_csv(prompts).iloc[:4].to_csv(few, index=False)
    args = audit_args(inputs, out, "--top", 2)
    _invoke([*args[: args.index("--prompts") + 1], few, *args[args.index("--prompts") + 2 :]])
    m = _manifest(out)
    assert m["status"] == "complete" and m["stages"]["candidates"]["prompts_kept"] == 4
    assert len(pd.read_parquet(out / "candidates.parquet")) == 4
    assert "stale" not in m["stages"]["triage"] and m["stages"]["triage"]["evaluations"] > 0
    assert (out / "stages" / "important.txt").read_text() == "mine\n"
    assert (out / "stages" / "sub" / "data.csv").read_text() == "a,b\n1,2\n"

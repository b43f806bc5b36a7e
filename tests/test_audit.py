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

from memscan.audit.budget import round_size
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


@pytest.fixture(scope="module")
def full_audit(inputs, tmp_path_factory):
    """An audit with --top 12: every candidate attacked (no budget cut)."""
    out = tmp_path_factory.mktemp("audit") / "run"
    _invoke(audit_args(inputs, out, "--top", 12))
    return out


def test_audit_tables_equal_the_standalone_commands(inputs, full_audit, tmp_path):
    train, prompts = small_demo(inputs)
    # triage by hand on the same prompts, with the generator's schedule (5 steps, no guidance)
    _invoke(["triage", "--model", MODEL, "--prompts", prompts, "--out", tmp_path / "t", "--num-inference-steps", 5,
             "--guidance-scale", 1.0, "--quiet"])  # fmt: skip
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
    assert s["triage"]["evaluations"] == 12 * 2 * 4 * 1  # 2 evaluations × 4 generations × 1 step per prompt
    # one probe image (the UNet generator declares no output shape) + every generation made
    assert s["extract"]["evaluations"] == per_image * (1 + int(det["n_samples"].sum()))
    assert m["evaluations_total"] == sum(v["evaluations"] for v in s.values())
    assert m["evaluations_full_budget"] == 12 * 12 * per_image
    ext = pd.read_parquet(full_audit / "extractions.parquet").query("rank == 1 and extracted")
    assert s["verify"]["prompts_kept"] == len(ext) == m["counts"]["extractions"]


def test_the_budget_is_spent_down_the_ranking_round_by_round(inputs, full_audit, tmp_path):
    out = tmp_path / "run"
    budget = 96 + 5 + 5 * 4 * 6  # triage + probe + six first rounds of 4 generations × 5 steps
    _invoke(audit_args(inputs, out, "--budget", budget))
    m = _manifest(out)
    # an independent replay of the rule on the full audit's per-prompt costs (same seeds, same n_samples)
    full = pd.read_parquet(full_audit / "detections.parquet").set_index("prompt_id")["n_samples"]
    ranking = pd.read_parquet(full_audit / "prompts.parquet")["prompt_id"].tolist()
    spent, pos, rounds = 96 + 5, 0, []
    while (k := round_size(budget, spent, len(ranking) - pos, 4 * 5, 4)) > 0:
        rounds.append(k)
        spent += 5 * int(full[ranking[pos : pos + k]].sum())
        pos += k
    assert [r["prompts"] for r in m["stages"]["extract"]["rounds"]] == rounds
    assert pd.read_parquet(out / "prompts.parquet")["prompt_id"].tolist() == ranking[:pos]
    assert m["evaluations_total"] == spent and pos < len(ranking)
    det = pd.read_parquet(out / "detections.parquet")
    pd.testing.assert_frame_equal(
        det, pd.read_parquet(full_audit / "detections.parquet").head(pos), check_dtype=True, obj="detections"
    )


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
    res = audit(gen, train, tmp_path / "run", prompts=prompts, config=cfg, controls=[last], progress=False,
                budget=AuditBudget(evaluations=96 + 5 + 4 * 20, round_prompts=4))  # fmt: skip
    rounds = res.manifest["stages"]["extract"]["rounds"]
    assert [(r["prompts"], r["why"]) for r in rounds] == [(4, "ranking"), (1, "controls")]
    assert res.detections["prompt_id"].tolist() == [*ranking[:4], last]


def test_triage_of_a_caption_conditional_unet_matches_a_hand_computation():
    """Wen et al.'s ||ε(x_T, c) − ε(x_T, ∅)|| and Webster's one-step change, with the null class as ∅."""
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
    for k, (pid, label) in enumerate(zip("abc", range(3))):
        wen, web = [], []
        for i in range(3):
            g = torch.Generator("cpu").manual_seed(derive_seed(7, pid, i))
            x = torch.randn((1, 8, 8), generator=g)[None]
            with torch.no_grad():
                eps_c = unet(x, t, class_labels=torch.tensor([label])).sample
                eps_u = unet(x, t, class_labels=torch.tensor([3])).sample
            wen.append(float((eps_c - eps_u).flatten().norm()))
            x1 = sched.step(eps_c, t, x).prev_sample  # guidance 1: the conditional prediction
            web.append(float(((x - x1) ** 2).mean()))
        np.testing.assert_allclose(got["wen"][k], np.mean(wen), rtol=1e-5)
        np.testing.assert_allclose(got["webster"][k], np.mean(web), rtol=1e-5)
    assert got["wen"].min() > 0

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

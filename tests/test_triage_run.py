"""The triage run on the one lifecycle (issue 12): shards that do not change the scores, resume,
the Ray runner, and the triage report. Tiny pipeline: tests/data/tiny_sd_memorized (as in
tests/test_triage.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import shard_log_counts

from memscan.errors import InputError, MemscanError
from memscan.generators.text2image import load_pipeline
from memscan.report.registry import build_report
from memscan.runners import RayOptions
from memscan.store import RunStore
from memscan.triage import TriageConfig, triage

DATA = Path(__file__).parent / "data" / "tiny_sd_memorized"
META = json.loads((DATA / "memscan.json").read_text())
MEMORIZED = META["finetune"]["memorized"][0]["caption"]
PROMPTS = [MEMORIZED, "a yellow tram", "two cats", "a quiet harbour", "snowy peaks", "a red box", "an old map"]
# 2 generations per prompt, 4 per UNet call: 2 prompts per UNet batch
CFG = TriageConfig(generations=2, steps=1, num_inference_steps=4, guidance_scale=3.0, batch_size=4)


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(str(DATA))


@pytest.fixture(scope="module")
def one_shard(pipe, tmp_path_factory):
    return triage(pipe, PROMPTS, tmp_path_factory.mktemp("t") / "one", CFG, progress=False)


def test_shards_do_not_change_the_scores(pipe, one_shard, tmp_path):
    assert one_shard.manifest["n_shards"] == 1
    res = triage(pipe, PROMPTS, tmp_path / "many", CFG, shard_size=3, progress=False)
    # 3 prompts a shard, rounded up to whole UNet batches of 2 prompts: 4, 4, … → 2 shards
    assert res.manifest["shard_size"] == 4 and res.manifest["n_shards"] == 2
    pd.testing.assert_frame_equal(res.scores, one_shard.scores, check_exact=True)
    pd.testing.assert_frame_equal(
        pd.read_parquet(tmp_path / "many" / "scores.parquet"), pd.read_parquet(one_shard.run_dir / "scores.parquet")
    )
    assert res.scores.set_index("prompt").loc[MEMORIZED, "wen_rank"] == 1
    records = [RunStore(tmp_path / "many").shard_record(s) for s in range(2)]
    assert [r["rows"]["scores"] for r in records] == [4, 3] and all(r["seconds"] >= 0 for r in records)
    m = res.manifest
    assert m["kind"] == "triage" and m["status"] == "complete" and m["model"]["pipeline"] == "StableDiffusionPipeline"
    assert m["model"]["parameters"] > 0 and m["model"]["dtype"] == "float32"
    # 2 generations × (Wen: 2 per step + Webster's one-step sample: 2, guided)
    assert m["throughput"]["seconds"] > 0 and m["cost"]["unet_evaluations_per_prompt"] == 2 * (2 + 2)
    assert (res.scores["unet_evaluations"] == 8).all() and m["scores"]["wen"]["timesteps"] == [751]


def test_a_stopped_run_resumes_with_the_same_inputs_only(pipe, one_shard, tmp_path):
    out = tmp_path / "r"
    with pytest.raises(MemscanError, match="stopped before all shards were done"):
        triage(pipe, PROMPTS, out, CFG, shard_size=2, progress=False, stop_after_shards=2)
    m = RunStore(out).read_manifest(expect="triage")
    assert m["status"] == "incomplete" and m["n_shards"] == 4
    assert not (out / "scores.parquet").exists() and not (out / "prompts.csv").exists()
    with pytest.raises(MemscanError, match="already holds a run"):
        triage(pipe, PROMPTS, out, CFG, shard_size=2, progress=False)
    other = TriageConfig(**{**CFG.to_dict(), "generations": 4, "batch_size": 8})
    with pytest.raises(MemscanError, match="its config differs"):
        triage(pipe, PROMPTS, out, other, shard_size=2, progress=False, resume=True)
    with pytest.raises(MemscanError, match="its prompts_sha256 differs"):
        triage(pipe, [*PROMPTS[:-1], "another prompt"], out, CFG, shard_size=2, progress=False, resume=True)
    with pytest.raises(MemscanError, match="its model_spec differs"):  # another model: the directory
        triage(str(DATA), PROMPTS, out, CFG, shard_size=2, progress=False, resume=True)
    # a run started under other score definitions (an older memscan's Webster score) is not mixed in
    older = tmp_path / "older"
    shutil.copytree(out, older)
    m_old = json.loads((older / "manifest.json").read_text())
    del m_old["definitions"]
    (older / "manifest.json").write_text(json.dumps(m_old))
    with pytest.raises(MemscanError, match="definitions of its numbers differ"):
        triage(pipe, PROMPTS, older, CFG, shard_size=2, progress=False, resume=True)
    # the ranking options may change on resume: prompts.csv is made from the merged scores
    res = triage(pipe, PROMPTS, out, CFG, shard_size=2, progress=False, resume=True, top=2, score="webster")
    pd.testing.assert_frame_equal(res.scores, one_shard.scores, check_exact=True)
    assert len(res.ranked) == 2 and res.manifest["ranking"]["score"] == "webster"
    assert len(res.manifest["resumed"]) == 1 and res.manifest["started"] == m["started"]
    # the first two shards were not redone: the resume kept them, and logged that it did
    counts = shard_log_counts((out / "run.log").read_text(), 4)
    assert counts == {0: (1, 1), 1: (1, 1), 2: (1, 0), 3: (1, 0)}, (out / "run.log").read_text()


def test_ray_tables_equal_local_tables(ray_address, tmp_path):
    prompts = PROMPTS[:4]
    local = triage(str(DATA), prompts, tmp_path / "local", CFG, shard_size=2, progress=False, top=3)
    ray = triage(
        str(DATA),
        prompts,
        tmp_path / "ray",
        CFG,
        shard_size=2,
        progress=False,
        top=3,
        runner="ray",
        runner_options=RayOptions(num_workers=2),
    )
    assert ray.manifest["n_shards"] == 2
    for name in ("scores.parquet",):
        pd.testing.assert_frame_equal(
            pd.read_parquet(tmp_path / "ray" / name), pd.read_parquet(tmp_path / "local" / name)
        )
    # the same ranking; scores equal up to float32 rounding (torch's thread count differs between
    # the driver and Ray workers, which moves UNet outputs by ~1e-7 relative)
    ray_csv, local_csv = (pd.read_csv(tmp_path / d / "prompts.csv") for d in ("ray", "local"))
    assert ray_csv["prompt_id"].tolist() == local_csv["prompt_id"].tolist()
    pd.testing.assert_series_equal(ray_csv["score"], local_csv["score"], rtol=1e-5)
    assert ray.manifest["runner"]["name"] == "ray" and ray.manifest["runner"]["workers"] == 2
    assert ray.manifest["model"] == local.manifest["model"]  # the parameter count came from a worker
    assert local.manifest["model"]["id"] == str(DATA.resolve()) and local.manifest["model"]["parameters"] > 0
    workers = {RunStore(tmp_path / "ray").shard_record(s)["worker"] for s in range(2)}
    assert all(w.startswith("ray:w") for w in workers), workers


def test_ray_needs_a_model_spec_not_a_loaded_pipeline(pipe, tmp_path):
    pytest.importorskip("ray")
    with pytest.raises(InputError, match="loads the pipeline in each worker"):
        triage(pipe, PROMPTS[:2], tmp_path / "r", CFG, progress=False, runner="ray")


def test_report_shows_ranked_prompts_as_text_cost_and_plot(pipe, tmp_path):
    hostile = '<script>alert("x")</script> a prompt'
    table = pd.DataFrame(
        {
            "prompt_id": ["m", "h", "u1", "u2"],
            "prompt": [MEMORIZED, hostile, "two cats", "a red box"],
            "train_id": ["t-m", "<b>t-h</b>", None, None],
            "duplicate_count": [30, 1, 2, None],
        }
    )
    res = triage(pipe, table, tmp_path / "run", CFG, progress=False)  # no cut: every prompt kept
    path = build_report(tmp_path / "run")
    html = path.read_text()
    assert path == tmp_path / "run" / "report.html"
    assert "<script" not in html.lower() and "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; a prompt" in html
    assert "<b>t-h</b>" not in html and "&lt;b&gt;t-h&lt;/b&gt;" in html
    assert "Content-Security-Policy" in html and html.count("data:image/png;base64,") == 1
    assert "against its training-set duplicate count" in html
    assert (
        "none (all prompts)" in html and "4 kept" in html and "50,000" in html and "1.60e-04" in html
    )  # cost: 8 of 50,000 evaluations
    # the ranked prompts in prompts.csv's order, both scores shown
    first = res.ranked["prompt_id"].tolist()
    assert [html.index(f"<code>{p}</code>") for p in first] == sorted(html.index(f"<code>{p}</code>") for p in first)
    assert f"{res.ranked['webster_score'].iloc[0]:.5g}" in html


def test_report_states_the_cost_of_each_computed_score_and_shows_only_those(pipe, one_shard, tmp_path):
    """Both scores: the cost per prompt written out per score (guided, no negative prompt: Wen 2
    per generation and step, Webster 2 per generation); a wen-only run: no Webster column, plot
    or cost, and half the evaluations."""
    html = build_report(one_shard.run_dir, tmp_path / "both.html").read_text()
    assert "wen: 2 generations × 1 step(s) × 2 = 4; webster: 2 generations × 2 = 4" in html
    assert "<th>webster_score</th>" in html
    wen_only = TriageConfig(**{**CFG.to_dict(), "scores": ("wen",)})
    res = triage(pipe, PROMPTS, tmp_path / "wen", wen_only, progress=False, top=3)
    assert res.manifest["cost"]["unet_evaluations_per_prompt"] == 4 and list(res.manifest["definitions"]) == ["wen"]
    html = build_report(tmp_path / "wen").read_text()
    assert "wen: 2 generations × 1 step(s) × 2 = 4)" in html and "webster" not in html.lower()
    assert "<th>wen_score</th>" in html and html.count("data:image/png;base64,") == 1
    # a resume is the same run: other scores are another config
    with pytest.raises(MemscanError, match="its config differs"):
        triage(pipe, PROMPTS, tmp_path / "wen", CFG, progress=False, resume=True)


def test_report_of_a_run_without_duplicate_counts_and_of_an_old_run(one_shard, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(one_shard.run_dir, old)
    (old / "report.html").unlink(missing_ok=True)
    m = json.loads((old / "manifest.json").read_text())
    # a run made before the one lifecycle: "command", memscan_run 1, no status, no model record
    for key in ("kind", "status", "n_shards", "shard_size", "runner", "prompts_sha256", "versions"):
        m.pop(key, None)
    m.update(
        command="triage",
        memscan_run=1,
        model={"source": str(DATA), "pipeline": "StableDiffusionPipeline", "dtype": "float32"},
    )
    (old / "manifest.json").write_text(json.dumps(m))
    html = build_report(old).read_text()
    assert "shown as histograms" in html and MEMORIZED in html


def test_report_refuses_an_unfinished_run(pipe, tmp_path):
    with pytest.raises(MemscanError):
        triage(pipe, PROMPTS, tmp_path / "r", CFG, shard_size=2, progress=False, stop_after_shards=1)
    with pytest.raises(MemscanError, match="not complete"):
        build_report(tmp_path / "r")


def test_report_of_a_damaged_triage_run_is_one_clean_error(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "manifest.json").write_text('{"kind": "triage", "status": "complete"}')
    with pytest.raises(MemscanError, match="scores.parquet is missing"):
        build_report(run)
    pd.DataFrame({"prompt_id": ["a"], "wen_score": [1.0], "webster_score": [1.0]}).to_parquet(run / "scores.parquet")
    with pytest.raises(MemscanError, match="has no config"):
        build_report(run)


def test_a_failing_pipeline_ends_cleanly_naming_the_prompts_and_resume_finishes(pipe, one_shard, tmp_path, monkeypatch):
    import memscan.triage.worker as worker
    from memscan.errors import UserCodeError

    real = worker.score_prompts

    def oom_on_the_second_batch(model, ids, prompts, config):
        if ids[0] == "p2":
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(model, ids, prompts, config)

    monkeypatch.setattr(worker, "score_prompts", oom_on_the_second_batch)
    out = tmp_path / "r"
    with pytest.raises(
        UserCodeError, match=r"the pipeline failed on prompts p2…p3: RuntimeError: CUDA out of memory"
    ) as err:
        triage(pipe, PROMPTS, out, CFG, shard_size=2, progress=False)
    assert "--batch-size" in err.value.hint and "--resume" in err.value.hint
    assert RunStore(out).read_manifest()["status"] == "incomplete" and RunStore(out).shard_done(0)
    monkeypatch.setattr(worker, "score_prompts", real)
    res = triage(pipe, PROMPTS, out, CFG, shard_size=2, progress=False, resume=True)
    pd.testing.assert_frame_equal(res.scores, one_shard.scores, check_exact=True)


def test_cli_ray_options_need_the_ray_runner(tmp_path):
    from typer.testing import CliRunner

    from memscan.cli import app

    (tmp_path / "p.txt").write_text("a prompt\n")
    args = ["triage", "--model", str(DATA), "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "r")]
    res = CliRunner().invoke(app, [*args, "--num-workers", "2", "--quiet"])
    assert res.exit_code == 2 and "--num-workers applies to --runner ray only" in res.output
    res = CliRunner().invoke(app, [*args, "--runner", "spark", "--quiet"])
    assert res.exit_code == 2 and "unknown runner 'spark'" in res.output
    assert not (tmp_path / "r").exists()  # nothing written for a refused invocation


def test_triage_checks_a_prompts_table_as_extract_does():
    """A table or list handed to triage (and so to the audit) passes extract's checks: a
    duplicate_count that is not an integer, repeated ids, no prompts — one error each, before
    any model loads (the checks: memscan.data.prompts.validate_prompt_table)."""
    import pandas as pd

    from memscan.errors import InputError
    from memscan.triage.run import prompt_table

    with pytest.raises(InputError, match=r"'12 copies'"):
        prompt_table(
            pd.DataFrame({"prompt_id": ["a", "b"], "prompt": ["x", "y"], "duplicate_count": ["3", "12 copies"]})
        )
    with pytest.raises(InputError, match="repeats prompt ids: a"):
        prompt_table(pd.DataFrame({"prompt_id": ["a", "a"], "prompt": ["x", "y"]}))
    with pytest.raises(InputError, match="no prompts"):
        prompt_table([])
    df, info = prompt_table(pd.DataFrame({"prompt_id": [1], "prompt": ["x"], "duplicate_count": [4.0]}))
    assert df["prompt_id"].tolist() == ["1"] and df["duplicate_count"].tolist() == [4] and info["source"] == "<table>"

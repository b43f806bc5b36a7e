"""Triage of an SDXL-style pipeline (two text encoders, pooled text embeds + time ids as added
conditioning, zero embeddings as the unconditional input), computed by hand from the pipeline's
parts, and ``memscan audit`` through a tiny SDXL pipeline built from config."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from memscan.cli import app
from memscan.generators.seeds import derive_seed

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    from memscan.testing.tiny_sdxl import save_tiny_sdxl

    return save_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "model")


def _by_hand(pipe, prompts, pids, seed, generations, guidance, steps_in_schedule):
    """Wen's ||ε(x_T, c) − ε(x_T, ∅)|| and Webster's one-step change, from the pipeline's parts:
    each encoder's penultimate hidden states concatenated, the second encoder's projected pooled
    output, time ids (32, 32, 0, 0, 32, 32), zeros as ∅ (force_zeros_for_empty_prompt)."""
    import torch
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(steps_in_schedule)
    t = sched.timesteps[0]
    wen, web = np.zeros(len(prompts)), np.zeros(len(prompts))
    for k, (pid, prompt) in enumerate(zip(pids, prompts)):
        hidden, pooled = [], None
        for tok, enc in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
            ids = tok([prompt], padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids  # fmt: skip
            with torch.no_grad():
                out = enc(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = getattr(out, "text_embeds", None)
        c = torch.cat(hidden, dim=-1)
        time_ids = torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]])
        for i in range(generations):
            g = torch.Generator("cpu").manual_seed(derive_seed(seed, pid, i))
            x = torch.randn((1, 4, 16, 16), generator=g) * sched.init_noise_sigma
            with torch.no_grad():
                eps_c = pipe.unet(x, t, encoder_hidden_states=c,
                                  added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample  # fmt: skip
                eps_u = pipe.unet(x, t, encoder_hidden_states=torch.zeros_like(c),
                                  added_cond_kwargs={"text_embeds": torch.zeros_like(pooled), "time_ids": time_ids}).sample  # fmt: skip
            wen[k] += float((eps_c - eps_u).flatten().norm()) / generations
            x1 = sched.step(eps_u + guidance * (eps_c - eps_u), t, x).prev_sample
            web[k] += float(((x - x1) ** 2).mean()) / generations
    return wen, web


def test_sdxl_triage_scores_match_a_computation_from_the_pipelines_parts(sdxl_dir):
    from memscan.generators.text2image import load_pipeline
    from memscan.triage import SDXLTriageModel, TriageConfig, score_prompts
    from memscan.triage.scores import text2image_triage_model

    pipe = load_pipeline(str(sdxl_dir))
    model = text2image_triage_model(pipe)
    assert isinstance(model, SDXLTriageModel) and model.resolution == (32, 32)
    prompts, pids = ["a red fox in snow", "two cats", "purple tulips"], ["p0", "p1", "p2"]
    cfg = TriageConfig(generations=2, steps=1, num_inference_steps=4, guidance_scale=3.0, batch_size=4, seed=3)
    got = score_prompts(model, pids, prompts, cfg)
    wen, web = _by_hand(pipe, prompts, pids, 3, 2, 3.0, 4)
    np.testing.assert_allclose(got["wen"], wen, rtol=1e-4)
    np.testing.assert_allclose(got["webster"], web, rtol=1e-4)
    assert got["wen"].min() > 0 and len(set(np.round(got["wen"], 6))) == 3  # the prompts differ
    assert got["unet_evaluations_per_prompt"] == 4


def test_other_added_conditioning_is_refused_with_the_reason(sdxl_dir):
    from memscan.audit.support import triage_gap
    from memscan.errors import InputError
    from memscan.generators.text2image import Text2ImageGenerator, load_pipeline
    from memscan.triage import TriageModel

    pipe = load_pipeline(str(sdxl_dir))
    # the single-encoder scorer does not supply SDXL's added conditioning
    with pytest.raises(InputError, match="text_time"):
        TriageModel(pipe)
    assert triage_gap(Text2ImageGenerator(pipe, num_inference_steps=2)) is None
    pipe.unet.register_to_config(addition_embed_type="image")
    assert "'image'" in triage_gap(Text2ImageGenerator(pipe, num_inference_steps=2))


def test_audit_runs_through_a_tiny_sdxl_pipeline(sdxl_dir, tmp_path):
    """Candidates from the captions → SDXL triage (no fallback) → adaptive extraction → verification."""
    from memscan.generators.text2image import load_pipeline
    from memscan.synthetic import training_image
    from memscan.testing.tiny_sd import as_the_pipeline_sees_it

    pipe = load_pipeline(str(sdxl_dir))
    train = tmp_path / "train"
    train.mkdir()
    captions = ["a red fox in snow", "two cats", "purple tulips"]
    raw = np.stack([training_image(f"t{i}", 32) for i in range(3)])
    for i, (img, cap) in enumerate(zip(as_the_pipeline_sees_it(pipe, raw), captions)):
        for c in range(2 if i == 0 else 1):
            Image.fromarray(img).save(train / f"t{i}_{c}.png")
            (train / f"t{i}_{c}.txt").write_text(cap + "\n")
    out = tmp_path / "run"
    res = CliRunner().invoke(app, [str(a) for a in [
        "audit", "--model", sdxl_dir, "--train", train, "--out", out, "--samples-per-prompt", 4,
        "--first-round", 2, "--round-size", 2, "--min-clique", 2, "--batch-size", 4, "--round-prompts", 3, "--top", 3,
        "--quiet", "--no-report"]], catch_exceptions=False)  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "falling back" not in res.output
    m = json.loads((out / "manifest.json").read_text())
    tri = m["stages"]["triage"]
    # 3 candidates × 4 generations × 1 step × 2 (conditional and unconditional)
    assert not tri.get("skipped") and tri["evaluations"] == 3 * 4 * 1 * 2
    scores = pd.read_parquet(out / "scores.parquet")
    assert len(scores) == 3 and np.isfinite(scores["wen_score"]).all() and (scores["wen_score"] > 0).all()
    det = pd.read_parquet(out / "detections.parquet")
    assert len(det) == 3 and set(det["n_samples"]) <= {2, 4}
    per_image = m["budget"]["evaluations_per_generation"]
    assert per_image == 4 * 2  # 4 Euler steps, guided
    assert m["evaluations_total"] == tri["evaluations"] + m["stages"]["extract"]["evaluations"]

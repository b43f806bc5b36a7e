"""Triage of an SDXL-style pipeline (two text encoders, pooled text embeds + time ids as added
conditioning, zero embeddings as the empty prompt, the negative prompt as guidance's
unconditional input), computed by hand from the pipeline's parts, and ``memscan audit`` through a
tiny SDXL pipeline built from config."""

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


def _encode(pipe, prompt):
    """Each encoder's penultimate hidden states concatenated, and the second encoder's projected
    pooled output (as SDXL conditions its UNet)."""
    import torch

    hidden, pooled = [], None
    for tok, enc in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        ids = tok([prompt], padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids  # fmt: skip
        with torch.no_grad():
            out = enc(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = getattr(out, "text_embeds", None)
    return torch.cat(hidden, dim=-1), pooled


def _by_hand(pipe, prompts, pids, seed, generations, guidance, steps_in_schedule, negative=None, size=32):
    """Wen's ||ε(x_T, c) − ε(x_T, ∅)|| and Webster's one-step change, from the pipeline's parts:
    time ids (size, size, 0, 0, size, size), zeros as ∅ (force_zeros_for_empty_prompt), the
    encoded ``negative`` prompt (when given) as guidance's unconditional input. Webster: one Euler
    step from σ_max to 0 in k-diffusion's VE space (z_T = σ_max·n, D(z) = z − σ·ε̂(z/sqrt(σ²+1),
    T − 1)), σ = sqrt((1 − ᾱ)/ᾱ) from the scheduler's alphas_cumprod."""
    import torch
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(steps_in_schedule)
    t = sched.timesteps[0]
    acp = sched.alphas_cumprod.double()
    s_max, t_last = ((1 - acp[-1]) / acp[-1]).sqrt(), len(acp) - 1
    time_ids = torch.tensor([[float(size), float(size), 0.0, 0.0, float(size), float(size)]])
    wen, web = np.zeros(len(prompts)), np.zeros(len(prompts))
    for k, (pid, prompt) in enumerate(zip(pids, prompts)):
        c, pooled = _encode(pipe, prompt)
        e, pooled_e = torch.zeros_like(c), torch.zeros_like(pooled)
        n, pooled_n = (e, pooled_e) if negative is None else _encode(pipe, negative)

        def eps(x, step, hidden, text):
            with torch.no_grad():
                return pipe.unet(x, step, encoder_hidden_states=hidden,
                                 added_cond_kwargs={"text_embeds": text, "time_ids": time_ids}).sample.double()  # fmt: skip

        for i in range(generations):
            g = torch.Generator("cpu").manual_seed(derive_seed(seed, pid, i))
            noise = torch.randn((1, 4, size // 2, size // 2), generator=g)
            x = noise * sched.init_noise_sigma
            wen[k] += float((eps(x, t, c, pooled) - eps(x, t, e, pooled_e)).flatten().norm()) / generations
            z_T = s_max * noise.double()
            x_in = (z_T / (s_max**2 + 1).sqrt()).float()
            e_c, e_n = eps(x_in, t_last, c, pooled), eps(x_in, t_last, n, pooled_n)
            denoised = z_T - s_max * (e_n + guidance * (e_c - e_n))
            z_0 = z_T + (z_T - denoised) / s_max * (0.0 - s_max)  # Euler to σ = 0
            web[k] += float(((z_T - z_0) ** 2).mean()) / generations
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
    assert got["unet_evaluations_per_prompt"] == 2 * (2 + 2)  # Wen's step and Webster's, guided


def test_sdxl_triage_follows_the_generators_resolution_and_negative_prompt(sdxl_dir):
    """Through the extraction's Text2ImageGenerator at 64×64 (native 32×32) with a negative
    prompt: latents of 32×32 with time ids of 64 (as the pipeline samples), c_empty stays the
    pipeline's empty prompt (zeros), and guidance uses the encoded negative prompt."""
    import torch

    from memscan.generators.text2image import Text2ImageGenerator, load_pipeline
    from memscan.triage import TriageConfig, score_prompts
    from memscan.triage.worker import setup_triage

    pipe = load_pipeline(str(sdxl_dir))
    gen = Text2ImageGenerator(pipe, height=64, width=64, num_inference_steps=4, guidance_scale=3.0,
                              negative_prompt="blurry")  # fmt: skip
    cfg = TriageConfig(generations=2, steps=1, num_inference_steps=4, guidance_scale=3.0, batch_size=4, seed=3)
    model = setup_triage(gen, cfg).model
    seeds = [derive_seed(3, "p0", i) for i in range(2)]
    assert torch.equal(model.initial_latents("p0", range(2), 3), gen.initial_latents("", seeds, gen.generators(seeds)))
    prompts, pids = ["a red fox in snow", "two cats"], ["p0", "p1"]
    got = score_prompts(model, pids, prompts, cfg)
    wen, web = _by_hand(pipe, prompts, pids, 3, 2, 3.0, 4, negative="blurry", size=64)
    np.testing.assert_allclose(got["wen"], wen, rtol=1e-4)
    np.testing.assert_allclose(got["webster"], web, rtol=1e-4)
    assert got["unet_evaluations_per_prompt"] == 2 * (3 + 2)  # c, ∅ and the negative prompt; Webster 2


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
    import memscan.triage.worker as worker

    with pytest.MonkeyPatch.context() as mp:
        calls = _count_triage_calls(mp, worker)
        res = CliRunner().invoke(app, [str(a) for a in [
            "audit", "--model", sdxl_dir, "--train", train, "--out", out, "--samples-per-prompt", 4,
            "--first-round", 2, "--round-size", 2, "--min-clique", 2, "--batch-size", 4, "--round-prompts", 3, "--top", 3,
            "--quiet", "--no-report"]], catch_exceptions=False)  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "falling back" not in res.output
    m = json.loads((out / "manifest.json").read_text())
    tri = m["stages"]["triage"]
    # only wen (the ranking score): counted at the UNet, 3 candidates × 4 generations × 1 step ×
    # (the prompt, the empty prompt); guided, no negative prompt
    assert not tri.get("skipped") and tri["evaluations"] == sum(calls) == 3 * 4 * 1 * 2
    scores = pd.read_parquet(out / "scores.parquet")
    assert len(scores) == 3 and np.isfinite(scores["wen_score"]).all() and (scores["wen_score"] > 0).all()
    det = pd.read_parquet(out / "detections.parquet")
    assert len(det) == 3 and set(det["n_samples"]) <= {2, 4}
    per_image = m["budget"]["evaluations_per_generation"]
    assert per_image == 4 * 2  # 4 Euler steps, guided
    assert m["evaluations_total"] == tri["evaluations"] + m["stages"]["extract"]["evaluations"]


def _count_triage_calls(mp, worker) -> list[int]:
    """Count every latent the UNet sees inside triage's ``score_prompts`` (a forward hook: one
    UNet evaluation per latent), not through memscan's own bookkeeping."""
    calls: list[int] = []
    real = worker.score_prompts

    def score_prompts(model, *args, **kwargs):
        hook = model.unet.register_forward_hook(lambda m, a, out: calls.append(int(a[0].shape[0])))
        try:
            return real(model, *args, **kwargs)
        finally:
            hook.remove()

    mp.setattr(worker, "score_prompts", score_prompts)
    return calls


def test_the_audits_triage_uses_the_extractions_resolution_and_negative_prompt(sdxl_dir, tmp_path):
    """An audit of a GeneratorSpec at 64×64 (native 32×32) with a negative prompt, as each worker
    loads it: triage draws the extraction's latents and guides with its negative prompt (Wen over
    2 steps, so the second step's latent depends on it) — the scores of a triage of the very
    generator the extraction samples with — and pays 3 UNet evaluations per generation and step."""
    import memscan.triage.worker as worker
    from memscan.audit import AuditBudget, audit, default_extract_config
    from memscan.generators.text2image import Text2ImageGenerator, load_pipeline
    from memscan.runners import GeneratorSpec
    from memscan.synthetic import training_image
    from memscan.testing.tiny_sd import as_the_pipeline_sees_it
    from memscan.triage import TriageConfig, score_prompts
    from memscan.triage.worker import setup_triage

    pipe = load_pipeline(str(sdxl_dir))
    captions = ["a red fox in snow", "two cats"]
    train = tmp_path / "train"
    train.mkdir()
    for i, img in enumerate(as_the_pipeline_sees_it(pipe, np.stack([training_image(f"t{i}", 64) for i in range(2)]))):
        Image.fromarray(img).save(train / f"t{i}.png")
    load = {"height": 64, "width": 64, "negative_prompt": "blurry", "num_inference_steps": 4, "guidance_scale": 3.0}
    cfg = default_extract_config(2, first_round=2, round_size=2, min_clique=2, batch_size=2)
    tcfg = TriageConfig(generations=2, steps=2, batch_size=4, seed=0)
    with pytest.MonkeyPatch.context() as mp:
        calls = _count_triage_calls(mp, worker)
        res = audit(GeneratorSpec(str(sdxl_dir), load), train, tmp_path / "run", prompts=captions, config=cfg,
                    triage_config=tcfg, budget=AuditBudget(top=2), progress=False)  # fmt: skip
    tri = res.manifest["stages"]["triage"]
    assert tri["evaluations"] == sum(calls) == 2 * 2 * 2 * 3  # 2 prompts × 2 generations × 2 steps × (c, ∅, negative)
    assert tri["config"]["height"] == tri["config"]["width"] == 64 and tri["config"]["negative_prompt"] == "blurry"
    # the triage of the extraction's own generator, through the same triage code
    gen = Text2ImageGenerator(pipe, batch_size=2, **load)
    tcfg = TriageConfig(**{**tcfg.to_dict(), "num_inference_steps": 4, "guidance_scale": 3.0, "scores": ("wen",)})
    want = score_prompts(setup_triage(gen, tcfg).model, ["p0", "p1"], captions, tcfg)["wen"]
    got = res.scores.set_index("prompt_id").loc[["p0", "p1"], "wen_score"].to_numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # what the spec alone (native size, no negative prompt) scores differs: the options mattered
    bare = score_prompts(setup_triage(str(sdxl_dir), tcfg).model, ["p0", "p1"], captions, tcfg)["wen"]
    assert not np.allclose(bare, want, rtol=1e-3)

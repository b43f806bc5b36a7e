"""Webster's score of a v-prediction model (Salimans & Ho 2022), against a computation written out
here: the tiny SD pipeline built from config, its scheduler set to ``prediction_type="v_prediction"``,
the UNet called directly and its ``v̂`` turned into ``ε̂`` by diffusers' convention (not by
memscan's conversion, :func:`memscan.generators.noise.to_epsilon`)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from memscan.generators.seeds import derive_seed
from memscan.triage import TriageConfig, TriageModel, score_prompts

pytest.importorskip("transformers")

PROMPTS = ["a red fox in snow", "two cats"]
IDS = ["p0", "p1"]
# a short linear schedule, so that ᾱ_{T−1} ≈ 0.35: both terms of ε = √ᾱ·v + √(1−ᾱ)·x_t weigh
# (with SD's schedule, ᾱ_{T−1} ≈ 0.005, ε̂ would be almost x_t whatever v̂ is)
SCHEDULE = {"prediction_type": "v_prediction", "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 2e-3}


@pytest.fixture(scope="module")
def pipe():
    from diffusers import DDIMScheduler

    from memscan.testing.tiny_sd import build_tiny_sd

    pipe = build_tiny_sd()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, **SCHEDULE)
    return pipe


def test_the_velocity_convention_is_diffusers(pipe):
    """``ε = √ᾱ·v + √(1−ᾱ)·x_t`` inverts diffusers' ``v = √ᾱ·ε − √(1−ᾱ)·x_0`` with its
    ``x_t = √ᾱ·x_0 + √(1−ᾱ)·ε`` (``get_velocity``, ``add_noise``) — the convention the reference
    below uses, as diffusers' DDIM step does for ``v_prediction``."""
    import torch

    sched = pipe.scheduler
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn((2, 4, 8, 8), generator=g), torch.randn((2, 4, 8, 8), generator=g)
    t = torch.tensor([999, 500])
    v = sched.get_velocity(x0, eps, t)
    x_t = sched.add_noise(x0, eps, t)
    a = sched.alphas_cumprod[t].double().view(-1, 1, 1, 1)
    back = a.sqrt() * v.double() + (1 - a).sqrt() * x_t.double()
    torch.testing.assert_close(back, eps.double(), rtol=1e-5, atol=1e-5)


def _encode(pipe, prompts):
    """Our own tokenisation and text encoding (not encode_prompt)."""
    import torch

    tok = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        return pipe.text_encoder(tok.input_ids)[0]


def _webster_by_hand(pipe, prompt: str, pid: str, generations: int, guidance: float, seed: int = 0):
    """Webster's score per generation of a v-prediction model: the UNet's ``v̂`` at the last
    training timestep ``T − 1`` for the input ``x_t = √(1−ᾱ)·n``, ``ε̂ = √ᾱ·v̂ + √(1−ᾱ)·x_t``
    (diffusers' convention), guided ``ε̂_u + g·(ε̂_c − ε̂_u)`` (the conditional one when ``g ≤ 1``),
    and ``σ_max²·mean(ε̂²)`` with ``σ_max² = (1 − ᾱ)/ᾱ``. Also returns what the score would be with
    ``v̂`` taken for ``ε̂`` (to show the conversion matters here)."""
    import torch

    c, u = _encode(pipe, [prompt, ""]).chunk(2)
    acp = pipe.scheduler.alphas_cumprod.double()
    t_last = len(acp) - 1
    a = float(acp[t_last])
    sigma2 = (1.0 - a) / a
    shape = (pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    scores, as_eps = [], []
    for i in range(generations):
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(derive_seed(seed, pid, i)))[None]
        x_t = (noise.double() * math.sqrt(1.0 - a)).float()
        with torch.no_grad():
            v_c, v_u = (pipe.unet(x_t, t_last, encoder_hidden_states=e).sample.double() for e in (c, u))
        e_c, e_u = (math.sqrt(a) * v + math.sqrt(1.0 - a) * x_t.double() for v in (v_c, v_u))
        guided = e_u + guidance * (e_c - e_u) if guidance > 1 else e_c
        scores.append(sigma2 * float((guided**2).mean()))
        raw = v_u + guidance * (v_c - v_u) if guidance > 1 else v_c
        as_eps.append(sigma2 * float((raw**2).mean()))
    return np.array(scores), np.array(as_eps)


@pytest.mark.parametrize("guidance", [3.0, 1.0])
def test_webster_of_a_v_prediction_model_matches_the_definition(pipe, guidance):
    model = TriageModel(pipe)
    assert model.scheduler.config.prediction_type == "v_prediction"
    cfg = TriageConfig(generations=2, guidance_scale=guidance, scores=("webster",), batch_size=4)
    got = score_prompts(model, IDS, PROMPTS, cfg)
    for k in range(len(PROMPTS)):
        want, as_eps = _webster_by_hand(pipe, PROMPTS[k], IDS[k], 2, guidance)
        np.testing.assert_allclose(got["webster_per_generation"][k], want, rtol=1e-5)
        # the conversion matters for this model: v̂ read as ε̂ would score far off
        assert not np.allclose(as_eps, want, rtol=0.05), (as_eps, want)
    # one UNet call per generation and conditioning: the prompt and the empty prompt when guided
    assert got["unet_evaluations_per_prompt"] == 2 * (2 if guidance > 1 else 1)

"""Triage scores (Wen et al. 2024; Webster 2023) on the tiny pipeline fine-tuned to memorize one
image–caption pair (tests/data/tiny_sd_memorized, made by ``python -m memscan.testing.tiny_sd
tests/data/tiny_sd_memorized --memorized 1``; its memscan.json holds the recipe and log)."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import run_cli

from memscan.data.prompts import load_prompts
from memscan.errors import InputError, MemscanError
from memscan.generators.seeds import derive_seed
from memscan.generators.text2image import load_pipeline
from memscan.triage import TriageConfig, TriageModel, score_prompts, select_ranked, triage

DATA = Path(__file__).parent / "data" / "tiny_sd_memorized"
META = json.loads((DATA / "memscan.json").read_text())
MEMORIZED = META["finetune"]["memorized"][0]["caption"]
SEEN = [META["finetune"]["other_captions"][k] for k in (3, 17, 40)]  # trained on, with random images
UNSEEN = ["a yellow tram", "two cats", "a quiet harbour", "snowy peaks", "a red box"]
PROMPTS = [MEMORIZED, *SEEN, *UNSEEN]
IDS = [f"q{i}" for i in range(len(PROMPTS))]
CFG = TriageConfig(generations=4, steps=1, num_inference_steps=10, guidance_scale=3.0)


@pytest.fixture(scope="module")
def model():
    return TriageModel(load_pipeline(str(DATA)))


@pytest.fixture(scope="module")
def scores(model):
    return score_prompts(model, IDS, PROMPTS, CFG)


def test_memorized_prompt_ranks_above_unrelated_prompts(scores):
    for name in ("wen", "webster"):
        s = scores[name]
        assert int(np.argmax(s)) == 0, (name, dict(zip(PROMPTS, np.round(s, 4))))
        # a clear margin over the runner-up, not a tie
        assert s[0] > 1.2 * np.sort(s)[-2], (name, s)


def test_scores_are_deterministic_under_a_seed(model, scores):
    again = score_prompts(model, IDS, PROMPTS, CFG)
    for name in ("wen", "webster"):
        assert np.array_equal(again[name], scores[name])
    other = score_prompts(model, IDS[:2], PROMPTS[:2], TriageConfig(**{**CFG.to_dict(), "seed": 1}))
    assert not np.array_equal(other["wen"], scores["wen"][:2])
    # a prompt's score does not depend on which other prompts share its batch
    alone = score_prompts(model, IDS[3:4], PROMPTS[3:4], CFG)
    np.testing.assert_allclose(alone["wen"], scores["wen"][3:4], rtol=1e-5)


def _by_hand(model, prompt: str, pid: str, generations: int):
    """Wen and Webster per generation from the definitions, without score_prompts' code path:
    our own tokenisation and text encoding, UNet calls, and the DDIM update written out."""
    import torch

    pipe, unet = model.pipe, model.unet
    tok = pipe.tokenizer(
        [prompt, ""], padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt"
    )
    with torch.no_grad():
        emb = pipe.text_encoder(tok.input_ids)[0]
    sched = model.scheduler
    sched.set_timesteps(10)
    t = int(sched.timesteps[0])
    t_prev = t - sched.config.num_train_timesteps // 10
    acp = sched.alphas_cumprod.double()
    a_t = acp[t]
    a_prev = acp[t_prev] if t_prev >= 0 else sched.final_alpha_cumprod.double()
    wen, web = [], []
    for i in range(generations):
        g = torch.Generator().manual_seed(derive_seed(0, pid, i))
        z0 = torch.randn(model.latent_shape, generator=g)[None]
        with torch.no_grad():
            e_c = unet(z0, t, encoder_hidden_states=emb[:1]).sample.double()
            e_u = unet(z0, t, encoder_hidden_states=emb[1:]).sample.double()
        wen.append(float((e_c - e_u).flatten().norm()))
        eps = e_u + 3.0 * (e_c - e_u)
        x0 = (z0.double() - (1 - a_t).sqrt() * eps) / a_t.sqrt()  # DDIM, eta = 0 (Song et al. 2021, eq. 12)
        z1 = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        web.append(float(((z0.double() - z1) ** 2).mean()))
    return np.array(wen), np.array(web)


def test_scores_match_the_definitions(model, scores):
    for k in (0, 4):
        wen, web = _by_hand(model, PROMPTS[k], IDS[k], CFG.generations)
        np.testing.assert_allclose(scores["wen_per_generation"][k], wen, rtol=1e-4)
        np.testing.assert_allclose(scores["webster_per_generation"][k], web, rtol=1e-3)
        assert scores["wen"][k] == pytest.approx(wen.mean(), rel=1e-4)
    assert scores["unet_evaluations_per_prompt"] == 2 * 4 * 1


def test_cli_triage_writes_scores_and_a_ranked_file_extract_reads(tmp_path):
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    run = tmp_path / "triage"
    proc = run_cli(
        "triage",
        "--model",
        DATA,
        "--prompts",
        tmp_path / "prompts.txt",
        "--out",
        run,
        "--top",
        3,
        "--num-inference-steps",
        10,
        "--guidance-scale",
        3.0,
        "--quiet",
    )
    table = pd.read_parquet(run / "scores.parquet")
    assert len(table) == len(PROMPTS) and {"wen_score", "webster_score", "wen_rank", "unet_evaluations"} <= set(table)
    assert table.set_index("prompt").loc[MEMORIZED, "wen_rank"] == 1
    ranked, _ = load_prompts(run / "prompts.csv")  # what `memscan extract --prompts` reads
    assert len(ranked) == 3 and ranked["prompt"].iloc[0] == MEMORIZED
    assert ranked["prompt_id"].iloc[0] == "line-1"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["cost"]["unet_evaluations_per_prompt"] == 8
    assert manifest["cost"]["full_attack_unet_evaluations_per_prompt"] == 500 * 50 * 2
    assert manifest["config"]["num_inference_steps"] == 10
    assert "3 kept" in proc.stdout
    again = run_cli("triage", "--model", DATA, "--prompts", tmp_path / "prompts.txt", "--out", run, check=False)
    # one run lifecycle (issue 12): the refusal is open_run's, and it points at --resume
    assert again.returncode == 2 and "already holds a run" in again.stderr and "--resume" in again.stderr


def test_min_score_and_top_cuts(tmp_path, model):
    res = triage(model.pipe, PROMPTS, tmp_path / "t", CFG, score="webster", min_score=0.0)
    assert len(res.ranked) == len(PROMPTS)
    cut = float(res.scores["webster_score"].sort_values().iloc[-2])
    kept = select_ranked(res.scores, "webster", min_score=cut)
    assert kept["prompt"].tolist()[0] == MEMORIZED and len(kept) == 2
    assert (kept["webster_score"] >= cut).all()
    with pytest.raises(InputError, match="unknown score"):
        select_ranked(res.scores, "loss")


def test_triage_refuses_a_unet2d_model(tmp_path):
    from diffusers import UNet2DModel

    UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 8),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        layers_per_block=1,
    ).save_pretrained(tmp_path / "m")
    # an unconditional UNet has no prompt to score (class-conditional ones are scored: test_audit.py)
    with pytest.raises(MemscanError, match="unconditional UNet2DModel"):
        triage(str(tmp_path / "m"), ["a"], tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before the run directory


def test_finetune_lowers_the_memorized_pairs_loss():
    """A few steps of the fine-tuning recipe on a very small pipeline lower the ε-prediction error
    on the memorized pair (measured at fixed noise and timesteps before and after)."""
    import torch

    from memscan.synthetic import training_image
    from memscan.testing.tiny_sd import FinetuneConfig, TinySDConfig, build_tiny_sd, encode_images, finetune_tiny_sd

    pipe = build_tiny_sd(TinySDConfig(unet_channels=(8, 16), vae_channels=(8, 8), text_dim=16, max_length=16))
    image = training_image("m0000", 32)
    pool = np.stack([training_image(f"t{i:04d}", 32) for i in range(4)])
    z = encode_images(pipe, image[None])
    tok = pipe.tokenizer(["a fox"], padding="max_length", max_length=16, return_tensors="pt")
    emb = pipe.text_encoder(tok.input_ids)[0].detach()
    g = torch.Generator().manual_seed(5)
    t = torch.tensor([100, 400, 700, 900])
    noise = torch.randn((4, *z.shape[1:]), generator=g)
    acp = pipe.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = acp.sqrt() * z + (1 - acp).sqrt() * noise

    def err():
        with torch.no_grad():
            return float(((pipe.unet(x_t, t, encoder_hidden_states=emb.expand(4, -1, -1)).sample - noise) ** 2).mean())

    before = err()
    losses = finetune_tiny_sd(
        pipe, [(image, "a fox")], pool, ["x", "y"], FinetuneConfig(steps=40, batch_size=8, lr=3e-3)
    )
    assert len(losses) == 40 and np.isfinite(losses).all()
    assert err() < 0.7 * before, (before, err())


def test_training_pairs_memorized_pool_and_paired_pool():
    """draw_pairs: a memorized draw is image i with caption i; the default pool draws image and
    caption independently (the recipe's original RNG order); ``paired`` draws pool pair j."""
    import torch

    from memscan.testing.tiny_sd import FinetuneConfig, draw_pairs

    w = torch.tensor([0.7, 0.3], dtype=torch.float64)
    cfg = FinetuneConfig(batch_size=4000, memorized_share=0.5)
    img, cap = draw_pairs(torch.Generator().manual_seed(1), cfg, w, 2, 10, 30)
    mem = img < 2
    assert (cap[mem] == img[mem]).all() and 0.45 < mem.float().mean() < 0.55
    assert img[~mem].max() == 11 and cap[~mem].max() == 31  # pool images 2..11, captions 2..31
    assert (img[~mem] != cap[~mem]).float().mean() > 0.8  # independent draws
    # the same stream by hand: rand, multinomial, then image and caption draws
    g = torch.Generator().manual_seed(1)
    m_ = torch.rand(4000, generator=g) < 0.5
    which = torch.multinomial(w, 4000, replacement=True, generator=g)
    ref_img = torch.where(m_, which, torch.randint(2, 12, (4000,), generator=g))
    ref_cap = torch.where(m_, which, torch.randint(2, 32, (4000,), generator=g))
    assert torch.equal(img, ref_img) and torch.equal(cap, ref_cap)
    img, cap = draw_pairs(torch.Generator().manual_seed(1), FinetuneConfig(batch_size=4000, paired=True), w, 2, 10, 10)
    assert torch.equal(img, cap) and set(img.tolist()) == set(range(12))


def test_paired_training_needs_a_caption_per_pool_image():
    from memscan.synthetic import training_image
    from memscan.testing.tiny_sd import FinetuneConfig, build_tiny_sd, finetune_tiny_sd

    pipe = build_tiny_sd()
    pool = np.stack([training_image(f"t{i:04d}", 32) for i in range(3)])
    with pytest.raises(ValueError, match="one caption per pool image"):
        finetune_tiny_sd(
            pipe, [(pool[0], "a fox")], pool, ["x", "y"], FinetuneConfig(steps=1, batch_size=2, paired=True)
        )


def test_public_name_does_not_shadow_the_subpackage():
    import types

    import memscan

    assert isinstance(memscan.triage, types.ModuleType)
    assert memscan.triage_prompts is triage

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
    # Wen: a clear margin over the runner-up, not a tie. Webster's σ_max²·mean(ε̂²) is dominated by
    # the noise estimate's own size (σ_max² ≈ 214 times ≈ 1 for every prompt), so its lead is small.
    s = scores["wen"]
    assert s[0] > 1.2 * np.sort(s)[-2], s
    s = scores["webster"]
    assert s[0] > 1.02 * np.sort(s)[-2], s


def test_scores_are_deterministic_under_a_seed(model, scores):
    again = score_prompts(model, IDS, PROMPTS, CFG)
    for name in ("wen", "webster"):
        assert np.array_equal(again[name], scores[name])
    other = score_prompts(model, IDS[:2], PROMPTS[:2], TriageConfig(**{**CFG.to_dict(), "seed": 1}))
    assert not np.array_equal(other["wen"], scores["wen"][:2])
    # a prompt's score does not depend on which other prompts share its batch
    alone = score_prompts(model, IDS[3:4], PROMPTS[3:4], CFG)
    np.testing.assert_allclose(alone["wen"], scores["wen"][3:4], rtol=1e-5)
    np.testing.assert_allclose(alone["webster"], scores["webster"][3:4], rtol=1e-5)


def _encode(pipe, prompts):
    """Our own tokenisation and text encoding (not encode_prompt)."""
    import torch

    tok = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt")
    with torch.no_grad():
        return pipe.text_encoder(tok.input_ids)[0]


def _by_hand(model, prompt: str, pid: str, generations: int, negative: str = "", steps: int = 1, latent=None):
    """Wen and Webster per generation from the papers' definitions, without score_prompts' code
    path: our own text encoding, UNet calls, the DDIM update (Song et al. 2021, eq. 12) and
    Webster's one-step sample written out in k-diffusion's VE space — ``z_T = σ_max·n``, the
    denoiser ``D(z) = z − σ·ε̂(z / sqrt(σ² + 1), t(σ))`` and one Euler step to σ = 0
    (``z ← z + (z − D)/σ · (0 − σ)``), as Webster's code samples with Karras sigmas
    ``[σ_max, 0]`` — with ``σ = sqrt((1 − ᾱ)/ᾱ)`` from the scheduler's ``alphas_cumprod``.
    ``c_empty`` is the empty prompt; guidance's unconditional input is ``negative``."""
    import torch

    pipe, unet = model.pipe, model.unet
    emb = _encode(pipe, [prompt, "", negative])
    c, e, n = emb[:1], emb[1:2], emb[2:]
    sched = model.scheduler
    sched.set_timesteps(10)
    ratio = sched.config.num_train_timesteps // 10
    acp = sched.alphas_cumprod.double()
    sigmas = ((1 - acp) / acp).sqrt()  # k-diffusion's sigmas of the DDPM schedule
    wen, web = [], []
    for i in range(generations):
        g = torch.Generator().manual_seed(derive_seed(0, pid, i))
        noise = torch.randn(latent or model.latent_shape, generator=g)[None]
        # Wen: the first `steps` timesteps of the 10-step schedule, advanced by guided DDIM
        z, d = noise.double(), 0.0
        for k in range(steps):
            t = int(sched.timesteps[k])
            with torch.no_grad():
                e_c, e_u, e_n = (unet(z.float(), t, encoder_hidden_states=x).sample.double() for x in (c, e, n))
            d += float((e_c - e_u).flatten().norm()) / steps
            eps = e_n + 3.0 * (e_c - e_n)
            a_t, t_prev = acp[t], t - ratio
            a_prev = acp[t_prev] if t_prev >= 0 else sched.final_alpha_cumprod.double()
            x0 = (z - (1 - a_t).sqrt() * eps) / a_t.sqrt()
            z = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        wen.append(d)
        # Webster: one Euler step from σ_max to 0 in VE space
        s_max, t_last = sigmas[-1], len(acp) - 1
        z_T = s_max * noise.double()
        x_in = (z_T / (s_max**2 + 1).sqrt()).float()
        with torch.no_grad():
            e_c, e_n = (unet(x_in, t_last, encoder_hidden_states=x).sample.double() for x in (c, n))
        denoised = z_T - s_max * (e_n + 3.0 * (e_c - e_n))
        z_0 = z_T + (z_T - denoised) / s_max * (0.0 - s_max)
        web.append(float(((z_T - z_0) ** 2).mean()))
    return np.array(wen), np.array(web)


def test_scores_match_the_definitions(model, scores):
    for k in (0, 4):
        wen, web = _by_hand(model, PROMPTS[k], IDS[k], CFG.generations)
        np.testing.assert_allclose(scores["wen_per_generation"][k], wen, rtol=1e-4)
        np.testing.assert_allclose(scores["webster_per_generation"][k], web, rtol=1e-4)
        assert scores["wen"][k] == pytest.approx(wen.mean(), rel=1e-4)
    # Wen: 2 per generation and step; Webster's one-step sample: 2 (guided) per generation
    assert scores["unet_evaluations_per_prompt"] == 4 * (2 * 1 + 2)
    # 10 steps, SD's leading spacing with steps_offset 1: 0, 100, …, 900 shifted by 1, descending
    assert scores["timesteps"] == [901]


def _counting_unet_rows(model):
    """A forward hook on the UNet that adds up the latents of every call (one UNet evaluation
    each): the count does not go through memscan's own bookkeeping."""
    rows = []
    hook = model.unet.register_forward_hook(lambda module, args, out: rows.append(int(args[0].shape[0])))
    return rows, hook


@pytest.mark.parametrize(
    ("asked", "per_prompt"),
    # guided (3.0), no negative prompt: Wen 2 per generation and step, Webster 2 per generation
    [(("wen",), 4 * 1 * 2), (("webster",), 4 * 2), (("wen", "webster"), 4 * 1 * 2 + 4 * 2)],
)
def test_only_the_asked_scores_are_computed_and_paid_for(model, scores, asked, per_prompt):
    cfg = TriageConfig(**{**CFG.to_dict(), "scores": asked})
    rows, hook = _counting_unet_rows(model)
    try:
        got = score_prompts(model, IDS[:3], PROMPTS[:3], cfg)
    finally:
        hook.remove()
    assert sum(rows) == 3 * per_prompt == 3 * got["unet_evaluations_per_prompt"]
    for name in ("wen", "webster"):
        if name in asked:  # the same numbers as a run that computes both scores
            assert np.array_equal(got[name], scores[name][:3]), name
        else:
            assert name not in got and f"{name}_per_generation" not in got


def test_a_wen_only_run_writes_the_wen_column_of_a_both_scores_run(model, tmp_path):
    """``memscan triage --scores wen``: the UNet evaluations counted by a hook are the run's
    recorded cost, the table has no Webster columns, and its Wen columns equal a both-scores
    run's; ranking by the score it did not compute is refused."""
    from typer.testing import CliRunner

    from memscan.cli import app

    def cli(*args):
        return CliRunner().invoke(app, [str(a) for a in ["triage", *common, *args]])

    (tmp_path / "p.txt").write_text("\n".join(PROMPTS[:4]) + "\n")
    common = ["--model", DATA, "--prompts", tmp_path / "p.txt", "--num-inference-steps", 10, "--guidance-scale", 3.0,
              "--generations", 2, "--quiet"]  # fmt: skip
    assert cli("--out", tmp_path / "both").exit_code == 0
    counted = []
    real_forward = type(model.unet).forward

    def forward(self, sample, *args, **kwargs):  # every UNet call of the run, whoever makes it
        counted.append(int(sample.shape[0]))
        return real_forward(self, sample, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(model.unet), "forward", forward)
        res = cli("--out", tmp_path / "wen", "--scores", "wen")
    assert res.exit_code == 0, res.output
    both, wen = (pd.read_parquet(tmp_path / d / "scores.parquet") for d in ("both", "wen"))
    assert "webster_score" not in wen and "webster_rank" not in wen
    cols = ["prompt_id", "wen_score", "wen_rank"]
    pd.testing.assert_frame_equal(wen[cols], both[cols], check_exact=True)
    manifest = json.loads((tmp_path / "wen" / "manifest.json").read_text())
    assert sum(counted) == 4 * 2 * 1 * 2  # 4 prompts × 2 generations × 1 step × (c, "")
    assert manifest["cost"]["unet_evaluations_per_prompt"] == 2 * 1 * 2 and (wen["unet_evaluations"] == 4).all()
    assert manifest["cost"]["unet_evaluations_by_score"] == {"wen": 4}
    assert manifest["config"]["scores"] == ["wen"] and list(manifest["definitions"]) == ["wen"]
    assert "webster" not in manifest["scores"] and manifest["scores"]["computed"] == ["wen"]
    with pytest.raises(InputError, match="no webster score"):
        select_ranked(wen, "webster")
    bad = cli("--out", tmp_path / "x", "--scores", "wen", "--score", "webster")
    assert bad.exit_code == 2 and "does not compute" in bad.output and not (tmp_path / "x").exists()
    bad = cli("--out", tmp_path / "x", "--scores", "loss")
    assert bad.exit_code == 2 and "unknown score" in bad.output and not (tmp_path / "x").exists()
    # --scores webster alone ranks by webster
    assert cli("--out", tmp_path / "web", "--scores", "webster").exit_code == 0
    web = pd.read_parquet(tmp_path / "web" / "scores.parquet")
    pd.testing.assert_series_equal(web["webster_score"], both["webster_score"], check_exact=True)
    assert json.loads((tmp_path / "web" / "manifest.json").read_text())["ranking"]["score"] == "webster"


def test_a_negative_prompt_guides_the_step_and_c_empty_stays_the_empty_prompt(model):
    """Wen's c_empty is "" (Wen et al.'s code); the extraction's negative prompt is guidance's
    unconditional input: the latent Wen's second step sees, and Webster's one-step sample."""
    from memscan.generators.text2image import Text2ImageGenerator
    from memscan.triage.worker import setup_triage

    cfg = TriageConfig(**{**CFG.to_dict(), "steps": 2, "generations": 2})
    gen = Text2ImageGenerator(model.pipe, num_inference_steps=10, guidance_scale=3.0, negative_prompt="a grey fog")
    worker = setup_triage(gen, cfg)
    got = score_prompts(worker.model, IDS[:2], PROMPTS[:2], cfg)
    for k in range(2):
        wen, web = _by_hand(model, PROMPTS[k], IDS[k], 2, negative="a grey fog", steps=2)
        np.testing.assert_allclose(got["wen_per_generation"][k], wen, rtol=1e-4)
        np.testing.assert_allclose(got["webster_per_generation"][k], web, rtol=1e-4)
    # c, "" and the negative prompt per Wen step; c and the negative prompt for Webster
    assert got["unet_evaluations_per_prompt"] == 2 * (3 * 2 + 2)


def test_triage_latents_are_the_extractions_at_the_generators_resolution():
    """At a non-native resolution (64×64 on a 32×32 pipeline) triage draws the extraction's
    initial latents of sample i, and scores them."""
    import torch

    from memscan.generators.text2image import Text2ImageGenerator
    from memscan.testing.tiny_sd import build_tiny_sd
    from memscan.triage.worker import setup_triage

    gen = Text2ImageGenerator(build_tiny_sd(), height=64, width=64, num_inference_steps=10, guidance_scale=3.0)
    worker = setup_triage(gen, CFG)
    seeds = [derive_seed(CFG.seed, "p7", i) for i in range(3)]
    want = gen.initial_latents("a fox", seeds, gen.generators(seeds)).float()
    got = worker.model.initial_latents("p7", range(3), CFG.seed)
    assert tuple(want.shape[1:]) == (4, 32, 32)
    assert torch.equal(got, want)
    res = score_prompts(worker.model, ["p7"], ["a fox"], TriageConfig(**{**CFG.to_dict(), "generations": 2}))
    wen, web = _by_hand(worker.model, "a fox", "p7", 2, latent=(4, 32, 32))
    np.testing.assert_allclose(res["wen_per_generation"][0], wen, rtol=1e-4)
    np.testing.assert_allclose(res["webster_per_generation"][0], web, rtol=1e-4)


def test_cli_triage_takes_extracts_resolution_options(tmp_path):
    """``memscan triage --height H --width W`` scores the latents ``memscan extract --height H
    --width W`` samples from (the generator that command loads); a UNet2DModel refuses them, as
    extract does, before the run directory is written."""
    from typer.testing import CliRunner

    from memscan.cli import app
    from memscan.generators.load import load_generator
    from memscan.triage.worker import setup_triage

    (tmp_path / "p.txt").write_text("\n".join(PROMPTS[:2]) + "\n")
    args = ["triage", "--model", DATA, "--prompts", tmp_path / "p.txt", "--num-inference-steps", 10,
            "--guidance-scale", 3.0, "--generations", 2, "--scores", "wen", "--height", 64, "--width", 48, "--quiet"]  # fmt: skip
    res = CliRunner().invoke(app, [str(a) for a in [*args, "--out", tmp_path / "t"]])
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "t" / "manifest.json").read_text())
    assert manifest["scores"]["latent_shape"] == [4, 32, 24]
    assert (manifest["config"]["height"], manifest["config"]["width"]) == (64, 48)
    # what `memscan extract --model DATA --height 64 --width 48 --steps 10 --guidance-scale 3` samples with
    gen = load_generator(str(DATA), num_inference_steps=10, guidance_scale=3.0, height=64, width=48)
    cfg = TriageConfig(generations=2, num_inference_steps=10, guidance_scale=3.0, scores=("wen",))
    want = score_prompts(setup_triage(gen, cfg).model, ["line-1", "line-2"], PROMPTS[:2], cfg)["wen"]
    got = pd.read_parquet(tmp_path / "t" / "scores.parquet")["wen_score"].to_numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # a config that contradicts the generator it scores is refused
    with pytest.raises(InputError, match="height 32 vs the generator's 64"):
        setup_triage(gen, TriageConfig(**{**cfg.to_dict(), "height": 32}))
    from memscan.demo.run import model_dir

    res = CliRunner().invoke(app, [str(a) for a in ["triage", "--model", model_dir(), "--prompts", tmp_path / "p.txt",
                                                    "--height", 64, "--out", tmp_path / "u", "--quiet"]])  # fmt: skip
    assert res.exit_code == 2 and "apply to text-to-image pipelines" in res.output and not (tmp_path / "u").exists()


def test_a_schedule_that_scores_near_the_end_of_sampling_is_refused(model, tmp_path):
    """SD's leading spacing with steps_offset 1: 1 step scores t = 1 (of 1000), 2 steps t = 501."""
    one = TriageConfig(**{**CFG.to_dict(), "num_inference_steps": 1})
    with pytest.raises(InputError, match=r"first scored timestep t=1 of 1000.*default 50 steps"):
        score_prompts(model, IDS[:1], PROMPTS[:1], one)
    with pytest.raises(InputError, match="t=1 of 1000"):  # refused before the run directory is written
        triage(str(DATA), PROMPTS[:2], tmp_path / "t", one, progress=False)
    assert not (tmp_path / "t").exists()
    two = score_prompts(model, IDS[:1], PROMPTS[:1], TriageConfig(**{**CFG.to_dict(), "num_inference_steps": 2}))
    assert two["timesteps"] == [501]


def test_a_nan_score_is_one_error_naming_the_prompt(model, tmp_path):
    """A model that overflows (NaN) fails where the score is made, naming the prompt and the
    fix — not after all compute with a pandas casting error; a NaN in the table ranks last."""
    import torch

    from memscan.triage.run import scores_table

    def to_nan(module, inputs, out):
        return type(out)(sample=torch.full_like(out.sample, float("nan")))

    hook = model.unet.register_forward_hook(to_nan)
    try:
        with pytest.raises(InputError, match=r"score of prompt p0 \(generation 0\) is nan.*--dtype fp32"):
            triage(model.pipe, PROMPTS[:2], tmp_path / "t", CFG, progress=False)
    finally:
        hook.remove()
    df = pd.DataFrame(
        {"prompt_id": ["a", "b", "c"], "prompt": ["x", "y", "z"], "train_id": None, "duplicate_count": None}
    )
    merged = pd.DataFrame({"wen_score": [0.5, np.nan, 0.7], "webster_score": [1.0, 2.0, np.nan]})
    table = scores_table(df, merged, CFG, 16)
    assert table["wen_rank"].tolist() == [2, 3, 1] and table["webster_rank"].tolist() == [2, 1, 3]
    assert select_ranked(table, "wen")["prompt_id"].tolist() == ["c", "a", "b"]


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
    assert manifest["cost"]["unet_evaluations_per_prompt"] == 4 * (2 + 2)  # Wen's step and Webster's, guided
    assert manifest["scores"]["wen"]["timesteps"] == [901] and manifest["scores"]["webster"]["timestep"] == 999
    # σ_max² = (1 − ᾱ_999)/ᾱ_999 of SD's scaled-linear β (0.00085 … 0.012 over 1000 steps), by hand
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    abar = np.prod(1 - betas)
    assert manifest["scores"]["webster"]["sigma_max"] == pytest.approx(((1 - abar) / abar) ** 0.5, rel=1e-5)
    assert manifest["scores"]["wen"]["c_empty"].startswith("the empty prompt")
    assert manifest["scores"]["latent_shape"] == [4, 16, 16] and "webster" in manifest["definitions"]
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

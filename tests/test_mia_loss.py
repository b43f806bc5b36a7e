"""The diffusion loss L_t: direct computation, determinism, batch-size independence, and members
vs non-members on a tiny model trained here."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from gen_support import tiny_unet

from memscan.errors import InputError
from memscan.generators.seeds import derive_seed
from memscan.mia.loss import diffusion_loss, images_to_model_space, noise_for, parse_timesteps, timestep_sweep
from memscan.mia.metrics import roc_metrics
from memscan.mia.noise import CallableNoisePredictor, DiffusersNoisePredictor, as_noise_predictor, load_noise_predictor
from memscan.mia.shadow import torch_threads


@pytest.fixture(autouse=True)
def _one_thread():
    # several torch threads on a busy 2-core machine are many times slower than one
    with torch_threads(1):
        yield


def _tiny_unet(num_class_embeds=None, seed=0):
    return tiny_unet(channels=1, blocks=(16, 32), groups=8, classes=num_class_embeds, seed=seed)


def _sched(T=1000):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2")


def _images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 1)).astype(np.uint8)


def test_loss_equals_a_plain_loop_over_the_unet():
    """Independent computation: the UNet called directly, example by example, with the same noise."""
    unet = _tiny_unet(num_class_embeds=5)
    sched = _sched()
    p = DiffusersNoisePredictor(unet, sched)
    imgs = _images(4)
    labels = np.array([0, 3, 1, 4])
    ts, K = [7, 300], 3
    got = diffusion_loss(p, imgs, ts, condition=labels, noise_draws=K, flip=True, seed=11, batch_size=5)
    a = sched.alphas_cumprod.double()
    want = np.zeros((2, 4))
    for i in range(4):
        x = torch.from_numpy(imgs[i]).permute(2, 0, 1).float()[None] / 127.5 - 1
        for j, t in enumerate(ts):
            vals = []
            for k in range(K):
                g = torch.Generator().manual_seed(derive_seed(11, f"mia-noise/{i}", k))
                eps = torch.randn((1, 8, 8), generator=g)[None]
                for xx in (x, torch.flip(x, dims=[3])):
                    xt = math.sqrt(a[t]) * xx + math.sqrt(1 - a[t]) * eps
                    with torch.no_grad():
                        pred = unet(xt, torch.tensor([t]), class_labels=torch.tensor([labels[i]])).sample
                    vals.append(float(((eps - pred) ** 2).mean()))
            want[j, i] = np.mean(vals)
    np.testing.assert_allclose(got, want, rtol=2e-5)


def test_deterministic_under_a_seed_and_batch_size_independent():
    p = DiffusersNoisePredictor(_tiny_unet(), _sched())
    imgs = _images(7)
    ts = [3, 50, 400]
    ref = diffusion_loss(p, imgs, ts, noise_draws=3, seed=5, batch_size=64)
    again = diffusion_loss(p, imgs, ts, noise_draws=3, seed=5, batch_size=64)
    assert np.array_equal(ref, again)
    for bs in (1, 2, 5, 9):
        other = diffusion_loss(p, imgs, ts, noise_draws=3, seed=5, batch_size=bs)
        np.testing.assert_allclose(other, ref, rtol=1e-5, atol=0)  # float32 batched kernels only
    assert not np.allclose(diffusion_loss(p, imgs, ts, noise_draws=3, seed=6), ref, rtol=1e-3)
    # a part of the data scored alone, with its global ids, equals the same rows of the whole
    part = diffusion_loss(p, imgs[[6, 2]], ts, noise_draws=3, seed=5, example_ids=[6, 2], batch_size=1)
    np.testing.assert_allclose(part, ref[:, [6, 2]], rtol=1e-5)
    # the order of the examples does not matter either
    perm = [3, 0, 6, 1, 5, 2, 4]
    shuffled = diffusion_loss(p, imgs[perm], ts, noise_draws=3, seed=5, example_ids=perm, batch_size=4)
    np.testing.assert_allclose(shuffled, ref[:, perm], rtol=1e-5)


def test_flip_is_the_mean_of_both_orientations():
    p = DiffusersNoisePredictor(_tiny_unet(), _sched())
    imgs = _images(3, seed=1)
    both = diffusion_loss(p, imgs, [20], noise_draws=2, flip=True, seed=0)
    plain = diffusion_loss(p, imgs, [20], noise_draws=2, seed=0)
    flipped = diffusion_loss(p, imgs[:, :, ::-1], [20], noise_draws=2, seed=0)
    np.testing.assert_allclose(both, (plain + flipped) / 2, rtol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_prediction_types_are_converted_to_epsilon(prediction_type):
    """An oracle for data = one known image has zero loss whatever it predicts."""
    a = _sched().alphas_cumprod.double()
    x0 = images_to_model_space(_images(1, seed=3))

    def oracle(x_t, t, c):
        at = a[t].float().view(-1, 1, 1, 1)
        eps = (x_t - at.sqrt() * x0) / (1 - at).sqrt()
        if prediction_type == "v_prediction":
            return at.sqrt() * eps - (1 - at).sqrt() * x0
        return x0.expand_as(x_t) if prediction_type == "sample" else eps

    p = CallableNoisePredictor(oracle, a, prediction_type=prediction_type)
    L = diffusion_loss(p, _images(1, seed=3), [10, 500, 900], noise_draws=2)
    assert L.max() < 1e-6
    # and a wrong image gets a large loss at small t
    assert diffusion_loss(p, _images(1, seed=4), [10], noise_draws=2)[0, 0] > 1.0


def test_unet2d_condition_model_takes_encoder_hidden_states():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        norm_num_groups=8,
        layers_per_block=1,
        attention_head_dim=4,
    )
    p = as_noise_predictor(unet, scheduler=_sched(100))
    assert p.kind == "unet2d_condition"
    imgs, h = _images(5), torch.randn(5, 3, 8)
    a = diffusion_loss(p, imgs, [5, 50], condition=h, noise_draws=2, batch_size=3)
    b = diffusion_loss(p, imgs, [5, 50], condition=h, noise_draws=2, batch_size=64)
    np.testing.assert_allclose(a, b, rtol=1e-5)
    # the condition matters: other embeddings, other losses
    c = diffusion_loss(p, imgs, [5, 50], condition=torch.randn(5, 3, 8), noise_draws=2)
    assert not np.allclose(a, c, rtol=1e-4)
    with pytest.raises(InputError, match="encoder_hidden_states"):
        diffusion_loss(p, imgs, [5])


def test_input_errors():
    p = DiffusersNoisePredictor(_tiny_unet(num_class_embeds=3), _sched(100))
    with pytest.raises(InputError, match="class-conditional"):
        diffusion_loss(p, _images(2), [5])
    with pytest.raises(InputError, match="not below T = 100"):
        diffusion_loss(p, _images(2), [5, 100], condition=0)
    with pytest.raises(InputError, match="2 entries for 3 examples"):
        diffusion_loss(p, _images(3), [5], condition=np.array([0, 1]))
    with pytest.raises(InputError, match="dtype"):
        diffusion_loss(p, _images(2).astype(np.int32), [5], condition=0)
    with pytest.raises(InputError, match="in \\[0, 1\\]"):
        diffusion_loss(p, _images(2).astype(np.float32), [5], condition=0)
    with pytest.raises(InputError, match="listed twice"):
        parse_timesteps("10,10")
    with pytest.raises(InputError, match="not an integer"):
        parse_timesteps("10,abc")
    with pytest.raises(InputError, match="noise_draws"):
        diffusion_loss(p, _images(2), [5], condition=0, noise_draws=0)
    with pytest.raises(InputError, match="alphas_cumprod"):
        as_noise_predictor(lambda x, t, c: x)
    bad = CallableNoisePredictor(lambda x, t, c: x[:, :, :4], np.linspace(0.99, 0.1, 10))
    with pytest.raises(InputError, match="returned shape"):
        diffusion_loss(bad, _images(1), [3])


def test_noise_depends_on_seed_id_and_draw_only():
    a = noise_for("x1", 3, (1, 8, 8), seed=0)
    assert torch.equal(a, noise_for("x1", 3, (1, 8, 8), seed=0))
    assert torch.equal(a[:2], noise_for("x1", 2, (1, 8, 8), seed=0))  # more draws extend, not reshuffle
    assert not torch.equal(a, noise_for("x2", 3, (1, 8, 8), seed=0))
    assert not torch.equal(a, noise_for("x1", 3, (1, 8, 8), seed=1))
    # standard normal
    big = noise_for(0, 50, (1, 16, 16), seed=0)
    assert abs(float(big.mean())) < 0.05 and abs(float(big.std()) - 1) < 0.05


def test_timestep_sweep_against_roc_metrics():
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(30, bool), np.zeros(30, bool)]
    L = rng.normal(1.0, 0.1, (3, 60))
    L[1, y] -= 0.15  # t = 50 separates best
    L[2, y] -= 0.05
    s = timestep_sweep(L, [10, 50, 200], y)
    assert s.best_timestep == 50
    for j in range(3):
        r = roc_metrics(-L[j], y)
        assert s.table["auc"].iloc[j] == pytest.approx(r.auc)
        assert s.table["tpr@1%fpr"].iloc[j] == pytest.approx(r.tpr_at_fpr(0.01))
    assert s.table["mean_loss_members"].iloc[1] < s.table["mean_loss_nonmembers"].iloc[1]
    assert timestep_sweep(L, [10, 50, 200], y, by="auc").best_timestep == 50
    with pytest.raises(InputError, match="one row per timestep"):
        timestep_sweep(L[:2], [10, 50, 200], y)
    with pytest.raises(InputError, match="not a metric"):
        timestep_sweep(L, [10, 50, 200], y, by="accuracy")


# ------------------------------------------------------------------------------------------
# a tiny model trained here: members get lower loss than held-out images (`tiny_trained`: conftest.py)
# ------------------------------------------------------------------------------------------


def test_members_have_lower_loss_at_small_t(tiny_trained):
    imgs, y, d = tiny_trained
    p = load_noise_predictor(d)
    assert json.loads((d / "memscan.json").read_text())["null_class"] == p.null_class == 8
    ts = [10, 50, 100]
    L = diffusion_loss(p, imgs, ts, condition=p.null_class, noise_draws=4, seed=0)
    for j, t in enumerate(ts):
        members, others = L[j, y].mean(), L[j, ~y].mean()
        # measured: members' mean loss is 0.52, 0.40, 0.30 of the non-members' at t = 10, 50, 100; AUC 1.0
        assert members < 0.75 * others, (t, members, others)
        assert roc_metrics(-L[j], y).auc >= 0.9, t
    s = timestep_sweep(L, ts, y)
    assert s.table["auc"].min() >= 0.9

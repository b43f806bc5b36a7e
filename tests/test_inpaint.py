"""The inpainting attack: masks, the masked distance, RePaint's determinism, and members
reconstructed closer than non-members by a tiny model trained here."""

from __future__ import annotations

import numpy as np
import pytest
from gen_support import tiny_unet

from memscan.errors import InputError
from memscan.mia.inpaint import (
    InpaintConfig,
    inpaint_distances,
    inpaint_mask,
    masked_l2,
    pipeline_inpainter,
    repaint,
)
from memscan.mia.metrics import roc_metrics
from memscan.mia.noise import DiffusersNoisePredictor, load_noise_predictor
from memscan.mia.shadow import torch_threads


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


@pytest.mark.parametrize(
    "region,expected",
    [
        ("left", np.s_[:, :5]),
        ("right", np.s_[:, 5:]),
        ("top", np.s_[:3, :]),
        ("bottom", np.s_[3:, :]),
    ],
)
def test_half_masks(region, expected):
    m = inpaint_mask((6, 10), region)
    want = np.zeros((6, 10), bool)
    want[expected] = True
    np.testing.assert_array_equal(m, want)


def test_center_and_random_masks():
    c = inpaint_mask((16, 16), "center", fraction=0.25)
    assert c.sum() == 64 and c[4:12, 4:12].all()
    r = inpaint_mask((32, 32), "random", fraction=0.3, seed=1, example_id="a")
    assert abs(r.mean() - 0.3) < 0.06
    assert np.array_equal(r, inpaint_mask((32, 32), "random", fraction=0.3, seed=1, example_id="a"))
    assert not np.array_equal(r, inpaint_mask((32, 32), "random", fraction=0.3, seed=1, example_id="b"))
    assert inpaint_mask((8, 8), "left", fraction=0.25).sum() == 16
    with pytest.raises(InputError, match="region"):
        inpaint_mask((8, 8), "diagonal")
    with pytest.raises(InputError, match="fraction"):
        inpaint_mask((8, 8), fraction=1.0)


def test_masked_l2_brute_force():
    rng = np.random.default_rng(0)
    a, b = rng.random((3, 5, 6, 2)), rng.random((3, 5, 6, 2))
    hid = rng.random((3, 5, 6)) < 0.4
    got = masked_l2(a, b, hid)
    for i in range(3):
        diffs = [
            (a[i, y, x, c] - b[i, y, x, c]) ** 2 for y in range(5) for x in range(6) for c in range(2) if hid[i, y, x]
        ]
        assert got[i] == pytest.approx(np.sqrt(np.mean(diffs)))


@pytest.mark.parametrize(
    "shape,region",
    [((1, 8), "top"), ((1, 8), "bottom"), ((8, 1), "left"), ((8, 1), "right"), ((1, 8), "center"), ((1, 1), "random")],
)
def test_a_mask_that_hides_nothing_is_one_error(shape, region):
    """An image one pixel high (wide) has no row (column) to hide and one to keep: the mask was
    empty and the distance 0/0 = NaN with a RuntimeWarning."""
    with pytest.raises(InputError, match=rf"{region!r} region .* hides no pixel of an image of {shape[0]}×{shape[1]}"):
        inpaint_mask(shape, region)
    # one more row / column (or pixel) is enough: one hidden, one kept
    bigger = (shape[0] + 1, shape[1]) if region in ("top", "bottom", "center", "random") else (shape[0], shape[1] + 1)
    m = inpaint_mask(bigger, region)
    assert 0 < int(m.sum()) < m.size


def test_masked_l2_refuses_an_empty_mask():
    a, b = np.zeros((3, 2, 2, 1)), np.ones((3, 2, 2, 1))
    hid = np.ones((3, 2, 2), bool)
    hid[1] = False  # image 1 hides nothing
    with pytest.raises(InputError, match=r"1 image\(s\) is empty \(first: image 1 of 3, 2×2\)"):
        masked_l2(a, b, hid)
    with pytest.raises(InputError, match="empty"):
        masked_l2(a, b, np.zeros((2, 2), bool))
    assert masked_l2(a, b, np.eye(2, dtype=bool)).tolist() == [1.0, 1.0, 1.0]  # |0 − 1| everywhere


def _tiny_unet(seed=0):
    return tiny_unet(channels=1, blocks=(16, 32), groups=8, classes=4, seed=seed)


def test_repaint_is_batch_independent_and_keeps_known_pixels():
    from diffusers import DDPMScheduler

    p = DiffusersNoisePredictor(_tiny_unet(), DDPMScheduler(num_train_timesteps=200))
    imgs = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 1)).astype(np.uint8)
    hid = inpaint_mask((8, 8), "top")
    labels = np.array([0, 1, 2, 3, 0])
    cfg = InpaintConfig(num_inference_steps=10, jump_length=3, jump_n_sample=2, batch_size=5)
    a = repaint(p, imgs, hid, condition=labels, config=cfg)
    b = repaint(p, imgs, hid, condition=labels, config=InpaintConfig(**{**cfg.to_dict(), "batch_size": 2}))
    np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_array_equal(a, repaint(p, imgs, hid, condition=labels, config=cfg))
    # known pixels are the original's; hidden ones were painted
    np.testing.assert_allclose(a[:, ~hid], imgs[:, ~hid] / 255.0, atol=1e-6)
    assert not np.allclose(a[:, hid], imgs[:, hid] / 255.0, atol=0.05)
    # one example alone, with its id, is inpainted exactly as in the batch
    one = repaint(p, imgs[[3]], hid, condition=labels[[3]], config=cfg, example_ids=[3])
    np.testing.assert_allclose(one, a[[3]], atol=1e-5)
    # another sample index, another inpainting
    assert not np.allclose(repaint(p, imgs, hid, condition=labels, config=cfg, sample=1), a, atol=1e-3)


def test_config_errors():
    with pytest.raises(InputError, match="jump_length"):
        InpaintConfig(num_inference_steps=5, jump_length=5).validated(1000)
    with pytest.raises(InputError, match="exceeds"):
        InpaintConfig(num_inference_steps=50).validated(20)
    with pytest.raises(InputError, match="region"):
        InpaintConfig(region="ring").validated(1000)
    # without T (an inpainter): every setting but the schedule is checked; counts become ints
    with pytest.raises(InputError, match="samples"):
        InpaintConfig(samples=0).validated()
    with pytest.raises(InputError, match="num_inference_steps"):
        InpaintConfig(num_inference_steps=float("nan")).validated()
    assert InpaintConfig(num_inference_steps=5, jump_length=5).validated().num_inference_steps == 5
    assert type(InpaintConfig(samples=2.0).validated(1000).samples) is int


def _inpainter(value):
    """An inpainter (``inpaints = True``) that fills every image with ``value``."""

    def fill(images, hidden, seeds):
        return np.full(images.shape, value, np.float32)

    fill.inpaints = True
    return fill


def test_inpainter_path_validates_config_and_reconstructions():
    """With an inpainter (not a noise predictor) the settings went unchecked — ``samples=0`` gave
    the distances [nan, nan] — and reconstructions outside [0, 1] were accepted, giving ℓ2
    distances above 1 (DESIGN.md: 0 ≤ ℓ2 ≤ 1)."""
    imgs = np.zeros((2, 4, 4, 1), np.uint8)
    assert inpaint_distances(_inpainter(1.0), imgs).distance.tolist() == [1.0, 1.0]  # the bounds are fine
    for bad, name in ((dict(samples=0), "samples"), (dict(samples=1.5), "samples"), (dict(fraction=1.0), "fraction"),
                      (dict(region="ring"), "region"), (dict(eta=2.0), "eta"), (dict(batch_size="abc"), "batch_size")):  # fmt: skip
        with pytest.raises(InputError, match=name):
            inpaint_distances(_inpainter(0.5), imgs, InpaintConfig(**bad))
    # the RePaint schedule is not an inpainter's: not checked on that path
    r = inpaint_distances(_inpainter(0.5), imgs, InpaintConfig(num_inference_steps=3, jump_length=5, samples=2.0))
    assert r.per_sample.shape == (2, 2) and r.config.samples == 2
    for value, what in ((2.0, "outside \\[0, 1\\] \\(from 2 to 2\\)"), (-0.5, "outside"), (np.nan, "NaN/Inf")):
        with pytest.raises(InputError, match=f"inpainter .*fill.*{what}") as exc:
            inpaint_distances(_inpainter(value), imgs)
        assert "in [0, 1]" in exc.value.hint

    class OneShort:  # an inpainter object: named by its class
        inpaints = True

        def __call__(self, images, hidden, seeds):
            return np.zeros((len(images) - 1, *images.shape[1:]), np.float32)

    with pytest.raises(InputError, match=r"inpainter OneShort: returned shape \(1, 4, 4, 1\)") as exc:
        inpaint_distances(OneShort(), imgs)
    assert "one per image" in exc.value.hint

    class Bright:  # a pipeline returning 0..255 floats: named through pipeline_inpainter
        def __call__(self, prompt, image, mask_image, generator, height, width, output_type):
            from types import SimpleNamespace

            return SimpleNamespace(images=[np.full((height, width, 1), 255.0, np.float32)])

    with pytest.raises(InputError, match=r"inpainter pipeline_inpainter\(Bright\): .* outside \[0, 1\]"):
        inpaint_distances(pipeline_inpainter(Bright()), imgs)


def test_pipeline_inpainter_glue():
    """The adapter hands the pipeline diffusers' mask convention (white = repaint) and pastes the
    known pixels back; a stand-in records what it was given."""
    from types import SimpleNamespace

    seen = {}

    class FakePipe:
        def __call__(self, prompt, image, mask_image, generator, height, width, output_type, **kw):
            seen.setdefault("prompts", []).append(prompt)
            seen.setdefault("masks", []).append(np.asarray(mask_image))
            seen["kw"] = kw
            out = np.full((height, width, 3), 0.25, np.float32)  # an RGB pipeline on grey input
            return SimpleNamespace(images=[out])

    fn = pipeline_inpainter(FakePipe(), ["a", "b"], num_inference_steps=3)
    imgs = np.full((2, 4, 4, 1), 200, np.uint8)
    r = inpaint_distances(fn, imgs, InpaintConfig(region="right"), keep_images=True)
    assert seen["prompts"] == ["a", "b"] and seen["kw"] == {"num_inference_steps": 3}
    np.testing.assert_array_equal(seen["masks"][0] == 255, inpaint_mask((4, 4), "right"))
    np.testing.assert_allclose(r.distance, abs(200 / 255 - 0.25))
    np.testing.assert_allclose(r.reconstructions[:, :, :2], 200 / 255)


# ------------------------------------------------------------------------------------------
# a tiny model trained here reconstructs its members better (fixture `tiny_trained`: conftest.py)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("region", ["left", "top"])
def test_members_reconstruct_closer(tiny_trained, region):
    imgs, y, d = tiny_trained
    p = load_noise_predictor(d)
    cfg = InpaintConfig(region=region, num_inference_steps=20, jump_length=5, jump_n_sample=2, samples=2)
    r = inpaint_distances(p, imgs, cfg, condition=p.null_class)
    assert r.per_sample.shape == (2, 16)
    members, others = r.distance[y].mean(), r.distance[~y].mean()
    # measured: mean distance 0.13 vs 0.34 (left half), 0.10 vs 0.35 (top half); AUC 1.0 for both
    assert members < 0.6 * others, (members, others)
    assert roc_metrics(-r.distance, y).auc >= 0.85


def test_pipeline_outputs_are_brought_to_the_images_channels():
    """An inpainting pipeline's output with other channels than the images: grey repeated into
    RGB, RGB averaged into grey (alpha dropped), RGBA cut to RGB (not made grey)."""
    from memscan.mia.inpaint import _channels

    rgba = np.stack([np.full((2, 2), v, np.float32) for v in (0.2, 0.4, 0.9, 1.0)], -1)
    np.testing.assert_array_equal(_channels(rgba, 3), rgba[..., :3])
    np.testing.assert_allclose(_channels(rgba, 1)[..., 0], np.full((2, 2), 0.5))
    grey = np.full((2, 2), 0.3, np.float32)
    assert _channels(grey, 3).shape == (2, 2, 3) and (_channels(grey, 3) == 0.3).all()
    np.testing.assert_array_equal(_channels(rgba[..., :3], 3), rgba[..., :3])  # already right: unchanged
    grey_alpha = np.stack([grey, np.ones((2, 2), np.float32)], -1)  # alpha never enters the pixels
    assert _channels(grey_alpha, 3).shape == (2, 2, 3) and (_channels(grey_alpha, 3) == 0.3).all()
    assert (_channels(grey_alpha, 1) == 0.3).all()

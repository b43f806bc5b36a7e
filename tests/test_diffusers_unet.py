"""Diffusers unconditional / class-conditional models behind the generator protocol."""

import json

import numpy as np
import pandas as pd
import pytest
from conftest import run_cli
from gen_support import tiny_unet

from memscan import InputError, load_generator


def _unet(num_class_embeds=None):
    return tiny_unet(classes=num_class_embeds)


@pytest.fixture(scope="module")
def ddpm_dir(tmp_path_factory):
    from diffusers import DDPMPipeline, DDPMScheduler

    root = tmp_path_factory.mktemp("ddpm")
    DDPMPipeline(unet=_unet(), scheduler=DDPMScheduler(num_train_timesteps=50)).save_pretrained(
        root, safe_serialization=True
    )
    return root


@pytest.fixture(scope="module")
def cond_dir(tmp_path_factory):
    from diffusers import DDIMPipeline, DDPMScheduler

    root = tmp_path_factory.mktemp("cond")
    DDIMPipeline(unet=_unet(num_class_embeds=4), scheduler=DDPMScheduler(num_train_timesteps=50)).save_pretrained(
        root, safe_serialization=True
    )
    (root / "memscan.json").write_text(
        json.dumps({"class_captions": ["a cat", "a dog", "a car"], "null_class": 3, "num_inference_steps": 4})
    )
    return root


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_seeds_reproduce_alone_and_in_any_batch(ddpm_dir, sampler):
    gen = load_generator(str(ddpm_dir), batch_size=3, sampler=sampler, num_inference_steps=5)
    a = gen.generate("", [11, 12, 13, 14])
    assert a.shape == (4, 8, 8, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, gen.generate("", [11, 12, 13, 14]))
    alone = gen.generate("", [13])[0]
    assert np.abs(alone.astype(int) - a[2].astype(int)).max() <= 1  # batch-size independent (float rounding only)
    assert not np.array_equal(a[0], a[1])


def test_class_conditional_prompts(cond_dir):
    gen = load_generator(str(cond_dir), batch_size=4)
    assert gen.class_of("a dog") == 1 and gen.class_of("2") == 2
    x_dog, x_one = gen.generate("a dog", [5, 6]), gen.generate("1", [5, 6])
    np.testing.assert_array_equal(x_dog, x_one)
    assert not np.array_equal(gen.generate("a cat", [5, 6]), x_dog)
    with pytest.raises(InputError, match="neither a known caption"):
        gen.generate("a horse", [1])
    with pytest.raises(InputError, match="outside"):
        gen.generate("7", [1])
    guided = load_generator(str(cond_dir), batch_size=4, guidance_scale=3.0)
    assert guided.generate("a cat", [5]).shape == (1, 8, 8, 3)


def test_extract_cli_on_a_saved_pipeline_and_a_config_file(ddpm_dir, cond_dir, tmp_path):
    from memscan.synthetic import write_training_set

    write_training_set(tmp_path / "train", 5, size=8)
    (tmp_path / "labels.txt").write_text("0\n1\n2\n")
    (tmp_path / "run.toml").write_text("[extract]\nsamples_per_prompt = 12\nmin_clique = 3\nbatch_size = 6\n")
    run_cli(
        "extract",
        "--model",
        cond_dir,
        "--prompts",
        tmp_path / "labels.txt",
        "--train",
        tmp_path / "train",
        "--out",
        tmp_path / "run",
        "--config",
        tmp_path / "run.toml",
        "--seed",
        3,
        "--quiet",
    )
    m = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert m["config"]["samples_per_prompt"] == 12 and m["config"]["min_clique"] == 3 and m["config"]["seed"] == 3
    assert m["generator"]["type"] == "diffusers-unet2d" and m["output_shape"] == [8, 8, 3]
    det = pd.read_parquet(tmp_path / "run" / "detections.parquet")
    assert det["n_samples"].tolist() == [12, 12, 12]
    run_cli(
        "extract",
        "--model",
        ddpm_dir,
        "--prompts",
        tmp_path / "labels.txt",
        "--train",
        tmp_path / "train",
        "--out",
        tmp_path / "run2",
        "--samples-per-prompt",
        4,
        "--min-clique",
        2,
        "--quiet",
    )
    bad = run_cli(
        "extract",
        "--model",
        ddpm_dir,
        "--prompts",
        tmp_path / "labels.txt",
        "--train",
        tmp_path / "train",
        "--out",
        tmp_path / "run3",
        "--config",
        tmp_path / "nope.toml",
        check=False,
    )
    assert bad.returncode == 2 and "cannot read config" in bad.stderr


def test_the_scheduler_is_the_class_its_config_names_with_its_schedule(tmp_path):
    """The demo pipeline's scheduler (``DDIMScheduler``, ``squaredcos_cap_v2``) is what the
    generator, the noise predictor and triage use — not diffusers' ``DDPMScheduler()`` defaults
    (linear β), which a missing or damaged config used to stand in for silently."""
    import shutil

    import torch
    from diffusers import DDIMScheduler, DDPMScheduler

    from memscan.demo.run import model_dir
    from memscan.generators.diffusers_models import load_scheduler
    from memscan.generators.noise import load_diffusers_noise_predictor

    want = DDIMScheduler(beta_schedule="squaredcos_cap_v2", num_train_timesteps=1000)
    assert type(load_scheduler(model_dir() / "scheduler")) is DDIMScheduler
    gen = load_generator(str(model_dir()), num_inference_steps=2)
    assert gen.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    torch.testing.assert_close(gen.scheduler.alphas_cumprod, want.alphas_cumprod)
    p = load_diffusers_noise_predictor(model_dir())
    torch.testing.assert_close(p.alphas_cumprod.float(), want.alphas_cumprod)
    assert not torch.allclose(p.alphas_cumprod.float(), DDPMScheduler().alphas_cumprod)  # the old fallback differs
    # a config without _class_name (written by hand): its schedule, on a DDPMScheduler
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "scheduler_config.json").write_text(json.dumps({"beta_schedule": "squaredcos_cap_v2"}))
    plain = load_scheduler(tmp_path / "s")
    assert type(plain) is DDPMScheduler and plain.config.beta_schedule == "squaredcos_cap_v2"
    # a bare UNet directory keeps its scheduler_config.json beside config.json
    bare = tmp_path / "bare"
    shutil.copytree(model_dir() / "unet", bare)
    shutil.copy(model_dir() / "scheduler" / "scheduler_config.json", bare)
    assert load_generator(str(bare), num_inference_steps=2).scheduler.config.beta_schedule == "squaredcos_cap_v2"


def test_a_scheduler_without_a_ddpm_noise_schedule_is_refused(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from memscan.generators.diffusers_models import load_scheduler

    FlowMatchEulerDiscreteScheduler().save_pretrained(tmp_path / "scheduler")
    with pytest.raises(InputError, match="no DDPM noise schedule") as e:
        load_scheduler(tmp_path / "scheduler")
    assert "scheduler_config.json" in e.value.message


def test_a_rectangular_unet_samples_at_its_height_and_width(tmp_path):
    """``sample_size`` may be (height, width) (diffusers' DDPMPipeline samples such models): it
    used to raise a bare TypeError from ``int(sample_size)``."""
    from diffusers import DDPMPipeline, DDPMScheduler

    DDPMPipeline(unet=tiny_unet(size=(8, 16)), scheduler=DDPMScheduler(num_train_timesteps=50)).save_pretrained(
        tmp_path, safe_serialization=True
    )
    gen = load_generator(str(tmp_path), batch_size=2, num_inference_steps=3)
    assert gen.config["resolution"] == [8, 16]
    x = gen.generate("", [1, 2, 3])
    assert x.shape == (3, 8, 16, 3) and x.dtype == np.uint8
    np.testing.assert_array_equal(x, gen.generate("", [1, 2, 3]))
    assert np.abs(x[1:].astype(int) - gen.generate("", [2, 3]).astype(int)).max() <= 1  # other batches: rounding

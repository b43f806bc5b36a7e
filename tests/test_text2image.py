"""Text-to-image pipelines (the tiny Stable-Diffusion-shaped one, built offline) as generators,
and ``memscan extract --model <pipeline dir>`` end to end through the CLI."""

import json
import textwrap

import numpy as np
import pandas as pd
import pytest
from conftest import run_cli

from memscan import tiled_l2
from memscan.data.images import save_png
from memscan.errors import InputError
from memscan.generators.load import load_generator
from memscan.generators.seeds import derive_seeds
from memscan.generators.text2image import Text2ImageGenerator, load_pipeline, resolve_dtype
from memscan.synthetic import write_training_set
from memscan.testing.tiny_sd import build_tokenizer, save_tiny_sd

STEPS, GUIDANCE = 2, 3.0


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_sd(tmp_path_factory.mktemp("tiny") / "tiny-sd")


@pytest.fixture(scope="module")
def gen(tiny_dir):
    return load_generator(str(tiny_dir), batch_size=4, num_inference_steps=STEPS, guidance_scale=GUIDANCE)


def test_directory_dispatches_to_the_text2image_adapter(gen, tiny_dir):
    assert isinstance(gen, Text2ImageGenerator)
    assert gen.config["pipeline"] == "StableDiffusionPipeline"
    assert gen.config["num_inference_steps"] == STEPS and gen.config["guidance_scale"] == GUIDANCE
    assert gen.config["dtype"] == "float32" and gen.output_shape == (32, 32, 3)
    index = json.loads((tiny_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["safety_checker"] == [None, None]
    assert list((tiny_dir / "unet").glob("*.safetensors")) and not list(tiny_dir.rglob("*.bin"))


def test_same_seed_same_images_and_one_generation_reproduces_alone(gen):
    seeds = derive_seeds(0, "p", 0, 5)
    a = gen.generate("a red fox", seeds)  # batches of 4 + 1
    b = gen.generate("a red fox", seeds)
    assert a.dtype == np.uint8 and a.shape == (5, 32, 32, 3)
    assert np.array_equal(a, b)
    for i in (2, 4):
        # alone, the kernels see another batch size (float differences ~1e-6): at most one grey
        # level on the few pixels that sit on a rounding boundary
        alone = gen.generate("a red fox", [seeds[i]])[0].astype(int)
        assert np.abs(alone - a[i]).max() <= 1, i
        assert (alone != a[i]).mean() < 0.01, i
        assert tiled_l2(alone.astype(np.uint8), a[i]) < 1e-3
    # other seeds and other prompts give other images
    assert not np.array_equal(gen.generate("a red fox", derive_seeds(1, "p", 0, 1))[0], a[0])
    assert not np.array_equal(gen.generate("a blue car", seeds[:1])[0], a[0])


def test_adapter_matches_the_pipeline_drawing_its_own_noise(gen):
    """The adapter's images equal diffusers' own sampling with one generator per sample
    (diffusers draws the initial noise itself there), quantised to uint8."""
    import torch

    seeds = [11, 12, 13]
    ours = gen.generate("a photo", seeds)
    ref = gen.pipe(
        prompt=["a photo"] * 3,
        generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        output_type="np",
    ).images
    assert np.array_equal(ours, np.round(np.clip(ref, 0, 1) * 255).astype(np.uint8))


def test_options_scheduler_dtype_resolution(tiny_dir):
    g = load_generator(str(tiny_dir), scheduler="euler-ancestral", num_inference_steps=2, height=48, width=48)
    assert g.config["scheduler"] == "EulerAncestralDiscreteScheduler"
    x = g.generate("a dog", [5, 6])
    assert x.shape == (2, 48, 48, 3)
    # a stochastic sampler still reproduces each sample alone (its per-step noise is per sample);
    # batched convolutions may round differently from a batch of one, so allow one level
    alone = g.generate("a dog", [6])[0]
    assert np.abs(alone.astype(int) - x[1].astype(int)).max() <= 1
    assert not np.array_equal(alone, x[0])
    assert str(resolve_dtype("auto", "cpu")) == "torch.float32"
    assert str(resolve_dtype("fp16", "cuda:1")) == "torch.float16"
    with pytest.raises(InputError, match="unknown scheduler"):
        load_generator(str(tiny_dir), scheduler="warp-drive")
    with pytest.raises(InputError, match="--dtype .fp8. is not one of"):
        resolve_dtype("fp8", "cuda")
    with pytest.raises(InputError, match="multiple of the VAE scale factor"):
        load_generator(str(tiny_dir), height=33)


def test_bf16_pipeline_runs(tiny_dir):
    g = Text2ImageGenerator(load_pipeline(str(tiny_dir), dtype="bf16"), num_inference_steps=2, guidance_scale=2.0)
    assert g.config["dtype"] == "bfloat16"
    x = g.generate("a bird", [1, 2])
    assert x.shape == (2, 32, 32, 3) and x.std() > 0


def test_tokenizer_is_local_and_roundtrips():
    tok = build_tokenizer()
    ids = tok("a red fox").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "a red fox"


def test_fresh_random_pipeline_end_to_end_no_false_extractions(tiny_dir, tmp_path):
    train = tmp_path / "train"
    write_training_set(train, 30, size=32)
    (tmp_path / "prompts.txt").write_text("a red fox\na blue car\n")
    run = tmp_path / "run"
    proc = run_cli(
        "extract",
        "--model",
        tiny_dir,
        "--prompts",
        tmp_path / "prompts.txt",
        "--train",
        train,
        "--out",
        run,
        "--samples-per-prompt",
        12,
        "--batch-size",
        12,
        "--steps",
        STEPS,
        "--quiet",
    )
    det = pd.read_parquet(run / "detections.parquet")
    ext = pd.read_parquet(run / "extractions.parquet")
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["generator"]["type"] == "diffusers-text2image"
    assert manifest["generator"]["num_inference_steps"] == STEPS
    assert manifest["counts"] == {
        "prompts": 2,
        "samples": 24,
        "detections": 0,
        "undecided": 0,
        "extractions": 0,
        "extracted_images": 0,
    }
    assert len(det) == 2 and not det["detected"].any() and len(ext) == 0
    # every pair of generations is far apart: a random pipeline does not repeat itself
    assert (det["min_pairwise_distance"] > 0.08).all()
    assert "0 extractions" in proc.stdout


WRAPPER = '''
import torch

from memscan.generators.text2image import Text2ImageGenerator, load_pipeline

MODEL = {model!r}


class IgnoresNoise(Text2ImageGenerator):
    """For one prompt, every sample starts from the same latent: the output ignores the seed."""

    def initial_latents(self, prompt, seeds, generators):
        x = super().initial_latents(prompt, seeds, generators)
        if prompt == "the fixed one":
            fixed = torch.randn(self.latent_shape, generator=torch.Generator().manual_seed(1234))
            x = fixed.expand_as(x).clone().to(x.dtype)
        return x


def make():
    return IgnoresNoise(load_pipeline(MODEL), num_inference_steps={steps}, guidance_scale={guidance}, batch_size=12)
'''


def test_pipeline_ignoring_the_noise_is_detected_and_extracted(tiny_dir, tmp_path):
    wrapper = tmp_path / "ignores_noise.py"
    wrapper.write_text(textwrap.dedent(WRAPPER.format(model=str(tiny_dir), steps=STEPS, guidance=GUIDANCE)))
    # the training set holds the image the wrapped pipeline always makes for "the fixed one"
    import importlib.util

    spec = importlib.util.spec_from_file_location("ignores_noise_local", wrapper)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    fixed = mod.make().generate("the fixed one", [1, 2, 3])
    assert np.array_equal(fixed[0], fixed[1]) and np.array_equal(fixed[0], fixed[2])
    train = tmp_path / "train"
    write_training_set(train, 20, size=32)
    save_png(fixed[0], train / "fixed.png")
    (tmp_path / "prompts.txt").write_text("a red fox\nthe fixed one\n")
    run = tmp_path / "run"
    run_cli(
        "extract",
        "--model",
        f"py:{wrapper}:make",
        "--prompts",
        tmp_path / "prompts.txt",
        "--train",
        train,
        "--out",
        run,
        "--samples-per-prompt",
        12,
        "--batch-size",
        12,
        "--quiet",
    )
    det = pd.read_parquet(run / "detections.parquet").set_index("prompt")
    assert bool(det.loc["the fixed one", "detected"]) and det.loc["the fixed one", "clique_size"] == 12
    assert det.loc["the fixed one", "mean_clique_distance"] == 0.0
    assert not det.loc["a red fox", "detected"] and det.loc["a red fox", "min_pairwise_distance"] > 0.08
    ext = pd.read_parquet(run / "extractions.parquet")
    top = ext[(ext["rank"] == 1) & ext["extracted"]]
    assert top["train_id"].tolist() == ["fixed"] and float(top["tiled_l2"].iloc[0]) == 0.0


def test_unet_only_options_refused_for_unet_models(tmp_path):
    from diffusers import DDPMScheduler, UNet2DModel

    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 8),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        layers_per_block=1,
    )
    unet.save_pretrained(tmp_path / "m" / "unet")
    DDPMScheduler().save_pretrained(tmp_path / "m" / "scheduler")
    with pytest.raises(InputError, match="text-to-image"):
        load_generator(str(tmp_path / "m"), dtype="fp16")


@pytest.mark.parametrize("how", ["custom-pipeline", "custom-component", "code-in-a-component-folder"])
def test_a_model_directory_that_would_run_its_own_code_is_refused(tiny_dir, tmp_path, how):
    """A pipeline naming its own module (``_class_name: [module, class]``), a component from a
    library that is neither diffusers (nor one of its pipeline modules) nor transformers, or a
    ``.py`` file in a component folder: memscan loads model directories as data only. One error
    naming the directory's code, before anything is imported or written — the payload (which
    would write a marker file when imported) never runs."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    marker = tmp_path / "payload-ran"
    payload = f"open({str(marker)!r}, 'w').write('ran')\nclass Evil: pass\n"
    index = json.loads((model / "model_index.json").read_text())
    if how == "custom-pipeline":
        (model / "pipeline.py").write_text(payload)
        index["_class_name"] = ["pipeline", "Evil"]
    elif how == "custom-component":
        index["scheduler"] = ["evil_scheduler", "Evil"]
        (model / "scheduler" / "evil_scheduler.py").write_text(payload)
    else:
        (model / "unet" / "modeling.py").write_text(payload)
    (model / "model_index.json").write_text(json.dumps(index))
    (tmp_path / "p.txt").write_text("a red fox\n")
    write_training_set(tmp_path / "train", 3, size=16)
    proc = run_cli("extract", "--model", model, "--prompts", tmp_path / "p.txt", "--train", tmp_path / "train",
                   "--out", tmp_path / "run", check=False)  # fmt: skip
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert ("custom pipeline" if how == "custom-pipeline" else "code" if how != "custom-component" else
            "not from diffusers or transformers") in errors[0]  # fmt: skip
    assert "py:module:attribute" in proc.stderr
    assert not marker.exists() and not (tmp_path / "run").exists()
    # the library check knows diffusers' own pipeline modules (SD's safety checker comes from one)
    from memscan.generators.diffusers_models import _is_diffusers_pipeline_module

    assert _is_diffusers_pipeline_module("stable_diffusion") and not _is_diffusers_pipeline_module("evil_scheduler")


@pytest.mark.parametrize("scheduler", [None, "pndm", "euler", "lcm-unet"])
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_declared_unet_evaluations_equal_the_unet_calls(scheduler, guidance):
    """The audit prices its budget by ``evaluations_per_generation``. It used to be steps × (2 if
    guided): PNDM's Runge-Kutta warm-up (4 steps → 13 UNet calls: 3 warm-up steps of 4 evaluations
    each, then 1 linear multistep; not 4) and an LCM-distilled UNet
    (guidance embedded, ``time_cond_proj_dim``: diffusers does not guide) were miscounted.
    Counted here by a hook on the UNet, one image, rows of a guided batch counted each."""
    from diffusers import LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from memscan.testing.tiny_sd import build_tiny_sd

    pipe = build_tiny_sd()
    if scheduler == "lcm-unet":
        cfg = {k: v for k, v in pipe.unet.config.items() if not k.startswith("_")}
        unet = UNet2DConditionModel.from_config({**cfg, "time_cond_proj_dim": 8})
        lcm = LCMScheduler.from_config(pipe.scheduler.config)
        pipe = StableDiffusionPipeline(**{**pipe.components, "unet": unet, "scheduler": lcm})
    calls = []
    pipe.unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    name = None if scheduler == "lcm-unet" else scheduler
    g = Text2ImageGenerator(pipe, num_inference_steps=4, guidance_scale=guidance, scheduler=name)
    g.generate("a dog", [7])
    assert sum(calls) == g.evaluations_per_generation
    want = {None: 4, "pndm": 3 * 4 + 1, "euler": 4, "lcm-unet": 4}[scheduler]  # None: the tiny SD's DDIM
    guided = guidance > 1 and scheduler != "lcm-unet"
    assert g.evaluations_per_generation == want * (2 if guided else 1)


def test_a_rectangular_native_size_keeps_its_width():
    """``sample_size`` (h, w) is read as diffusers' pipelines read it: the width used to be h too."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from memscan.testing.tiny_sd import build_tiny_sd

    pipe = build_tiny_sd()
    cfg = {k: v for k, v in pipe.unet.config.items() if not k.startswith("_")}
    unet = UNet2DConditionModel.from_config({**cfg, "sample_size": [8, 12]})
    pipe = StableDiffusionPipeline(**{**pipe.components, "unet": unet})
    g = Text2ImageGenerator(pipe, num_inference_steps=1, guidance_scale=1.0)
    assert g.output_shape == (16, 24, 3) and g.config["resolution"] == [16, 24]
    assert g.generate("a dog", [1]).shape == (1, 16, 24, 3)


def test_a_schedule_the_scheduler_cannot_make_is_one_error_at_load():
    """PNDM (with its Runge-Kutta warm-up) cannot make 2 steps: diffusers raises a bare
    ValueError from ``set_timesteps``, now one error naming the scheduler, the steps and the fix."""
    from memscan.testing.tiny_sd import build_tiny_sd

    with pytest.raises(InputError, match=r"PNDMScheduler cannot sample 2 steps.*--steps"):
        Text2ImageGenerator(build_tiny_sd(), num_inference_steps=2, guidance_scale=1.0, scheduler="pndm")

"""What the commands share behaves the same in each: ``--dtype`` spellings, the loading of a
``.bin``-only UNet, and ``--quiet`` / the progress bar of ``memscan lm index``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from gen_support import tiny_unet
from typer.testing import CliRunner

from memscan.cli import app
from memscan.commands.common import canonical_dtype
from memscan.devices import DTYPE_SPELLINGS
from memscan.errors import InputError

TINY_SD = Path(__file__).parent / "data" / "tiny_sd_memorized"
runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


# ---- --dtype: the same spellings everywhere -----------------------------------------------------
# (spelling, what the command passes on): a spelling the command read before is passed on as it
# was (the manifests record --dtype as given, and --resume compares that record); a new one
# becomes the command's own name for the same precision
IMAGE_DTYPES = [
    ("auto", "auto"),
    ("fp32", "fp32"),
    ("fp16", "fp16"),
    ("bf16", "bf16"),
    ("FP16", "FP16"),
    ("float32", "fp32"),
    ("float16", "fp16"),
    ("bfloat16", "bf16"),
    ("Float16", "fp16"),
    ("BFLOAT16", "bf16"),
]
LM_DTYPES = [
    ("auto", "auto"),
    ("float32", "float32"),
    ("fp32", "fp32"),
    ("float16", "float16"),
    ("fp16", "fp16"),
    ("bfloat16", "bfloat16"),
    ("bf16", "bf16"),
    ("AUTO", "auto"),
    ("FP16", "fp16"),
    ("Float16", "float16"),
    ("BF16", "bf16"),
]


def _stop(seen: list):
    """A stand-in for a command's library call: records the ``--dtype`` it got, then stops."""

    def fake(*args, **kwargs):
        cfg = next((a for a in (*args, *kwargs.values()) if hasattr(a, "dtype") and hasattr(a, "device")), None)
        seen.append(kwargs["dtype"] if cfg is None else cfg.dtype)
        raise InputError("stopped by the test", "nothing to fix")

    return fake


# command → (the library function it calls, its arguments before --dtype)
LM_DTYPE_COMMANDS = {
    "lm extractable": ("memscan.lm.extractable_run.lm_extractable", ("--data", "d.jsonl")),
    "lm exposure": ("memscan.lm.exposure_run.lm_exposure", ("--canaries", "my PIN is {d2}::my PIN is 12")),
    "lm mia": ("memscan.lm.mia_run.run_lm_mia", ("--members", "a.txt", "--nonmembers", "b.txt")),
    "lm extract": ("memscan.lm.extract_run.lm_extract", ("--index", "idx")),
}


@pytest.mark.parametrize(("spelling", "passed"), LM_DTYPES)
@pytest.mark.parametrize("command", sorted(LM_DTYPE_COMMANDS))
def test_every_lm_command_takes_every_dtype_spelling(tmp_path, monkeypatch, command, spelling, passed):
    target, extra = LM_DTYPE_COMMANDS[command]
    seen: list = []
    monkeypatch.setattr(target, _stop(seen))
    res = cli(*command.split(), "--model", tmp_path / "m", *extra, "--out", tmp_path / "o", "--dtype", spelling)
    assert "stopped by the test" in res.output, res.output
    assert seen == [passed]


@pytest.mark.parametrize(("spelling", "passed"), IMAGE_DTYPES)
def test_extract_takes_every_dtype_spelling(tmp_path, monkeypatch, spelling, passed):
    seen: list = []
    monkeypatch.setattr("memscan.generators.load.load_generator", _stop(seen))
    (tmp_path / "p.txt").write_text("a prompt\n")
    args = ("extract", "--model", TINY_SD, "--prompts", tmp_path / "p.txt", "--train", tmp_path)
    res = cli(*args, "--out", tmp_path / "o", "--dtype", spelling)
    assert "stopped by the test" in res.output, res.output
    assert seen == [passed]


@pytest.mark.parametrize("spelling", sorted({s for s in DTYPE_SPELLINGS} | {s.upper() for s in DTYPE_SPELLINGS}))
def test_both_libraries_read_what_the_commands_pass_as_the_same_precision(spelling):
    """Whichever command family gets a spelling, its library turns it into the same torch dtype."""
    from memscan.generators.causal_lm import _torch_dtype
    from memscan.generators.text2image import resolve_dtype

    for device in ("cpu", "cuda"):
        image = resolve_dtype(canonical_dtype(spelling, "image"), device)
        lm = _torch_dtype(canonical_dtype(spelling, "lm"), device)
        if spelling.lower() == "auto":  # the libraries' own defaults: fp16 on CUDA for images
            assert str(image) == ("torch.float16" if device == "cuda" else "torch.float32")
        else:
            assert image == lm == getattr(torch, DTYPE_SPELLINGS[spelling.lower()])


def test_a_new_spelling_runs_end_to_end_and_is_recorded_as_its_canonical_name(tmp_path):
    """`lm mia --dtype FLOAT32` on a tiny GPT-2: the run records ``float32``, and a resume with
    the old spelling ``float32`` is the same run."""
    pytest.importorskip("transformers")
    from memscan.testing.tiny_lm import make_tiny_gpt2

    model = make_tiny_gpt2(tmp_path / "gpt2")
    (tmp_path / "a.txt").write_text("a member text of some length\nanother member text\n")
    (tmp_path / "b.txt").write_text("a text that was not trained on\nand one more of them\n")
    out = tmp_path / "o"
    args = ("lm", "mia", "--model", model, "--members", tmp_path / "a.txt", "--nonmembers", tmp_path / "b.txt")
    res = cli(*args, "--out", out, "--bootstrap", 0, "--quiet", "--dtype", "FLOAT32")
    assert res.exit_code == 0, res.output
    assert json.loads((out / "manifest.json").read_text())["config"]["dtype"] == "float32"
    res = cli(*args, "--out", out, "--bootstrap", 0, "--quiet", "--dtype", "float32", "--resume")
    assert res.exit_code == 0, res.output


# ---- a .bin-only UNet: loaded weights-only by every diffusion command ---------------------------
def _bin_unet(root: Path) -> tuple[Path, object]:
    """A tiny class-conditional UNet2DModel pipeline (3 classes, null class 2) whose weights are
    only ``unet/diffusion_pytorch_model.bin``."""
    from diffusers import DDPMScheduler

    unet = tiny_unet(size=32, groups=8, classes=3)
    unet.save_pretrained(root / "unet", safe_serialization=False)
    DDPMScheduler(num_train_timesteps=100).save_pretrained(root / "scheduler")
    (root / "memscan.json").write_text(json.dumps({"null_class": 2}))
    assert sorted(p.name for p in (root / "unet").iterdir()) == ["config.json", "diffusion_pytorch_model.bin"]
    return root, unet


def _diffusion_args(command: str, model: Path, tmp: Path) -> tuple:
    (tmp / "ids.txt").write_text("0\n1\n")
    (tmp / "m.txt").write_text("m0\nm1\n")
    data = tmp / "clean"
    if not data.exists():
        from PIL import Image

        from memscan.synthetic import training_image

        data.mkdir()
        for i in range(4):
            Image.fromarray(training_image(f"m{i}", 32)).save(data / f"m{i}.png")
    return {
        "extract": ("extract", "--model", model, "--prompts", tmp / "ids.txt", "--train", data,
                    "--samples-per-prompt", 4, "--min-clique", 3, "--steps", 2),
        "triage": ("triage", "--model", model, "--prompts", tmp / "ids.txt", "--num-inference-steps", 4),
        "mia": ("mia", "--data", data, "--model", model, "--members", tmp / "m.txt", "--condition", "null",
                "--timesteps", 10, "--noise-draws", 1, "--bootstrap", 5),
        "inpaint": ("inpaint", "--data", data, "--model", model, "--members", tmp / "m.txt", "--condition", "null",
                    "--steps", 2, "--jump-n-sample", 1, "--bootstrap", 5),
    }[command]  # fmt: skip


@pytest.mark.parametrize("command", ["extract", "triage", "mia", "inpaint"])
def test_a_bin_only_unet_runs_in_every_diffusion_command(tmp_path, command):
    model, _ = _bin_unet(tmp_path / "model")
    res = cli(*_diffusion_args(command, model, tmp_path), "--out", tmp_path / "o", "--quiet")
    assert res.exit_code == 0, res.output


def test_membership_loads_the_bin_weights_themselves(tmp_path):
    """The noise predictor of mia and inpaint holds the saved weights, not a fresh initialisation."""
    from memscan.mia.noise import load_noise_predictor

    model, unet = _bin_unet(tmp_path / "model")
    loaded = load_noise_predictor(model).unet
    want = unet.state_dict()
    got = loaded.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert not loaded.training


def test_a_bin_only_text_to_image_unet_loads_for_membership(tmp_path):
    """The UNet2DConditionModel of a pipeline, saved as .bin only, loads as a noise predictor too."""
    import shutil

    from safetensors.torch import load_file

    from memscan.mia.noise import load_noise_predictor

    shutil.copytree(TINY_SD, tmp_path / "sd")
    st = tmp_path / "sd" / "unet" / "diffusion_pytorch_model.safetensors"
    want = load_file(st)
    torch.save(want, st.with_suffix(".bin"))
    st.unlink()
    got = load_noise_predictor(tmp_path / "sd").unet.state_dict()
    assert type(load_noise_predictor(tmp_path / "sd").unet).__name__ == "UNet2DConditionModel"
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_bin_that_does_not_fit_the_config_is_one_error_naming_it(tmp_path):
    from memscan.mia.noise import load_noise_predictor

    model, unet = _bin_unet(tmp_path / "model")
    config = json.loads((model / "unet" / "config.json").read_text())
    (model / "unet" / "config.json").write_text(json.dumps({**config, "block_out_channels": [16, 32]}))
    with pytest.raises(InputError, match=r"config.json does not fit the UNet's weights"):
        load_noise_predictor(model)
    (model / "unet" / "config.json").write_text(json.dumps(config))
    state = unet.state_dict()
    state.pop(next(iter(state)))
    torch.save(state, model / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(InputError, match=r"1 missing, 0 unexpected"):
        load_noise_predictor(model)


# ---- memscan lm index: a progress bar, and --quiet ----------------------------------------------
def _txt_corpus(root: Path) -> Path:
    root.mkdir()
    for i in range(3):
        (root / f"d{i}.txt").write_text(f"document {i} of the training corpus\n")
    return root


def test_lm_index_shows_a_progress_bar_unless_quiet(tmp_path):
    corpus = _txt_corpus(tmp_path / "c")
    res = cli("lm", "index", corpus, "--out", tmp_path / "loud", "--bytes")
    assert res.exit_code == 0, res.output
    assert "3/3 documents" in res.output  # the bar's last state: the documents read, of all there are
    res = cli("lm", "index", corpus, "--out", tmp_path / "quiet", "--bytes", "--quiet")
    assert res.exit_code == 0, res.output
    assert "3/3" not in res.output and "━" not in res.output
    assert res.output.startswith("3 documents")  # the summary line only


def test_lm_index_counts_documents_it_cannot_count_beforehand(tmp_path):
    """A JSONL corpus (blank lines skipped) gives no total: the bar counts the documents read."""
    from memscan.lm.index_run import document_count
    from memscan.lm.text_data import open_text_source

    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"text": "first document"}\n\n{"text": "second document"}\n')
    assert document_count(open_text_source(jsonl)) is None
    assert document_count(open_text_source(_txt_corpus(tmp_path / "txt"))) == 3
    res = cli("lm", "index", jsonl, "--out", tmp_path / "o", "--bytes")
    assert res.exit_code == 0, res.output
    assert "2/? documents" in res.output


@pytest.mark.parametrize("spelling", sorted(DTYPE_SPELLINGS))
def test_the_library_loaders_take_every_spelling_the_cli_takes(spelling):
    """The Python API (text-to-image and causal-LM loaders) reads the same spellings as --dtype,
    in any case: ``resolve_dtype("float16")`` was refused and ``_torch_dtype("FP16")`` too."""
    import torch

    from memscan.generators.causal_lm import _torch_dtype
    from memscan.generators.text2image import resolve_dtype

    for s in (spelling, spelling.upper()):
        want = {"auto": torch.float32}.get(spelling) or getattr(torch, DTYPE_SPELLINGS[spelling])
        assert resolve_dtype(s, "cpu") == want
        assert _torch_dtype(s, "cpu") == want
    for bad in ("fp8", "half"):
        with pytest.raises(InputError, match="--dtype"):
            resolve_dtype(bad, "cpu")
        with pytest.raises(InputError, match="--dtype"):
            _torch_dtype(bad, "cpu")


def test_sharded_safetensors_win_over_a_stray_bin(tmp_path):
    """A UNet folder with sharded safetensors (an index file) and a stray .bin loads the
    safetensors, as diffusers does; the .bin (other weights) is not read."""
    import torch
    from diffusers import DDPMScheduler

    from memscan.generators.diffusers_models import load_unet
    from memscan.generators.diffusers_unet import _load_unet

    root = tmp_path / "m"
    unet = tiny_unet(size=32, groups=8, classes=3)
    unet.save_pretrained(root / "unet", max_shard_size="20KB")
    assert (root / "unet" / "diffusion_pytorch_model.safetensors.index.json").exists()
    torch.save(
        {k: torch.zeros_like(v) for k, v in unet.state_dict().items()}, root / "unet" / "diffusion_pytorch_model.bin"
    )
    DDPMScheduler(num_train_timesteps=100).save_pretrained(root / "scheduler")
    for loaded in (load_unet(root / "unet", str(root)), _load_unet(root / "unet")):
        for k, v in unet.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v), k

"""Untrusted checkpoints never go through an unrestricted unpickler."""

import pickle
import re

import numpy as np
import pytest
import torch
from gen_support import tiny_unet
from pickle_support import Payload, SystemCall

from memscan import InputError
from memscan.generators.diffusers_unet import load_unet_generator
from memscan.safe_load import load_state_dict


def _tiny_unet():
    return tiny_unet(channels=1, blocks=(8, 8))


def _save_model(root, weights):
    from diffusers import DDPMScheduler

    unet = _tiny_unet()
    (root / "unet").mkdir(parents=True)
    unet.save_config(root / "unet")
    DDPMScheduler(num_train_timesteps=100).save_pretrained(root / "scheduler")
    torch.save(weights(unet), root / "unet" / "diffusion_pytorch_model.bin") if callable(weights) else None
    return unet


def test_bin_weights_load_weights_only(tmp_path):
    unet = _save_model(tmp_path, lambda u: u.state_dict())
    gen = load_unet_generator(str(tmp_path), num_inference_steps=3, batch_size=2)
    for a, b in zip(unet.state_dict().values(), gen.unet.state_dict().values()):
        torch.testing.assert_close(a, b)
    assert gen.generate("", [1, 2]).shape == (2, 8, 8, 1)


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    _save_model(tmp_path, None)
    with open(tmp_path / "unet" / "diffusion_pytorch_model.bin", "wb") as f:
        pickle.dump({"weight": Payload(str(marker))}, f)
    with pytest.raises(InputError, match="refused to load"):
        load_unet_generator(str(tmp_path))
    assert not marker.exists()
    with pytest.raises(InputError, match="refused"):
        load_state_dict(tmp_path / "unet" / "diffusion_pytorch_model.bin")
    assert not marker.exists()
    # the control: an unrestricted unpickler would have run it
    with open(tmp_path / "unet" / "diffusion_pytorch_model.bin", "rb") as f:
        pickle.load(f)
    assert marker.exists()


def test_safetensors_round_trip(tmp_path):
    from safetensors.torch import save_file

    t = {"a": torch.arange(6.0).reshape(2, 3)}
    save_file(t, tmp_path / "w.safetensors")
    np.testing.assert_array_equal(load_state_dict(tmp_path / "w.safetensors")["a"].numpy(), t["a"].numpy())
    with pytest.raises(InputError, match="unknown checkpoint format"):
        load_state_dict(tmp_path / "w.npz")


# --------------------------------------------------------------------------------------------
# damaged checkpoints: one error naming the file, not a refusal (nor a bare EOFError/KeyError)
# --------------------------------------------------------------------------------------------
def _truncated_checkpoint(path):
    torch.save({"w": torch.arange(64.0), "b": torch.ones(8)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a download cut short


def _damaged_checkpoints(root):
    """name → a checkpoint file that is no loadable checkpoint (and no pickle of code either)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "empty.pt").write_bytes(b"")
    (root / "text.bin").write_bytes(b"hello world this is not a checkpoint")
    _truncated_checkpoint(root / "trunc.pt")
    (root / "empty.safetensors").write_bytes(b"")
    return {f.name: f for f in sorted(root.iterdir())}


@pytest.mark.parametrize("name", ["empty.pt", "text.bin", "trunc.pt", "empty.safetensors"])
def test_a_damaged_checkpoint_is_one_error_naming_the_file_not_a_refusal(tmp_path, name):
    path = _damaged_checkpoints(tmp_path / "ck")[name]
    with pytest.raises(InputError) as info:
        load_state_dict(path)
    message = str(info.value)
    assert str(path) in message, message
    assert "refused" not in message and "more than tensors" not in message, message
    assert "empty" in message or "truncated" in message, message
    assert "download it again" in info.value.hint


def test_a_truncated_checkpoint_names_the_zip_failure_in_one_sentence(tmp_path):
    _truncated_checkpoint(tmp_path / "trunc.pt")
    with pytest.raises(InputError, match=r"truncated, damaged or not a PyTorch checkpoint \(RuntimeError: "):
        load_state_dict(tmp_path / "trunc.pt")


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_a_pickle_of_more_than_tensors_is_still_refused_with_the_security_wording(tmp_path, protocol):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"w": Payload(str(marker))}, protocol=protocol))
    with pytest.raises(InputError, match="refused to load evil.pt: it is a pickle holding more than tensors") as info:
        load_state_dict(evil)
    assert "never unpickles code" in info.value.hint
    assert "weights_only` set to `False`" not in str(info.value)  # not torch's advice to load it unrestricted
    torch.save({"w": Payload(str(marker))}, tmp_path / "evil_zip.pt")  # torch's own zip format
    with pytest.raises(InputError, match="refused to load evil_zip.pt") as info:
        load_state_dict(tmp_path / "evil_zip.pt")
    assert "Weights only load failed" not in str(info.value)  # torch's advice, not the reason
    assert re.search(r"unsupported GLOBAL|Unsupported global", str(info.value)), str(info.value)
    # a builtin-module global (os.system → posix.system) is refused with another torch wording,
    # whose first line is torch's advice: the reason is still the line naming the global
    torch.save({"w": SystemCall()}, tmp_path / "evil_system.pt")
    with pytest.raises(InputError, match="refused to load evil_system.pt") as info:
        load_state_dict(tmp_path / "evil_system.pt")
    assert "Weights only load failed" not in str(info.value)
    assert re.search(r"unsupported GLOBAL (posix|nt)\.system", str(info.value)), str(info.value)
    assert not marker.exists()


def test_a_unet_folder_with_an_empty_bin_names_the_file(tmp_path):
    _save_model(tmp_path, None)
    weights = tmp_path / "unet" / "diffusion_pytorch_model.bin"
    weights.write_bytes(b"")
    with pytest.raises(InputError, match="the file is empty") as info:
        load_unet_generator(str(tmp_path))
    assert str(weights) in str(info.value)


def test_the_index_cli_on_an_empty_open_clip_checkpoint_prints_one_error_naming_it(tmp_path, monkeypatch):
    """``memscan index --embedder open_clip:MODEL:<empty .pt>``: one ``error:`` line naming the
    file (before the fix: click's bare "Aborted." from an EOFError). memscan's safe loader reads
    the weights before open_clip is imported, so a stand-in open_clip is enough (and never called)."""
    import sys
    import types

    from typer.testing import CliRunner

    from memscan.cli import app
    from memscan.synthetic import write_training_set

    calls = []
    monkeypatch.setitem(
        sys.modules, "open_clip", types.SimpleNamespace(create_model_and_transforms=lambda *a, **k: calls.append(a))
    )
    write_training_set(tmp_path / "train", 3, size=16)
    checkpoints = _damaged_checkpoints(tmp_path / "ck")
    for name in ("empty.pt", "text.bin", "trunc.pt"):
        res = CliRunner().invoke(
            app,
            [
                "index",
                str(tmp_path / "train"),
                "--out",
                str(tmp_path / f"idx_{name}"),
                "--embedder",
                f"open_clip:ViT-B-32:{checkpoints[name]}",
            ],
        )
        assert res.exit_code == 2, res.output
        assert "Traceback" not in res.output and "Aborted" not in res.output, res.output
        errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and str(checkpoints[name]) in errors[0], res.output
    assert calls == []

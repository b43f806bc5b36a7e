"""Untrusted checkpoints never go through an unrestricted unpickler."""

import pickle

import numpy as np
import pytest
import torch
from gen_support import tiny_unet
from pickle_support import Payload

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

"""Shadow models: membership assignment, per-model resume (counted train_fn calls), stored masks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from memscan.demo.shadow_recipe import DemoRecipe, shadow_train_config
from memscan.errors import InputError
from memscan.mia.shadow import load_shadow_models, shadow_membership, train_shadow_models


def test_membership_schemes():
    m = shadow_membership(50, 8, seed=3)
    assert m.dtype == bool and m.shape == (8, 50)
    assert (m.sum(0) == 4).all()  # balanced: every example IN exactly M/2 models
    assert 15 <= m.sum(1).min() and m.sum(1).max() <= 35  # each model sees about half
    assert np.array_equal(m, shadow_membership(50, 8, seed=3))
    assert not np.array_equal(m, shadow_membership(50, 8, seed=4))
    h = shadow_membership(51, 5, seed=0, scheme="halves")
    assert (h.sum(1) == 25).all()  # halves: exactly ⌊N/2⌋ per model
    assert len({tuple(r) for r in h}) == 5
    with pytest.raises(InputError, match="scheme"):
        shadow_membership(10, 4, scheme="thirds")
    with pytest.raises(InputError, match="n_models"):
        shadow_membership(10, 0)


class _Counter:
    """A train_fn that records its calls and writes the mean of its subset; can crash on demand."""

    def __init__(self, crash_at=None):
        self.calls = []
        self.crash_at = crash_at

    def __call__(self, subset, model_dir):
        if self.crash_at is not None and len(self.calls) == self.crash_at:
            (model_dir / "partial.bin").write_bytes(b"half written")
            raise RuntimeError("killed")
        self.calls.append(np.asarray(subset).copy())
        (model_dir / "model.json").write_text(json.dumps({"mean": float(np.mean(subset)), "n": len(subset)}))
        return {"n": len(subset)}

    def describe(self):
        return {"train_fn": "counter"}


def test_resumes_per_model(tmp_path):
    data = np.arange(20.0) * 3
    ids = [f"e{i:02d}" for i in range(20)]
    crashing = _Counter(crash_at=3)
    with pytest.raises(RuntimeError, match="killed"):
        train_shadow_models(data, crashing, tmp_path, n_models=6, seed=1, ids=ids)
    assert len(crashing.calls) == 3
    partial = load_shadow_models(tmp_path)
    assert partial.done == [True, True, True, False, False, False]
    assert (tmp_path / "models" / "0003" / "partial.bin").exists()

    resumed = _Counter()
    sm = train_shadow_models(data, resumed, tmp_path, n_models=6, seed=1, ids=ids)
    assert len(resumed.calls) == 3  # models 3, 4, 5 only
    assert all(sm.done)
    assert not (tmp_path / "models" / "0003" / "partial.bin").exists()  # the half-written model was redone
    # each model trained on exactly its mask's members, in pool order
    for k, m in enumerate((3, 4, 5)):
        np.testing.assert_array_equal(resumed.calls[k], data[sm.membership[m]])
    # the masks on disk: .npy without pickle and JSON indices, both equal to the seeded assignment
    mask = np.load(tmp_path / "membership.npy", allow_pickle=False)
    np.testing.assert_array_equal(mask, shadow_membership(20, 6, seed=1))
    for m in range(6):
        rec = json.loads((tmp_path / "models" / f"{m:04d}.done.json").read_text())
        assert rec["member_indices"] == np.flatnonzero(mask[m]).tolist()
        model = json.loads((sm.model_dir(m) / "model.json").read_text())
        assert model["mean"] == pytest.approx(data[mask[m]].mean())
    # a complete directory trains nothing
    again = _Counter()
    train_shadow_models(data, again, tmp_path, n_models=6, seed=1, ids=ids)
    assert again.calls == []
    # a damaged completion record (other members) makes that model train again
    rec_path = tmp_path / "models" / "0002.done.json"
    rec = json.loads(rec_path.read_text())
    rec["member_indices"] = rec["member_indices"][1:]
    rec_path.write_text(json.dumps(rec))
    fix = _Counter()
    train_shadow_models(data, fix, tmp_path, n_models=6, seed=1, ids=ids)
    assert len(fix.calls) == 1
    np.testing.assert_array_equal(fix.calls[0], data[mask[2]])


def test_refuses_a_directory_made_with_other_settings(tmp_path):
    data = np.arange(10.0)
    train_shadow_models(data, _Counter(), tmp_path, n_models=2, seed=0)
    with pytest.raises(InputError, match="seed"):
        train_shadow_models(data, _Counter(), tmp_path, n_models=2, seed=1)
    with pytest.raises(InputError, match="ids"):
        train_shadow_models(data, _Counter(), tmp_path, n_models=2, seed=0, ids=list("abcdefghij"))
    with pytest.raises(InputError, match="not a shadow directory"):
        load_shadow_models(tmp_path / "nothing")
    with pytest.raises(InputError, match="not unique"):
        train_shadow_models(data, _Counter(), tmp_path / "x", n_models=2, ids=["a"] * 10)


def test_demo_recipe_saves_a_loadable_safetensors_model(tmp_path):
    from sklearn.datasets import load_digits

    imgs = np.clip(load_digits().images[:6] * 255 / 16, 0, 255).astype(np.uint8)[..., None]
    recipe = DemoRecipe(shadow_train_config(steps=3, batch_size=4, block_out_channels=(8, 16), warmup=1), threads=1)
    sm = train_shadow_models(imgs, recipe, tmp_path, n_models=2, seed=0)
    assert sm.recipe["config"]["steps"] == 3 and sm.recipe["config"]["p_uncond"] == 1.0
    for m in range(2):
        files = {p.name for p in sm.model_dir(m).rglob("*") if p.is_file()}
        assert "diffusion_pytorch_model.safetensors" in files
        assert not any(f.endswith((".bin", ".pt", ".pkl", ".ckpt")) for f in files)
        p = sm.load_predictor(m)
        assert p.null_class == int(sm.membership[m].sum())  # one class per member + the null class
        meta = json.loads((sm.model_dir(m) / "memscan.json").read_text())
        assert meta["training"]["data"]["rows"] == int(sm.membership[m].sum())
    with pytest.raises(InputError, match="uint8"):
        recipe(imgs.astype(np.float32), tmp_path / "bad")

"""The triage schedule's defaults (50 steps, guidance 7.5) are filled in by one function,
:func:`memscan.triage.scores.resolve_schedule`, for ``memscan triage``, the audit's triage and the
scores themselves: the config's value first, then the model's (``memscan.json``, generator), then
the defaults."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from memscan.triage import TriageConfig, triage

pytest.importorskip("transformers")

DATA = Path(__file__).parent / "data" / "tiny_sd_memorized"  # its memscan.json: 10 steps, guidance 3.0


@pytest.mark.parametrize(
    ("given", "model", "want"),
    [
        ((None, None), (None, None), (50, 7.5)),  # nothing set: SD's defaults
        ((None, None), (10, 3.0), (10, 3.0)),  # the model's own values win over the defaults
        ((20, 5.0), (10, 3.0), (20, 5.0)),  # the config's win over the model's
        ((0, None), (None, 0.0), (50, 0.0)),  # 0 steps is open; guidance 0.0 is a value
        ((None, 1.0), (12, None), (12, 1.0)),  # each field on its own
    ],
)
def test_the_config_then_the_model_then_the_defaults(given, model, want):
    from memscan.audit.support import triage_config_for
    from memscan.triage.scores import resolve_schedule

    cfg = TriageConfig(num_inference_steps=given[0], guidance_scale=given[1])
    got = resolve_schedule(cfg, *model)
    assert (got.num_inference_steps, got.guidance_scale) == want
    # the audit's triage of a generator with those sampling values
    gen = SimpleNamespace(steps=model[0], guidance_scale=model[1])
    audit = triage_config_for(gen, cfg)
    assert (audit.num_inference_steps, audit.guidance_scale) == want


def test_every_path_takes_the_defaults_from_one_place(monkeypatch, tmp_path):
    """With the defaults changed where they are defined, ``memscan triage`` (a model without
    sampling values of its own), the audit's triage and the scores' own record all follow; a
    model's memscan.json still wins over them."""
    import memscan.triage.scores as scores
    from memscan.audit.support import triage_config_for
    from memscan.testing.tiny_sd import build_tiny_sd
    from memscan.triage.scores import TriageModel, score_record

    monkeypatch.setattr(scores, "DEFAULT_STEPS", 20)
    monkeypatch.setattr(scores, "DEFAULT_GUIDANCE", 2.0)
    cfg = TriageConfig(generations=1, scores=("wen",), batch_size=1)
    pipe = build_tiny_sd()  # a loaded pipeline: no memscan.json
    res = triage(pipe, ["a red box"], tmp_path / "t", cfg, progress=False)
    got = res.manifest["config"]
    assert (got["num_inference_steps"], got["guidance_scale"]) == (20, 2.0)
    assert res.manifest["scores"]["wen"]["num_inference_steps"] == 20
    assert res.manifest["scores"]["guidance"]["scale"] == 2.0
    audit = triage_config_for(SimpleNamespace(), TriageConfig())
    assert (audit.num_inference_steps, audit.guidance_scale) == (20, 2.0)
    record = score_record(TriageModel(pipe), TriageConfig(scores=("wen",)))
    assert record["wen"]["num_inference_steps"] == 20 and record["guidance"]["scale"] == 2.0
    # a model directory's memscan.json comes before the defaults
    res = triage(str(DATA), ["a red box"], tmp_path / "m", cfg, progress=False)
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert (manifest["config"]["num_inference_steps"], manifest["config"]["guidance_scale"]) == (10, 3.0)


@pytest.mark.parametrize(
    "meta", [{"null_class": 2}, {"null_class": 2, "guidance_scale": 2.0, "num_inference_steps": 6}]
)
def test_a_class_model_is_triaged_at_the_schedule_its_extraction_samples_with(tmp_path, meta):
    """A class-conditional UNet2DModel directory without a guidance_scale in memscan.json samples
    with guidance 1 (no guidance) in extract and the audit; triage took SD's 7.5 for it, so its
    score was measured at a schedule the extraction never runs."""
    from diffusers import DDPMScheduler
    from gen_support import tiny_unet

    from memscan.generators.diffusers_unet import load_unet_generator

    root = tmp_path / "model"
    tiny_unet(size=16, groups=8, classes=3).save_pretrained(root / "unet")
    DDPMScheduler(num_train_timesteps=100).save_pretrained(root / "scheduler")
    (root / "memscan.json").write_text(json.dumps(meta))
    gen = load_unet_generator(str(root))
    res = triage(str(root), ["0", "1"], tmp_path / "t", TriageConfig(generations=1, steps=1), progress=False)
    cfg = res.manifest["config"]
    assert (cfg["num_inference_steps"], cfg["guidance_scale"]) == (gen.steps, gen.guidance_scale)
    assert cfg["guidance_scale"] == meta.get("guidance_scale", 1.0)

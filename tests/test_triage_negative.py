"""Guidance's negative prompt in triage: encoded once, not once per UNet batch, with the very
scores that encoding it per batch gives (tiny SD and SDXL pipelines built from config)."""

from __future__ import annotations

import numpy as np
import pytest

from memscan.triage import TriageConfig, score_prompts
from memscan.triage.scores import text2image_triage_model

pytest.importorskip("transformers")

NEGATIVE = "a grey fog"
PROMPTS = ["a red fox in snow", "two cats", "purple tulips"]
IDS = ["p0", "p1", "p2"]
# 2 generations per prompt, 2 per UNet call: 3 batches of one prompt each
CFG = TriageConfig(generations=2, steps=1, num_inference_steps=4, guidance_scale=3.0, batch_size=2)


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def pipe(request):
    if request.param == "sd":
        from memscan.testing.tiny_sd import build_tiny_sd

        return build_tiny_sd()
    from memscan.testing.tiny_sdxl import build_tiny_sdxl

    return build_tiny_sdxl()


def _count_negative_encodings(pipe, negative: str):
    """Forward hooks on the pipeline's text encoder(s) that count the calls encoding ``negative``
    (a row of input ids equal to its tokens): counted where the encoding happens, not through
    memscan's code."""
    import torch

    calls, hooks = [], []
    for tok_name, enc_name in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
        tok, enc = getattr(pipe, tok_name, None), getattr(pipe, enc_name, None)
        if tok is None or enc is None:
            continue
        ids = tok([negative], padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids[0]  # fmt: skip

        def hook(module, args, out, ids=ids, name=enc_name):
            if any(torch.equal(row.cpu(), ids) for row in args[0]):
                calls.append(name)

        hooks.append(enc.register_forward_hook(hook))
    return calls, hooks


def test_the_negative_prompt_is_encoded_once_not_per_batch(pipe):
    model = text2image_triage_model(pipe, negative_prompt=NEGATIVE)
    encoders = 2 if getattr(pipe, "text_encoder_2", None) is not None else 1
    calls, hooks = _count_negative_encodings(pipe, NEGATIVE)
    try:
        got = score_prompts(model, IDS, PROMPTS, CFG)  # 3 UNet batches of 2 rows
        assert len(calls) == encoders, calls  # once (per text encoder), not once per batch (3×)
        # a later shard of the same run (the worker keeps its model) encodes nothing again
        score_prompts(model, IDS[:1], PROMPTS[:1], CFG)
        assert len(calls) == encoders, calls
    finally:
        for h in hooks:
            h.remove()
    # bit for bit what encoding the negative prompt for each batch gives: each batch scored by a
    # fresh model, which encodes it for that batch
    for k in range(len(PROMPTS)):
        fresh = text2image_triage_model(pipe, negative_prompt=NEGATIVE)
        alone = score_prompts(fresh, IDS[k : k + 1], PROMPTS[k : k + 1], CFG)
        for name in ("wen", "webster"):
            assert np.array_equal(alone[f"{name}_per_generation"][0], got[f"{name}_per_generation"][k]), (name, k)
    # guidance did use the negative prompt: c, "" and the negative per Wen step; c and the negative for Webster
    assert got["unet_evaluations_per_prompt"] == 2 * (3 + 2)


def test_a_batch_of_another_size_gets_the_encoding_of_its_own_size(pipe):
    """The last, smaller batch is encoded at its own size (a text encoder's numbers may depend on
    the batch shape), once; its rows score as a run of that batch alone does."""
    model = text2image_triage_model(pipe, negative_prompt=NEGATIVE)
    cfg = TriageConfig(**{**CFG.to_dict(), "batch_size": 4, "scores": ("webster",)})  # batches of 4 and 2 rows
    calls, hooks = _count_negative_encodings(pipe, NEGATIVE)
    try:
        got = score_prompts(model, IDS, PROMPTS, cfg)
        score_prompts(model, IDS, PROMPTS, cfg)
    finally:
        for h in hooks:
            h.remove()
    encoders = 2 if getattr(pipe, "text_encoder_2", None) is not None else 1
    assert len(calls) == 2 * encoders, calls  # sizes 4 and 2, once each
    fresh = text2image_triage_model(pipe, negative_prompt=NEGATIVE)
    last = score_prompts(fresh, IDS[2:], PROMPTS[2:], cfg)
    assert np.array_equal(last["webster_per_generation"][0], got["webster_per_generation"][2])

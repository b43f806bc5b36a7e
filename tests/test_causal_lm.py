"""The causal-LM adapter (memscan.generators.causal_lm) on a tiny random GPT-2 with a byte-level
tokenizer, and the reference lookup model (memscan.testing.lookup_lm)."""

from __future__ import annotations

import numpy as np
import pytest

from memscan.errors import InputError
from memscan.generators.causal_lm import NEAR_TIE, TransformersCausalLM, describe_lm, load_causal_lm
from memscan.testing.lookup_lm import LookupLM

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light."
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from memscan.testing.tiny_lm import make_tiny_gpt2

    return make_tiny_gpt2(tmp_path_factory.mktemp("lm") / "gpt2", seed=3)


@pytest.fixture(scope="module")
def lm(tiny_dir):
    return load_causal_lm(str(tiny_dir))


def _prefixes(lm, k=16, b=12):
    ids = lm.encode(TEXT)
    return np.stack([ids[i * 7 : i * 7 + k] for i in range(b)])


def test_loads_with_tokenizer_record(lm, tiny_dir):
    assert isinstance(lm, TransformersCausalLM)
    rec = lm.describe()
    assert rec["class"] == "GPT2LMHeadModel" and rec["dtype"] == "float32" and rec["device"] == "cpu"
    assert rec["tokenizer"]["class"] == "ByT5Tokenizer" and len(rec["tokenizer"]["vocab_sha256"]) == 64
    assert lm.vocab_size == 384 and lm.parameters > 0
    assert lm.decode(lm.encode("héllo")) == "héllo"
    assert lm.encode("ab").dtype == np.int64 and list(lm.encode("ab")) == [ord("a") + 3, ord("b") + 3]
    # the same tokenizer loaded twice hashes the same
    assert load_causal_lm(str(tiny_dir)).describe()["tokenizer"]["vocab_sha256"] == rec["tokenizer"]["vocab_sha256"]


def test_batched_greedy_equals_one_at_a_time_except_near_ties(lm):
    prefixes = _prefixes(lm)
    tokens, gaps = lm.greedy(prefixes, 30)
    assert tokens.shape == gaps.shape == (12, 30) and (gaps >= 0).all()
    near_ties = 0
    for i in range(len(prefixes)):
        alone, alone_gaps = lm.greedy(prefixes[i : i + 1], 30)
        diff = np.flatnonzero(alone[0] != tokens[i])
        if diff.size:  # allowed only after a near-tie at the first difference
            j = diff[0]
            assert min(gaps[i, j], alone_gaps[0, j]) < NEAR_TIE, (i, j, gaps[i, j])
            near_ties += 1
        else:
            np.testing.assert_allclose(alone_gaps[0], gaps[i], atol=1e-4)
    print(f"near-ties that changed a batched continuation: {near_ties} of {len(prefixes)}")
    assert near_ties <= 1


def test_greedy_equals_transformers_generate(lm):
    prefixes = _prefixes(lm, b=3)
    tokens, gaps = lm.greedy(prefixes, 20)
    for i in range(3):
        x = torch.as_tensor(prefixes[i : i + 1])
        out = lm.model.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=20, do_sample=False, pad_token_id=0
        )
        ref = out[0, prefixes.shape[1] :].numpy()
        if not (gaps[i] < NEAR_TIE).any():
            np.testing.assert_array_equal(tokens[i], ref)


def test_token_logprobs_equal_log_softmax_of_one_forward(lm):
    ids = _prefixes(lm, k=40, b=4)
    got = lm.token_logprobs(ids)
    with torch.no_grad():
        logits = lm.model(input_ids=torch.as_tensor(ids)).logits.double()
    ref = torch.log_softmax(logits, -1)[:, :-1].gather(-1, torch.as_tensor(ids)[:, 1:, None])[..., 0].numpy()
    assert got.shape == (4, 39) and got.dtype == np.float64
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)
    full = lm.next_token_logprobs(ids)
    assert full.shape == (4, 39, lm.vocab_size)
    np.testing.assert_allclose(np.exp(full).sum(-1), 1.0, atol=1e-9)
    # token_logprobs: float32 logit − log-sum-exp; next_token_logprobs: float64 log-softmax
    np.testing.assert_allclose(np.take_along_axis(full, ids[:, 1:, None], -1)[..., 0], got, atol=1e-6)
    np.testing.assert_allclose(lm.next_token_logprobs(ids, start=30), full[:, 30:], atol=1e-9)


@pytest.mark.parametrize("chunk", [None, 100, 700])
def test_per_token_passes_equal_a_float64_log_softmax_in_any_chunking(lm, monkeypatch, chunk):
    """token_logprobs and next_token_moments (float32, chunks of positions) against a float64
    log-softmax of the same logits and the Min-K%++ moments summed directly over the vocabulary;
    chunks of 100 / 700 elements (< one position of V = 384, ~2 positions) split every row."""
    import memscan.generators.causal_lm as causal_lm

    if chunk is not None:
        monkeypatch.setattr(causal_lm, "CHUNK_ELEMENTS", chunk)
    ids = _prefixes(lm, k=33, b=3)
    with torch.no_grad():
        ref = torch.log_softmax(lm.model(input_ids=torch.as_tensor(ids)).logits.double(), -1)[:, :-1].numpy()
    ref_tok = np.take_along_axis(ref, ids[:, 1:, None], -1)[..., 0]
    p = np.exp(ref)
    ref_mu = (p * ref).sum(-1)
    ref_sigma = np.sqrt((p * ref**2).sum(-1) - ref_mu**2)  # the paper's form, in float64
    np.testing.assert_allclose(lm.token_logprobs(ids), ref_tok, rtol=0, atol=1e-6)
    tok, mu, sigma = lm.next_token_moments(ids)
    assert tok.shape == mu.shape == sigma.shape == (3, 32) and mu.dtype == np.float64
    np.testing.assert_allclose(tok, ref_tok, rtol=0, atol=1e-6)
    np.testing.assert_allclose(mu, ref_mu, rtol=0, atol=1e-5)
    np.testing.assert_allclose(sigma, ref_sigma, rtol=0, atol=1e-5)
    assert (sigma > 0.1).all()  # a random model's distributions are far from one-hot: a real check
    # one token: nothing to predict
    assert [a.shape for a in lm.next_token_moments(ids[:, :1])] == [(3, 0)] * 3
    assert lm.token_logprobs(ids[:, :1]).shape == (3, 0)


def test_moments_of_a_distribution_with_impossible_tokens():
    """Logits of −inf (tokens a model masks out) have p = 0 and add nothing to μ or σ; checked
    against membership.next_token_moments, which handles them the same way."""
    from memscan.generators.causal_lm import per_token_moments
    from memscan.lm.membership import next_token_moments

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=g)
    logits[0, :, 3] = float("-inf")
    logits[1, 2, :5] = float("-inf")
    ids = torch.tensor([[0, 1, 2, 4, 5, 6], [7, 8, 9, 10, 6, 5]])
    tok, mu, sigma = per_token_moments(logits, ids)
    lp = torch.log_softmax(logits.double(), -1)[:, :-1].numpy()
    ref_mu, ref_sigma = next_token_moments(lp)
    np.testing.assert_allclose(mu.numpy(), ref_mu, atol=1e-6)
    np.testing.assert_allclose(sigma.numpy(), ref_sigma, atol=1e-6)
    np.testing.assert_allclose(tok.numpy(), np.take_along_axis(lp, ids[:, 1:, None].numpy(), -1)[..., 0], atol=1e-6)
    assert np.isfinite(mu.numpy()).all() and np.isfinite(sigma.numpy()).all()


def test_greedy_agrees_with_teacher_forced_argmax(lm):
    """The first greedy token is the argmax of the next-token distribution after the prefix."""
    prefixes = _prefixes(lm, b=5)
    tokens, _ = lm.greedy(prefixes, 5)
    whole = np.concatenate([prefixes, tokens], axis=1)
    lp = lm.next_token_logprobs(whole, start=prefixes.shape[1] - 1)
    np.testing.assert_array_equal(lp.argmax(-1), tokens)


def test_sampling_reproducible_by_seed(lm):
    prefixes = _prefixes(lm, b=4)
    a = lm.sample(prefixes, 12, temperature=1.0, top_k=40, seed=7)
    b = lm.sample(prefixes, 12, temperature=1.0, top_k=40, seed=7)
    c = lm.sample(prefixes, 12, temperature=1.0, top_k=40, seed=8)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    greedy, gaps = lm.greedy(prefixes, 12)
    one = lm.sample(prefixes, 12, top_k=1, seed=1)
    if not (gaps < NEAR_TIE).any():
        np.testing.assert_array_equal(one, greedy)
    np.testing.assert_array_equal(lm.sample(prefixes, 12, top_p=1e-9, seed=2), one)
    with pytest.raises(InputError, match="temperature"):
        lm.sample(prefixes, 2, temperature=0.0)


def test_bad_model_inputs(tmp_path, tiny_dir):
    with pytest.raises(InputError, match="no config.json"):
        load_causal_lm(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(InputError, match="not a .gguf"):
        load_causal_lm(str(tmp_path / "weights.bin"))
    with pytest.raises(InputError, match="not a directory"):
        load_causal_lm("./nowhere/at/all")
    with pytest.raises(InputError, match="outside the model's vocabulary"):
        load_causal_lm(str(tiny_dir)).token_logprobs(np.array([[1, 5000]]))


def test_pickled_weights_are_refused_never_unpickled(tmp_path, tiny_dir, monkeypatch):
    """A directory whose weights are only a pickled ``pytorch_model.bin`` is refused with the way
    to convert it; nothing is unpickled (torch.load and pickle are never reached)."""
    import pickle
    import shutil

    import torch
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_dir, pickled)
    state = load_file(pickled / "model.safetensors")
    (pickled / "model.safetensors").unlink()
    torch.save(state, pickled / "pytorch_model.bin")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load reached"))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("pickle.load reached"))
    with pytest.raises(InputError, match="no .safetensors weights.*does not load pickled") as err:
        load_causal_lm(str(pickled))
    assert "save_pretrained" in err.value.hint
    assert load_causal_lm(str(tiny_dir)).vocab_size > 0  # the safetensors copy loads


def test_not_a_causal_lm_directory(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=50, d_model=16, d_kv=8, d_ff=16, num_layers=1, num_heads=2)
    T5ForConditionalGeneration(config).save_pretrained(tmp_path)
    with pytest.raises(InputError, match="not a causal language model"):
        load_causal_lm(str(tmp_path))


def test_python_spec_loads_a_user_object():
    lm = load_causal_lm("py:memscan.testing.lookup_lm:lookup_factory")
    assert isinstance(lm, LookupLM) and describe_lm(lm)["class"] == "LookupLM"
    with pytest.raises(InputError, match="not a causal LM"):
        load_causal_lm("py:memscan.testing.lookup_lm:as_int64_batch")


# ---- the lookup model


def test_lookup_model_copies_its_training_text():
    texts = ["the quick brown fox jumps over the lazy dog", "pack my box with five dozen liquor jugs"]
    lm = LookupLM.from_texts(texts, order=6)
    for text in texts:
        ids = lm.encode(text)
        tokens, gaps = lm.greedy(ids[None, :10], len(ids) - 10)
        assert lm.decode(tokens[0]) == text[10:]
        assert (gaps > 1.0).all()
    ids = lm.encode(texts[0])[None, :]
    lp = lm.token_logprobs(ids)
    full = lm.next_token_logprobs(ids)
    np.testing.assert_allclose(np.exp(full).sum(-1), 1.0)
    np.testing.assert_allclose(np.take_along_axis(full, ids[:, 1:, None], -1)[..., 0], lp)
    # after an order-6 context the true byte has probability confidence + (1-confidence)·f(v)
    f = np.exp(lm.fallback)
    assert np.isclose(np.exp(lp[0, 10]), 0.9 + 0.1 * f[ids[0, 11]])


def test_lookup_model_sampling_reproducible_and_within_top_k():
    lm = LookupLM.from_texts(["abcabcabd"], order=2)
    prefixes = lm.encode("ab")[None, :].repeat(3, 0)
    a = lm.sample(prefixes, 8, top_k=2, seed=5)
    np.testing.assert_array_equal(a, lm.sample(prefixes, 8, top_k=2, seed=5))
    allowed = set(lm.encode("abcd").tolist()) | {0, 1}  # top-2 of an unseen context: fallback tokens 0, 1
    assert set(a.ravel().tolist()) <= allowed


def test_shared_prefix_logprobs_equal_the_plain_pass(lm):
    ids = lm.encode(TEXT)
    rows = np.stack([np.concatenate([ids[:20], lm.encode(f"{i:04d}"), ids[30:35]]) for i in range(0, 9000, 700)])
    plain = lm.token_logprobs(rows)
    shared = lm.token_logprobs_shared_prefix(rows)
    assert shared.shape == plain.shape
    np.testing.assert_allclose(shared, plain, atol=2e-5, rtol=0)
    # nothing shared, or one row: the plain pass
    np.testing.assert_array_equal(lm.token_logprobs_shared_prefix(rows[:1]), lm.token_logprobs(rows[:1]))
    same = np.stack([ids[:12]] * 3)
    np.testing.assert_allclose(lm.token_logprobs_shared_prefix(same), lm.token_logprobs(same), atol=2e-5)


def test_per_token_passes_of_a_bfloat16_model(tiny_dir):
    """A bfloat16 model's logits are cast to float32 a chunk at a time: the same values as a float64
    log-softmax of those bfloat16 logits."""
    lm16 = load_causal_lm(str(tiny_dir), dtype="bfloat16")
    assert lm16.describe()["dtype"] == "bfloat16"
    ids = _prefixes(lm16, k=20, b=2)
    with torch.no_grad():
        logits = lm16.model(input_ids=torch.as_tensor(ids)).logits
    assert logits.dtype == torch.bfloat16
    ref = torch.log_softmax(logits.double(), -1)[:, :-1].numpy()
    ref_tok = np.take_along_axis(ref, ids[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(lm16.token_logprobs(ids), ref_tok, rtol=0, atol=1e-5)
    tok, mu, _ = lm16.next_token_moments(ids)
    np.testing.assert_allclose(tok, ref_tok, rtol=0, atol=1e-5)
    np.testing.assert_allclose(mu, (np.exp(ref) * ref).sum(-1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["threads", "processes"])
def test_rows_split_across_cores_decode_as_the_whole_batch(lm, mode, monkeypatch):
    """On a CPU with 2 intra-op threads a batch of 16 rows is split into two parts of 8, each decoded
    by its own single-threaded worker (a thread, or a forked process): greedy tokens equal the whole
    batch's, except after a near-tie (batch size changes the float rounding), and per-row-seeded
    samples do too; the caller's thread count is left as it was. One seed for the whole batch keeps
    it whole."""
    from memscan.generators import causal_lm
    from memscan.generators.row_split import split_mode

    if mode == "processes" and split_mode() != "processes":
        pytest.skip("forked workers need Linux's fork")
    monkeypatch.setenv("MEMSCAN_ROW_SPLIT", mode)
    forks, fallbacks = lm._forked.forks, lm._forked.fallbacks
    prefixes = np.concatenate([_prefixes(lm), _prefixes(lm, b=4) + 1])  # 16 rows
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert lm.row_workers(16) == 2 and lm.row_workers(15) == 1 and lm.row_workers(4) == 1
        split, split_gaps = lm.greedy(prefixes, 20)
        assert torch.get_num_threads() == 2
        whole, whole_gaps = lm._greedy_rows(lm._tensor(prefixes), 20)
        seeds = list(range(100, 116))
        sampled = lm.sample(prefixes, 12, temperature=1.0, top_k=40, seed=seeds)
        sampled_whole = lm._sample_rows(
            lm._tensor(prefixes), 12, [1.0] * 12, 40, None, None, causal_lm.row_uniforms(seeds, 16, 12)
        )
    finally:
        torch.set_num_threads(before)
    for i in range(16):
        diff = np.flatnonzero(split[i] != whole[i])
        if diff.size:
            assert min(split_gaps[i, diff[0]], whole_gaps[i, diff[0]]) < NEAR_TIE
        else:
            np.testing.assert_allclose(split_gaps[i], whole_gaps[i], atol=1e-4)
    assert (split == whole).all(axis=1).sum() >= 15
    assert (sampled == sampled_whole).all(axis=1).sum() >= 15
    # and each split row equals that row decoded alone (the split changes nothing a row sees)
    alone, _ = lm._greedy_rows(lm._tensor(prefixes[9:10]), 20)
    assert (alone[0] == split[9]).all() or split_gaps[9].min() < NEAR_TIE
    # the parts ran where the mode says: a worker process was forked only for "processes"
    # (and no part fell back to the caller: the workers computed theirs)
    assert (lm._forked.forks > forks) == (mode == "processes") and lm._forked.fallbacks == fallbacks


def test_a_bad_row_split_setting_is_refused_at_load(tiny_dir, monkeypatch):
    monkeypatch.setenv("MEMSCAN_ROW_SPLIT", "fibers")
    with pytest.raises(InputError, match="MEMSCAN_ROW_SPLIT='fibers'.*auto, processes or threads"):
        load_causal_lm(str(tiny_dir))


def test_forked_row_workers_follow_changed_weights(tiny_dir, monkeypatch):
    """Workers forked before the model changes are forked again, so the split decodes as the whole
    batch does: after an in-place update (an optimizer step), a write through ``.data`` (which
    bypasses the version counter) and a forward hook."""
    monkeypatch.setenv("MEMSCAN_ROW_SPLIT", "processes")
    from memscan.generators.row_split import split_mode

    if split_mode() != "processes":
        pytest.skip("forked workers need Linux's fork")
    lm2 = load_causal_lm(str(tiny_dir))
    prefixes = np.concatenate([_prefixes(lm2), _prefixes(lm2, b=4) + 1])
    params = list(lm2.model.parameters())
    changes = [
        lambda: [p.mul_(-1.5) for p in params],
        lambda: [p.data.add_(0.05 * torch.randn_like(p)) for p in params],
        lambda: lm2.model.get_output_embeddings().register_forward_hook(
            lambda mod, inp, out: out + torch.linspace(0, 30, out.shape[-1])
        ),
    ]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        previous, _ = lm2.greedy(prefixes, 12)
        assert lm2._forked.forks == 1
        for n, change in enumerate(changes, start=2):
            with torch.no_grad():
                change()
            new, _ = lm2.greedy(prefixes, 12)
            whole, _ = lm2._greedy_rows(lm2._tensor(prefixes), 12)
            assert lm2._forked.forks == n  # forked again after the change
            assert (previous[8:] != new[8:]).any()  # the change altered what the workers' rows decode to
            assert (new == whole).all(axis=1).sum() >= 15
            previous = new
    finally:
        torch.set_num_threads(before)
    assert lm2._forked.fallbacks == 0

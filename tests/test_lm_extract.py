"""``memscan lm extract`` (Carlini et al. 2021): the temperature schedule and per-sample seeds of
the sampler, each ranking metric against a direct computation, the trigram dedup against a
brute-force comparison, precision@N against a hand count, and end to end on a copy model (whose
confirmed samples are known) and a tiny random GPT-2; the report escapes sample text. Confirmation
against naive scans of the corpus: the match, its count and the count of its first ``min_match``
units (``match_window_count``, the duplication the report bins), and a sample drawn in a
non-canonical tokenization of corpus text, confirmed through its re-encoding."""

from __future__ import annotations

import math
import random
import zlib
from collections import Counter

import numpy as np
import pandas as pd
import pytest
from lm_extract_support import DOCS, PROMPTS, copy_lm, reference_lm

from memscan.errors import InputError
from memscan.lm import ranking as rk
from memscan.lm.corpus_index import CorpusIndex
from memscan.lm.decoding import scheme_logprobs
from memscan.lm.dedup import greedy_dedup, is_near_duplicate, word_trigrams, words
from memscan.lm.extract_run import LmExtractConfig, lm_extract, precision_table, read_prompts
from memscan.lm.sampling_attack import ExtractSampleWorker, sample_and_score_stage, sample_seed, temperature_schedule


# ---- the sampler --------------------------------------------------------------------------------
def test_temperature_schedule_is_linear_from_10_to_1_over_20_tokens():
    t = temperature_schedule(30)  # the paper's defaults
    assert len(t) == 30
    for j in range(30):
        want = 10.0 - 9.0 * j / 20 if j < 20 else 1.0
        assert t[j] == pytest.approx(want, abs=1e-12)
    assert t[0] == 10.0 and t[19] > 1.0 and t[20] == 1.0
    assert temperature_schedule(5, 2.0, 2.0, 20) == [2.0] * 5
    assert temperature_schedule(3, 10, 1, 0) == [1.0] * 3


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    pytest.importorskip("transformers")
    from memscan.generators.causal_lm import load_causal_lm
    from memscan.testing.tiny_lm import make_tiny_gpt2

    path = make_tiny_gpt2(tmp_path_factory.mktemp("gpt2") / "m", seed=3)
    return path, load_causal_lm(str(path))


def test_adapter_draws_each_row_from_its_seed_under_the_step_temperature(tiny_gpt2):
    """Per-row seeds: each token is the inverse CDF of the row's own uniform under
    scheme(temperature_t, top-k) of the model's next-token distribution — recomputed here from
    next_token_logprobs and numpy — and a row does not depend on the rows batched with it."""
    from memscan.generators.causal_lm import row_uniforms

    _, lm = tiny_gpt2
    n_new, k = 12, 40
    temps = temperature_schedule(n_new, 10.0, 1.0, 6)
    prefixes = np.tile(lm.encode("ab"), (3, 1))
    seeds = [sample_seed(0, i) for i in range(3)]
    toks = lm.sample(prefixes, n_new, temperature=temps, top_k=k, seed=seeds)
    alone = np.concatenate([lm.sample(prefixes[i : i + 1], n_new, temperature=temps, top_k=k, seed=[s])
                            for i, s in enumerate(seeds)])  # fmt: skip
    np.testing.assert_array_equal(toks, alone)
    u = row_uniforms(seeds, 3, n_new)
    full = np.concatenate([prefixes, toks], axis=1)
    nt = lm.next_token_logprobs(full, start=prefixes.shape[1] - 1)  # rows predict the new tokens
    checked = 0
    for i in range(3):
        for t in range(n_new):
            q = np.exp(scheme_logprobs(nt[i, t], temperature=temps[t], top_k=k))
            c = np.cumsum(q)
            want = int(np.searchsorted(c, u[i, t] * c[-1], side="right"))
            if np.min(np.abs(c - u[i, t] * c[-1])) < 1e-9:
                continue  # a uniform on a float boundary: either token is right
            assert toks[i, t] == want, (i, t)
            checked += 1
    assert checked >= 30
    # the schedule matters: a constant temperature of 1 draws other tokens from the same uniforms
    assert not np.array_equal(toks, lm.sample(prefixes, n_new, temperature=1.0, top_k=k, seed=seeds))
    with pytest.raises(InputError, match="schedule of 3 steps"):
        lm.sample(prefixes, n_new, temperature=[1.0, 2.0, 3.0], seed=seeds)


def _inverse_cdf_by_numpy(nt, u, temps, top_k, top_p):
    """Per row and step, the token whose cumulative scheme probability (numpy scheme_logprobs of
    the model's next-token log-probabilities) holds u; -1 where u lies on a float boundary."""
    want = np.full(u.shape, -1)
    for i in range(u.shape[0]):
        for t in range(u.shape[1]):
            q = np.exp(scheme_logprobs(nt[i, t], temperature=temps[t], top_k=top_k, top_p=top_p))
            c = np.cumsum(q)
            if np.min(np.abs(c - u[i, t] * c[-1])) >= 1e-9:
                want[i, t] = int(np.searchsorted(c, u[i, t] * c[-1], side="right"))
    return want


@pytest.mark.parametrize(
    "temps,top_k,top_p",
    [(1.0, None, 0.8), (1.5, 20, 0.7), ("schedule", 40, 0.9)],
    ids=["top-p", "top-k+top-p+temperature", "schedule+top-k+top-p"],
)
def test_adapter_top_p_draws_equal_the_numpy_scheme(tiny_gpt2, temps, top_k, top_p):
    """The torch top-p path of the sampler against scheme_logprobs, the numpy scheme p_sample is
    scored with: (1) per-row seeds — every token is the inverse CDF of the row's uniform under the
    numpy scheme; (2) one seed — 4000 one-token draws never hit a token the scheme removes and
    match its probabilities."""
    from memscan.generators.causal_lm import row_uniforms

    _, lm = tiny_gpt2
    n_new, rows = 10, 4
    temps = temperature_schedule(n_new, 3.0, 1.0, 5) if temps == "schedule" else [temps] * n_new
    prefixes = np.tile(lm.encode("the "), (rows, 1))
    seeds = [sample_seed(7, i) for i in range(rows)]
    toks = lm.sample(prefixes, n_new, temperature=temps, top_k=top_k, top_p=top_p, seed=seeds)
    nt = lm.next_token_logprobs(np.concatenate([prefixes, toks], axis=1), start=prefixes.shape[1] - 1)
    want = _inverse_cdf_by_numpy(nt, row_uniforms(seeds, rows, n_new), temps, top_k, top_p)
    sure = want >= 0
    assert sure.sum() >= 30 and (toks[sure] == want[sure]).all()
    # top-p matters here: the nucleus removes tokens the rest of the scheme keeps
    q = np.exp(scheme_logprobs(nt, temperature=temps[0], top_k=top_k, top_p=top_p))
    q_no_p = np.exp(scheme_logprobs(nt, temperature=temps[0], top_k=top_k))
    assert ((q == 0) & (q_no_p > 0)).any()
    # (2) one torch.Generator for the batch: the empirical distribution of one step
    n, prefix = 4000, lm.encode("the ")
    draws = lm.sample(np.tile(prefix, (n, 1)), 1, temperature=temps[0], top_k=top_k, top_p=top_p, seed=5)
    after = lm.next_token_logprobs(np.r_[prefix, 0][None], start=prefix.size - 1)[0, 0]  # p(· | prefix)
    q = np.exp(scheme_logprobs(after, temperature=temps[0], top_k=top_k, top_p=top_p))
    freq = np.bincount(draws[:, 0], minlength=q.size) / n
    assert (q[draws[:, 0]] > 0).all()  # never a removed token
    np.testing.assert_array_less(np.abs(freq - q), 5 * np.sqrt(q * (1 - q) / n) + 1e-12)


def test_adapter_refuses_a_top_p_above_1(tiny_gpt2):
    _, lm = tiny_gpt2
    with pytest.raises(InputError, match="top-p 1.5"):
        lm.sample(lm.encode("ab")[None], 3, top_p=1.5, seed=0)
    a = lm.sample(lm.encode("ab")[None], 3, top_p=1.0, seed=[4])  # 1: off
    np.testing.assert_array_equal(a, lm.sample(lm.encode("ab")[None], 3, seed=[4]))


# ---- the metrics --------------------------------------------------------------------------------
def _min_window_brute(lp, w):
    w = min(w, len(lp))
    return min(math.exp(-sum(lp[j : j + w]) / w) for j in range(len(lp) - w + 1))


def test_min_window_perplexity_and_ranks_by_hand():
    rng = np.random.default_rng(0)
    for n in (1, 5, 49, 50, 51, 130):
        lp = np.log(rng.uniform(0.01, 1.0, n))
        for w in (1, 7, 50):
            assert rk.min_window_perplexity(lp, w) == pytest.approx(_min_window_brute(list(lp), w), rel=1e-12)
    assert rk.ranks(np.array([0.2, 0.9, np.nan, 0.5]), higher_first=True).tolist() == [3, 1, 4, 2]
    assert rk.ranks(np.array([0.2, 0.9, 0.2, 0.5]), higher_first=False).tolist() == [1, 4, 2, 3]


def test_every_score_of_the_stage_equals_a_direct_computation():
    lm, ref = copy_lm(), reference_lm()
    cfg = LmExtractConfig(samples=6, length=70, batch_size=4, window=20).validate().to_dict()
    tables, meta = sample_and_score_stage(ExtractSampleWorker(lm, ref), list(range(6)), PROMPTS, cfg)
    s = tables["samples"]
    assert meta["generate_seconds"] >= 0 and meta["score_seconds"] >= 0
    for r in s.to_dict("records"):
        prompt = PROMPTS[r["sample_id"] % len(PROMPTS)]
        ctx = lm.encode(prompt)
        gen = np.asarray(r["tokens"])
        assert r["text"] == lm.decode(gen) and r["n_tokens"] == gen.size == 70
        lp = lm.token_logprobs(np.concatenate([ctx, gen]))[0][-gen.size :]
        nll = -lp.mean()
        assert r["mean_nll"] == pytest.approx(nll, rel=1e-12)
        assert r["perplexity"] == pytest.approx(math.exp(nll), rel=1e-12)
        bits = 8 * len(zlib.compress(r["text"].encode("utf-8")))
        assert r["zlib_bits"] == bits and r["zlib_ratio"] == pytest.approx(nll / bits, rel=1e-12)
        low = lm.encode(r["text"].lower())
        low_lp = lm.token_logprobs(np.concatenate([ctx, low]))[0][-low.size :]
        assert r["lowercase_ratio"] == pytest.approx(-low_lp.mean() / nll, rel=1e-12)
        rseq = ref.encode(r["text"])
        ref_lp = ref.token_logprobs(np.concatenate([ref.encode(prompt), rseq]))[0][-rseq.size :]
        assert r["reference_ratio"] == pytest.approx(-ref_lp.mean() / nll, rel=1e-12)
        assert r["min_window_perplexity"] == pytest.approx(_min_window_brute(list(lp), 20), rel=1e-12)


def test_precision_at_n_by_hand():
    s = pd.DataFrame(
        {
            "perplexity": [5.0, 1.0, 3.0, 2.0, 4.0],  # lowest first: 1, 3, 2, 4, 0
            "lowercase_ratio": [9.0, 1.0, 8.0, 7.0, 1.0],  # highest first: 0, 2, 3, 1, 4
            "confirmed": [True, True, False, False, True],
        }
    )
    p = precision_table(s, ["perplexity", "lowercase_ratio"], 3).set_index("metric")
    # perplexity top 3 = samples 1, 3, 2 → 1 confirmed; lowercase top 3 = 0, 2, 3 → 1 confirmed
    assert p.loc["perplexity", ["N", "confirmed"]].tolist() == [3, 1]
    assert p.loc["perplexity", "precision"] == pytest.approx(1 / 3)
    assert p.loc["lowercase_ratio", "confirmed"] == 1
    assert p.loc["all samples", ["N", "confirmed"]].tolist() == [5, 3]
    big = precision_table(s, ["perplexity"], 100).set_index("metric")  # N larger than the samples
    assert big.loc["perplexity", ["N", "confirmed"]].tolist() == [5, 3]


# ---- the dedup ----------------------------------------------------------------------------------
def _brute_dedup(texts, order):
    kept, dup_of = [], [-1] * len(texts)
    for i in order:
        ti = Counter(zip(*(words(texts[i])[j:] for j in range(3))))
        best = None
        for k in kept:
            if not ti:
                hit = texts[i] == texts[k]
                ov = 0
            else:
                tk = Counter(zip(*(words(texts[k])[j:] for j in range(3))))
                ov = sum((ti & tk).values())
                hit = 2 * ov >= sum(ti.values())
            if hit and (best is None or ov > best[0] or (ov == best[0] and k < best[1])):
                best = (ov, k)
        if best is None:
            kept.append(i)
        else:
            dup_of[i] = best[1]
    return kept, dup_of


def test_dedup_equals_a_brute_force_trigram_comparison():
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(12)]
    base = [" ".join(rng.choice(vocab) for _ in range(rng.randint(2, 25))) for _ in range(30)]
    texts = []
    for t in base:  # each base text and mutated copies of it (near duplicates at every overlap)
        texts.append(t)
        for _ in range(rng.randint(0, 3)):
            w = t.split()
            for _ in range(rng.randint(0, 6)):
                w[rng.randrange(len(w))] = rng.choice(vocab)
            texts.append(", ".join(w) if rng.random() < 0.3 else " ".join(w))
    texts += ["a b", "a b", "x"]  # no trigrams: duplicates only when equal
    for seed in range(3):
        order = list(range(len(texts)))
        random.Random(seed).shuffle(order)
        dd = greedy_dedup(texts, order)
        kept, dup_of = _brute_dedup(texts, order)
        assert dd.keep.tolist() == kept
        assert dd.duplicate_of.tolist() == dup_of
        assert dd.duplicates.sum() == len(texts) - len(kept) > 0


def test_the_papers_rule_multisets_and_asymmetry():
    assert word_trigrams("my name my name my name") == Counter({("my", "name", "my"): 2, ("name", "my", "name"): 2})
    # half of s1's trigrams shared → duplicate (≥, not >); fewer → not
    assert is_near_duplicate("a b c d", "a b c x")  # 1 of 2
    assert not is_near_duplicate("a b c d e", "a b c x y")  # 1 of 3
    # a short sample inside a long one duplicates it, not the reverse
    long = "one two three four five six seven eight nine ten"
    assert is_near_duplicate("three four five six", long) and not is_near_duplicate(long, "three four five six")
    assert words("don't-stop, now!") == ["don", "t", "stop", "now"]


def test_words_split_on_every_unicode_punctuation_character():
    """§6.1 splits on punctuation characters: every code point of Unicode category P* (checked
    against unicodedata, one by one), not only ASCII's; letters, digits and symbols stay inside."""
    import sys
    import unicodedata

    for c in map(chr, range(sys.maxunicode + 1)):
        cat = unicodedata.category(c)
        if cat.startswith("P"):
            assert words(f"ab{c}cd") == ["ab", "cd"], (hex(ord(c)), cat)
    assert words("“Wait”—she said… «non» ¿qué?") == ["Wait", "she", "said", "non", "qué"]
    assert words("naïve café №5 €3") == ["naïve", "café", "№5", "€3"]  # letters and symbols (S*, N*) kept
    # an em-dash-joined sample is the same words as the spaced one: a duplicate (one "word" before)
    assert is_near_duplicate("alpha—beta—gamma—delta", "alpha beta gamma delta")
    assert word_trigrams("“alpha” beta gamma") == Counter({("alpha", "beta", "gamma"): 1})


# ---- end to end ---------------------------------------------------------------------------------
def _longest_common_run(q: bytes, docs: list[bytes]) -> int:
    best = 0
    for s in range(len(q)):
        for d in docs:
            n = best + 1
            while s + n <= len(q) and q[s : s + n] in d:
                best, n = n, n + 1
    return best


def _occurrences(span: bytes, docs: list[bytes]) -> int:
    n = 0
    for d in docs:
        i = d.find(span)
        while i >= 0:
            n, i = n + 1, d.find(span, i + 1)
    return n


@pytest.fixture(scope="module")
def copy_index(tmp_path_factory):
    root = tmp_path_factory.mktemp("copyidx")
    CorpusIndex.build([d.encode() for d in DOCS], root / "idx")
    return root / "idx"


def test_copy_model_end_to_end_confirms_exactly_the_copied_samples(copy_index, tmp_path):
    cfg = LmExtractConfig(samples=24, length=150, top=5, batch_size=8, min_match=60)
    res = lm_extract(copy_lm(), copy_index, tmp_path / "run", cfg, prompts=PROMPTS, reference=reference_lm(),
                     progress=False, shard_size=10)  # fmt: skip
    s = res.samples
    docs = [d.encode() for d in DOCS]
    c = res.manifest["counts"]
    assert c["generated"] == 24 and c["kept"] == len(s) and c["kept"] + c["duplicates_removed"] + c["empty"] == 24
    for r in s.to_dict("records"):
        q = r["text"].encode()
        assert r["match_len"] == _longest_common_run(q, docs)  # the index's match vs a naive scan
        assert r["confirmed"] == (r["match_len"] >= 60)
        span = q[r["match_start"] : r["match_start"] + r["match_len"]]
        assert (r["match_before"] + r["match_text"] + r["match_after"]).encode() == q
        assert r["match_text"].encode() == span
        assert docs[r["match_doc"]][r["match_offset"] : r["match_offset"] + r["match_len"]] == span
        assert r["match_count"] == _occurrences(span, docs)
        # the fixed-length duplicate count: the first min_match bytes of the match, 0 unconfirmed
        assert r["match_window_count"] == (_occurrences(span[:60], docs) if r["confirmed"] else 0)
        assert r["match_query"] == "text"
    # the copy model copies from inside its documents: most samples are confirmed, and the
    # samples from the prompt it never saw ("xyz ") start off the corpus
    assert s["confirmed"].sum() >= len(s) // 2
    # precision recounted from the table
    for m in rk.METRICS:
        top = s.sort_values([m, "sample_id"], ascending=[m not in rk.HIGHER_FIRST, True]).head(5)
        assert res.precision_of(m) == pytest.approx(top["confirmed"].mean())
        assert sorted(s[f"rank_{m}"]) == list(range(1, len(s) + 1))
    assert res.precision_of("all samples") == pytest.approx(s["confirmed"].mean())
    # near duplicates were removed: no kept sample duplicates another kept one walked before it
    order = np.argsort(s["perplexity"].to_numpy(), kind="stable")
    for a in range(len(order)):
        for b in range(a):
            assert not is_near_duplicate(s["text"][order[a]], s["text"][order[b]])
    # the report escapes the copied markup and highlights the match
    from memscan.report.registry import build_report

    html = build_report(res.run_dir).read_text()
    assert "<script>alert" not in html
    assert "&lt;script&gt;alert" in html and "<mark>" in html
    for m in rk.METRICS:
        assert m in html
    # the duplication section says what it plots and claims no trend
    assert "the first 60 bytes of the longest corpus match" in html and "no trend is fitted" in html
    assert "Least-squares" not in html and "data:image/png" in html
    # a run made before match_window_count: said so, not dropped silently
    path = res.run_dir / "samples.parquet"
    pd.read_parquet(path).drop(columns=["match_window_count", "match_query"]).to_parquet(path)
    html = build_report(res.run_dir).read_text()
    assert "has no <code>match_window_count</code>" in html and "<mark>" in html


def test_same_tables_on_a_second_run_with_another_batch_size(copy_index, tmp_path):
    """Per-sample seeds: the batch size does not change a sample."""
    a = lm_extract(copy_lm(), copy_index, tmp_path / "a", LmExtractConfig(samples=10, length=40, batch_size=3),
                   prompts=PROMPTS, progress=False)  # fmt: skip
    b = lm_extract(copy_lm(), copy_index, tmp_path / "b", LmExtractConfig(samples=10, length=40, batch_size=10),
                   prompts=PROMPTS, progress=False, shard_size=4)  # fmt: skip
    assert a.samples["text"].tolist() == b.samples["text"].tolist()


def test_tiny_gpt2_unconditional_end_to_end_on_a_token_index(tiny_gpt2, tmp_path):
    """A random GPT-2 (ByT5 tokenizer) against an index of its own token ids: runs, starts from the
    EOS token, and refuses an index of another tokenizer."""
    path, lm = tiny_gpt2
    rec = lm.describe()["tokenizer"]
    text = "some training text for the tiny model, repeated. " * 4
    CorpusIndex.build([lm.encode(text)], tmp_path / "tok", tokenizer=rec, vocab_size=lm.vocab_size)
    res = lm_extract(lm, tmp_path / "tok", tmp_path / "run", LmExtractConfig(samples=6, length=30, top=3,
                     batch_size=3), progress=False)  # fmt: skip
    assert res.manifest["match_unit"] == "tokens" and res.manifest["min_match"] == 50
    assert len(res.samples) >= 1 and not res.samples["confirmed"].any()  # 30 tokens cannot reach 50
    assert set(res.precision["metric"]) == {*(m for m in rk.METRICS if m != "reference_ratio"), "all samples"}
    CorpusIndex.build([np.arange(10)], tmp_path / "other", tokenizer={**rec, "vocab_sha256": "0" * 64})
    with pytest.raises(InputError, match="is not the corpus index's"):
        lm_extract(lm, tmp_path / "other", tmp_path / "r2", LmExtractConfig(samples=2, length=5), progress=False)
    assert not (tmp_path / "r2").exists()


def test_read_prompts(tmp_path):
    (tmp_path / "p.txt").write_text("first\n\nsecond line\n")
    assert read_prompts(tmp_path / "p.txt") == ["first", "second line"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "\\n"}\n{"text": "x"}\n')
    assert read_prompts(tmp_path / "p.jsonl") == ["\n", "x"]


def test_ray_equals_local(ray_address, copy_index, tmp_path):
    """The same shard stage on Ray workers (each loads the py: model itself): the same tables."""
    from memscan.runners import RayOptions

    cfg = LmExtractConfig(samples=12, length=60, top=4, batch_size=3, min_match=40)
    common = dict(prompts=PROMPTS, reference="py:lm_extract_support:reference_lm", progress=False, shard_size=4)
    local = lm_extract("py:lm_extract_support:copy_lm", copy_index, tmp_path / "local", cfg, **common)
    ray = lm_extract("py:lm_extract_support:copy_lm", copy_index, tmp_path / "ray", cfg, runner="ray",
                     runner_options=RayOptions(num_workers=2), **common)  # fmt: skip
    assert ray.manifest["runner"]["name"] == "ray" and local.manifest["runner"]["name"] == "local"
    assert ray.manifest["model"] == local.manifest["model"]
    for t in ("samples", "precision"):
        pd.testing.assert_frame_equal(
            pd.read_parquet(tmp_path / "local" / f"{t}.parquet"), pd.read_parquet(tmp_path / "ray" / f"{t}.parquet")
        )


def test_duplication_bins_count_confirmed_samples_by_their_fixed_length_window():
    """Only confirmed samples, binned by ``match_window_count`` (log₂ bins, as lm extractable):
    the unconfirmed samples' short, common longest matches (huge ``match_count``) stay out."""
    from memscan.report.lm_extract import duplication_bins, duplication_plot

    s = pd.DataFrame(
        {
            "match_count": [0, 5000, 900, 1, 3, 2, 5, 1, 40],  # the longest match's count: its length varies
            "match_window_count": [0, 0, 0, 1, 3, 2, 5, 1, 40],
            "match_len": [0, 5, 7, 120, 60, 80, 50, 200, 55],
            "confirmed": [False, False, False, True, True, True, True, True, True],
            "duplicates": [0, 9, 2, 0, 1, 4, 0, 2, 7],
        }
    )
    bins = duplication_bins(s)
    # by hand: [1, 2): counts 1, 1 — [2, 4): 3, 2 — [4, 8): 5 — [32, 64): 40
    want = [(1, 2, [3, 7]), (2, 4, [4, 5]), (4, 8, [6]), (32, 64, [8])]
    assert [(b["low"], b["high"]) for b in bins] == [(lo, hi) for lo, hi, _ in want]
    for b, (lo, hi, rows) in zip(bins, want):
        sel = s.loc[rows]
        assert ((sel["match_window_count"] >= lo) & (sel["match_window_count"] < hi)).all()
        assert b["samples"] == len(rows) and b["generated"] == int((sel["duplicates"] + 1).sum())
        assert b["mean_count"] == pytest.approx(sel["match_window_count"].mean())
        assert b["mean_match_len"] == pytest.approx(sel["match_len"].mean())
    assert sum(b["samples"] for b in bins) == int(s["confirmed"].sum())
    assert duplication_plot(s, bins)  # a PNG
    assert duplication_bins(s[~s["confirmed"]]) == []


# ---- confirmation of a non-canonical tokenization -------------------------------------------------
def _longest_common_run_ids(q, docs) -> int:
    """The longest run of consecutive ids of ``q`` in any of ``docs``, by dynamic programming."""
    best = 0
    for d in docs:
        prev = [0] * (len(d) + 1)
        for a in q:
            cur = [0] * (len(d) + 1)
            for j, b in enumerate(d):
                if a == b:
                    cur[j + 1] = prev[j] + 1
                    best = max(best, cur[j + 1])
            prev = cur
    return best


def _count_ids(window, docs) -> int:
    w = list(window)
    return sum(list(d[i : i + len(w)]) == w for d in docs for i in range(len(d) - len(w) + 1))


@pytest.fixture(scope="module")
def merge_index(tmp_path_factory):
    """An index of :data:`DOCS` in the canonical tokens of the merge tokenizer (as ``memscan lm
    index --tokenizer`` builds it: ``encode(doc)``)."""
    from lm_extract_support import merge_lm

    lm = merge_lm()
    root = tmp_path_factory.mktemp("mergeidx") / "idx"
    CorpusIndex.build([lm.encode(d) for d in DOCS], root, tokenizer=lm.describe()["tokenizer"],
                      vocab_size=lm.vocab_size)  # fmt: skip
    return root


def test_a_non_canonical_sampled_tokenization_is_confirmed_by_its_re_encoding(merge_index):
    """A sample that spells corpus text byte by byte ("b" "r" "a" "v" "o", not "bravo"): its
    sampled ids share only short runs with the index's ``encode(doc)`` tokens, its re-encoded
    text shares them all; confirmed, with the match and window counts of a naive scan."""
    from lm_extract_support import merge_lm

    from memscan.lm.extract_run import confirm_samples

    lm = merge_lm()
    idx = CorpusIndex.open(merge_index)
    canon = [lm.encode(d).tolist() for d in DOCS]
    texts = [DOCS[0][6:260], DOCS[1][40:240], "nothing of the corpus here, bravo " * 3]
    byte_ids = [list(t.encode()) for t in texts]  # the sampled ids: bytes only, never a merge
    samples = pd.DataFrame({"text": texts, "tokens": [np.asarray(t, dtype=np.int64) for t in byte_ids]})
    min_match = 45  # the sampled bytes share at most 42 with the corpus (the markup of DOCS[1])
    out = confirm_samples(samples, idx, min_match, lm.decode, lm.encode)
    for i, r in out.iterrows():
        q = lm.encode(texts[i]).tolist()
        run = _longest_common_run_ids(q, canon)
        assert _longest_common_run_ids(byte_ids[i], canon) < min_match  # the sampled ids alone: missed
        assert r["match_query"] == "text" and r["match_len"] == run
        assert r["confirmed"] == (run >= min_match)
        span = q[r["match_start"] : r["match_start"] + r["match_len"]]
        assert canon[r["match_doc"]][r["match_offset"] : r["match_offset"] + r["match_len"]] == span
        assert r["match_count"] == _count_ids(span, canon)
        assert r["match_window_count"] == (_count_ids(span[:min_match], canon) if r["confirmed"] else 0)
        assert r["match_before"] + r["match_text"] + r["match_after"] == texts[i]
    assert out["confirmed"].tolist() == [True, True, False]
    # without the tokenizer only the sampled ids are queried, and the copies are missed
    assert not confirm_samples(samples, idx, min_match, lm.decode)["confirmed"].any()


def test_the_sampled_ids_are_kept_when_they_match_longer(tmp_path):
    """An index of pre-tokenized ids that holds the non-canonical spelling: the sampled ids match,
    the re-encoding does not; the longer match is kept (``match_query`` = ``sampled``)."""
    from lm_extract_support import merge_lm

    from memscan.lm.extract_run import confirm_samples

    lm = merge_lm()
    text = DOCS[0][6:120]
    ids = np.frombuffer(text.encode(), dtype=np.uint8).astype(np.int64)
    CorpusIndex.build([ids], tmp_path / "idx", tokenizer=lm.describe()["tokenizer"], vocab_size=lm.vocab_size)
    idx = CorpusIndex.open(tmp_path / "idx")
    out = confirm_samples(pd.DataFrame({"text": [text], "tokens": [ids]}), idx, 50, lm.decode, lm.encode).iloc[0]
    assert out["match_query"] == "sampled" and out["match_len"] == len(ids) and out["confirmed"]
    assert out["match_window_count"] == _count_ids(ids[:50].tolist(), [ids.tolist()]) == 1


def test_lm_extract_confirms_a_model_that_samples_non_canonical_tokens(merge_index, tmp_path):
    """End to end on a token index: the run re-encodes each sample's text before it queries."""
    from lm_extract_support import merge_lm

    lm = merge_lm()
    cfg = LmExtractConfig(samples=8, length=120, top=3, batch_size=4, min_match=25, temperature_start=1.0,
                          temperature_end=1.0)  # fmt: skip
    res = lm_extract(lm, merge_index, tmp_path / "run", cfg, prompts=PROMPTS, progress=False)
    canon = [lm.encode(d).tolist() for d in DOCS]
    missed_before = 0
    for r in res.samples.to_dict("records"):
        run = max(_longest_common_run_ids(lm.encode(r["text"]).tolist(), canon),
                  _longest_common_run_ids(list(r["tokens"]), canon))  # fmt: skip
        assert r["match_len"] == run and r["confirmed"] == (run >= 25)
        missed_before += r["confirmed"] and _longest_common_run_ids(list(r["tokens"]), canon) < 25
    assert missed_before >= 2  # confirmed now, missed when the sampled ids were the query
    assert res.manifest["counts"]["confirmed"] == int(res.samples["confirmed"].sum())


# ---- the models' windows ------------------------------------------------------------------------
class _PieceLM:
    """A model over bytes (ids 0–255) and one piece, ``"ABCD"`` (id 256), that samples the piece
    over and over; ``encode`` spells the piece as one token only with ``pieces`` (and only in
    upper case), so a sample of n tokens re-encodes to 4n tokens lowercased, or under a byte-level
    reference. Like a transformer's position table, it refuses sequences beyond ``max_length``."""

    vocab_size = 257
    eos_token_id = None
    parameters = None

    def __init__(self, max_length: int, pieces: bool = True):
        self.max_length, self.pieces = max_length, pieces

    def encode(self, text: str) -> np.ndarray:
        out, b, i = [], text.encode("utf-8"), 0
        while i < len(b):
            piece = self.pieces and b.startswith(b"ABCD", i)
            out.append(256 if piece else b[i])
            i += 4 if piece else 1
        return np.asarray(out, dtype=np.int64)

    def decode(self, ids) -> str:
        return b"".join(b"ABCD" if int(i) == 256 else bytes([int(i)]) for i in np.asarray(ids).ravel()).decode()

    def sample(self, prefixes, n_new, **kw) -> np.ndarray:
        return np.full((np.asarray(prefixes).shape[0], n_new), 256, dtype=np.int64)

    def token_logprobs(self, ids) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.shape[1] > self.max_length:
            raise IndexError("index out of range in self")  # what a GPT-2 position table raises
        return np.full((ids.shape[0], ids.shape[1] - 1), -math.log(self.vocab_size))

    def greedy(self, prefixes, n_new):
        raise NotImplementedError

    def describe(self) -> dict:
        return {"class": "_PieceLM", "max_length": self.max_length, "tokenizer": None}


def test_re_encoded_samples_longer_than_a_window_are_cut_to_it_and_counted(copy_index, tmp_path):
    """A 10-token sample re-encodes to 40 tokens lowercased (target) and under a byte-level
    reference: each is scored on the tokens that fit the model's 12 positions after the 2-token
    prompt, and counted (the old code fed all 40: IndexError after every sample was drawn)."""
    cfg = LmExtractConfig(samples=3, length=10, batch_size=2, window=5)
    target, ref = _PieceLM(12), _PieceLM(12, pieces=False)
    tables, meta = sample_and_score_stage(ExtractSampleWorker(target, ref), [0, 1, 2], ["> "], cfg.to_dict())
    s = tables["samples"]
    assert meta["lowercase_cut"] == 3 and meta["reference_cut"] == 3
    assert (s["n_tokens"] == 10).all() and (s["text"] == "ABCD" * 10).all()
    assert np.allclose(s[["mean_nll", "lowercase_mean_nll", "reference_mean_nll"]], math.log(257))
    res = lm_extract(target, copy_index, tmp_path / "run", cfg, prompts=["> "], reference=ref, progress=False)
    c = res.manifest["counts"]
    assert c["lowercase_cut"] == 3 and c["reference_cut"] == 3
    log = (tmp_path / "run" / "run.log").read_text()
    assert "3 lowercased samples re-encoded longer" in log and "3 samples under the reference re-encoded" in log


def test_a_reference_with_fewer_positions_than_the_samples_is_refused_before_sampling(copy_index, tmp_path):
    """A reference whose positions cannot hold prompt + --length tokens is refused before any
    run directory is written (the old code drew every sample, then failed in the reference)."""
    cfg = LmExtractConfig(samples=4, length=40, batch_size=4)
    with pytest.raises(InputError, match=r"exceeds the 30 positions of the reference model") as err:
        lm_extract(copy_lm(), copy_index, tmp_path / "run", cfg, prompts=PROMPTS, reference=_PieceLM(30),
                   progress=False)  # fmt: skip
    assert "at most --length 22 fits" in err.value.hint and not (tmp_path / "run").exists()
    # the target's own window is checked as before
    with pytest.raises(InputError, match=r"exceeds the 30 positions of the model"):
        lm_extract(_PieceLM(30), copy_index, tmp_path / "run", cfg, prompts=PROMPTS, progress=False)

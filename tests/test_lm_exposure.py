"""Canary exposure (memscan.lm.exposure): exact enumeration against a brute-force rank
(Carlini et al. 2019 Def. 2: ``rank = |{r ∈ R : Px(r) ≤ Px(s)}|``, every token scored after the
model's start token), ties that push the canary down (a model that cannot tell the candidates apart
gives exposure 0), a format that starts with a hole, the skew-normal estimate against the exact
value and its clip at ``log2 |R|``, and the lookup model where the answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from memscan.errors import InputError
from memscan.lm.exposure import (
    CanaryFormat,
    estimated_exposure,
    exact_exposure,
    exposure_from_rank,
    log_perplexity,
    skewnorm_exposure,
)
from memscan.testing.lookup_lm import LookupLM

EOS = 256  # the byte-level lookup model's end token: the start token canaries are scored after


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("transformers")
    from memscan.generators.causal_lm import load_causal_lm
    from memscan.testing.tiny_lm import make_tiny_gpt2

    return load_causal_lm(str(make_tiny_gpt2(tmp_path_factory.mktemp("exp") / "m", seed=1)))


def test_format_parse_fill_and_refusals():
    fmt = CanaryFormat.parse("pin {d2}-{d2}!")
    assert fmt.space_size == 10_000 and fmt.fill(7) == "pin 00-07!" and fmt.index_of("pin 12-34!") == 1234
    with pytest.raises(InputError, match="does not match"):
        fmt.index_of("pin 1-234!")
    # other scripts' decimal digits (Arabic-Indic, fullwidth) are no candidate of R: refused,
    # never read as secret 1234 (whose candidate "pin 12-34!" would then be skipped in the rank)
    for other in ("pin \u0661\u0662-\u0663\u0664!", "pin \uff11\uff12-34!"):
        with pytest.raises(InputError, match="ASCII digits"):
            fmt.index_of(other)
    with pytest.raises(InputError, match="no hole"):
        CanaryFormat.parse("no secret here")
    assert exposure_from_rank(1, 1024) == 10.0 and exposure_from_rank(1024, 1024) == 0.0


def _start(lm) -> int:
    """The token a text is scored after: BOS, else EOS (independent of the code under test)."""
    tok = getattr(lm, "bos_token_id", None)
    return int(lm.eos_token_id if tok is None else tok)


def brute_force_px(lm, fmt: CanaryFormat) -> np.ndarray:
    """Def. 1 for every candidate, each scored alone: ``−Σ log2 p`` over all of its tokens, the
    first one predicted from the start token."""
    start = _start(lm)
    px = []
    for r in range(fmt.space_size):
        ids = np.concatenate([[start], np.asarray(lm.encode(fmt.fill(r)), dtype=np.int64)])
        px.append(-lm.token_logprobs(ids[None, :]).sum() / math.log(2))
    return np.asarray(px)


def brute_force_rank(px: np.ndarray, secret: int) -> int:
    """Def. 2: the candidates (the canary included) at most as unlikely as the canary."""
    return int(np.sum(px <= px[secret]))


def lookup(texts, *, order: int = 4, fallback_slope: float = 1.0) -> LookupLM:
    """A byte-level lookup model trained on ``texts``, each a document that starts after EOS."""
    seqs = [np.concatenate([[EOS], np.frombuffer(t.encode(), dtype=np.uint8).astype(np.int64)]) for t in texts]
    return LookupLM(seqs, 257, order=order, eos_token_id=EOS, byte_level=True, fallback_slope=fallback_slope)


def test_log_perplexity_is_minus_log2_of_every_token_probability():
    lm = LookupLM.from_texts(["abcabc"], order=2)
    ctx = [EOS, *lm.encode("abca")]  # the first token "a" is predicted from the start token
    direct = -sum(lm.distribution(ctx[: t + 1])[ctx[t + 1]] for t in range(4)) / math.log(2)
    assert log_perplexity(lm, ["abca"])[0] == pytest.approx(direct)


def test_the_start_token_is_bos_else_eos_and_a_model_without_either_is_refused():
    from memscan.lm.exposure import start_token

    lm = LookupLM.from_texts(["abc"], order=2)
    assert start_token(lm) == EOS
    lm.bos_token_id = 7
    assert start_token(lm) == 7
    bare = LookupLM([[1, 2, 3]], 10, order=2)  # neither BOS nor EOS
    with pytest.raises(InputError, match="neither a BOS nor an EOS"):
        exact_exposure(bare, CanaryFormat.parse("{d1}"), "3")


def test_exact_exposure_equals_a_brute_force_rank(tiny):
    fmt = CanaryFormat.parse("my PIN is {d3}")
    px = brute_force_px(tiny, fmt)
    order = np.argsort(px, kind="stable")
    for canary_rank in (1, 17, 400, 1000):
        secret = int(order[canary_rank - 1])
        got = exact_exposure(tiny, fmt, fmt.fill(secret), batch_size=97)
        assert got["rank"] == brute_force_rank(px, secret) == canary_rank
        assert got["exposure"] == pytest.approx(math.log2(1000) - math.log2(canary_rank))
        assert got["log_perplexity"] == pytest.approx(px[secret], abs=1e-5)


def test_ties_push_the_canary_down_as_in_a_brute_force_rank():
    # three planted PINs the model finds equally likely (a flat fallback: no other tie-breaker)
    lm = lookup(["pin 12", "pin 34", "pin 56"], order=8, fallback_slope=0.0)
    fmt = CanaryFormat.parse("pin {d2}")
    px = brute_force_px(lm, fmt)
    assert px[12] == px[34] == px[56] < np.delete(px, [12, 34, 56]).min()
    for secret in (12, 34, 56, 0, 99):
        got = exact_exposure(lm, fmt, fmt.fill(secret), batch_size=7)
        assert got["rank"] == brute_force_rank(px, secret)
        assert got["ties"] == int(np.sum(px == px[secret])) - 1
    assert exact_exposure(lm, fmt, "pin 34")["rank"] == 3  # not 1: two others are as likely
    assert exact_exposure(lm, fmt, "pin 34")["exposure"] == pytest.approx(math.log2(100 / 3))


def test_a_uniform_model_gives_rank_r_and_exposure_zero(tmp_path):
    """Every candidate equally likely: the canary is not exposed at all (rank |R|, exposure 0),
    in the library and in an lm-exposure run whose shards each hold part of the ties."""
    from memscan.lm.exposure_run import ExposureConfig, lm_exposure

    uniform = LookupLM([], 257, eos_token_id=EOS, byte_level=True, fallback_slope=0.0)
    fmt = CanaryFormat.parse("my PIN is {d3}")
    got = exact_exposure(uniform, fmt, "my PIN is 042", batch_size=64)
    assert (got["rank"], got["ties"], got["exposure"]) == (1000, 999, 0.0)
    res = lm_exposure(
        uniform,
        "my PIN is {d3}::my PIN is 042",
        tmp_path / "run",
        ExposureConfig(candidates_per_shard=300, batch_size=64),
        progress=False,
    )
    row = res.exposures.iloc[0]
    assert (row["rank"], row["ties"], row["exposure"], row["candidates"]) == (1000, 999, 0.0, 999)


def test_a_model_that_cannot_tell_the_digits_apart_ties_them_all(tmp_path):
    """The transformers adapter, digits with one embedding (so one logit): every candidate is
    exactly as likely as the canary, which is compared with the candidates of each batch scored
    in that very batch — not with itself scored alone, a float rounding away."""
    pytest.importorskip("transformers")
    import torch

    from memscan.generators.causal_lm import load_causal_lm
    from memscan.testing.tiny_lm import make_tiny_gpt2

    lm = load_causal_lm(str(make_tiny_gpt2(tmp_path / "m", seed=2)))
    digits = [int(lm.encode(str(d))[0]) for d in range(10)]
    with torch.no_grad():  # the output embedding is tied to the input one
        w = lm.model.get_input_embeddings().weight
        w[digits] = w[digits[0]].clone()
    fmt = CanaryFormat.parse("my PIN is {d3}")
    for batch_size in (97, 256):
        got = exact_exposure(lm, fmt, "my PIN is 517", batch_size=batch_size)
        assert (got["rank"], got["ties"], got["exposure"]) == (1000, 999, 0.0)


def test_a_format_that_starts_with_a_hole_scores_its_first_token():
    """``{d1} is it``: the secret is the first token. After every digit `` is it`` is equally
    likely (the ordinary documents say it of each digit), so only the first token — predicted
    from the start token — can tell the planted canary apart."""
    fmt = CanaryFormat.parse("{d1} is it")
    ordinary = [f"say {d} is it." for d in range(10)]
    planted = lookup(ordinary + ["7 is it"] * 3, order=4)
    unplanted = lookup(ordinary, order=4)
    for lm in (planted, unplanted):
        px = brute_force_px(lm, fmt)
        assert exact_exposure(lm, fmt, "7 is it")["rank"] == brute_force_rank(px, 7)
    got_planted = exact_exposure(planted, fmt, "7 is it")
    got_unplanted = exact_exposure(unplanted, fmt, "7 is it")
    assert got_planted["rank"] == 1 and got_planted["exposure"] == pytest.approx(math.log2(10))
    assert got_unplanted["exposure"] < got_planted["exposure"] - 1


def test_skewnorm_estimate_close_to_exact(tiny):
    fmt = CanaryFormat.parse("the code is {d3}.")
    px = log_perplexity(tiny, [fmt.fill(r) for r in range(1000)], batch_size=500)
    order = np.argsort(px)
    for rank, tol in ((300, 0.3), (50, 0.3), (5, 1.0)):
        canary = fmt.fill(int(order[rank - 1]))
        exact = exact_exposure(tiny, fmt, canary, batch_size=500)
        est = estimated_exposure(tiny, fmt, canary, samples=1000, seed=0, batch_size=500)
        assert exact["rank"] == rank
        assert abs(est["exposure"] - exact["exposure"]) < tol, (rank, exact["exposure"], est["exposure"])


def test_skewnorm_exposure_on_a_known_distribution():
    from scipy.stats import skewnorm

    x = skewnorm.rvs(3.0, loc=50, scale=5, size=20_000, random_state=np.random.default_rng(0))
    canary = float(skewnorm.ppf(2.0**-8, 3.0, loc=50, scale=5))  # 1 in 256 candidates is this likely
    got = skewnorm_exposure(x, canary, space_size=10**6)
    assert got["exposure"] == pytest.approx(8.0, abs=0.3) and got["exposure"] == got["extrapolated_exposure"]
    assert not got["clipped"]


def test_the_skewnorm_estimate_is_clipped_at_log2_r():
    """Far in the fit's tail, the paper's extrapolation exceeds log2 |R| (a "rank" below 1): the
    exposure is clipped there, and the unclipped value kept."""
    x = np.random.default_rng(0).normal(50.0, 5.0, 5000)
    got = skewnorm_exposure(x, 10.0, space_size=1000)
    assert got["clipped"] and got["exposure"] == math.log2(1000) < got["extrapolated_exposure"]


def test_lookup_model_memorized_canary_has_maximal_exposure(tmp_path):
    from memscan.lm.exposure_run import ExposureConfig, lm_exposure

    canary = "my PIN is 042917"
    texts = [f"line {i} of some ordinary text." for i in range(5)] + [canary] * 3
    lm = LookupLM.from_texts(texts, order=12)
    fmt = CanaryFormat.parse("my PIN is {d6}")
    est = estimated_exposure(lm, fmt, canary, samples=500, seed=1)
    assert est["exposure"] == pytest.approx(math.log2(10**6))  # far in the tail of the sampled candidates
    assert est["clipped"] and est["extrapolated_exposure"] > math.log2(10**6)
    small = CanaryFormat.parse("my PIN is 042{d3}")
    got = exact_exposure(lm, small, canary)
    assert got["rank"] == 1 and got["exposure"] == pytest.approx(math.log2(1000))
    # the run's table: the estimate clipped, its rank |R| · 2^−exposure never below 1
    res = lm_exposure(lm, f"my PIN is {{d6}}::{canary}", tmp_path / "run", ExposureConfig(samples=500), progress=False)
    row = res.exposures.iloc[0]
    assert row["method"] == "estimate" and row["clipped"] and row["rank"] == 1.0
    assert row["exposure"] == row["max_exposure"] < row["extrapolated_exposure"]
    # the report marks the clipped estimate
    from memscan.report.lm import build_lm_exposure_report

    html = build_lm_exposure_report(tmp_path / "run").read_text()
    assert "(clipped)" in html and "exceeds log2 |R|" in html

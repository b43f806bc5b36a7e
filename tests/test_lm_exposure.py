"""Canary exposure (memscan.lm.exposure): exact enumeration against a brute-force rank, the
skew-normal estimate against the exact value, and the lookup model where the answer is known."""

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
    with pytest.raises(InputError, match="no hole"):
        CanaryFormat.parse("no secret here")
    assert exposure_from_rank(1, 1024) == 10.0 and exposure_from_rank(1024, 1024) == 0.0


def test_log_perplexity_is_minus_log2_of_the_token_probabilities():
    lm = LookupLM.from_texts(["abcabc"], order=2)
    ids = lm.encode("abca")
    direct = -sum(lm.distribution(ids[: t + 1])[ids[t + 1]] for t in range(3)) / math.log(2)
    assert log_perplexity(lm, ["abca"])[0] == pytest.approx(direct)


def test_exact_exposure_equals_a_brute_force_rank(tiny):
    fmt = CanaryFormat.parse("my PIN is {d3}")
    # brute force: each candidate scored alone, then sorted
    px = np.array([-tiny.token_logprobs(tiny.encode(fmt.fill(r))[None, :]).sum() / math.log(2) for r in range(1000)])
    order = np.argsort(px, kind="stable")
    for canary_rank in (1, 17, 400, 1000):
        secret = int(order[canary_rank - 1])
        got = exact_exposure(tiny, fmt, fmt.fill(secret), batch_size=97)
        brute_rank = 1 + int(np.sum(np.delete(px, secret) < px[secret] - 1e-9))
        assert got["rank"] == brute_rank == canary_rank
        assert got["exposure"] == pytest.approx(math.log2(1000) - math.log2(canary_rank))
        assert got["log_perplexity"] == pytest.approx(px[secret], abs=1e-6)


def test_skewnorm_estimate_close_to_exact(tiny):
    fmt = CanaryFormat.parse("the code is {d4}.")
    px = log_perplexity(tiny, [fmt.fill(r) for r in range(10_000)], batch_size=512)
    order = np.argsort(px)
    for rank, tol in ((3000, 0.3), (500, 0.3), (50, 1.0)):
        canary = fmt.fill(int(order[rank - 1]))
        exact = exact_exposure(tiny, fmt, canary, batch_size=512)
        est = estimated_exposure(tiny, fmt, canary, samples=2000, seed=0, batch_size=512)
        assert exact["rank"] == rank
        assert abs(est["exposure"] - exact["exposure"]) < tol, (rank, exact["exposure"], est["exposure"])


def test_skewnorm_exposure_on_a_known_distribution():
    from scipy.stats import skewnorm

    x = skewnorm.rvs(3.0, loc=50, scale=5, size=20_000, random_state=np.random.default_rng(0))
    canary = float(skewnorm.ppf(2.0**-8, 3.0, loc=50, scale=5))  # 1 in 256 candidates is this likely
    assert skewnorm_exposure(x, canary)["exposure"] == pytest.approx(8.0, abs=0.3)


def test_lookup_model_memorized_canary_has_maximal_exposure():
    canary = "my PIN is 042917"
    texts = [f"line {i} of some ordinary text." for i in range(5)] + [canary] * 3
    lm = LookupLM.from_texts(texts, order=12)
    fmt = CanaryFormat.parse("my PIN is {d6}")
    est = estimated_exposure(lm, fmt, canary, samples=500, seed=1)
    assert est["exposure"] > 15  # far in the tail of the sampled candidates
    small = CanaryFormat.parse("my PIN is 042{d3}")
    got = exact_exposure(lm, small, canary)
    assert got["rank"] == 1 and got["exposure"] == pytest.approx(math.log2(1000))

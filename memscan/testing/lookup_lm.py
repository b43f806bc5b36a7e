"""A reference causal "language model" in pure numpy that copies its training text: an order-n
lookup (n-gram) model with a deterministic fallback, behind the :class:`~memscan.generators.causal_lm.CausalLM`
protocol. Exact answers are known, so the memorization measures can be tested against it.

The next-token distribution after a context ``x_≤j``:

- find the longest suffix ``c`` of ``x_≤j`` of length ``L ≤ order`` that occurs in the training
  sequences followed by some token (counts ``N(c, v)``);
- if there is one: ``p(v) = confidence · N(c, v) / Σ_u N(c, u) + (1 − confidence) · f(v)``;
- else ``p(v) = f(v)``,

with the fallback ``f = softmax(−fallback_slope · v / V)``: nearly uniform, strictly decreasing in
``v`` (so its argmax, token 0, is unique). Greedy decoding of a training sequence whose ``order``-grams
are unique in the training data therefore reproduces it exactly (``confidence > (1 − confidence) · max f``);
ties between equally frequent continuations go to the lowest token id (``np.argmax``).

Tokens are bytes with :meth:`LookupLM.from_texts` (vocabulary 257: the 256 bytes and an end
token 256), or any ids ``< vocab_size`` given directly.

Examples
--------
>>> lm = LookupLM.from_texts(["the cat sat on the mat."], order=5)
>>> prefix = lm.encode("the cat sat")[None, :]
>>> tokens, gaps = lm.greedy(prefix, 12)
>>> lm.decode(tokens[0])
' on the mat.'
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from memscan.generators.causal_lm import as_int64_batch, row_uniforms, temperature_steps, vocab_sha256
from memscan.lm.decoding import log_softmax, scheme_logprobs


class LookupLM:
    """Order-``order`` lookup model over ``sequences`` (see the module docstring)."""

    def __init__(
        self,
        sequences,
        vocab_size: int,
        *,
        order: int = 4,
        confidence: float = 0.9,
        fallback_slope: float = 1.0,
        eos_token_id: int | None = None,
        byte_level: bool = False,
    ):
        if order < 1:
            raise ValueError("order must be ≥ 1")
        self.vocab_size = int(vocab_size)
        self.order = int(order)
        self.confidence = float(confidence)
        self.eos_token_id = eos_token_id
        self.byte_level = byte_level
        self.parameters = None
        self.fallback = log_softmax(-float(fallback_slope) * np.arange(self.vocab_size) / self.vocab_size)
        self.counts: dict[tuple, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        for seq in sequences:
            seq = [int(t) for t in np.asarray(seq).ravel()]
            if any(t < 0 or t >= self.vocab_size for t in seq):
                raise ValueError("training token outside the vocabulary")
            for i in range(1, len(seq)):
                for length in range(1, self.order + 1):
                    if i - length < 0:
                        break
                    self.counts[tuple(seq[i - length : i])][seq[i]] += 1
        self.counts = {k: dict(v) for k, v in self.counts.items()}
        self._cache: dict[tuple, np.ndarray] = {}

    @classmethod
    def from_texts(cls, texts, *, order: int = 4, **kwargs) -> LookupLM:
        """A byte-level lookup model trained on ``texts`` (UTF-8 bytes; end token 256)."""
        seqs = [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int64) for t in texts]
        return cls(seqs, 257, order=order, eos_token_id=256, byte_level=True, **kwargs)

    # ---- text
    def encode(self, text: str) -> np.ndarray:
        if not self.byte_level:
            return np.asarray([int(t) for t in text.split()], dtype=np.int64)
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids) -> str:
        ids = [int(i) for i in np.asarray(ids).ravel()]
        if not self.byte_level:
            return " ".join(str(i) for i in ids)
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    # ---- model
    def distribution(self, context) -> np.ndarray:
        """log p(· | context): float64 of length ``vocab_size``."""
        context = tuple(int(t) for t in context)
        key = context[-self.order :]
        if key in self._cache:
            return self._cache[key]
        out = self.fallback
        for length in range(min(self.order, len(key)), 0, -1):
            counts = self.counts.get(key[-length:])
            if counts:
                p = np.zeros(self.vocab_size)
                for tok, n in counts.items():
                    p[tok] = n
                p = self.confidence * p / p.sum() + (1 - self.confidence) * np.exp(self.fallback)
                out = np.log(p)
                break
        self._cache[key] = out
        return out

    def next_token_logprobs(self, ids, start: int = 0) -> np.ndarray:
        x = as_int64_batch(ids)
        b, t = x.shape
        out = np.zeros((b, max(t - 1 - start, 0), self.vocab_size))
        for i in range(b):
            for j in range(start, t - 1):
                out[i, j - start] = self.distribution(x[i, : j + 1])
        return out

    def token_logprobs(self, ids) -> np.ndarray:
        x = as_int64_batch(ids)
        lp = self.next_token_logprobs(x)
        return np.take_along_axis(lp, x[:, 1:, None], axis=-1)[..., 0]

    def greedy(self, prefixes, n_new: int) -> tuple[np.ndarray, np.ndarray]:
        x = as_int64_batch(prefixes)
        tokens = np.zeros((x.shape[0], n_new), dtype=np.int64)
        gaps = np.zeros((x.shape[0], n_new))
        for i in range(x.shape[0]):
            ctx = list(x[i])
            for t in range(n_new):
                lp = self.distribution(ctx)
                top = np.argsort(-lp, kind="stable")[:2]
                tokens[i, t] = top[0]
                gaps[i, t] = lp[top[0]] - lp[top[1]]
                ctx.append(int(top[0]))
        return tokens, gaps

    def sample(self, prefixes, n_new: int, *, temperature=1.0, top_k=None, top_p=None, seed=0) -> np.ndarray:
        """Inverse-CDF sampling under the scheme; ``temperature`` one value or one per step,
        ``seed`` one integer (one generator for the batch) or one per row (as the transformers
        adapter)."""
        x = as_int64_batch(prefixes)
        temps = temperature_steps(temperature, n_new)
        per_row = row_uniforms(seed, x.shape[0], n_new)
        rng = np.random.default_rng(seed) if per_row is None else None
        tokens = np.zeros((x.shape[0], n_new), dtype=np.int64)
        ctxs = [list(row) for row in x]
        for t in range(n_new):
            u = rng.random(x.shape[0]) if per_row is None else per_row[:, t]
            for i, ctx in enumerate(ctxs):
                q = np.exp(scheme_logprobs(self.distribution(ctx), temperature=temps[t], top_k=top_k, top_p=top_p))
                tok = int(min(np.searchsorted(np.cumsum(q), u[i] * q.sum(), side="right"), self.vocab_size - 1))
                while q[tok] == 0:  # never land on a removed token through rounding
                    tok -= 1
                tokens[i, t] = tok
                ctx.append(tok)
        return tokens

    def describe(self) -> dict:
        vocab = {f"<{i}>": i for i in range(self.vocab_size)}
        return {
            "class": "LookupLM",
            "order": self.order,
            "confidence": self.confidence,
            "vocab_size": self.vocab_size,
            "tokenizer": {
                "name": "bytes" if self.byte_level else "ids",
                "class": "LookupLM",
                "vocab_size": self.vocab_size,
                "vocab_sha256": vocab_sha256(vocab),
            },
        }


def lookup_factory() -> LookupLM:  # pragma: no cover - a py: spec example
    """``py:memscan.testing.lookup_lm:lookup_factory``: a lookup model of a pangram."""
    return LookupLM.from_texts(["the quick brown fox jumps over the lazy dog. " * 2], order=4)

"""The causal-language-model adapter: the one module that loads language models with transformers.

``load_causal_lm(spec, *, device="cpu", dtype="auto", gguf_file=None) -> CausalLM`` where ``spec``
is

- a local directory saved with ``save_pretrained`` (model + tokenizer), or a hub id — loaded with
  ``AutoModelForCausalLM`` and ``AutoTokenizer``;
- a ``.gguf`` file (or a directory/hub id plus ``gguf_file=``) — transformers' GGUF loading, which
  dequantises the weights into a torch model (needs the ``gguf`` and ``accelerate`` packages:
  ``pip install 'memscan[lm]'``);
- ``py:module:attribute`` — the user's own object implementing :class:`CausalLM` (or a class /
  zero-argument factory returning one).

The protocol (:class:`CausalLM`), token ids are int64 numpy arrays::

    encode(text) -> int64 array           (no special tokens added)
    decode(ids) -> str
    vocab_size: int                       (width of the next-token distribution)
    max_length: int | None                (optional: the longest sequence the model takes)
    eos_token_id: int | None
    greedy(prefixes B×k, n_new) -> (tokens B×n_new int64, top2_gap B×n_new float64)
    sample(prefixes B×k, n_new, *, temperature, top_k, top_p, seed) -> B×n_new int64
                                          (temperature: one or one per step; seed: one or one per row)
    token_logprobs(ids B×T) -> B×(T−1) float64       column j: log p(x_{j+1} | x_≤j)
    next_token_moments(ids B×T) -> 3 × B×(T−1) float64   (optional) log p(x_{j+1}), μ_j, σ_j:
                                          the Min-K%++ moments of log p over the vocabulary
    next_token_logprobs(ids B×T, start=0) -> B×(T−1−start)×V float64
                                          row j: log p(· | x_≤start+j), the full distribution
    describe() -> dict                    class, spec, dtype, device, tokenizer name + vocab sha256
    parameters: int | None

``greedy`` decodes a batch of equal-length prefixes together with the KV cache (no padding, so a
row's tokens do not depend on the batch up to float rounding); ``top2_gap`` is the difference of
the two largest logits at each step: where it is within float rounding (:data:`NEAR_TIE`), a
different batch composition may pick the other token. ``sample`` applies temperature, top-k and
top-p in transformers' order (:mod:`memscan.lm.decoding`) and draws with a ``torch.Generator``
seeded by ``seed`` (same seed, same batch: same tokens).

Examples
--------
>>> vocab_sha256({"a": 0, "b": 1}) == vocab_sha256({"b": 1, "a": 0})
True
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from memscan.devices import check_device, precision
from memscan.errors import InputError
from memscan.generators.row_split import ForkedRows, split_mode, split_rows

#: A top-2 logit gap below this is a near-tie: float rounding (batch composition, kernels) may
#: flip the argmax. float32 logits of magnitude ~10 carry ~1e-6 absolute rounding per operation.
NEAR_TIE = 1e-4

#: Fewest rows per part when a CPU batch is split across cores (:meth:`TransformersCausalLM.row_workers`).
MIN_ROWS_PER_WORKER = 8

#: Methods every causal LM must have (``sample`` and ``next_token_logprobs`` are needed only by
#: the measures that use them, and checked there).
REQUIRED = ("encode", "decode", "greedy", "token_logprobs")


@runtime_checkable
class CausalLM(Protocol):
    """What memscan needs from a causal language model (see the module docstring)."""

    vocab_size: int
    eos_token_id: int | None

    def encode(self, text: str) -> np.ndarray: ...  # pragma: no cover

    def decode(self, ids) -> str: ...  # pragma: no cover

    def greedy(self, prefixes: np.ndarray, n_new: int) -> tuple[np.ndarray, np.ndarray]: ...  # pragma: no cover

    def token_logprobs(self, ids: np.ndarray) -> np.ndarray: ...  # pragma: no cover


def vocab_sha256(vocab: dict[str, int]) -> str:
    """sha256 of a tokenizer's vocabulary (token → id), independent of dict order."""
    items = sorted((str(k), int(v)) for k, v in vocab.items())
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode("utf-8")).hexdigest()


def as_int64_batch(ids: Any, what: str = "token ids") -> np.ndarray:
    """``ids`` as a 2-D int64 array (a 1-D array becomes one row)."""
    arr = np.asarray(ids)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        raise InputError(f"{what} must be a B×T integer array, got {arr.dtype} {arr.shape}", "pass int64 token ids")
    return arr.astype(np.int64, copy=False)


class TransformersCausalLM:
    """A transformers causal LM and its tokenizer behind the :class:`CausalLM` protocol."""

    def __init__(self, model: Any, tokenizer: Any, *, spec: str, device: str = "cpu", gguf_file: str | None = None):
        import torch

        self.model = model.eval()
        self.tokenizer = tokenizer
        self.spec = spec
        self.device = torch.device(device)
        self.gguf_file = gguf_file
        out = model.get_output_embeddings()
        self.vocab_size = int(out.weight.shape[0]) if out is not None else int(model.config.vocab_size)
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos_token_id = int(eos) if eos is not None else None
        bos = getattr(tokenizer, "bos_token_id", None)
        self.bos_token_id = int(bos) if bos is not None else None
        self.parameters = int(sum(p.numel() for p in model.parameters()))
        cfg = model.config
        self.max_length = next(
            (int(getattr(cfg, a)) for a in ("n_positions", "max_position_embeddings") if getattr(cfg, a, None)), None
        )
        self._vocab_sha = None
        params = inspect.signature(model.forward).parameters
        # transformers ≥ 5 names the KV cache ``cache`` (``past_key_values`` before)
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._keep_arg = next((a for a in ("logits_to_keep", "num_logits_to_keep") if a in params), None)
        # worker processes for the row split (forked when first needed; made here, not lazily,
        # so that two threads never make two)
        self._forked = ForkedRows(self, weights_fingerprint)
        split_mode()  # a bad MEMSCAN_ROW_SPLIT is refused here, before any work starts

    # ---- text
    def encode(self, text: str) -> np.ndarray:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return np.asarray(ids, dtype=np.int64)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(
            [int(i) for i in np.asarray(ids).ravel()], skip_special_tokens=False, clean_up_tokenization_spaces=False
        )

    # ---- model
    def _tensor(self, ids: np.ndarray):
        import torch

        arr = as_int64_batch(ids)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise InputError(
                f"token ids outside the model's vocabulary [0, {self.vocab_size})",
                "tokenize with the model's own tokenizer",
            )
        return torch.as_tensor(arr, device=self.device)

    def _logits(self, out):
        return out.logits.float()

    def _first(self, x):
        """Forward over the prefixes with the cache on; logits of the last position only where supported."""
        kwargs = {self._keep_arg: 1} if self._keep_arg else {}
        return self.model(input_ids=x, use_cache=True, **kwargs)

    def _next(self, out, nxt):
        """One cached decoding step: feed the chosen tokens B×1."""
        cache = getattr(out, self._cache_arg, None)
        if cache is None:
            cache = getattr(out, "past_key_values", None)
        return self.model(input_ids=nxt[:, None], use_cache=True, **{self._cache_arg: cache})

    def row_workers(self, rows: int) -> int:
        """Parts into which a CPU batch of ``rows`` rows is split (1: not split).

        A decoding step of a small model is a chain of small operations (B×d by d×4d products,
        layer norms, element-wise activations) that torch's intra-op threads divide too finely to
        pay; the rows, whose decoding is independent, divide well. So on a CPU the batch is split
        into up to ``torch.get_num_threads()`` parts of at least :data:`MIN_ROWS_PER_WORKER` rows,
        each decoded with one intra-op thread — the same cores as before, put where the work is —
        in persistent forked worker processes on Linux, else in threads
        (:mod:`memscan.generators.row_split`; ``MEMSCAN_ROW_SPLIT=threads`` forces threads). On
        other devices the batch stays whole."""
        import torch

        if self.device.type != "cpu":
            return 1
        return max(1, min(torch.get_num_threads(), rows // MIN_ROWS_PER_WORKER))

    def greedy(self, prefixes: np.ndarray, n_new: int) -> tuple[np.ndarray, np.ndarray]:
        """Greedy continuation of B equal-length prefixes, n_new tokens, with the KV cache.

        On a CPU the rows are split across threads (:meth:`row_workers`); a row's tokens do not
        depend on the split up to float rounding (near-ties, reported by ``top2_gap``)."""
        x = self._tensor(prefixes)
        workers = self.row_workers(x.shape[0]) if n_new else 1
        if workers <= 1:
            return self._greedy_rows(x, n_new)
        parts = np.array_split(x.cpu().numpy(), workers)
        done = self._split("_greedy_part", [(p, n_new) for p in parts])
        return np.concatenate([t for t, _ in done]), np.concatenate([g for _, g in done])

    def _split(self, method: str, args: list[tuple]) -> list:
        """``[getattr(self, method)(*a) for a in args]``, the parts in parallel, each with one torch
        thread: in forked worker processes (Linux) or in threads (:mod:`memscan.generators.row_split`)."""
        if split_mode() == "threads":
            return split_rows(lambda a: getattr(self, method)(*a), args)
        return self._forked.map(method, args)

    def _greedy_part(self, prefixes: np.ndarray, n_new: int) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`_greedy_rows` of validated int64 prefixes given as an array (one part of a split)."""
        import torch

        return self._greedy_rows(torch.as_tensor(prefixes, device=self.device), n_new)

    def _greedy_rows(self, x, n_new: int) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`greedy` of one B×k tensor of prefixes, in this thread."""
        import torch

        b = x.shape[0]
        tokens = np.zeros((b, n_new), dtype=np.int64)
        gaps = np.zeros((b, n_new), dtype=np.float64)
        if n_new == 0 or b == 0:
            return tokens, gaps
        with torch.inference_mode():
            out = self._first(x)
            for t in range(n_new):
                logits = self._logits(out)[:, -1, :]
                top2 = torch.topk(logits, 2, dim=-1)
                nxt = top2.indices[:, 0]
                tokens[:, t] = nxt.cpu().numpy()
                gaps[:, t] = (top2.values[:, 0] - top2.values[:, 1]).double().cpu().numpy()
                if t + 1 < n_new:
                    out = self._next(out, nxt)
        return tokens, gaps

    def sample(
        self,
        prefixes: np.ndarray,
        n_new: int,
        *,
        temperature: float | Sequence[float] = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | Sequence[int] = 0,
    ) -> np.ndarray:
        """Sampled continuation (temperature → top-k → top-p, renormalised), seeded by ``seed``.

        ``temperature`` is one value, or one per new token (a schedule, e.g. the decaying
        temperature of Carlini et al. 2021, :func:`memscan.lm.sampling_attack.temperature_schedule`).
        ``seed`` is one integer (a ``torch.Generator`` draws the whole batch) or one integer per row:
        row i then draws its uniforms from ``numpy.random.default_rng(seed[i])`` and takes the token
        by inverse CDF, so a row's tokens do not depend on the rows batched with it (up to float
        rounding of the logits).
        """
        import torch

        from memscan.lm.decoding import check_scheme

        top_k = None if not top_k else int(top_k)
        temps = temperature_steps(temperature, n_new)
        for t in sorted(set(temps)):
            check_scheme(t, top_k, top_p)  # before 1 means "off": a top-p above 1 is refused
        top_p = None if top_p is None or top_p >= 1.0 else float(top_p)
        x = self._tensor(prefixes)
        b = x.shape[0]
        if n_new == 0 or b == 0:
            return np.zeros((b, n_new), dtype=np.int64)
        uniforms = row_uniforms(seed, b, n_new)
        if uniforms is None:  # one generator draws the whole batch: it stays whole
            gen = torch.Generator(device=self.device).manual_seed(int(seed))
            return self._sample_rows(x, n_new, temps, top_k, top_p, gen, None)
        # one seed per row: rows are independent, so a CPU batch is split across cores
        parts = np.array_split(np.arange(b), self.row_workers(b))
        xs = x.cpu().numpy()
        done = self._split("_sample_part", [(xs[r], n_new, temps, top_k, top_p, uniforms[r]) for r in parts])
        return np.concatenate(done)

    def _sample_part(self, prefixes: np.ndarray, n_new: int, temps, top_k, top_p, uniforms) -> np.ndarray:
        """:meth:`_sample_rows` of one part of a split, row i drawing by inverse CDF of ``uniforms[i]``."""
        import torch

        return self._sample_rows(
            torch.as_tensor(prefixes, device=self.device), n_new, temps, top_k, top_p, None, uniforms
        )

    def _sample_rows(self, x, n_new: int, temps: list, top_k, top_p, gen, uniforms) -> np.ndarray:
        """:meth:`sample` of one B×k tensor of prefixes, in this thread: ``gen`` draws the tokens,
        or (``gen`` None) row i takes them by inverse CDF of ``uniforms[i]``."""
        import torch

        tokens = np.zeros((x.shape[0], n_new), dtype=np.int64)
        with torch.inference_mode():
            out = self._first(x)
            for t in range(n_new):
                s = torch.log_softmax(self._logits(out)[:, -1, :].double(), dim=-1) / float(temps[t])
                if top_k is not None and top_k < s.shape[-1]:
                    kth = torch.topk(s, top_k, dim=-1).values[:, -1:]
                    s = s.masked_fill(s < kth, float("-inf"))
                s = torch.log_softmax(s, dim=-1)
                if top_p is not None:
                    sp, order = torch.sort(s, dim=-1, descending=True, stable=True)
                    p = sp.exp()
                    before = torch.cumsum(p, dim=-1) - p
                    remove_sorted = before >= top_p
                    remove_sorted[:, 0] = False
                    remove = remove_sorted.scatter(1, order, remove_sorted)
                    s = torch.log_softmax(s.masked_fill(remove, float("-inf")), dim=-1)
                if uniforms is None:
                    nxt = torch.multinomial(s.exp(), 1, generator=gen)[:, 0]
                else:
                    nxt = inverse_cdf(s.exp(), torch.as_tensor(uniforms[:, t], device=s.device))
                tokens[:, t] = nxt.cpu().numpy()
                if t + 1 < n_new:
                    out = self._next(out, nxt)
        return tokens

    def token_logprobs(self, ids: np.ndarray) -> np.ndarray:
        """log p(x_{t+1} | x_≤t) for every position, one forward pass: B×(T−1) float64.

        Computed as the gathered logit minus the float32 log-sum-exp over the vocabulary, in chunks
        of positions (:func:`per_token_logprobs`): no B×T×V log-softmax tensor, no float64 copy of
        the logits. Within float32 rounding (≈ 1e-6 for logits of magnitude ~10) of a float64
        log-softmax."""
        import torch

        x = self._tensor(ids)
        if x.shape[1] < 2:
            return np.zeros((x.shape[0], 0), dtype=np.float64)
        with torch.inference_mode():
            logits = self.model(input_ids=x, use_cache=False).logits
            return per_token_logprobs(logits, x).double().cpu().numpy()

    def next_token_moments(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(log p(x_{t+1} | x_≤t), μ_t, σ_t)``, three B×(T−1) float64 arrays, from one forward pass.

        μ_t and σ_t are the exact moments of ``log p(z)`` under the next-token distribution, over
        the whole vocabulary (Min-K%++, Zhang et al. 2025, eq. 3; the sums of
        :func:`memscan.lm.membership.next_token_moments`), computed in float32 where the logits
        are, in chunks of positions (:func:`per_token_moments`): the B×(T−1)×V distributions
        never leave the model's device and are never copied to float64."""
        import torch

        x = self._tensor(ids)
        b, t = x.shape
        if t < 2:
            empty = np.zeros((b, 0), dtype=np.float64)
            return empty, empty.copy(), empty.copy()
        with torch.inference_mode():
            logits = self.model(input_ids=x, use_cache=False).logits
            tok, mu, sigma = per_token_moments(logits, x)
            return tok.double().cpu().numpy(), mu.double().cpu().numpy(), sigma.double().cpu().numpy()

    def token_logprobs_shared_prefix(self, ids: np.ndarray) -> np.ndarray:
        """:meth:`token_logprobs` of rows that begin with the same tokens (canary candidates of one
        format): the common prefix goes through the model once, its KV cache is repeated for every
        row, and only the differing tail is computed per row. Equal to :meth:`token_logprobs` up
        to float rounding; falls back to it when the rows share fewer than 2 tokens or the cache
        cannot be repeated."""
        import torch

        x = self._tensor(ids)
        b, t = x.shape
        arr = x.cpu().numpy()
        same = np.all(arr == arr[:1], axis=0)
        p = t if same.all() else int(np.argmin(same))
        p = min(p, t - 1)
        if b < 2 or p < 2:
            return self.token_logprobs(arr)
        with torch.inference_mode():
            out = self.model(input_ids=x[:1, :p], use_cache=True)
            cache = getattr(out, self._cache_arg, None)
            if cache is None:
                cache = getattr(out, "past_key_values", None)
            if not hasattr(cache, "batch_repeat_interleave"):
                return self.token_logprobs(arr)
            cache.batch_repeat_interleave(b)
            head = out.logits[0]  # p × V: predicts x_1 … x_p
            rest = self.model(input_ids=x[:, p:], use_cache=True, **{self._cache_arg: cache})
            shared = per_token_logprobs(head[None], x[:1, :p])[0]  # x_1 … x_{p−1}
            last = head[-1].float()
            first = last[x[:, p]] - torch.logsumexp(last, dim=0)  # x_p, per row
            after = per_token_logprobs(rest.logits, x[:, p:])  # x_{p+1} …
            lp = torch.cat([shared[None, :].expand(b, -1), first[:, None], after], dim=1)
            return lp.double().cpu().numpy()

    def next_token_logprobs(self, ids: np.ndarray, start: int = 0) -> np.ndarray:
        """The full next-token distributions log p(· | x_≤j) for j ≥ start: B×(T−1−start)×V float64."""
        import torch

        x = self._tensor(ids)
        with torch.inference_mode():
            logits = self._logits(self.model(input_ids=x, use_cache=False))[:, start : x.shape[1] - 1, :]
            return torch.log_softmax(logits.double(), dim=-1).cpu().numpy()

    # ---- record
    def tokenizer_record(self) -> dict:
        if self._vocab_sha is None:
            self._vocab_sha = vocab_sha256(self.tokenizer.get_vocab())
        return {
            "name": str(getattr(self.tokenizer, "name_or_path", "") or self.spec),
            "class": type(self.tokenizer).__name__,
            "vocab_size": int(len(self.tokenizer)),
            "vocab_sha256": self._vocab_sha,
        }

    def describe(self) -> dict:
        return {
            "class": type(self.model).__name__,
            "spec": self.spec,
            "gguf_file": self.gguf_file,
            "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."),
            "device": str(self.device),
            "vocab_size": self.vocab_size,
            "tokenizer": self.tokenizer_record(),
        }


#: Elements (positions × vocabulary) of the logits handled at once by :func:`per_token_logprobs`
#: and :func:`per_token_moments`: their float32 temporaries stay ≈ 4 MB, in cache.
CHUNK_ELEMENTS = 1 << 20


def _position_chunks(logits, n_pos: int):
    """``(row, lo, hi)`` over the first ``n_pos`` positions of each row of B×T×V ``logits``:
    ``logits[row, lo:hi]`` is contiguous and holds ≲ :data:`CHUNK_ELEMENTS` values."""
    step = max(1, CHUNK_ELEMENTS // max(1, int(logits.shape[-1])))
    for row in range(int(logits.shape[0])):
        for lo in range(0, n_pos, step):
            yield row, lo, min(n_pos, lo + step)


def per_token_logprobs(logits, ids):
    """``log p(ids[:, j+1] | ids[:, ≤j])`` from B×T×V ``logits`` (any float dtype) and B×T ``ids``:
    a B×(T−1) float32 tensor.

    1. for each row and chunk of positions, cast that chunk of logits to float32;
    2. gather the logit of the true next token;
    3. subtract the log-sum-exp over the vocabulary (max-shifted, so exact up to float32
       rounding) — the log-softmax of that one token, without a B×T×V log-softmax tensor.
    """
    import torch

    n_pos = int(ids.shape[1]) - 1
    out = torch.empty((int(ids.shape[0]), max(0, n_pos)), dtype=torch.float32, device=logits.device)
    for row, lo, hi in _position_chunks(logits, n_pos):
        chunk = logits[row, lo:hi].float()  # (1)
        picked = chunk.gather(1, ids[row, lo + 1 : hi + 1, None])[:, 0]  # (2)
        out[row, lo:hi] = picked - torch.logsumexp(chunk, dim=1)  # (3)
    return out


def per_token_moments(logits, ids):
    """``(log p(x_{j+1}), μ_j, σ_j)``, three B×(T−1) float32 tensors, from B×T×V ``logits``:
    the per-token log-probabilities and the moments of ``log p(z)`` over the whole vocabulary
    (μ = Σ p·log p, σ² = Σ p·(log p − μ)², as :func:`memscan.lm.membership.next_token_moments`).

    1. for each row and chunk of positions, the float32 log-softmax of that chunk;
    2. the true token's entry;
    3. p = exp(log p), μ = Σ p·log p;
    4. σ² = Σ p·(log p − μ)² (no cancellation), σ = √σ².
    """
    import torch

    n_pos = int(ids.shape[1]) - 1
    shape = (int(ids.shape[0]), max(0, n_pos))
    tok, mu, sigma = (torch.empty(shape, dtype=torch.float32, device=logits.device) for _ in range(3))
    for row, lo, hi in _position_chunks(logits, n_pos):
        lp = torch.log_softmax(logits[row, lo:hi].float(), dim=1)  # (1)
        tok[row, lo:hi] = lp.gather(1, ids[row, lo + 1 : hi + 1, None])[:, 0]  # (2)
        p = lp.exp()  # (3)
        m = (p * lp).sum(1)
        if not bool(torch.isfinite(m).all()):  # a −inf logit: p = 0 there, and 0 · −inf is NaN
            m = torch.where(p > 0, p * lp, 0.0).sum(1)
        mu[row, lo:hi] = m
        lp.sub_(m[:, None]).square_()  # (4)
        var = (p * lp).sum(1)
        if not bool(torch.isfinite(var).all()):
            var = torch.where(p > 0, p * lp, 0.0).sum(1)
        sigma[row, lo:hi] = var.clamp_min_(0.0).sqrt_()
    return tok, mu, sigma


def weights_fingerprint(lm: TransformersCausalLM) -> tuple:
    """What :class:`ForkedRows` compares before each call: changes when anything the forked workers
    would compute with changes.

    Every parameter's and buffer's identity, address, in-place version counter and an integer
    checksum of its bits (so writes through ``.data``, which bypass the version counter, are seen
    too: one read of the weights, against the ``n_new`` reads of a decoding call), each module's
    training flag and forward hooks, the module itself and the device."""
    import torch

    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    model = lm.model
    out: list = [id(model), str(lm.device)]
    with torch.no_grad():
        for t in (*model.parameters(), *model.buffers()):
            try:
                version = t._version
            except RuntimeError:  # an inference tensor keeps no version counter
                version = -1
            flat = t.detach().reshape(-1)
            bits = flat.view(ints[flat.element_size()]) if flat.element_size() in ints else flat
            out.append((id(t), t.data_ptr(), version, int(bits.sum(dtype=torch.int64))))
    for m in model.modules():
        out.append((m.training, tuple(m._forward_hooks), tuple(m._forward_pre_hooks)))
    return tuple(out)


def temperature_steps(temperature: float | Sequence[float], n_new: int) -> list[float]:
    """One temperature per new token: a number repeated, or a sequence of exactly ``n_new``.

    >>> temperature_steps(0.5, 3), temperature_steps([2.0, 1.0], 2)
    ([0.5, 0.5, 0.5], [2.0, 1.0])
    """
    if np.ndim(temperature) == 0:
        return [float(temperature)] * int(n_new)
    temps = [float(t) for t in np.asarray(temperature, dtype=np.float64).ravel()]
    if len(temps) != int(n_new):
        raise InputError(
            f"a temperature schedule of {len(temps)} steps for {n_new} new tokens",
            "give one temperature, or one per new token",
        )
    return temps


def row_uniforms(seed: int | Sequence[int], rows: int, n_new: int) -> np.ndarray | None:
    """``rows × n_new`` uniforms in [0, 1), row i from ``numpy.random.default_rng(seed[i])`` — or
    ``None`` for a single integer seed (the batch then shares one ``torch.Generator``)."""
    if np.ndim(seed) == 0:
        return None
    seeds = [int(s) for s in np.asarray(seed).ravel()]
    if len(seeds) != rows:
        raise InputError(f"{len(seeds)} per-row seeds for {rows} rows", "give one seed, or one per row")
    return np.stack([np.random.default_rng(s).random(n_new) for s in seeds]) if rows else np.zeros((0, n_new))


def inverse_cdf(probs, u):
    """The token whose cumulative probability interval holds ``u`` (B×V probabilities, B uniforms):
    the first index with ``cumsum > u · total``, never a token of probability 0."""
    import torch

    c = torch.cumsum(probs, dim=-1)
    idx = torch.searchsorted(c, (u.to(c.dtype) * c[:, -1]).unsqueeze(-1), right=True)[:, 0]
    last = probs.shape[-1] - 1 - torch.argmax(torch.flip(probs > 0, dims=[-1]).to(torch.int8), dim=-1)
    idx = torch.minimum(idx, last)
    return idx


def describe_lm(lm: Any) -> dict:
    """The manifest record of any causal LM (a user's object may lack ``describe``)."""
    fn = getattr(lm, "describe", None)
    if callable(fn):
        return dict(fn())
    return {"class": type(lm).__qualname__, "vocab_size": int(getattr(lm, "vocab_size", 0) or 0), "tokenizer": None}


def tokenizer_sha256(lm: Any) -> str | None:
    """The vocabulary hash the model's record carries, or ``None`` when it has none."""
    tok = describe_lm(lm).get("tokenizer") or {}
    return tok.get("vocab_sha256") if isinstance(tok, dict) else None


def _torch_dtype(dtype: str, device: str):
    import torch

    name = precision(dtype)  # any spelling (fp16, float16, …); others: one error
    if name == "auto":
        return torch.float32 if str(device).startswith("cpu") else "auto"
    return getattr(torch, name)


def load_causal_lm(spec: str, *, device: str = "cpu", dtype: str = "auto", gguf_file: str | None = None) -> Any:
    """Load the causal LM named by ``spec`` (see the module docstring)."""
    check_device(device)
    spec = str(spec)
    if spec.startswith("py:"):
        return _load_python(spec)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        if gguf_file is not None:
            raise InputError(f"model {spec} is a .gguf file and gguf_file={gguf_file!r} was given too", "pass one")
        return _load_transformers(str(path.parent), spec, device, dtype, gguf_file=path.name)
    if path.exists() and not path.is_dir():
        raise InputError(
            f"model {spec} is a file but not a .gguf",
            "pass a transformers model directory, a .gguf file, a hub id or py:module:attribute",
        )
    if path.is_dir() or (spec.count("/") == 1 and not spec.startswith((".", "/", "~"))):
        return _load_transformers(str(path) if path.is_dir() else spec, spec, device, dtype, gguf_file=gguf_file)
    raise InputError(
        f"model {spec!r} is not a directory, a .gguf file, a hub id or py:module:attribute",
        "e.g. --model ./my-gpt2 or --model HuggingFaceTB/SmolLM2-135M",
    )


def _load_transformers(where: str, spec: str, device: str, dtype: str, gguf_file: str | None) -> TransformersCausalLM:
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise InputError("language models need transformers", "pip install 'memscan[lm]'") from None
    if gguf_file is not None:
        for pkg in ("gguf", "accelerate"):
            try:
                __import__(pkg)
            except ImportError:
                raise InputError(
                    f"loading {gguf_file} needs the {pkg!r} package", "pip install 'memscan[lm]'"
                ) from None
    with quiet_loading():
        return _load_transformers_quiet(where, spec, device, dtype, gguf_file)


@contextlib.contextmanager
def quiet_loading():
    """Silence transformers' progress bars and deprecation chatter while loading."""
    from transformers.utils import logging as tlog

    level = tlog.get_verbosity()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    # the GGUF reader draws its own tqdm bar, outside transformers' progress-bar switch
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except Exception:  # noqa: BLE001 - an older transformers or no gguf support: nothing to silence
        gguf_utils = None
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is not None:
        gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        tlog.set_verbosity(level)
        tlog.enable_progress_bar()
        if bar is not None:
            gguf_utils.tqdm = bar


def _load_transformers_quiet(where, spec, device, dtype, gguf_file) -> TransformersCausalLM:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    local = Path(where).is_dir()
    if local and gguf_file is None and not (Path(where) / "config.json").is_file():
        raise InputError(
            f"model directory {spec} has no config.json: not a transformers model",
            "save it with model.save_pretrained(dir) and tokenizer.save_pretrained(dir), or pass a .gguf file",
        )
    try:
        config = AutoConfig.from_pretrained(where, **kwargs)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the model config of {spec}: {str(exc).splitlines()[0]}", _hint(local)) from None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            where,
            **{_dtype_keyword(): _torch_dtype(dtype, device)},
            **(kwargs or {"use_safetensors": True}),  # GGUF, or safetensors: never a pickle
        )
    except InputError:  # a bad --dtype: shown as itself, not blamed on the model
        raise
    except ValueError as exc:
        raise InputError(
            f"model {spec} ({type(config).__name__}) is not a causal language model: {str(exc).splitlines()[0]}",
            "pass a model AutoModelForCausalLM loads (GPT-2, Llama, …), or wrap yours as py:module:attribute",
        ) from None
    except OSError as exc:
        if local and gguf_file is None and not any(Path(where).glob("*.safetensors")):
            raise InputError(
                f"model directory {spec} holds no .safetensors weights: memscan does not load pickled "
                "checkpoints (pytorch_model.bin can run code when unpickled)",
                "convert it once where you trust it: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir)",
            ) from None
        raise InputError(f"cannot load model {spec}: {str(exc).splitlines()[0]}", _hint(local)) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    except (OSError, ValueError, TypeError) as exc:
        raise InputError(
            f"cannot load the tokenizer of {spec}: {str(exc).splitlines()[0]}",
            "save the tokenizer beside the model (tokenizer.save_pretrained(dir))",
        ) from None
    model.to(device)
    return TransformersCausalLM(model, tokenizer, spec=spec, device=device, gguf_file=gguf_file)


def _dtype_keyword() -> str:
    """``from_pretrained``'s dtype keyword: ``dtype`` since transformers 4.56, ``torch_dtype`` before."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def _hint(local: bool) -> str:
    return "check the directory" if local else "check the id and your network, or pass a local directory"


def _load_python(spec: str) -> Any:
    from memscan.errors import user_code
    from memscan.user_code import import_object

    obj = import_object(spec, "a causal LM object, or a class / factory returning one")
    if inspect.isclass(obj) or (callable(obj) and not hasattr(obj, "greedy") and _no_required_args(obj)):
        with user_code(f"the factory {spec} failed", "fix the factory"):
            obj = obj()
    return check_causal_lm(obj, spec)


def _no_required_args(fn: Any) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return not [p for p in params if p.default is p.empty and p.kind in kinds]


def check_causal_lm(obj: Any, name: str) -> Any:
    """Refuse an object that lacks the protocol's required methods."""
    missing = [m for m in (*REQUIRED, "vocab_size") if not hasattr(obj, m)]
    if missing:
        raise InputError(
            f"{name} is not a causal LM: it lacks {', '.join(missing)}",
            "implement encode, decode, vocab_size, greedy and token_logprobs (memscan.generators.causal_lm.CausalLM)",
        )
    return obj


__all__ = [
    "NEAR_TIE",
    "CausalLM",
    "TransformersCausalLM",
    "as_int64_batch",
    "check_causal_lm",
    "describe_lm",
    "inverse_cdf",
    "load_causal_lm",
    "per_token_logprobs",
    "per_token_moments",
    "row_uniforms",
    "temperature_steps",
    "tokenizer_sha256",
    "vocab_sha256",
]

"""Checkpoint sweeps of the language-model run kinds, with each checkpoint's held-out loss.

``memscan lm extractable | exposure | mia | extract --model FOLDER`` with ``FOLDER/checkpoint-N/``
(each a full transformers model directory, as transformers' ``Trainer`` saves them) runs the same
measurement, with the same options and seeds, on every checkpoint, then compares the runs by
training step (:func:`memscan.compare.sweep.checkpoint_sweep`).

**Held-out loss.** With ``--heldout TEXTS`` (JSONL with ``text``, Parquet with a ``text`` column,
or one text a line) each checkpoint's mean token negative log-likelihood on them is recorded,
``heldout_loss`` (nats per predicted token, pooled over all texts: Σ −log p(x_{t+1} | x_≤t) over
every text and position, divided by the number of predicted tokens; each text encoded without
special tokens and cut into windows of the model's ``max_length``), with ``heldout_tokens``; and
where the command has training text (``lm extractable --data``, ``lm mia --members``) the same on
the first as many training texts, ``train_loss`` and ``loss_gap = heldout_loss − train_loss``.
Memorization that rises while the held-out loss still falls is "memorization without overfitting"
(Tirumala et al. 2022).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from memscan.errors import InputError

#: Windows of one length scored per forward pass.
NLL_BATCH = 16


def mean_token_nll(lm, token_rows: Iterable[np.ndarray], *, batch_size: int = NLL_BATCH) -> tuple[float, int]:
    """Pooled mean negative log-likelihood (nats per predicted token) of token sequences.

    Each row is cut into windows of ``lm.max_length`` tokens (the whole row when the model has no
    limit); a window of T tokens predicts T − 1 of them (:meth:`token_logprobs`). Windows of one
    length go through the model together. Returns ``(mean NLL, predicted tokens)``; ``(nan, 0)``
    when no row has 2 tokens.
    """
    limit = getattr(lm, "max_length", None)
    # 1. windows, grouped by length
    by_len: dict[int, list[np.ndarray]] = {}
    for row in token_rows:
        ids = np.asarray(row, dtype=np.int64).ravel()
        step = int(limit) if limit else max(len(ids), 1)
        for s in range(0, len(ids), step):
            w = ids[s : s + step]
            if len(w) >= 2:
                by_len.setdefault(len(w), []).append(w)
    # 2. −Σ log p over every predicted token, batch by batch
    total, count = 0.0, 0
    for length in sorted(by_len):
        rows = by_len[length]
        for i in range(0, len(rows), batch_size):
            lp = np.asarray(lm.token_logprobs(np.stack(rows[i : i + batch_size])), dtype=np.float64)
            total -= float(lp.sum())
            count += int(lp.size)
    return (total / count if count else float("nan")), count


def read_heldout(path: str | Path) -> list[str]:
    """The held-out texts of ``--heldout`` (the formats of ``memscan lm mia --members``)."""
    from memscan.lm.mia_run import read_texts

    table, _ = read_texts(path, role="heldout")
    if not len(table):
        raise InputError(f"--heldout {path} holds no text", "pass a file with at least one non-empty text")
    return table["text"].tolist()


def lm_losses(
    heldout: str | Path,
    train_rows: Callable[[object, int], list[np.ndarray]] | None = None,
    *,
    device: str = "cpu",
    dtype: str = "auto",
) -> Callable[[Path, Path], dict]:
    """The ``losses`` function of a sweep: load the checkpoint, score the held-out texts (and
    ``train_rows(lm, n)``, the first ``n`` training sequences as token ids, when given)."""
    texts = read_heldout(heldout)  # a bad file fails before any checkpoint runs

    def losses(model: Path, sub: Path) -> dict:
        from memscan.generators.causal_lm import load_causal_lm

        lm = load_causal_lm(str(model), device=device, dtype=dtype)
        held, n_held = mean_token_nll(lm, [lm.encode(t) for t in texts])
        out = {"heldout_loss": held, "heldout_tokens": n_held}
        if train_rows is not None:
            train, _ = mean_token_nll(lm, train_rows(lm, len(texts)))
            out.update(train_loss=train, loss_gap=held - train)
        return out

    return losses


def first_documents(data, text_column: str = "text") -> Callable[[object, int], list[np.ndarray]]:
    """``train_rows`` for training text in any :mod:`memscan.lm.text_data` format: the first
    ``n`` documents, tokenized by the checkpoint."""
    from memscan.lm.text_data import iter_documents, open_text_source

    source = open_text_source(data, text_column=text_column)

    def rows(lm, n: int) -> list[np.ndarray]:
        out = []
        for _, _, ids in iter_documents(source, lm.encode):
            out.append(ids)
            if len(out) >= n:
                break
        return out

    return rows


def first_texts(path: str | Path, role: str = "members") -> Callable[[object, int], list[np.ndarray]]:
    """``train_rows`` for a file of texts (``lm mia --members``): the first ``n``, tokenized."""
    from memscan.lm.mia_run import read_texts

    texts = read_texts(path, role=role)[0]["text"].tolist()
    return lambda lm, n: [lm.encode(t) for t in texts[:n]]


def lm_checkpoint_sweep(
    folder: str | Path,
    run_one: Callable[[str, Path, bool, str], object],
    out: str | Path,
    *,
    heldout: str | Path | None = None,
    train_rows: Callable[[object, int], list[np.ndarray]] | None = None,
    device: str = "cpu",
    dtype: str = "auto",
    resume: bool = False,
    progress: bool = True,
):
    """:func:`memscan.compare.sweep.checkpoint_sweep` for a language-model run kind, with the
    held-out loss of each checkpoint when ``heldout`` is given (see the module)."""
    from memscan.compare.sweep import checkpoint_sweep

    if heldout is not None and not Path(heldout).exists():
        raise InputError(f"--heldout {heldout} does not exist", "pass a file of held-out texts")
    losses = lm_losses(heldout, train_rows, device=device, dtype=dtype) if heldout is not None else None
    return checkpoint_sweep(folder, run_one, out, losses=losses, resume=resume, progress=progress)

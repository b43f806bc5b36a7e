"""A tiny random GPT-2 with a byte-level tokenizer, saved like any transformers model (tests,
benchmarks): ``make_tiny_gpt2(path)`` → a directory ``load_causal_lm`` loads; no download.

``ByT5Tokenizer`` maps bytes to ids 3..258 (0 pad, 1 ``</s>``, 2 unk) and has 125 extra ids, so the
vocabulary is 384.
"""

from __future__ import annotations

from pathlib import Path


def make_tiny_gpt2(
    path: str | Path, *, seed: int = 0, n_layer: int = 2, n_embd: int = 32, n_head: int = 2, n_positions: int = 512
) -> Path:
    """Save a random ``GPT2LMHeadModel`` (weights from ``seed``) and a ``ByT5Tokenizer`` to ``path``."""
    import torch
    from transformers import ByT5Tokenizer, GPT2Config, GPT2LMHeadModel

    path = Path(path)
    tok = ByT5Tokenizer()
    config = GPT2Config(
        vocab_size=len(tok),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():  # sharper than the default init, so greedy decoding is not all near-ties
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path

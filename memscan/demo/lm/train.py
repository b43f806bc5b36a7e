"""Train the LM demo's model: a small byte-level GPT-2 on the Shakespeare plays with planted canaries.

Recipe (all recorded in the saved ``memscan.json``): a transformers ``GPT2LMHeadModel`` built from
a config (never downloaded), over the byte-level ``ByT5Tokenizer`` vocabulary (259 ids: 3 specials
+ 256 bytes, id = byte + 3); trained from scratch with AdamW on random windows of ``block`` bytes of
the planted corpus (:func:`memscan.demo.lm.canaries.planted_corpus`), linear warm-up then cosine
decay, seeded, on the CPU. Saved with ``save_pretrained(safe_serialization=True)`` beside the
tokenizer, so :func:`memscan.generators.causal_lm.load_causal_lm` loads it like any transformers
causal LM.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from memscan.demo.lm.canaries import DEFAULT_SEED, corpus_record, planted_corpus

MODEL_DIR = Path(__file__).resolve().parent / "model"
BYTE_OFFSET = 3  # ByT5: ids 0, 1, 2 are <pad>, </s>, <unk>; byte b is id b + 3
VOCAB = 259


@dataclass(frozen=True)
class LMTrainConfig:
    steps: int = 1800
    batch_size: int = 16
    block: int = 256
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.01
    seed: int = 0
    canary_seed: int = DEFAULT_SEED
    n_layer: int = 4
    n_embd: int = 192
    n_head: int = 4
    n_positions: int = 256
    threads: int = 1
    #: stop after this many steps of the ``steps``-step schedule (None: run it to the end)
    stop_at: int | None = None


def build_model(cfg: LMTrainConfig):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=cfg.n_positions,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


def encode_bytes(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("ascii"), dtype=np.uint8).astype(np.int64) + BYTE_OFFSET


def _lr(step: int, cfg: LMTrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def train_lm_demo_model(
    out_dir: str | Path = MODEL_DIR,
    cfg: LMTrainConfig = LMTrainConfig(),
    log_every: int = 50,
    progress=None,
    snapshot_every: int = 0,
    snapshot_dir: str | Path | None = None,
) -> dict:
    """Train and save the model; returns the training record (also in ``memscan.json``)."""
    from transformers import ByT5Tokenizer

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    planted = planted_corpus(cfg.canary_seed)
    ids = torch.from_numpy(encode_bytes(planted.text))
    n = len(ids)
    model = build_model(cfg)
    model.train()
    decay = [p for name, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for name, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    load_start = os.getloadavg()
    t0 = time.time()
    log: list[dict] = []
    running = None
    n_steps = cfg.steps if cfg.stop_at is None else min(cfg.steps, cfg.stop_at)
    for step in range(n_steps):
        for g in opt.param_groups:
            g["lr"] = _lr(step, cfg)
        starts = rng.integers(0, n - cfg.block, cfg.batch_size)
        x = torch.stack([ids[s : s + cfg.block] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        v = float(loss)
        running = v if running is None else 0.95 * running + 0.05 * v
        if step % log_every == 0 or step == n_steps - 1:
            rec = {
                "step": step,
                "loss": round(v, 4),
                "loss_ema": round(running, 4),
                "seconds": round(time.time() - t0, 1),
            }
            log.append(rec)
            if progress:
                progress(rec)
        if snapshot_every and snapshot_dir and step and step % snapshot_every == 0:
            model.save_pretrained(Path(snapshot_dir) / f"step{step}", safe_serialization=True)
    seconds = time.time() - t0
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    ByT5Tokenizer(extra_ids=0).save_pretrained(out)
    record = {
        "kind": "memscan-demo-lm",
        "recipe": asdict(cfg),
        "seconds": round(seconds, 1),
        "threads": cfg.threads,
        "loadavg_start": [round(x, 2) for x in load_start],
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "steps_run": n_steps,
        "tokens_seen": n_steps * cfg.batch_size * cfg.block,
        "corpus": {"sha256": corpus_record()["sha256"], "bytes": corpus_record()["bytes"]},
        "planted": {"sha256": planted.sha256, "bytes": len(planted.text), "canary_seed": planted.seed},
        "epochs": round(n_steps * cfg.batch_size * cfg.block / n, 3),
        "loss_log": log,
        "final_loss_ema": round(running, 4) if running is not None else None,
    }
    (out / "memscan.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def retrain(
    out: str | Path = MODEL_DIR, *, steps: int | None = None, threads: int | None = None, progress: bool = True
) -> dict:
    """``memscan demo lm train``: the recorded recipe (defaults of :class:`LMTrainConfig`), optionally
    with other ``steps`` / ``threads``; the loss log goes to stderr unless ``progress`` is false."""
    import sys
    from dataclasses import replace

    cfg = LMTrainConfig()
    over = {k: v for k, v in {"steps": steps, "threads": threads}.items() if v is not None}
    cfg = replace(cfg, **over)

    def show(rec: dict) -> None:
        print(f"step {rec['step']:>5}  loss {rec['loss_ema']:.3f}  {rec['seconds']:.0f} s", file=sys.stderr, flush=True)

    return train_lm_demo_model(out, cfg, progress=show if progress else None)

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
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from memscan.demo.lm.canaries import DEFAULT_SEED, corpus_record, planted_corpus
from memscan.demo.model_out import check_model_out, check_train_steps
from memscan.devices import check_device

MODEL_DIR = Path(__file__).resolve().parent / "model"
BYTE_OFFSET = 3  # ByT5: ids 0, 1, 2 are <pad>, </s>, <unk>; byte b is id b + 3
VOCAB = 259
#: Files whose presence in ``--out`` means it already holds a model (``memscan demo lm train``).
MODEL_MARKERS = ("config.json", "model.safetensors", "memscan.json")


@dataclass(frozen=True)
class LMTrainConfig:
    steps: int = 7200
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
    #: phase 2, a warm restart: this many more steps, fresh AdamW, cosine from ``restart_lr``
    restart_steps: int = 0
    restart_lr: float = 1e-3
    #: how many warm restarts (phases 2, 3, …), each ``restart_steps`` long
    restarts: int = 2
    #: forward and loss under ``torch.autocast("cpu", torch.bfloat16)`` (weights, gradients and
    #: AdamW state stay float32): 2.1× faster a step on a CPU with AVX-512 BF16 (docs/demo.md);
    #: on for the shipped weights (trained on a GPU, where autocast is bfloat16 too)
    bf16: bool = True
    #: where to train (``"cpu"``, ``"cuda"``): not part of the recipe's identity (the shipped
    #: record says where its weights were trained)
    device: str = "cpu"


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
        # GPT-2's tanh-approximated GELU computed by torch's fused kernel: the same function as
        # "gelu_new" (eight element-wise operations) to float rounding, and cheaper per decoding step
        activation_function="gelu_pytorch_tanh",
    )
    return GPT2LMHeadModel(config)


def encode_bytes(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("ascii"), dtype=np.uint8).astype(np.int64) + BYTE_OFFSET


def _lr(step: int, cfg: LMTrainConfig) -> float:
    """Phase 1: linear warm-up to ``lr``, cosine decay to ``lr · min_lr_ratio`` at ``steps``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def _lr_restart(step: int, cfg: LMTrainConfig) -> float:
    """Phase 2 (a warm restart, Loshchilov & Hutter 2017): warm-up to ``restart_lr``, cosine to
    ``restart_lr · min_lr_ratio`` at ``restart_steps``."""
    warm = min(cfg.warmup, max(1, cfg.restart_steps // 10))
    if step < warm:
        return cfg.restart_lr * (step + 1) / warm
    t = (step - warm) / max(1, cfg.restart_steps - warm)
    return cfg.restart_lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def _optimizer(model, cfg: LMTrainConfig):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )


def _phase(
    model,
    ids,
    cfg: LMTrainConfig,
    *,
    phase: int,
    steps: int,
    lr_fn,
    log: list,
    log_every: int,
    progress,
    after_step=None,
):
    """``steps`` AdamW steps on random ``block``-byte windows (fresh optimizer; windows drawn with
    ``numpy.random.default_rng([seed, phase])``); appends to ``log``; returns the seconds taken.
    ``after_step(n, model, seconds)``, if given, is called after the n-th step (1-based)."""
    rng = np.random.default_rng(cfg.seed if phase == 1 else [cfg.seed, phase])
    opt = _optimizer(model, cfg)
    n = len(ids)
    t0 = time.time()
    running = None
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_fn(step, cfg)
        starts = rng.integers(0, n - cfg.block, cfg.batch_size)
        x = torch.stack([ids[s : s + cfg.block] for s in starts]).to(cfg.device)
        with torch.autocast(torch.device(cfg.device).type, dtype=torch.bfloat16, enabled=cfg.bf16):
            loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        v = float(loss.detach())
        running = v if running is None else 0.95 * running + 0.05 * v
        if step % log_every == 0 or step == steps - 1:
            rec = {
                "phase": phase,
                "step": step,
                "loss": round(v, 4),
                "loss_ema": round(running, 4),
                "seconds": round(time.time() - t0, 1),
            }
            log.append(rec)
            if progress:
                progress(rec)
        if after_step is not None:
            after_step(step + 1, model, time.time() - t0)
    return time.time() - t0


def train_lm_demo_model(
    out_dir: str | Path = MODEL_DIR,
    cfg: LMTrainConfig = LMTrainConfig(),
    log_every: int = 50,
    progress=None,
    init_from: str | Path | None = None,
) -> dict:
    """Train and save the model; returns the training record (also in ``memscan.json``).

    Phase 1: ``steps`` (or ``stop_at``) steps from scratch; phases 2 … 1 + ``restarts`` (if
    ``restart_steps``): warm restarts with a fresh optimizer. ``init_from``: a directory holding the
    result of this recipe's first phase(s) (its weights and ``memscan.json``) — those phases are
    taken from it, not rerun.
    """
    check_device(cfg.device)
    from transformers import ByT5Tokenizer, GPT2LMHeadModel

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    planted = planted_corpus(cfg.canary_seed)
    ids = torch.from_numpy(encode_bytes(planted.text))
    n = len(ids)
    load_start = os.getloadavg()
    log: list[dict] = []
    n1 = cfg.steps if cfg.stop_at is None else min(cfg.steps, cfg.stop_at)
    n_phases = 1 + (cfg.restarts if cfg.restart_steps else 0)
    if init_from is None:
        model = build_model(cfg).to(cfg.device)
        model.train()
        sec1 = _phase(model, ids, cfg, phase=1, steps=n1, lr_fn=_lr, log=log, log_every=log_every, progress=progress)
        phase_seconds = [round(sec1, 1)]
        phase1 = {"seconds": round(sec1, 1), "threads": cfg.threads, "loadavg_start": [round(x, 2) for x in load_start]}
    else:
        prev = json.loads((Path(init_from) / "memscan.json").read_text())
        skip = ("restart_steps", "restart_lr", "stop_at", "restarts", "device")
        want = {k: v for k, v in asdict(cfg).items() if k not in skip}
        older = {"bf16": False}  # records written before the option existed trained in float32
        got = {k: prev["recipe"].get(k, older.get(k, getattr(LMTrainConfig(), k))) for k in want}
        if got != want:
            raise ValueError(f"{init_from} was trained with another phase-1 recipe: {got} != {want}")
        phase_seconds = list(prev.get("phase_seconds", [prev["seconds"]]))
        if len(phase_seconds) > 1 and prev["recipe"].get("restart_steps") != cfg.restart_steps:
            raise ValueError(f"{init_from} has warm restarts of another length than {cfg.restart_steps}")
        if len(phase_seconds) > n_phases:
            raise ValueError(f"{init_from} has more phases ({len(phase_seconds)}) than this recipe ({n_phases})")
        model = GPT2LMHeadModel.from_pretrained(init_from, use_safetensors=True).to(cfg.device)
        model.train()
        log += [{"phase": 1, **r} if "phase" not in r else r for r in prev["loss_log"]]
        phase1 = dict(prev.get("phase1") or {})
        phase1.setdefault("seconds", phase_seconds[0])
        phase1.setdefault("threads", prev["threads"])
        phase1.setdefault("loadavg_start", prev.get("loadavg_start"))
        phase1.setdefault("loadavg_end", prev.get("loadavg_end"))
        phase1["from"] = "a separate run of the same recipe's first phase(s)"
    for phase in range(len(phase_seconds) + 1, n_phases + 1):
        sec = _phase(
            model,
            ids,
            cfg,
            phase=phase,
            steps=cfg.restart_steps,
            lr_fn=_lr_restart,
            log=log,
            log_every=log_every,
            progress=progress,
        )
        phase_seconds.append(round(sec, 1))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.cpu().save_pretrained(out, safe_serialization=True)
    ByT5Tokenizer(extra_ids=0).save_pretrained(out)
    steps_run = n1 + (n_phases - 1) * cfg.restart_steps
    record = {
        "kind": "memscan-demo-lm",
        "recipe": asdict(cfg),
        "seconds": round(sum(phase_seconds), 1),
        "phase_seconds": phase_seconds,
        "phase1": phase1,
        "threads": cfg.threads,
        "device": cfg.device if cfg.device == "cpu" else f"{cfg.device} ({torch.cuda.get_device_name(cfg.device)})",
        "loadavg_start": phase1.get("loadavg_start"),
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "steps_run": steps_run,
        "tokens_seen": steps_run * cfg.batch_size * cfg.block,
        "corpus": {"sha256": corpus_record()["sha256"], "bytes": corpus_record()["bytes"]},
        "planted": {"sha256": planted.sha256, "bytes": len(planted.text), "canary_seed": planted.seed},
        "epochs": round(steps_run * cfg.batch_size * cfg.block / n, 3),
        "loss_log": log,
        "final_loss_ema": log[-1]["loss_ema"] if log else None,
    }
    (out / "memscan.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def retrain(
    out: str | Path = MODEL_DIR,
    *,
    steps: int | None = None,
    restart_steps: int | None = None,
    threads: int | None = None,
    bf16: bool | None = None,
    device: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """``memscan demo lm train``: the recorded recipe (defaults of :class:`LMTrainConfig`), optionally
    with other ``steps`` / ``restart_steps`` (0: no warm restarts) / ``threads`` / ``bf16``; the
    loss log (and transformers' save progress bar) goes to stderr unless ``progress`` is false.
    Bad options, an ``out`` that is a file or already holds a model (unless ``overwrite``) are
    refused before any training."""
    import sys
    from dataclasses import replace

    check_train_steps(steps, example="7200")
    check_train_steps(restart_steps, "--restart-steps", minimum=0, example="0 (none) or 900")
    check_train_steps(threads, "--threads", example="2")
    check_device(device or "cpu")
    check_model_out(out, MODEL_MARKERS, overwrite=overwrite)
    cfg = LMTrainConfig()
    over = {"steps": steps, "restart_steps": restart_steps, "threads": threads, "bf16": bf16, "device": device}
    over = {k: v for k, v in over.items() if v is not None}
    cfg = replace(cfg, **over)

    def show(rec: dict) -> None:
        msg = f"phase {rec['phase']} step {rec['step']:>5}  loss {rec['loss_ema']:.3f}  {rec['seconds']:.0f} s"
        print(msg, file=sys.stderr, flush=True)

    with nullcontext() if progress else _no_save_progress_bar():
        return train_lm_demo_model(out, cfg, progress=show if progress else None)


@contextmanager
def _no_save_progress_bar():
    """Hide transformers' "Writing model shards" bar of ``save_pretrained`` (transformers ≥ 5; older
    versions draw none) for the block, through its tqdm hook; the previous hook is restored after."""
    try:
        from transformers.utils.logging import set_tqdm_hook
    except ImportError:
        yield
        return
    previous = set_tqdm_hook(lambda factory, args, kwargs: factory(*args, **{**kwargs, "disable": True}))
    try:
        yield
    finally:
        set_tqdm_hook(previous)

"""Earlier checkpoints of the LM demo model, for ``memscan demo lm compare``.

One training run of the shipped model's recipe (:class:`memscan.demo.lm.train.LMTrainConfig`: the
same seed, corpus, batch order and the same 7,200-step learning-rate schedule), stopped at the last
step asked for, saving ``checkpoint-N/`` at each step N in ``save_at`` — the layout transformers'
``Trainer`` writes (a full model directory plus ``trainer_state.json`` with ``global_step``), so
``--model CHECKPOINTS`` sweeps them like any trainer's output. The shipped model (``model/``, all
7,200 steps) is the last point of the sweep.

Weights are saved in bfloat16 (``--dtype auto`` loads them as float32 on the CPU) to keep each
checkpoint under 4 MB; ``memscan.json`` in each records the recipe, where and how long it trained,
the machine's load, and the loss log up to its step.
"""

from __future__ import annotations

import copy
import json
import os
import platform
from dataclasses import asdict, replace
from pathlib import Path

import torch

from memscan.demo.lm.canaries import corpus_record, planted_corpus
from memscan.demo.lm.train import LMTrainConfig, _lr, _phase, encode_bytes

CHECKPOINTS_DIR = Path(__file__).resolve().parent / "checkpoints"
#: the steps of the shipped checkpoints (the shipped model is step 7,200)
DEFAULT_STEPS = (1200, 2400)


def save_checkpoint(model, out: Path, *, step: int, record: dict, dtype: str = "bfloat16") -> Path:
    """Save ``model`` (a copy, cast to ``dtype``) with the byte tokenizer, ``trainer_state.json``
    and ``memscan.json`` (``record``) under ``out``; returns ``out``."""
    from transformers import ByT5Tokenizer

    out.mkdir(parents=True, exist_ok=True)
    snap = copy.deepcopy(model).cpu().eval().to(getattr(torch, dtype))
    snap.save_pretrained(out, safe_serialization=True)
    ByT5Tokenizer(extra_ids=0).save_pretrained(out)
    (out / "trainer_state.json").write_text(json.dumps({"global_step": step}) + "\n")
    (out / "memscan.json").write_text(json.dumps(record, indent=2) + "\n")
    return out


def train_lm_checkpoints(
    out_root: str | Path = CHECKPOINTS_DIR,
    save_at: tuple[int, ...] = DEFAULT_STEPS,
    cfg: LMTrainConfig | None = None,
    *,
    dtype: str = "bfloat16",
    log_every: int = 50,
    progress=None,
) -> list[dict]:
    """Train the recipe's first phase up to ``max(save_at)`` steps (of its ``cfg.steps``-step
    schedule) in one run, saving ``out_root/checkpoint-N`` at every N in ``save_at``; returns
    their records."""
    cfg = cfg or LMTrainConfig(device="cpu")
    steps = sorted({int(s) for s in save_at})
    if not steps or steps[0] < 1 or steps[-1] > cfg.steps:
        raise ValueError(f"save_at must be steps in 1..{cfg.steps}, got {save_at}")
    cfg = replace(cfg, stop_at=steps[-1], restart_steps=0)
    from memscan.demo.lm.train import build_model

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    planted = planted_corpus(cfg.canary_seed)
    ids = torch.from_numpy(encode_bytes(planted.text))
    load_start = [round(x, 2) for x in os.getloadavg()]
    model = build_model(cfg).to(cfg.device)
    model.train()
    log: list[dict] = []
    records: list[dict] = []

    def after_step(n: int, m, seconds: float) -> None:
        if n not in steps:
            return
        m.eval()
        rec = {
            "kind": "memscan-demo-lm-checkpoint",
            "recipe": asdict(cfg),
            "step": n,
            "of_schedule": cfg.steps,
            "saved_dtype": dtype,
            "seconds": round(seconds, 1),
            "threads": cfg.threads,
            "device": cfg.device,
            "loadavg_start": load_start,
            "loadavg_at_save": [round(x, 2) for x in os.getloadavg()],
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "parameters": int(sum(p.numel() for p in m.parameters())),
            "tokens_seen": n * cfg.batch_size * cfg.block,
            "epochs": round(n * cfg.batch_size * cfg.block / len(ids), 3),
            "corpus": {"sha256": corpus_record()["sha256"], "bytes": corpus_record()["bytes"]},
            "planted": {"sha256": planted.sha256, "bytes": len(planted.text), "canary_seed": planted.seed},
            "loss_log": list(log),
            "final_loss_ema": log[-1]["loss_ema"] if log else None,
            "note": (
                "one run of the shipped model's recipe (same seed, batches and 7200-step schedule) "
                "stopped early; the shipped model/ was trained by its own run (see its memscan.json), "
                "so these are its recipe's earlier points, not snapshots of that very run"
            ),
        }
        save_checkpoint(m, Path(out_root) / f"checkpoint-{n}", step=n, record=rec, dtype=dtype)
        m.train()
        records.append(rec)

    _phase(
        model,
        ids,
        cfg,
        phase=1,
        steps=steps[-1],
        lr_fn=_lr,
        log=log,
        log_every=log_every,
        progress=progress,
        after_step=after_step,
    )
    return records


def export_checkpoint(src: str | Path, dst: str | Path, dtype: str = "bfloat16") -> Path:
    """Copy the checkpoint ``src`` (saved by :func:`train_lm_checkpoints`) to ``dst`` with its
    weights cast to ``dtype`` (its record says so)."""
    from transformers import GPT2LMHeadModel

    src = Path(src)
    rec = json.loads((src / "memscan.json").read_text())
    rec["saved_dtype"] = dtype
    model = GPT2LMHeadModel.from_pretrained(src, dtype=torch.float32, use_safetensors=True)
    return save_checkpoint(model, Path(dst), step=int(rec["step"]), record=rec, dtype=dtype)


if __name__ == "__main__":  # pragma: no cover - the shipped checkpoints' training run
    import argparse
    import sys

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(CHECKPOINTS_DIR))
    ap.add_argument("--steps", default=",".join(map(str, DEFAULT_STEPS)), help="comma-separated steps to save")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="bfloat16")
    a = ap.parse_args()

    def show(rec: dict) -> None:
        print(f"step {rec['step']:>5}  loss {rec['loss_ema']:.3f}  {rec['seconds']:.0f} s", file=sys.stderr, flush=True)

    train_lm_checkpoints(
        a.out,
        tuple(int(s) for s in a.steps.split(",")),
        LMTrainConfig(device="cpu", threads=a.threads),
        dtype=a.dtype,
        progress=show,
    )

"""Attack labels of a run (``--attacks``) and running them on one per-example statistic.

A label names an attack of :data:`memscan.mia.attacks.ATTACKS` with its options
(``lira_online_fixed`` = LiRA online with a fixed variance).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from memscan.errors import InputError
from memscan.mia.attacks import AttackInputs, make_attack

__all__ = ["ATTACK_SPECS", "STATISTICS", "parse_attacks", "run_attacks"]

#: Attack labels of a run → (registry name, options).
ATTACK_SPECS: dict[str, tuple[str, dict[str, Any]]] = {
    "loss": ("loss", {}),
    "lira_online": ("lira_online", {}),
    "lira_offline": ("lira_offline", {}),
    "lira_online_fixed": ("lira_online", {"fixed_variance": True}),
    "lira_offline_fixed": ("lira_offline", {"fixed_variance": True}),
}

STATISTICS = {
    "diffusion_loss": "diffusion loss L_t (lower for members)",
    "inpaint_distance": "inpainting distance in the hidden region (lower for members)",
}


def parse_attacks(spec: str | Sequence[str] | None, have_shadows: bool) -> list[str]:
    """Attack labels to run (default: all of :data:`ATTACK_SPECS` with shadows, else ``loss``)."""
    if spec is None or spec == "" or spec == "all":
        return list(ATTACK_SPECS) if have_shadows else ["loss"]
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    for a in names:
        if a not in ATTACK_SPECS:
            raise InputError(f"unknown attack {a!r}", f"choose from {', '.join(ATTACK_SPECS)}")
        if a != "loss" and not have_shadows:
            raise InputError(f"attack {a} needs shadow models", "pass --shadows DIR, or use --attacks loss")
    return names


def run_attacks(
    statistic: str,
    target: np.ndarray,
    is_member: np.ndarray,
    *,
    shadow: np.ndarray | None = None,
    shadow_in: np.ndarray | None = None,
    attacks: Sequence[str] = ("loss",),
    timestep: int | None = None,
    bootstrap: int = 0,
    seed: int = 0,
) -> tuple[list[tuple[str, Any]], list[dict]]:
    """Run each attack on one per-example statistic (lower = member-like).

    Returns ``[(label, AttackResult)]`` and the attacks that could not run, each with its reason
    (e.g. too few IN shadow models for per-example variances) — recorded, never dropped silently.
    """
    done, skipped = [], []
    for label in attacks:
        name, opts = ATTACK_SPECS[label]
        inputs = AttackInputs(
            target_loss=target,
            shadow_loss=shadow if name != "loss" else None,
            shadow_in=shadow_in if name != "loss" else None,
            is_member=is_member,
            timestep=timestep,
        )
        try:
            res = make_attack(name, **opts).fit_score(inputs, bootstrap=bootstrap, seed=seed)
        except InputError as exc:
            skipped.append({"statistic": statistic, "attack": label, "timestep": timestep, "reason": exc.message})
            continue
        done.append((label, res))
    return done, skipped

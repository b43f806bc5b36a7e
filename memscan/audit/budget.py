"""The audit's budget: model evaluations, the brute force they are compared with, and the rounds.

Every cost is counted in **model evaluations** (UNet evaluations for diffusers models: sampler
steps per image, ×2 with classifier-free guidance; one per image for a plain ``py:`` function,
whose unit the manifest then records as ``generations``). Triage computes only the score that
ranks (``--score``) and spends per prompt what the triage module counts for the model
(:func:`memscan.triage.scores.unet_evaluations_per_prompt`): for the default ``wen``,
``2 × generations × steps`` (``3 ×`` when guidance uses a negative prompt); for ``webster``,
``2 × generations`` (``1 ×`` unguided). The extraction spends ``n_samples × evaluations per
image`` per prompt (plus one probe image when the generator does not declare its output shape).

The **brute force** is the paper's attack: every candidate prompt × ``samples_per_prompt``
generations. The audit's default budget is :data:`DEFAULT_BUDGET_SHARE` of it.

The adaptive extraction goes down the triage ranking **round by round**: a round takes the next
``round_prompts`` prompts of the ranking (fewer when the budget left cannot pay every one of
them a first round) and attacks each with the adaptive budget of ``memscan extract --adaptive``;
after the round, what it spent is counted and the next round is planned. The audit stops when
the ranking is exhausted or the budget left cannot pay one prompt's first round.

The budget is a **hard cap**: the audit never spends more than ``evaluations``. A round whose
prompts could, all continuing to ``samples_per_prompt``, cost more than the budget left goes
prompt by prompt in ranking order, and a prompt continues past a round only while the budget left
pays that round after keeping one first round for each prompt still to come in the round (and
for each control prompt not attacked yet): :func:`prompt_cap`. A prompt so cut ends at the last
round the budget paid (its generations are the first ones of the uncut run, same seeds) and is
recorded (``capped``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from memscan.errors import InputError

#: The audit's default budget, as a share of the brute force's model evaluations.
DEFAULT_BUDGET_SHARE = 0.10
#: Prompts per round by default.
DEFAULT_ROUND_PROMPTS = 8


@dataclass(frozen=True)
class AuditBudget:
    """How much the audit may spend (recorded in the manifest).

    Parameters
    ----------
    evaluations : model evaluations for the whole audit, triage included (None: ``share`` of the
        brute force, unless ``top`` is given)
    top : attack the ``top`` highest-ranked prompts whatever they cost (instead of a budget)
    share : the default budget's share of the brute force (used when neither is given)
    round_prompts : prompts per round of the extraction
    """

    evaluations: int | None = None
    top: int | None = None
    share: float = DEFAULT_BUDGET_SHARE
    round_prompts: int = DEFAULT_ROUND_PROMPTS

    def validate(self) -> AuditBudget:
        if self.evaluations is not None and self.top is not None:
            raise InputError(
                "both --budget and --top were given", "pass one: a budget in model evaluations, or --top K"
            )
        if self.evaluations is not None and self.evaluations < 1:
            raise InputError(f"budget={self.evaluations}", "give a positive number of model evaluations")
        if self.top is not None and self.top < 1:
            raise InputError(f"top={self.top}", "attack at least 1 prompt")
        if not 0 < self.share <= 1:
            raise InputError(f"budget share {self.share} outside (0, 1]", f"default {DEFAULT_BUDGET_SHARE}")
        if self.round_prompts < 1:
            raise InputError(f"round_prompts={self.round_prompts}", "use at least 1 prompt per round")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def full_budget(n_prompts: int, samples_per_prompt: int, per_image: int) -> int:
    """Model evaluations of the brute force: every prompt × ``samples_per_prompt`` images.

    Examples
    --------
    >>> full_budget(52, 100, 20)
    104000
    """
    return n_prompts * samples_per_prompt * per_image


def resolve_budget(budget: AuditBudget, n_prompts: int, brute_force: int) -> int | None:
    """The budget in model evaluations (None with ``top``).

    Examples
    --------
    >>> resolve_budget(AuditBudget(), 52, 104000), resolve_budget(AuditBudget(evaluations=5000), 52, 104000)
    (10400, 5000)
    >>> resolve_budget(AuditBudget(top=3), 52, 104000) is None
    True
    """
    if budget.top is not None:
        return None
    if budget.evaluations is not None:
        return int(budget.evaluations)
    return int(math.ceil(budget.share * brute_force))


def check_one_round(
    budget: int | None,
    fixed_cost: int,
    first_round_cost: int,
    n_prompts: int,
    round_prompts: int,
    controls: int = 0,
    probe_cost: int = 0,
):
    """Refuse a budget that cannot pay triage, one round of first rounds and the controls' first
    rounds.

    ``fixed_cost`` is what triage spends and ``probe_cost`` the one probe generation that
    reads the model's output shape, both before the extraction; ``first_round_cost`` the
    evaluations of one prompt's first adaptive round; ``controls`` the control prompts (attacked
    whatever the ranking, so their first rounds are kept from the start). The controls are among
    the ``n_prompts``: those that may rank outside the first round (at most ``n_prompts`` less
    the round) add their first rounds; the ranking is not known yet, so as many as can.

    Examples
    --------
    >>> check_one_round(1040, 400, 80, 52, 8)  # exactly one round: accepted
    >>> check_one_round(500, 400, 80, 52, 8)
    Traceback (most recent call last):
    ...
    memscan.errors.InputError: budget 500 model evaluations is smaller than one round: triage 400 + 8 prompts × first round 80 = 1040 (use a budget of at least 1040, or --top K)
    >>> check_one_round(1120, 400, 80, 52, 8, controls=1)  # a control outside the first round
    >>> check_one_round(640, 0, 80, 8, 8, controls=1)  # 8 prompts, all in the first round: no extra
    >>> check_one_round(1044, 400, 80, 52, 8, probe_cost=5)
    Traceback (most recent call last):
    ...
    memscan.errors.InputError: budget 1044 model evaluations is smaller than one round: triage 400 + probe 5 + 8 prompts × first round 80 = 1045 (use a budget of at least 1045, or --top K)
    """
    if budget is None:
        return
    n = min(round_prompts, n_prompts)
    # the controls are among the prompts: at most the n_prompts − n outside the first round add
    # a first round of their own (the ranking is not known yet, so count as many as can be)
    extra = min(controls, n_prompts - n)
    need = fixed_cost + probe_cost + (n + extra) * first_round_cost
    if budget < need:
        with_controls = f" + {extra} control prompts" if extra else ""
        probe = f"probe {probe_cost} + " if probe_cost else ""
        raise InputError(
            f"budget {budget} model evaluations is smaller than one round: triage {fixed_cost} + {probe}"
            f"{n} prompts{with_controls} × first round {first_round_cost} = {need}",
            f"use a budget of at least {need}, or --top K",
        )


def round_size(
    budget: int | None, spent: int, left_in_ranking: int, first_round_cost: int, round_prompts: int, reserved: int = 0
) -> int:
    """Prompts in the next round: ``round_prompts`` (or what is left of the ranking), cut to the
    prompts whose first round the budget left (less ``reserved``: the first rounds kept for the
    controls) still pays; 0 ends the extraction.

    Examples
    --------
    >>> round_size(None, 0, 5, 80, 8), round_size(10000, 9000, 40, 80, 8), round_size(10000, 9950, 40, 80, 8)
    (5, 8, 0)
    >>> round_size(10000, 9700, 40, 80, 8), round_size(10000, 9700, 40, 80, 8, reserved=160)
    (3, 1)
    """
    k = min(round_prompts, left_in_ranking)
    if budget is not None:
        k = min(k, max(0, budget - spent - reserved) // first_round_cost)
    return int(k)


def prompt_cap(left: int, later_prompts: int, rounds: list[int], per_image: int) -> int:
    """Generations one prompt may reach: the last adaptive round end (``rounds``, cumulative
    generations) whose cost fits in ``left`` after one first round is kept for each of the
    ``later_prompts`` still to come; at least the first round (the round was planned so that
    every prompt's first round is paid).

    Examples
    --------
    >>> prompt_cap(10_000, 0, [4, 8, 12], 5)  # plenty: the full budget
    12
    >>> prompt_cap(60, 1, [4, 8, 12], 5)  # 60 − 20 kept for the next prompt = 40: two rounds
    8
    >>> prompt_cap(40, 1, [4, 8, 12], 5)
    4
    """
    afford = (left - later_prompts * rounds[0] * per_image) // per_image
    fits = [r for r in rounds if r <= afford]
    return int(fits[-1] if fits else rounds[0])

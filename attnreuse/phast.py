"""PHAST: greedy search for a reuse schedule, starting from HURRY (Hunter et al., arXiv:2401.01008).

A neighbour of a schedule swaps one reuse step with one computing step (never the first), so the
number of reuse steps stays fixed. Each round evaluates every unseen neighbour of the current schedule;
the best one is taken if it beats the current utility by more than ``epsilon``, else the search stops.
Utility is the mean PSNR of the calibration samples against the full sampler's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .patching import patch
from .schedule import hurry, to_string

PSNR_CAP_DB = 100.0  # identical images would give +inf; a cap keeps means finite


def psnr(images: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB of ``images`` against ``reference`` (``[N, ...]``), capped at 100 dB."""
    mse = (images.double() - reference.double()).flatten(1).pow(2).mean(1)
    db = 10 * torch.log10(data_range ** 2 / mse)
    return db.clamp(max=PSNR_CAP_DB)


@dataclass
class PhastRound:
    round: int
    schedule: str  # best schedule after this round
    utility: float  # its mean PSNR (dB)
    evaluated: int  # neighbours sampled in this round
    accepted: bool


@dataclass
class PhastResult:
    schedule: tuple[int, ...]
    utility: float
    start_utility: float
    samplings: int  # calls of generate(), the full sampler's included
    trace: list[PhastRound] = field(default_factory=list)


def neighbours(schedule: tuple[int, ...]) -> list[tuple[int, ...]]:
    """All schedules one swap of a reuse step and a (non-first) computing step away."""
    out = []
    reuse = [i for i, b in enumerate(schedule) if b == 0]
    compute = [i for i, b in enumerate(schedule) if b == 1 and i > 0]
    for i in reuse:
        for j in compute:
            s = list(schedule)
            s[i], s[j] = 1, 0
            out.append(tuple(s))
    return out


def phast(model, generate: Callable[[], torch.Tensor], steps: int, reuse: int, *, epsilon: float = 0.01,
          start=None, max_rounds: int | None = None, data_range: float = 1.0, **patch_kwargs) -> PhastResult:
    """Search a schedule with ``reuse`` reuse steps out of ``steps`` for ``model`` (a UNet or pipeline).

    Args:
        generate: samples the whole calibration set (fixed prompts/classes and seeds) with ``model`` and
            returns the images as one tensor; called once unpatched (the reference), then once per
            candidate schedule with ``model`` patched. Batch the calibration set inside it.
        epsilon: least improvement in mean PSNR (dB) for a neighbour to be accepted.
    Knobs:
        start: the starting schedule (default HURRY); max_rounds: stop after this many rounds;
        data_range: the images' value range for PSNR; patch_kwargs: passed to :func:`attnreuse.patch`.
    """
    with torch.no_grad():
        reference = generate()
    seen: dict[tuple[int, ...], float] = {}

    def utility(schedule):
        if schedule not in seen:
            with patch(model, schedule, **patch_kwargs), torch.no_grad():
                seen[schedule] = psnr(generate(), reference, data_range).mean().item()
        return seen[schedule]

    best = tuple(start) if start is not None else hurry(steps, reuse)
    if len(best) != steps or best.count(0) != reuse:
        raise ValueError(f"start {to_string(best)} must have {steps} steps with {reuse} reuse steps")
    result = PhastResult(best, utility(best), utility(best), 0)
    rounds = 0
    while max_rounds is None or rounds < max_rounds:
        rounds += 1
        candidates = [s for s in neighbours(best) if s not in seen]
        if not candidates:
            break
        scores = {s: utility(s) for s in candidates}
        top = max(scores, key=scores.get)
        accepted = scores[top] > result.utility + epsilon
        if accepted:
            best, result.utility = top, scores[top]
        result.trace.append(PhastRound(rounds, to_string(best), result.utility, len(candidates), accepted))
        if not accepted:
            break
    result.schedule = best
    result.samplings = 1 + len(seen)
    return result

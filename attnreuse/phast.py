"""PHAST: greedy search for a reuse schedule, starting from HURRY (Hunter et al., arXiv:2401.01008).

A neighbour of a schedule swaps one reuse step with one computing step (never the first), so the
number of reuse steps stays fixed. Each round evaluates every unseen neighbour of the current schedule;
the best one is taken if it beats the current utility by more than ``epsilon``, else the search stops.
Utility is the mean PSNR of the calibration samples against the full sampler's. :func:`greedy_search` is the
search alone, scoring each round's candidates through a callable (``python -m attnreuse search`` spreads them
over processes); :func:`phast` scores them by sampling a calibration set in this process.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

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


def start_schedule(start, steps: int, reuse: int) -> tuple[int, ...]:
    """``start`` (default HURRY) as a tuple, checked to have ``steps`` steps with ``reuse`` reuse steps."""
    best = tuple(start) if start is not None else hurry(steps, reuse)
    if len(best) != steps or best.count(0) != reuse:
        raise ValueError(f"start {to_string(best)} must have {steps} steps with {reuse} reuse steps")
    return best


Evaluate = Callable[[list[tuple[int, ...]]], Sequence[float]]


def greedy_search(evaluate: Evaluate, steps: int, reuse: int, *, epsilon: float = 0.01, start=None,
                  max_rounds: int | None = None, on_round: Callable[[PhastRound], None] | None = None) -> PhastResult:
    """PHAST's greedy search, given ``evaluate(schedules) -> utilities`` (one per schedule, in order).

    ``evaluate`` is called once with the start schedule, then once per round with that round's unseen
    neighbours in :func:`neighbours` order, so it may score a round's candidates in any order or in parallel.
    Ties go to the first candidate: the same utilities always give the same schedule and trace.
    ``on_round`` is told each round as it ends. ``samplings`` counts the schedules scored plus the reference.
    """
    best = start_schedule(start, steps, reuse)
    seen: dict[tuple[int, ...], float] = {}

    def score(schedules):
        utilities = [float(u) for u in evaluate(schedules)]
        if len(utilities) != len(schedules):
            raise ValueError(f"evaluate returned {len(utilities)} utilities for {len(schedules)} schedules")
        seen.update(zip(schedules, utilities))

    score([best])
    result = PhastResult(best, seen[best], seen[best], 0)
    rounds = 0
    while max_rounds is None or rounds < max_rounds:
        rounds += 1
        candidates = [s for s in neighbours(best) if s not in seen]
        if not candidates:
            break
        score(candidates)
        top = max(candidates, key=seen.__getitem__)
        accepted = seen[top] > result.utility + epsilon
        if accepted:
            best, result.utility = top, seen[top]
        result.trace.append(PhastRound(rounds, to_string(best), result.utility, len(candidates), accepted))
        if on_round is not None:
            on_round(result.trace[-1])
        if not accepted:
            break
    result.schedule = best
    result.samplings = 1 + len(seen)
    return result


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
    start = start_schedule(start, steps, reuse)  # a bad start fails before any sampling
    with torch.no_grad():
        reference = generate()

    def evaluate(schedules):
        utilities = []
        for schedule in schedules:
            with patch(model, schedule, **patch_kwargs), torch.no_grad():
                utilities.append(psnr(generate(), reference, data_range).mean().item())
        return utilities

    return greedy_search(evaluate, steps, reuse, epsilon=epsilon, start=start, max_rounds=max_rounds)

"""Reuse schedules: one 0/1 entry per sampling step (1 = compute the maps, 0 = reuse the last computed).

A schedule is either fixed-length (``"11110000"``, ``[1, 1, 0, 0]``, :func:`hurry`) or length-free
(:func:`hurry_fraction`, :func:`rescaled`): every generation resolves it against the number of steps it
really runs, before its first UNet call. What a step does follows from the resolved schedule alone:
``COMPUTE`` (maps not needed later: run the layer's own processor), ``CAPTURE`` (compute and store the
maps because the next step reuses them), ``REUSE`` (``O = A_cached · V``).
"""
from __future__ import annotations

from enum import Enum
from typing import NamedTuple, Sequence, Union


class Action(Enum):
    """The kind of a sampling step: all a processor needs to know about where sampling is."""

    COMPUTE = "compute"
    CAPTURE = "capture"
    REUSE = "reuse"


class Schedule:
    """A schedule that resolves to one 0/1 entry per step for any number of steps ``n``."""

    def resolve(self, n: int) -> tuple[int, ...]:
        raise NotImplementedError


class FixedSchedule(Schedule):
    """Exactly ``len(entries)`` steps: a generation of any other length is an error, never a silent change."""

    def __init__(self, entries: Sequence[int]):
        self.entries = as_schedule(entries)

    def resolve(self, n: int) -> tuple[int, ...]:
        if n != len(self.entries):
            same_share = min(n - 1, round(self.entries.count(0) * n / len(self.entries)))
            raise ValueError(
                f"attnreuse: this generation runs {n} sampling steps but the schedule has {len(self.entries)} "
                f"({to_string(self.entries)}); img2img strength, denoising_start/_end or num_inference_steps "
                f"change the step count: pass a schedule of {n} entries (e.g. attnreuse.hurry({n}, "
                f"{same_share})) or a length-free one such as attnreuse.hurry_fraction(0.5)")
        return self.entries

    def __repr__(self) -> str:
        return to_string(self.entries)


class HurryFraction(Schedule):
    def __init__(self, fraction: float):
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
            raise ValueError(f"hurry_fraction({fraction!r}): pass the fraction of steps to reuse, 0 <= f < 1")
        self.fraction = float(fraction)

    def resolve(self, n: int) -> tuple[int, ...]:
        reuse = min(round(self.fraction * n), n - 1)
        if reuse == 0 and self.fraction > 0:
            raise ValueError(f"attnreuse: hurry_fraction({self.fraction}) of {n} steps reuses no step; "
                             "pass a larger fraction or run more steps")
        return hurry(n, reuse)

    def __repr__(self) -> str:
        return f"hurry_fraction({self.fraction})"


class Rescaled(Schedule):
    def __init__(self, pattern):
        self.pattern = as_schedule(pattern)

    def resolve(self, n: int) -> tuple[int, ...]:
        length = len(self.pattern)
        out = [self.pattern[min(length - 1, int((i + 0.5) * length / n))] for i in range(n)]
        out[0] = 1  # the first step has no map to reuse
        if 0 in self.pattern and 0 not in out:
            raise ValueError(f"attnreuse: {to_string(self.pattern)} rescaled to {n} steps reuses no step; "
                             "run more steps or pass a fixed schedule")
        return tuple(out)

    def __repr__(self) -> str:
        return f"rescaled({to_string(self.pattern)!r})"


ScheduleLike = Union[str, Sequence[int], Schedule]


def hurry_fraction(fraction: float) -> Schedule:
    """HURRY for any step count ``n``: reuse the last ``round(fraction · n)`` steps (at most ``n − 1``)."""
    return HurryFraction(fraction)


def rescaled(pattern: ScheduleLike) -> Schedule:
    """A fixed pattern (e.g. a PHAST schedule searched at 20 steps) stretched or squeezed to any step count:
    step ``i`` of ``n`` takes the entry at the same relative position; the first step always computes."""
    return Rescaled(pattern)


def as_schedule_object(schedule: ScheduleLike) -> Schedule:
    """A :class:`Schedule` for any accepted form (validates fixed ones now)."""
    return schedule if isinstance(schedule, Schedule) else FixedSchedule(schedule)


def as_schedule(schedule: ScheduleLike) -> tuple[int, ...]:
    """Validate a fixed ``schedule`` ("11110000", [1, 1, 0], (1, 0, ...)) and return it as a tuple of ints."""
    if isinstance(schedule, FixedSchedule):
        return schedule.entries
    if isinstance(schedule, Schedule):
        raise TypeError(f"{schedule!r} is length-free: resolve it against a step count with .resolve(n)")
    if isinstance(schedule, str):
        entries = list(schedule.replace(" ", "").replace(",", ""))
    else:
        try:
            entries = list(schedule)
        except TypeError:
            raise TypeError(
                f"schedule must be a 0/1 sequence or a string like '11110000', got {type(schedule).__name__}; "
                "for N steps with r reuse steps pass attnreuse.hurry(N, r)") from None
    if not entries:
        raise ValueError("schedule is empty: pass one 0/1 entry per sampling step, e.g. attnreuse.hurry(20, 10)")
    values = []
    for i, e in enumerate(entries):
        if isinstance(e, bool) or str(e) not in ("0", "1"):
            raise ValueError(
                f"schedule entry {i} is {e!r}: entries must be 0 (reuse) or 1 (compute), e.g. '11110000'")
        values.append(int(e))
    if values[0] != 1:
        raise ValueError(
            "the first step of a schedule must compute (1): there is no map to reuse yet; e.g. pass "
            f"'1{''.join(map(str, values[1:]))}' or attnreuse.hurry({len(values)}, {values.count(0) - 1})")
    return tuple(values)


def hurry(steps: int, reuse: int) -> tuple[int, ...]:
    """HURRY: compute the first ``steps - reuse`` steps, then reuse the last computed maps ``reuse`` times."""
    if not isinstance(steps, int) or not isinstance(reuse, int) or steps < 1 or not 0 <= reuse < steps:
        raise ValueError(f"hurry(steps={steps!r}, reuse={reuse!r}): need integers with 0 <= reuse < steps")
    return (1,) * (steps - reuse) + (0,) * reuse


def check_num_steps(num_steps) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps={num_steps!r}: pass the number of sampling steps, an int >= 1")


def actions(schedule: Sequence[int]) -> tuple[Action, ...]:
    """The action of every step of a validated schedule."""
    out = []
    for i, bit in enumerate(schedule):
        if bit == 0:
            out.append(Action.REUSE)
        elif i + 1 < len(schedule) and schedule[i + 1] == 0:
            out.append(Action.CAPTURE)
        else:
            out.append(Action.COMPUTE)
    return tuple(out)


class StepCounts(NamedTuple):
    """How many steps of a generation reuse maps and how many capture them: what a plan's saving depends on."""

    reuse: int
    capture: int


def step_counts(steps: Sequence[Action]) -> StepCounts:
    return StepCounts(steps.count(Action.REUSE), steps.count(Action.CAPTURE))


def to_string(schedule: Sequence[int]) -> str:
    return "".join(str(b) for b in schedule)

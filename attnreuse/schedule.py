"""Reuse schedules: one 0/1 entry per sampling step (1 = compute the maps, 0 = reuse the last computed).

What a step does follows from the schedule alone, so it is derived here once:
``COMPUTE`` (maps not needed later: run the layer's own processor), ``CAPTURE`` (compute and store the
maps because the next step reuses them), ``REUSE`` (``O = A_cached · V``).
"""
from __future__ import annotations

from enum import Enum
from typing import Sequence, Union

ScheduleLike = Union[str, Sequence[int]]


class Action(Enum):
    COMPUTE = "compute"
    CAPTURE = "capture"
    REUSE = "reuse"


def as_schedule(schedule: ScheduleLike) -> tuple[int, ...]:
    """Validate ``schedule`` ("11110000", [1, 1, 0], (1, 0, ...)) and return it as a tuple of ints."""
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


def to_string(schedule: Sequence[int]) -> str:
    return "".join(str(b) for b in schedule)

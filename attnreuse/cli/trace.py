"""The record of a search, ``trace.json``: every scored schedule's per-image PSNR against the full sampler,
in scoring order, and what the images were sampled with (the key). Written after every scored candidate,
whole (see :mod:`attnreuse.cli.files`), so a killed search resumes from its last complete record; replaying
the greedy search over recorded scores takes no sampling and ends where the uninterrupted search would."""
from __future__ import annotations

import json
import math
from pathlib import Path

import attnreuse

from . import files
from .options import UsageError

FORMAT = "attnreuse search trace 1"


class Trace:
    """Per-image PSNR (dB) of each schedule (``"1101..."``), ``None`` where not sampled yet."""

    def __init__(self, key: dict, images: int):
        self.key = key
        self.images = images
        self.entries: dict[str, dict] = {}  # schedule -> {"round": r, "psnr": [...]}, in scoring order
        self.rounds: list[dict] = []

    def register(self, schedules: list[str], round_: int) -> None:
        """Schedules about to be scored in ``round_`` (0: the start), in order, so the record's order is the
        search's and not the order in which processes happen to finish."""
        for s in schedules:
            self.entries.setdefault(s, {"round": round_, "psnr": [None] * self.images})

    def missing(self, schedule: str, images: range) -> bool:
        return any(self.entries[schedule]["psnr"][i] is None for i in images)

    def record(self, schedule: str, images: range, values: list[float]) -> None:
        self.entries[schedule]["psnr"][images.start: images.stop] = values

    def utility(self, schedule: str) -> float:
        """Mean PSNR over the calibration images, summed exactly (the same whatever the order of scoring)."""
        values = self.entries[schedule]["psnr"]
        return math.fsum(values) / len(values)

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": attnreuse.__version__, "key": self.key, "rounds": self.rounds,
                "evaluated": [{"schedule": s, **e} for s, e in self.entries.items()]}

    def save(self, path) -> None:
        files.write_json(path, self.to_json())

    @classmethod
    def read(cls, path: Path) -> "Trace":
        """A trace written by :meth:`save`; rounds are left out, a resumed search replays them."""
        fix = "pass another --out, or delete it to start over"
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise UsageError(f"--resume: cannot read {path} ({e})", fix) from None
        try:
            if data.get("format") != FORMAT:
                raise KeyError("format")
            images = len(data["evaluated"][0]["psnr"]) if data["evaluated"] else 0
            trace = cls(dict(data["key"]), images)
            for e in data["evaluated"]:
                trace.entries[str(e["schedule"])] = {"round": int(e["round"]), "psnr": list(e["psnr"])}
        except (AttributeError, KeyError, IndexError, TypeError, ValueError):
            raise UsageError(f"--resume: {path} is not a trace of python -m attnreuse search", fix) from None
        return trace

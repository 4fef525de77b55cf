"""ρ, the cost of a reuse step relative to a computing step, as measured on GPUs (``measured.json``).

ρ = ``reuse_fp8 / default`` ms per UNet call in CUDA-graph mode, per card and resolution, from
``bench/e2e.py --json``. The demo and the quality study use measured values when there are any and the
labelled assumptions of ``measured.json`` otherwise. ``python -m attnreuse.measured e2e.json`` prints a GPU
run's entries for the ``rho`` list of ``measured.json``.
"""
from __future__ import annotations

import datetime
import json
import sys
from dataclasses import dataclass
from pathlib import Path

FIGURES = Path(__file__).with_name("measured.json")


@dataclass(frozen=True)
class Rho:
    label: str  # short name for tables and column names, e.g. "h200_sd15_512"
    value: float
    source: str  # what was measured where, or why it is assumed
    card: str = ""
    px: int = 0


def _card_tag(card: str) -> str:
    words = [w for w in card.lower().split() if w not in ("nvidia", "geforce", "tesla")]
    return words[0] if words else "gpu"


def _rho(entry: dict) -> Rho:
    return Rho(f"{_card_tag(entry['card'])}_{entry['arch']}_{entry['px']}", entry["rho"],
               f"{entry['card']}, {entry['arch']} {entry['px']}², {entry['date']}: reuse_fp8 "
               f"{entry['reuse_fp8_ms']:.2f} / default {entry['default_ms']:.2f} ms ({entry['source']})",
               entry["card"], entry["px"])


def rho_entry(card: str, arch: str, px: int, date: str, default_ms: float, reuse_fp8_ms: float, source: str) -> dict:
    """One entry of ``measured.json``'s ``rho`` list, as ``bench/e2e.py`` runs and ``python -m attnreuse bench``
    record it."""
    return {"card": card, "arch": arch, "px": px, "date": date, "default_ms": default_ms,
            "reuse_fp8_ms": reuse_fp8_ms, "rho": round(reuse_fp8_ms / default_ms, 3), "source": source}


def e2e_entries(path) -> list[dict]:
    """``measured.json`` entries from a ``bench/e2e.py --json`` file (graph-mode cases only)."""
    path = Path(path)
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path} ({e}): pass the --json file of a GPU run of bench/e2e.py") from e
    written = datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.timezone.utc)
    date = results.get("date") or written.date()
    try:
        entries = [rho_entry(results["card"], c["arch"], c["px"], str(date), c["default"]["graph"],
                             c["reuse_fp8"]["graph"], f"bench/e2e.py, torch {results.get('torch', '?')}")
                   for c in results["cases"] if c.get("mode") == "graph"]
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path} lacks the field {e}: pass the --json file of a GPU run of bench/e2e.py") from e
    if not entries:
        raise ValueError(f"{path} has no CUDA-graph cases (a CPU dry run?): pass the --json of a GPU run of "
                         "bench/e2e.py")
    return entries


def measured(e2e_json=None) -> list[Rho]:
    """Measured ρ per card and resolution: from ``e2e_json`` when given, else from ``measured.json``;
    empty when nothing was measured."""
    entries = e2e_entries(e2e_json) if e2e_json else json.loads(FIGURES.read_text())["rho"]
    return [_rho(e) for e in entries]


def assumed() -> list[Rho]:
    """The labelled assumptions used while no GPU figure exists (the paper's ρ, the H200 SDPA ceiling)."""
    return [Rho(a["label"], a["rho"], a["source"]) for a in json.loads(FIGURES.read_text())["assumed_rho"]]


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m attnreuse.measured E2E_JSON  (the --json file of a GPU run of bench/e2e.py)")
    print(json.dumps(e2e_entries(sys.argv[1]), indent=1))

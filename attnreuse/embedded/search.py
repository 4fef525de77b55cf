"""Search PHAST schedules for the embedded model: ``python -m attnreuse.embedded.search``.

For each scheduler and reuse count, runs :func:`attnreuse.phast` on the calibration pairs (at most
``--max-rounds`` rounds, 3 by default: a round costs up to r·(N−r−1) samplings, about 100 s on 2 CPU cores)
and writes the schedules with their search traces to ``--out`` (``out/embedded/phast.json`` by default). The
demo and the quality benchmark read the copy shipped in the package; to ship a new search, copy it there:
``cp out/embedded/phast.json attnreuse/embedded/phast.json``.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import attnreuse

from .model import CALIBRATION, generate, load_default


def search(schedulers=("ddim", "dpm"), reuses=(5, 10, 15), steps: int = 20, epsilon: float = 0.01,
           pairs=CALIBRATION, max_rounds=None, path="out/embedded/phast.json") -> dict:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    found = {}
    for name in schedulers:
        pipe = load_default(name)
        for r in reuses:
            t0 = time.time()
            res = attnreuse.phast(pipe, lambda: generate(pipe, pairs, steps), steps, r, epsilon=epsilon,
                                  max_rounds=max_rounds)
            entry = {"schedule": "".join(map(str, res.schedule)), "utility_db": res.utility,
                     "hurry_db": res.start_utility, "samplings": res.samplings, "seconds": round(time.time() - t0),
                     "trace": [asdict(t) for t in res.trace], "calibration_pairs": len(pairs)}
            found[f"{name}-{steps}-{r}"] = entry
            print(f"{name} r={r}: {entry['schedule']} {res.start_utility:.2f} -> {res.utility:.2f} dB, "
                  f"{res.samplings} samplings, {entry['seconds']} s", flush=True)
            path.write_text(json.dumps(found, indent=1) + "\n")  # as it goes: a search takes minutes
    return found


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m attnreuse.embedded.search", description=__doc__)
    p.add_argument("--epsilon", type=float, default=0.01)
    p.add_argument("--max-rounds", type=int, default=3, help="stop a search after this many rounds")
    p.add_argument("--out", default="out/embedded/phast.json",
                   help="where to write the schedules (default: %(default)s)")
    args = p.parse_args(argv)
    search(epsilon=args.epsilon, max_rounds=args.max_rounds, path=args.out)


if __name__ == "__main__":
    main()

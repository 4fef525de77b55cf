"""How far the SASS model is from the GPU: ``python bench/model_check.py KERNELS_JSON SASS_JSON [--json OUT]``.

``KERNELS_JSON``: ``bench/kernel_table.py --json`` from a GPU run; ``SASS_JSON``: ``bench/sass_report.py --json``
for that GPU's architecture. For each kernel the table timed (``cached_pv`` and capture per map format and
shape), the model's prediction (:func:`bench.sass_report.predict_ms`) on that card, with the copy bandwidth
measured in the same run, and the measured time over the prediction: the model's error, which the README
reports.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):  # run as a file: python bench/model_check.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

from bench.measure import FORMAT_TAGS  # noqa: E402
from bench.sass_report import CARDS, Card, budget_card, predict_ms  # noqa: E402


def card_of(kernels: dict, arch: str) -> Card:
    """The card the table ran on, with its measured copy bandwidth (and SM count and clock where recorded)."""
    name = kernels["card"]
    base = next((c for key, c in CARDS.items() if key in name), budget_card(arch))
    return replace(base, name=name, copy_tbps=kernels["copy_TBps"], sms=kernels.get("sm_count") or base.sms,
                   clock_ghz=kernels.get("sm_clock_ghz") or base.clock_ghz)


def compare(kernels: dict, sass: dict, arch: str = "sm_90a") -> list[dict]:
    card = card_of(kernels, arch)
    rows = {(r["kernel"], r["format"], tuple(r["shape"])): r for r in sass["rows"]
            if r["arch"] == arch and r["values"] == "float16"}
    out = []
    for name, k in kernels["shapes"].items():
        shape = tuple(k["shape"])
        for tag, fmt in FORMAT_TAGS.items():
            for kernel, key in (("cached_pv", f"pv{tag}_ms"), ("capture", f"capture{tag}_ms")):
                if key in k and (kernel, fmt, shape) in rows:
                    predicted = predict_ms(rows[(kernel, fmt, shape)], card)
                    out.append(dict(shape=name, kernel=kernel, format=fmt, measured_ms=k[key], predicted_ms=predicted,
                                    ratio=k[key] / predicted, card=card.name))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kernels")
    ap.add_argument("sass")
    ap.add_argument("--arch", default="sm_90a")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    rows = compare(json.loads(Path(args.kernels).read_text()), json.loads(Path(args.sass).read_text()), args.arch)
    print(f"{'shape':18} {'kernel':9} {'map':4} {'measured ms':>11} {'model ms':>9} {'measured/model':>14}")
    for r in rows:
        print(f"{r['shape']:18} {r['kernel']:9} {r['format']:4} {r['measured_ms']:11.4f} {r['predicted_ms']:9.4f} "
              f"{r['ratio']:14.2f}")
    if rows:
        ratios = sorted(r["ratio"] for r in rows)
        print(f"model error on {rows[0]['card']}: measured / model from {ratios[0]:.2f} to {ratios[-1]:.2f}, "
              f"median {ratios[len(ratios) // 2]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

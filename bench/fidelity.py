"""Fidelity of compressed attention maps: ``python bench/fidelity.py --out docs`` (7 minutes of CPU time, 13 minutes
on 2 CPU cores shared with other work).

A cached map is stored in fewer bits than the model computes it in; this measures what that costs, for
fp16, fp8 e4m3 (per row and per key block) and 4-bit codes (two per byte) with a scale per (row, key block):

* **kernel table**: relative error of ``Â·V`` against float64 ``A·V`` on long synthetic rows (softmax of
  Gaussian logits from diffuse to peaked, a few spikes, a local peak on a 2-D grid), and on the embedded
  model's own maps (4, 16 and 64 keys);
* **end-to-end table**: PSNR against the full sampler on the embedded model's held-out pairs, for HURRY and
  PHAST with DDIM and DPM-Solver++, sampled by ``attnreuse.patch(..., backend="torch")``: the shipped formats
  (fp16, fp8, fp4) as users get them, every other code registered as a map format for the run
  (:func:`study_format`), so any code can be tried without touching the kernels.

Writes ``fidelity.md`` and ``fidelity.csv`` into ``--out``.
"""
from __future__ import annotations

import argparse
import csv
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

import attnreuse
from attnreuse.embedded import HELD_OUT, generate, load_default, searched_schedules
from attnreuse.kernels import KEY_BLOCK, formats
from attnreuse.kernels.reference import split_heads
from attnreuse.schedule import to_string

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # the non-negative half of OCP FP4 (E2M1)
UE2M2 = (0, .25, .5, .75, 1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6, 7)  # unsigned: all 16 codes >= 0
SCALE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "e8": 1, "e8lat": 1, "e4m3": 1}


def log_levels(step: float, n: int = 15) -> tuple[float, ...]:
    """``2^(−step·c)`` for c = 0..n−1, plus zero (the 16th code): ascending, top = 1."""
    return (0.0,) + tuple(2.0 ** (-step * c) for c in reversed(range(n)))


# ----------------------------------------------------------------------------------------------- the codes
@dataclass(frozen=True)
class Code:
    """How a map is stored. Values are divided by a scale per (row, key block) (``block=None``: per row) and
    rounded to ``levels`` (normalised so the top level is 1), or cast to fp16 / fp8.

    Important:
        kind: ``"fp16"`` (no scale), ``"fp8"`` (e4m3, block max → 448) or ``"grid"`` (a 4-bit code).
        levels: the grid's values, ascending, first 0, top 1 (at most 16).
        block: keys per scale; None = one scale per row.
        scale: how the scale is stored: ``"fp32"``, ``"fp16"``, ``"bf16"`` (the block max itself), ``"e8"``
            (the next power of two at or above the block max: one byte), ``"e8lat"`` (a log code's block max
            rounded to the code's own lattice 2^(step·k): one byte, and the code's levels are exact powers),
            ``"e4m3"`` (block max / row max in e4m3, rounded up, and one fp32 row max per row).
    Knobs:
        rounding: ``"linear"`` (nearest level) or ``"log"`` (nearest in the log domain between non-zero levels;
            to zero below half the smallest level).
        anchor: ``"own"`` (each block's own max) or ``"running"`` (the running row max when the block is seen,
            in key order: what a one-pass capture has without looking at a block twice).
        fp8_top: the value a block's anchor maps to in fp8 (448: the top of e4m3; 1: stored as exp(S − m) ≤ 1).
        step: octaves per level of a log code (for ``"e8lat"``).
        rowsum: rescale each row of the dequantised map to sum to one (the capture kernel accumulates the sum of
            the stored values and folds 1/sum into the row factor instead of 1/l; 4 bytes a row).
    """

    name: str
    kind: str
    levels: tuple[float, ...] = ()
    block: int | None = None
    scale: str = "fp32"
    rounding: str = "linear"
    anchor: str = "own"
    fp8_top: float = FP8_MAX
    step: float = 0.0
    rowsum: bool = False

    def bytes_per_entry(self, keys: int) -> float:
        """Storage bytes per map entry for rows of ``keys`` keys, scales included (blocks padded at the end)."""
        data = {"fp16": 2.0, "fp8": 1.0, "grid": 0.5}[self.kind]
        if self.kind == "fp16":
            return data
        n_scales = 1 if self.block is None else math.ceil(keys / self.block)
        per_row = n_scales * SCALE_BYTES[self.scale] + 4 * (self.scale == "e4m3") + 4 * self.rowsum
        return data + per_row / keys


def _grid_round(x: torch.Tensor, levels: tuple[float, ...], rounding: str) -> torch.Tensor:
    lv = torch.tensor(levels, dtype=x.dtype, device=x.device)
    mids = (lv[1:] + lv[:-1]) / 2
    if rounding == "log":
        mids[1:] = (lv[2:] * lv[1:-1]).sqrt()
    return lv[torch.bucketize(x, mids)]  # values above the top level (a rounded scale) saturate


def _round_up_e4m3(v: torch.Tensor) -> torch.Tensor:
    """The smallest e4m3 value >= v (v in [0, 448]), so a block max never exceeds its scale."""
    q = v.to(FP8)
    bits = q.view(torch.uint8)
    up = torch.where(q.float() < v.float(), bits + 1, bits)
    return up.view(FP8).to(v.dtype)


def _scales(bmax: torch.Tensor, code: Code) -> torch.Tensor:
    """The per-(row, block) scale as the storage holds it (``bmax``: ``[..., n_blocks]`` block maxima >= 0).

    All-zero blocks get scale 1 (their values stay 0), so no division by zero and no NaN."""
    ref = torch.cummax(bmax, dim=-1).values if code.anchor == "running" else bmax
    safe = torch.where(ref > 0, ref, torch.ones_like(ref))
    if code.scale == "fp32":
        return safe.float().to(ref.dtype)
    if code.scale in ("fp16", "bf16"):
        s = safe.to(torch.float16 if code.scale == "fp16" else torch.bfloat16).to(ref.dtype)
        return torch.where(s > 0, s, torch.ones_like(s))  # below fp16's range: the block's values flush to 0
    if code.scale == "e8":
        return torch.exp2(torch.ceil(torch.log2(safe)))
    if code.scale == "e8lat":
        return torch.exp2(code.step * torch.round(torch.log2(safe) / code.step))
    if code.scale == "e4m3":
        rowmax = ref.amax(dim=-1, keepdim=True)
        rowmax = torch.where(rowmax > 0, rowmax, torch.ones_like(rowmax)).float().to(ref.dtype)
        ratio = (ref / rowmax * FP8_MAX).clamp(0, FP8_MAX).float()
        s = _round_up_e4m3(ratio).to(ref.dtype) * rowmax / FP8_MAX
        return torch.where(s > 0, s, torch.ones_like(s))
    raise ValueError(f"scale {code.scale!r}: pass one of {sorted(SCALE_BYTES)}")


def quantise(probs: torch.Tensor, code: Code) -> tuple[torch.Tensor, float]:
    """Store ``probs`` (``[..., keys]`` normalised probabilities) as ``code`` and read it back.

    Returns the dequantised map (float64) and the storage bytes per entry, scales included.
    """
    keys = probs.shape[-1]
    nbytes = code.bytes_per_entry(keys)
    if code.kind == "fp16":
        return probs.to(torch.float16).double(), nbytes
    if code.kind == "fp8" and code.block is None and code.anchor == "own" and code.fp8_top == FP8_MAX:
        # the first storage format, exactly: fp32 arithmetic, e4m3 data, fp32 row scale
        p = probs.float()
        rowmax = p.amax(dim=-1, keepdim=True)
        rowmax = torch.where(rowmax > 0, rowmax, torch.ones_like(rowmax))
        data = (p * (FP8_MAX / rowmax)).to(FP8)
        return (data.float() * (rowmax / FP8_MAX)).double(), nbytes
    p = probs.double()
    b = keys if code.block is None else code.block
    pad = -keys % b
    blocks = F.pad(p, (0, pad)).unflatten(-1, (-1, b))  # [..., n_blocks, b]
    s = _scales(blocks.amax(dim=-1), code).unsqueeze(-1)
    if code.kind == "fp8":
        out = (blocks * (code.fp8_top / s)).to(FP8).double() * (s / code.fp8_top)
    else:
        out = _grid_round(blocks / s, code.levels, code.rounding) * s
    out = out.flatten(-2)[..., :keys]
    if code.rowsum:
        total = out.sum(dim=-1, keepdim=True)
        out = out * torch.where(total > 0, p.sum(dim=-1, keepdim=True) / total, torch.ones_like(total))
    return out, nbytes


def _codes() -> dict[str, Code]:
    c = {"fp16": Code("fp16", "fp16"),
         "fp8 row": Code("fp8 row", "fp8")}
    for b in (64, 128):
        c[f"fp8 b{b}"] = Code(f"fp8 b{b}", "fp8", block=b)
    c["fp8 b64 running"] = Code("fp8 b64 running", "fp8", block=64, anchor="running")
    c["fp8 b64 running ≤1"] = Code("fp8 b64 running ≤1", "fp8", block=64, anchor="running", fp8_top=1.0)
    four_bit = {"e2m1": dict(levels=tuple(v / 6 for v in E2M1)),
                "log½": dict(levels=log_levels(0.5), rounding="log", step=0.5),
                "log⅓": dict(levels=log_levels(1 / 3), rounding="log", step=1 / 3),
                "log¼": dict(levels=log_levels(1 / 4), rounding="log", step=1 / 4),
                "ue2m2": dict(levels=tuple(v / 7 for v in UE2M2)),
                "u4": dict(levels=tuple(k / 15 for k in range(16)))}
    for name, kw in four_bit.items():
        c[f"{name} row"] = Code(f"{name} row", "grid", **kw)
        for b in (16, 32, 64, 128):
            c[f"{name} b{b}"] = Code(f"{name} b{b}", "grid", block=b, **kw)
    variants = {"e2m1 b16": [("e8", dict(scale="e8")), ("e4m3", dict(scale="e4m3"))],
                "log½ b16": [("e8", dict(scale="e8lat")), ("lin", dict(rounding="linear")), ("Σ", dict(rowsum=True))],
                "log½ b64": [("running", dict(anchor="running"))],
                "log⅓ b16": [("fp16", dict(scale="fp16")), ("bf16", dict(scale="bf16")), ("e8", dict(scale="e8lat")),
                             ("Σ", dict(rowsum=True))],
                "log⅓ b32": [("fp16", dict(scale="fp16")), ("Σ", dict(rowsum=True))],
                "log⅓ b64": [("Σ", dict(rowsum=True)), ("running", dict(anchor="running"))],
                "log⅓ b128": [("Σ", dict(rowsum=True))],
                "ue2m2 b128": [("Σ", dict(rowsum=True))],
                "ue2m2 b16": [("fp16", dict(scale="fp16")), ("bf16", dict(scale="bf16")), ("Σ", dict(rowsum=True))],
                "ue2m2 b32": [("fp16", dict(scale="fp16")), ("Σ", dict(rowsum=True))],
                "ue2m2 b64": [("running", dict(anchor="running"))]}
    for base, vs in variants.items():
        for suffix, kw in vs:
            c[f"{base} {suffix}"] = replace(c[base], name=f"{base} {suffix}", **kw)
    return c


CODES = _codes()
# codes run end to end on the embedded model (its rows have 4, 16 or 64 keys: a block of 64 or more is a row,
# so b128, attnreuse's key block, is one scale per row here)
E2E_CODES = ("fp32", "fp16", "fp8 row", "e2m1 b16", "e2m1 b32", "e2m1 b128", "log½ b16", "log½ b32", "log½ b128",
             "log⅓ b16", "log⅓ b32", "log⅓ b128", "log⅓ b16 Σ", "log⅓ b128 Σ", "ue2m2 b16", "ue2m2 b128 Σ")


# ----------------------------------------------------------------------------------------------- kernel table
def synthetic_logits(case: str, rows: int, keys: int, g: torch.Generator) -> torch.Tensor:
    """``[rows, keys]`` float64 logits: ``"σ=s"`` Gaussian, ``"spiky"`` (4 keys 8 above a unit Gaussian),
    ``"local"`` (keys on a square grid, a bump of height 6 and width 3 around the query's position)."""
    z = torch.randn(rows, keys, generator=g, dtype=torch.float64)
    if case.startswith("σ="):
        return z * float(case[2:])
    if case == "spiky":
        idx = torch.randint(keys, (rows, 4), generator=g)
        return z.scatter_add(1, idx, torch.full((rows, 4), 8.0, dtype=torch.float64))
    if case == "local":
        side = math.isqrt(keys)
        yx = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)
        centre = torch.randint(side, (rows, 1, 2), generator=g)
        d2 = ((yx[None] - centre) ** 2).sum(-1).double()
        return z + 6.0 * torch.exp(-d2 / 18.0)
    raise ValueError(case)


def av_error(probs: torch.Tensor, v: torch.Tensor, code: Code) -> tuple[float, float, float, float]:
    """Relative Frobenius error of Â·V vs A·V for ``v`` and for ``v + 1`` (values with a mean, as real
    channels have: a row whose sum is off shifts the whole output), mean |row sum of Â − 1|, bytes per entry."""
    deq, nbytes = quantise(probs, code)
    p = probs.double()
    errs = [((deq @ w - p @ w).norm() / (p @ w).norm()).item() for w in (v, v + 1)]
    return errs[0], errs[1], (deq.sum(-1) - p.sum(-1)).abs().mean().item(), nbytes


def kernel_table(args) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    for keys in args.keys:
        for case in args.cases:
            probs = synthetic_logits(case, args.rows, keys, g).softmax(-1)
            v = torch.randn(keys, 64, generator=g, dtype=torch.float64)
            for name in args.kernel_codes:
                err, err_mean, sum_err, nbytes = av_error(probs, v, CODES[name])
                rows.append({"table": "kernel", "source": "synthetic", "keys": keys, "case": case, "code": name,
                             "bytes_per_entry": nbytes, "rel_err": err, "rel_err_v_mean1": err_mean,
                             "rowsum_err": sum_err})
        print(f"kernel table: {keys} keys done", flush=True)
    return rows


def model_maps(steps: int, pairs, at_steps) -> dict[int, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The embedded model's attention maps and values (``[B, H, Nq, Nk]``, ``[B, H, Nk, D]``), grouped by key count,
    as attnreuse captures them at ``at_steps`` of a DDIM generation (in fp64 storage: the maps themselves; each
    capture step is followed by one reuse step, which the schedule needs to capture at all)."""
    pipe = load_default("ddim")
    schedule = tuple(0 if i - 1 in at_steps else 1 for i in range(steps))
    found: dict[int, list] = {}
    values: dict[str, torch.Tensor] = {}
    layers = {name: m for name, m in pipe.unet.named_modules() if type(m).__name__ == "Attention"}
    hooks = [m.to_v.register_forward_hook(lambda mod, args, out, name=name: values.__setitem__(name, out))
             for name, m in layers.items()]
    with attnreuse.patch(pipe, schedule, cache_dtype="fp64", backend="torch") as handle:
        def collect(*_):  # after each UNet call: the maps a capture step just stored
            gen = handle.current
            if gen is not None and gen.step_index in at_steps:
                for (name, _), cmap in gen.cache.maps.items():
                    v = split_heads(values[name].double(), layers[name].heads)
                    found.setdefault(cmap.kv_tokens, []).append((cmap.dequantize(torch.float64), v))
        hooks.append(pipe.unet.register_forward_hook(collect))
        generate(pipe, pairs, steps)
    for h in hooks:
        h.remove()
    return found


def model_table(args) -> list[dict]:
    rows = []
    for keys, items in sorted(model_maps(args.steps, HELD_OUT[:args.map_pairs], args.map_steps).items()):
        for name in args.kernel_codes:
            num = den = sums = 0.0
            for probs, v in items:
                deq, nbytes = quantise(probs, CODES[name])
                exact = probs.double() @ v
                num += ((deq @ v - exact) ** 2).sum().item()
                den += (exact ** 2).sum().item()
                sums += (deq.sum(-1) - probs.double().sum(-1)).abs().mean().item() / len(items)
            rows.append({"table": "kernel", "source": "embedded model", "keys": keys,
                         "case": "self" if keys > 4 else "cross", "code": name, "bytes_per_entry": nbytes,
                         "rel_err": math.sqrt(num / den), "rowsum_err": sums})
    return rows


# ----------------------------------------------------------------------------------------------- end to end
def study_format(code: Code) -> formats.MapFormat:
    """``code`` as a map format of attnreuse's registry, for the PyTorch path: each stored value is the code's
    dequantised value (fp32), its scales per key group within the storage's 128-key block (a per-row code: one
    scale per block, the same on the embedded model's rows of at most 64 keys); the row-sum correction is the
    storage's own (``stored_sums``)."""
    grouped = replace(code, block=min(code.block or KEY_BLOCK, KEY_BLOCK), rowsum=False)

    def encode(rel: torch.Tensor) -> torch.Tensor:
        rows = rel.reshape(-1, rel.shape[-1])
        return quantise(rows, grouped)[0].reshape(rel.shape).float()

    return formats.MapFormat(f"study {code.name}", torch.float32, 32, 1.0, encode, torch.Tensor.float,
                             stored_sums=code.rowsum)


SHIPPED = {"fp32": "fp32", "fp16": "fp16", "fp8 row": "fp8", "ue2m2 b128 Σ": "fp4"}  # codes attnreuse ships as formats


def e2e_table(args) -> list[dict]:
    """PSNR against the full sampler with each code's maps, sampled by ``attnreuse.patch(..., backend="torch")``:
    shipped formats as users get them, the other codes registered as formats for the run."""
    rows = []
    searched = searched_schedules()
    registered = {name: study_format(CODES[name]) for name in args.e2e_codes if name not in SHIPPED}
    with formats.registered(*registered.values()):
        for sched_name in args.schedulers:
            pipe = load_default(sched_name)
            reference = generate(pipe, args.pairs, args.steps)
            for r in args.reuse:
                strategies = {"HURRY": attnreuse.hurry(args.steps, r)}
                key = f"{sched_name}-{args.steps}-{r}"
                if key in searched:
                    strategies["PHAST"] = attnreuse.as_schedule(searched[key]["schedule"])
                for strategy, schedule in strategies.items():
                    t0 = time.time()
                    psnr = {}
                    for name in args.e2e_codes:
                        fmt = SHIPPED.get(name) or registered[name]
                        with attnreuse.patch(pipe, schedule, cache_dtype=fmt, backend="torch"):
                            images = generate(pipe, args.pairs, args.steps)
                        psnr[name] = attnreuse.psnr(images, reference).mean().item()
                    for name, value in psnr.items():
                        rows.append({"table": "e2e", "scheduler": sched_name, "r": r, "strategy": strategy,
                                     "schedule": to_string(schedule), "code": name, "psnr": value,
                                     "loss_vs_fp16": psnr.get("fp16", psnr["fp32"]) - value,
                                     "bytes_per_entry": 4.0 if name == "fp32" else CODES[name].bytes_per_entry(4096)})
                    print(f"{sched_name} r={r} {strategy}: fp32 {psnr['fp32']:.2f} dB, "
                          + ", ".join(f"{n} {psnr.get('fp16', 0) - p:+.2f}" for n, p in psnr.items() if n != "fp32")
                          + f" dB loss vs fp16 ({time.time() - t0:.0f} s)", flush=True)
    return rows


# ----------------------------------------------------------------------------------------------- report
def write(kernel_rows: list[dict], e2e_rows: list[dict], args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = kernel_rows + e2e_rows
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(out / "fidelity.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)

    lines = ["# Fidelity of compressed attention maps", "",
             f"`python bench/fidelity.py{' --tiny' if args.tiny else ''}` ({args.seconds:.0f} s on this machine). "
             "Bytes per entry include the scales (at 4096 keys for per-row scales).", ""]
    synth = [r for r in kernel_rows if r["source"] == "synthetic"]
    for keys in args.keys:
        lines += [f"## Kernel level: relative error of Â·V vs float64, {keys} keys, V ~ N(0, 1), {args.rows} rows", "",
                  "Logits: Gaussian with std σ; spiky: 4 keys 8 above a unit Gaussian; local: a bump of 6 around "
                  "the query's position on a square key grid. Last columns, worst over the cases: the error for "
                  "V ~ N(1, 1) (values with a mean, as real channels have) and the mean |row sum − 1|.", "",
                  "| code | bytes/entry | " + " | ".join(args.cases) + " | worst, V ~ N(1, 1) | worst \\|Σ−1\\| |",
                  "|---|---|" + "---|" * len(args.cases) + "---|---|"]
        for name in args.kernel_codes:
            cells = {r["case"]: r for r in synth if r["keys"] == keys and r["code"] == name}
            worst_sum = max(c["rowsum_err"] for c in cells.values())
            worst_mean = max(c["rel_err_v_mean1"] for c in cells.values())
            lines.append(f"| {name} | {CODES[name].bytes_per_entry(keys):.4g} | "
                         + " | ".join(f"{cells[c]['rel_err']:.2g}" for c in args.cases)
                         + f" | {worst_mean:.2g} | {worst_sum:.1g} |")
        lines.append("")
    real = [r for r in kernel_rows if r["source"] == "embedded model"]
    if real:
        ks = sorted({r["keys"] for r in real}, reverse=True)
        lines += ["## Kernel level: the embedded model's own maps (DDIM steps "
                  f"{', '.join(map(str, args.map_steps))}, {args.map_pairs} pairs, its V)", "",
                  "| code | " + " | ".join(f"{k} keys ({'self' if k > 4 else 'cross'})" for k in ks) + " |",
                  "|---|" + "---|" * len(ks)]
        for name in args.kernel_codes:
            cells = {r["keys"]: r["rel_err"] for r in real if r["code"] == name}
            lines.append(f"| {name} | " + " | ".join(f"{cells[k]:.2g}" for k in ks) + " |")
        lines.append("")
    settings = list(dict.fromkeys((r["scheduler"], r["r"], r["strategy"]) for r in e2e_rows))
    if settings:
        lines += [f"## End to end: PSNR dB vs the full {args.steps}-step sampler ({len(args.pairs)} held-out pairs), "
                  "and (loss vs fp16 maps)", "",
                  "The last two columns relate the end-to-end evidence to long rows: relative A·V error divided by "
                  "fp8 row's, on the model's own largest maps and at worst over the synthetic long rows (both V). A code whose "
                  "long-row ratio is far above its model ratio has not been tested end to end at the error it will "
                  "have on long rows.", "",
                  "| code | bytes/entry | " + " | ".join(f"{s} r={r} {st}" for s, r, st in settings)
                  + " | worst PHAST loss | err ÷ fp8, model | err ÷ fp8, long rows |",
                  "|---|---|" + "---|" * len(settings) + "---|---|---|"]
        ratios = _error_ratios(kernel_rows)
        for name in args.e2e_codes:
            cells = {(r["scheduler"], r["r"], r["strategy"]): r for r in e2e_rows if r["code"] == name}
            phast = [c["loss_vs_fp16"] for k, c in cells.items() if k[2] == "PHAST"]
            nbytes = 4.0 if name == "fp32" else CODES[name].bytes_per_entry(4096)
            worst = f"{max(phast):+.2f}" if phast else "-"
            model, long_rows = (f"{x:.2g}" for x in ratios[name]) if name in ratios else ("-", "-")
            lines.append(f"| {name} | {nbytes:.4g} | "
                         + " | ".join(f"{cells[s]['psnr']:.2f} ({cells[s]['loss_vs_fp16']:+.2f})" for s in settings)
                         + f" | {worst} | {model} | {long_rows} |")
        lines.append("")
    (out / "fidelity.md").write_text("\n".join(lines) + "\n")


def _error_ratios(kernel_rows: list[dict]) -> dict[str, tuple[float, float]]:
    """Per code: A·V error ÷ fp8 row's on the model's longest maps, and the worst such ratio on synthetic rows."""
    err = {(r["source"], r["keys"], r["case"], r["code"]): r["rel_err"] for r in kernel_rows}
    err_mean = {(r["keys"], r["case"], r["code"]): r["rel_err_v_mean1"] for r in kernel_rows
                if r["source"] == "synthetic"}
    model_keys = max((k for s, k, _, _ in err if s == "embedded model"), default=None)
    out = {}
    for name in {c for *_, c in err}:
        synth = [max(v / err[(s, k, case, "fp8 row")], err_mean[(k, case, c)] / err_mean[(k, case, "fp8 row")])
                 for (s, k, case, c), v in err.items() if c == name and s == "synthetic"]
        model = [v / err[(s, k, case, "fp8 row")] for (s, k, case, c), v in err.items()
                 if c == name and s == "embedded model" and k == model_keys]
        out[name] = (model[0] if model else math.nan, max(synth, default=math.nan))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/fidelity")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--reuse", type=int, nargs="+", default=[5, 10])
    ap.add_argument("--schedulers", nargs="+", default=["ddim", "dpm"])
    ap.add_argument("--pairs", type=int, default=len(HELD_OUT), help="held-out pairs for the end-to-end table")
    ap.add_argument("--keys", type=int, nargs="+", default=[4096, 16384], help="synthetic row lengths")
    ap.add_argument("--rows", type=int, default=64, help="synthetic rows per case")
    ap.add_argument("--e2e-codes", nargs="+", default=list(E2E_CODES))
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1: far faster than 2 when other processes share the cores)")
    ap.add_argument("--tiny", action="store_true", help="a quick end-to-end run: short rows, 6 steps, 3 pairs")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.cases = ["σ=0.5", "σ=1", "σ=2", "σ=4", "σ=8", "spiky", "local"]
    args.kernel_codes = list(CODES)
    args.map_pairs, args.map_steps = 10, (5, 10, 15)
    if args.tiny:
        args.steps, args.reuse, args.schedulers, args.pairs = 6, [2], ["ddim"], 3
        args.keys, args.rows, args.map_pairs, args.map_steps = [1024], 4, 2, (2,)
        args.e2e_codes = ["fp32", "fp16", "fp8 row", "e2m1 b128", "ue2m2 b128 Σ"]
    unknown = sorted(set(args.e2e_codes) - set(CODES) - {"fp32"})
    if unknown:
        raise SystemExit(f"unknown codes {unknown}: pick from {['fp32', *CODES]}")
    args.pairs = HELD_OUT[:args.pairs]
    t0 = time.time()
    with torch.no_grad():
        kernel_rows = kernel_table(args) + model_table(args)
        e2e_rows = e2e_table(args)
    args.seconds = time.time() - t0
    write(kernel_rows, e2e_rows, args)
    print((Path(args.out) / "fidelity.md").read_text())


if __name__ == "__main__":
    main()

"""SASS report: every kernel attnreuse launches for SD1.5, SD2.1 and SDXL, compiled here for Hopper (sm_90a),
Ada (sm_89) and Ampere (sm_80) without a GPU, with a modelled time per key-block tile and instruction budgets.

    python bench/sass_report.py [--arch sm_90a sm_89 sm_80] [--json out/sass.json] [--jobs 2]

Per kernel: registers, spills, shared memory, blocks per SM, the bytes per thread of each operand's global
loads and stores, the instructions of one key-block tile (one iteration of the key loop) by kind, and a model
of the tile's time on one SM:

* issue = tile instructions × warps / 4: each SM issues one warp instruction per cycle in each of its four
  sub-partitions (sm_80, sm_89 and sm_90 alike; uniform-datapath instructions take issue slots too);
* memory = the tile's DRAM bytes (the map and its block maxima: read by ``cached_pv``, written by ``capture``;
  V, K and Q are re-read from L2 by every row tile of a head and not counted) / the SM's share of copy
  bandwidth;
* matrix = the tile's dot FLOPs (head dim as the kernel pads it) / the SM's share of the fp16 matmul rate;
* modelled time = the largest of the three. It ignores latency and occupancy: it says which resource a tile
  waits for at least, and whether instruction issue hides under the memory stream.

Card constants (:data:`CARDS`): copy bandwidth and matmul rate measured on the H200 and H100
(``bench.measure.copy_bandwidth`` and an fp16 ``torch.mm``, ../shared/anchors/*-kernels-2026-11.json);
elsewhere 0.9 × the data sheet's bandwidth (the two measured Hopper cards reach 0.89 and 0.90 of theirs) and
the data sheet's dense fp16 rate with fp32 accumulation; SM counts and boost clocks from the data sheets.
Each architecture's budget card is the one with the most bandwidth per SM and cycle, where instruction issue
is hardest to hide: the H200 (16.3 bytes per SM-cycle) for sm_90a, the RTX 4090 (2.8) for sm_89.

Budgets (:func:`budget_failures`, asserted by tests/test_sass_budgets.py for sm_90a and sm_89):

1. no spills (no local-memory stack frame);
2. map, V, K and Q loads and map stores of at least 8 bytes per thread;
3. ``cached_pv`` with fp16, fp8 and 4-bit maps: issue ≤ 0.8 × memory;
4. ``capture``: modelled time ≤ 1.3 × (the flash-attention reference tile + the map's write at copy bandwidth).
   The reference, :mod:`bench.flash_reference`, is the same one-pass attention without the map: same tile,
   head dim, warps and stages, same compiler and target, its Q, K and V loaded as 16-byte vectors. What the
   capture adds beyond 30 % is what its map costs in instructions;
5. shared memory within the architecture's limit per block.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a file: python bench/sass_report.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"


@dataclass(frozen=True)
class Card:
    name: str
    arch: str
    sms: int
    clock_ghz: float  # boost clock
    copy_tbps: float  # copy bandwidth: bytes read + written per second / 1e12
    matmul_tflops: float  # dense fp16 matmul, fp32 accumulation
    source: str

    @property
    def bytes_per_cycle(self) -> float:
        """One SM's share of copy bandwidth, bytes per cycle."""
        return self.copy_tbps * 1e12 / self.sms / (self.clock_ghz * 1e9)

    @property
    def flops_per_cycle(self) -> float:
        return self.matmul_tflops * 1e12 / self.sms / (self.clock_ghz * 1e9)


CARDS = {
    "H200": Card("H200", "sm_90a", 132, 1.98, 4.25, 678.6, "copy and matmul measured (anchors, 2026-11)"),
    "H100": Card("H100 SXM", "sm_90a", 132, 1.98, 3.00, 751.0, "copy and matmul measured (anchors, 2026-11)"),
    "RTX 4090": Card("RTX 4090", "sm_89", 128, 2.52, 0.907, 165.2, "0.9 × 1008 GB/s, 165 TFLOPS (data sheet)"),
    "L40S": Card("L40S", "sm_89", 142, 2.52, 0.778, 362.0, "0.9 × 864 GB/s, 362 TFLOPS (data sheet)"),
    "L4": Card("L4", "sm_89", 58, 2.04, 0.270, 121.0, "0.9 × 300 GB/s, 121 TFLOPS (data sheet)"),
    "A100": Card("A100 SXM 80GB", "sm_80", 108, 1.41, 1.835, 312.0, "0.9 × 2039 GB/s, 312 TFLOPS (data sheet)"),
}
ARCHS = {"sm_90a": 90, "sm_89": 89, "sm_80": 80}
BUDGET_ARCHS = ("sm_90a", "sm_89")
# per architecture: registers, shared memory per SM and per block (bytes), threads and blocks per SM
LIMITS = {
    "sm_90a": dict(regs=65536, smem_sm=233472, smem_block=232448, threads=2048, blocks=32),
    "sm_89": dict(regs=65536, smem_sm=102400, smem_block=101376, threads=1536, blocks=24),
    "sm_80": dict(regs=65536, smem_sm=167936, smem_block=166912, threads=2048, blocks=32),
}
ISSUE_SLOTS = 4  # warp instructions per SM and cycle
ISSUE_BUDGET = 0.8  # cached_pv: issue time / memory time
CAPTURE_BUDGET = 1.3  # capture / (flash reference + map write)
MIN_LOAD_BYTES = 8
TIMED_FORMATS = ("fp16", "fp8", "fp4")  # formats held to budget 3
MODELS = {"sd15": 512, "sd21": 768, "sdxl": 1024}
OPERANDS = {"a_ptrs": "map", "v_row": "V", "v_ptrs": "V", "k_ptrs": "K", "Q": "Q", "o_row": "O", "o_ptrs": "O"}


def budget_card(arch: str) -> Card:
    """The card of ``arch`` with the most bandwidth per SM per cycle: where issue is hardest to hide."""
    return max((c for c in CARDS.values() if c.arch == arch), key=lambda c: c.bytes_per_cycle)


def blocks_per_sm(arch: str, registers: int, warps: int, shared: int) -> int:
    lim = LIMITS[arch]
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256  # allocated per warp in units of 256
    by_regs = lim["regs"] // (regs_per_warp * warps)
    by_smem = lim["smem_sm"] // (shared + 1024)  # 1 KB reserved per block
    return min(by_regs, by_smem, lim["threads"] // (32 * warps), lim["blocks"])


def shapes(kernels_only: bool = True) -> dict[tuple, list[str]]:
    """``{(batch, heads, q tokens, kv tokens, head dim): [models]}`` of every attention layer, batch 2 (CFG);
    with ``kernels_only``, those the kernels take (head dims up to ``MAX_HEAD_DIM``; the rest run PyTorch)."""
    from attnreuse.architectures import attention_shapes
    from attnreuse.kernels.tuning import MAX_HEAD_DIM
    out: dict[tuple, list[str]] = {}
    for model, px in MODELS.items():
        for shape in attention_shapes(model, px):
            if shape[4] <= MAX_HEAD_DIM or not kernels_only:
                out.setdefault(shape, []).append(f"{model}@{px}")
    return out


# ---- compiling what the package launches -------------------------------------------------------------------

def compile_group(arch: str, fmt: str, value_dtype: str, shape_list: list[tuple]) -> list[dict]:
    """Compile capture, cached_pv (and, for fp16 maps, the flash reference) for ``shape_list`` in one map
    format, through the package's own launchers; one row per (shape, kernel)."""
    import torch

    from attnreuse.kernels import formats, launchers
    from attnreuse.kernels.tuning import capture_config
    from bench import flash_reference
    from bench.sass import analyse, compiled_for

    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default; set, so it does not warn
    vdtype = getattr(torch, value_dtype)
    rows, seen = [], {}
    with compiled_for(ARCHS[arch]) as launches:
        for shape in shape_list:
            b, h, nq, nk, d = shape
            q = torch.empty(b, nq, h * d, dtype=vdtype, device="meta")
            k, v = (torch.empty(b, nk, h * d, dtype=vdtype, device="meta") for _ in range(2))
            bufs = launchers.capture_buffers(q, k, v, h, fmt)
            kernels = {"capture": lambda: launchers.launch_capture(*bufs, q, k, v, h, d ** -0.5, fmt),
                       "cached_pv": lambda: launchers.launch_cached_pv(bufs[0], *bufs[1:], v, h, fmt)}
            if fmt == "fp16":
                config = capture_config(d, nq, nk, formats.get(fmt), ARCHS[arch])
                kernels["flash"] = lambda: flash_reference.launch(q, k, v, h, d ** -0.5, config)
            for kernel, launch in kernels.items():
                launch()
                rec = launches[-1]
                if rec.kernel.hash not in seen:
                    seen[rec.kernel.hash] = analyse(rec.kernel)
                a = seen[rec.kernel.hash]
                rows.append(dict(
                    arch=arch, kernel=kernel, format=fmt, values=value_dtype, shape=list(shape),
                    block_m=rec.kwargs["BLOCK_M"], block_d=rec.kwargs["BLOCK_D"] + rec.kwargs.get("BLOCK_D2", 0),
                    num_warps=rec.kernel.metadata.num_warps, num_stages=rec.kernel.metadata.num_stages,
                    registers=a.registers, spill_bytes=a.spill_bytes, shared_bytes=a.shared_bytes,
                    instructions=a.instructions, tile_instructions=len(a.loop), tile_kinds=a.loop_kinds,
                    loads=_by_operand(a.loads), stores=_by_operand(a.stores), hash=rec.kernel.hash))
    return rows


def _by_operand(widths: dict) -> dict:
    out: dict = {}
    for pointer, counts in widths.items():
        merged = out.setdefault(OPERANDS.get(pointer, pointer), {})
        for width, n in counts.items():
            merged[str(width)] = merged.get(str(width), 0) + n
    return out


# ---- the model ---------------------------------------------------------------------------------------------

def tile_bytes(row: dict) -> int:
    """DRAM bytes of one key-block tile: the map (as stored: padded rows, whole blocks) and its block maxima."""
    from attnreuse.kernels import KEY_BLOCK, formats
    if row["kernel"] == "flash":
        return 0
    fmt = formats.get(row["format"])
    nk = row["shape"][3]
    keys = min(KEY_BLOCK, fmt.row_items(nk) * fmt.keys_per_item)
    return row["block_m"] * (keys * fmt.bits // 8 + 4)


def model(row: dict, card: Card) -> dict:
    """Cycles per tile on one SM of ``card``: issue, memory, matrix, and the modelled time (their maximum)."""
    from attnreuse.kernels import KEY_BLOCK
    issue = row["tile_instructions"] * row["num_warps"] / ISSUE_SLOTS
    memory = tile_bytes(row) / card.bytes_per_cycle
    dots = 1 if row["kernel"] == "cached_pv" else 2
    matrix = 2 * dots * row["block_m"] * KEY_BLOCK * row["block_d"] / card.flops_per_cycle
    time = max(issue, memory, matrix)
    return dict(card=card.name, issue=issue, memory=memory, matrix=matrix, time=time,
                ns=time / card.clock_ghz, issue_over_memory=issue / memory if memory else None)


def predict_ms(row: dict, card: Card) -> float:
    """The kernel's time on ``card`` if every SM ran tiles at the modelled rate: tiles × time per tile / SMs."""
    from attnreuse.kernels import KEY_BLOCK
    b, h, nq, nk, _ = row["shape"]
    tiles = b * h * -(-nq // row["block_m"]) * -(-nk // KEY_BLOCK)
    return tiles * model(row, card)["time"] / card.sms / (card.clock_ghz * 1e9) * 1e3


def annotate(rows: list[dict]) -> None:
    """Add per row: blocks per SM, the budget card's model, and (captures) the flash reference's."""
    flash = {(r["arch"], tuple(r["shape"])): r for r in rows if r["kernel"] == "flash"}
    for r in rows:
        r["blocks_per_sm"] = blocks_per_sm(r["arch"], r["registers"], r["num_warps"], r["shared_bytes"])
        card = budget_card(r["arch"])
        r["model"] = model(r, card)
        if r["kernel"] == "capture" and (r["arch"], tuple(r["shape"])) in flash:
            ref = model(flash[(r["arch"], tuple(r["shape"]))], card)
            r["reference"] = ref["time"] + r["model"]["memory"]
            r["capture_over_reference"] = r["model"]["time"] / r["reference"]


def budget_failures(row: dict) -> list[str]:
    """What ``row`` breaks of the budgets in the module docstring (empty: it keeps them all)."""
    out = []
    if row["spill_bytes"]:
        out.append(f"spills {row['spill_bytes']} B")
    for kind in ("loads", "stores"):
        for operand, widths in row[kind].items():
            if operand in ("map", "V", "K", "Q") and (kind == "loads" or operand == "map"):
                narrow = min(int(w) for w in widths)
                if narrow < MIN_LOAD_BYTES:
                    out.append(f"{operand} {kind[:-1]}s of {narrow} B")
    if row["kernel"] == "cached_pv" and row["format"] in TIMED_FORMATS and row["values"] == "float16":
        ratio = row["model"]["issue_over_memory"]
        if ratio > ISSUE_BUDGET:
            out.append(f"issue {ratio:.2f} × memory")
    if row.get("capture_over_reference", 0) > CAPTURE_BUDGET and row["format"] in TIMED_FORMATS:
        out.append(f"capture {row['capture_over_reference']:.2f} × reference")
    if row["shared_bytes"] > LIMITS[row["arch"]]["smem_block"]:
        out.append(f"shared {row['shared_bytes']} B")
    return out


# ---- the report --------------------------------------------------------------------------------------------

def kernel_formats() -> list[tuple[str, str]]:
    """``(map format, activation dtype)`` of every format with kernels: bf16 maps with bf16 activations, the
    rest with fp16 ones."""
    from attnreuse.kernels import formats
    return [(f.name, "bfloat16" if f.name == "bf16" else "float16") for f in formats.formats() if f.kernel is not None]


def run(archs, jobs: int = 1, shape_filter=None) -> list[dict]:
    all_shapes = shapes()
    chosen = [s for s in all_shapes if shape_filter is None or shape_filter(s)]
    groups = [(arch, fmt, vd, chosen) for arch in archs for fmt, vd in kernel_formats()]
    if jobs > 1:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
            parts = list(pool.map(compile_group, *zip(*groups)))
    else:
        parts = [compile_group(*g) for g in groups]
    rows = [r for part in parts for r in part]
    for r in rows:
        r["models"] = all_shapes[tuple(r["shape"])]
    annotate(rows)
    for r in rows:
        r["failures"] = budget_failures(r) if r["arch"] in BUDGET_ARCHS and r["kernel"] != "flash" else []
    return rows


def table(rows: list[dict]) -> str:
    head = ("| arch | kernel | map | values | B×H×Nq×Nk×d | tile | regs | spill | smem KB | blk/SM | map B/thr | V B/thr "
            "| tile instr (int/fp/cvt/mem/mma) | issue / mem / mma cyc | model ns | budget |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        m, k = r["model"], r["tile_kinds"]
        loads = r["loads"] if r["kernel"] != "capture" else {**r["loads"], "map": r["stores"].get("map", {})}
        width = lambda op: min((int(w) for w in loads.get(op, {})), default="-")  # noqa: E731
        budget = "; ".join(r["failures"]) or ("ok" if r["arch"] in BUDGET_ARCHS and r["kernel"] != "flash" else "")
        extra = f" ({r['capture_over_reference']:.2f}× ref)" if "capture_over_reference" in r else ""
        lines.append(
            f"| {r['arch']} | {r['kernel']} | {r['format'] if r['kernel'] != 'flash' else '-'} | {r['values']} | "
            f"{'×'.join(map(str, r['shape']))} | {r['block_m']}/{r['num_warps']}w/{r['num_stages']}s | "
            f"{r['registers']} | {r['spill_bytes']} | {r['shared_bytes'] / 1024:.0f} | {r['blocks_per_sm']} | "
            f"{width('map')} | {width('V')} | {r['tile_instructions']} ({k.get('integer', 0)}/{k.get('float', 0)}/"
            f"{k.get('conversion', 0)}/{k.get('memory', 0)}/{k.get('mma', 0)}) | "
            f"{m['issue']:.0f} / {m['memory']:.0f} / {m['matrix']:.0f} | {m['ns']:.0f}{extra} | {budget} |")
    return "\n".join(lines)


def constants() -> dict:
    return dict(cards={k: {**asdict(c), "bytes_per_cycle": c.bytes_per_cycle, "flops_per_cycle": c.flops_per_cycle}
                       for k, c in CARDS.items()},
                budget_cards={a: budget_card(a).name for a in ARCHS}, limits=LIMITS, issue_slots=ISSUE_SLOTS,
                issue_budget=ISSUE_BUDGET, capture_budget=CAPTURE_BUDGET, min_load_bytes=MIN_LOAD_BYTES)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", nargs="+", choices=list(ARCHS), default=list(ARCHS))
    ap.add_argument("--json", help="write every row, the constants and the budgets here")
    ap.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="compiling processes")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        ap.error("unset TRITON_INTERPRET: the report compiles for GPU targets")
    rows = run(args.arch, args.jobs)
    print(table(rows))
    torch_path = sorted(set(shapes(kernels_only=False)) - set(shapes()))
    print(f"\nPyTorch path (head dim above the kernels'): {', '.join('×'.join(map(str, s)) for s in torch_path)}")
    failed = [r for r in rows if r["failures"]]
    print(f"\n{len(rows)} kernel launches, {len({r['hash'] for r in rows})} distinct kernels; "
          f"budgets ({', '.join(BUDGET_ARCHS)}): {len(failed)} launches fail")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(constants=constants(), rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

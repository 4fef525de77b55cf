"""Compile attnreuse's Triton kernels for a GPU that is not here, and read their machine code.

Triton compiles for any NVIDIA target on a CPU-only machine, and its wheel ships ``ptxas``, ``cuobjdump`` and
``nvdisasm``. :func:`compiled_for` runs attnreuse's own launchers (so every argument is specialised exactly as
on a device: 16-byte-aligned pointers, integers divisible by 16, the config rule) against meta tensors with
Triton's driver pointed at a fake device of the chosen architecture; each launch compiles and returns instead
of running. :func:`analyse` reads one compiled kernel: registers, spills, shared memory, the width of every
global load and store by the source line (so by operand) it came from, and the instructions of the key-block
loop by kind.
"""
from __future__ import annotations

import collections
import contextlib
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import jit
from triton.runtime.driver import driver

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


class _FakeDriver:
    """What Triton's JIT asks of its driver before compiling: the target, a device key, a stream."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return ("sass", self.target.arch)  # the JIT's per-device cache keeps each target apart

    def get_current_stream(self, device=None):
        return 0


@dataclass
class Launch:
    """One kernel launch that was compiled instead of run."""

    kwargs: dict  # the launch's keyword arguments: constexprs, num_warps, num_stages
    kernel: object  # triton's CompiledKernel


@contextlib.contextmanager
def compiled_for(arch: int):
    """Inside the block, every Triton launch compiles for ``sm_<arch>`` (90 means sm_90a) and is recorded in
    the yielded list instead of running. Needs the real compiler: not under ``TRITON_INTERPRET=1``."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compiling for a GPU target needs TRITON_INTERPRET unset")
    launches: list[Launch] = []
    run = jit.JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        launches.append(Launch(dict(kwargs), kernel))
        return kernel

    previous = driver._active  # None until something asked for the real driver (there is none on a CPU)
    jit.JITFunction.run = compile_only
    driver.set_active(_FakeDriver(arch))
    try:
        yield launches
    finally:
        jit.JITFunction.run = run
        driver._active = previous


# ---- reading the machine code ----------------------------------------------------------------------------

# SASS opcodes by kind (the opcode's first dot-separated part; a leading U = the uniform datapath, same kind)
KINDS = {
    "memory": {"LDG", "LDGSTS", "LDGDEPBAR", "STG", "LDS", "STS", "LDSM", "STSM", "LDL", "STL", "LD", "ST", "ATOM",
               "ATOMS", "RED", "LDC", "UBLKCP", "UTMALDG", "UTMASTG", "UTMAPF", "SYNCS", "CCTL", "MEMBAR", "FENCE"},
    "mma": {"HGMMA", "QGMMA", "IGMMA", "BGMMA", "HMMA", "IMMA", "QMMA", "DMMA"},
    "conversion": {"F2F", "F2FP", "I2F", "F2I", "I2FP", "F2IP", "FRND", "I2I"},
    "float": {"FADD", "FMUL", "FFMA", "FMNMX", "FSEL", "FSET", "FSETP", "FCHK", "MUFU", "HADD2", "HMUL2", "HFMA2",
              "HMNMX2", "HSETP2", "HSET2", "FSWZADD", "DADD", "DMUL", "DFMA", "FADD32I", "FMUL32I", "FFMA32I"},
    "integer": {"IADD3", "IADD", "IADD32I", "IMAD", "IMUL", "LOP3", "LOP", "LOP32I", "SHF", "SHL", "SHR", "ISETP",
                "SEL", "PRMT", "LEA", "IABS", "IMNMX", "VIMNMX", "VIADD", "VIADDMNMX", "POPC", "FLO", "BMSK", "BREV",
                "SGXT", "IDP", "ISCADD", "BFE", "BFI", "PLOP3", "P2R", "R2P", "CS2R", "S2R", "S2UR", "R2UR",
                "LEPC"},
    "move": {"MOV", "MOV32I", "MOVM", "SHFL", "UMOV"},
}
_KIND_OF = {op: kind for kind, ops in KINDS.items() for op in ops}
_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*?);")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_LINE = re.compile(r'//## File "([^"]+)", line (\d+)')
_BRANCH = re.compile(r"`\((\.L_x_\d+)\)")
_WIDTH = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}


def kind_of(opcode: str) -> str:
    base = opcode.split(".")[0]
    if base not in _KIND_OF and base.startswith("U") and base[1:] in _KIND_OF:
        base = base[1:]
    return _KIND_OF.get(base, "control")


def access_bytes(opcode: str) -> int:
    """Bytes per thread of one global load or store (``LDG.E.128`` 16, ``LDG.E.U16`` 2, plain 4)."""
    widths = [_WIDTH[p] for p in opcode.split(".")[1:] if p in _WIDTH]
    return widths[-1] if widths else 4


@dataclass
class Instr:
    addr: int
    opcode: str
    source: tuple[str, int] | None  # (file, line) it was compiled from


@dataclass
class Analysis:
    registers: int
    spill_bytes: int  # stack frame (local memory) per thread: spills and register arrays moved to memory
    shared_bytes: int  # dynamic shared memory per block (Triton's pipeline buffers)
    instructions: int  # whole kernel
    loop: list[Instr] = field(default_factory=list)  # the key-block loop's body
    loop_kinds: dict = field(default_factory=dict)  # instructions of the loop body by kind
    loads: dict = field(default_factory=dict)  # pointer -> {bytes per thread: count}, global loads
    stores: dict = field(default_factory=dict)  # pointer -> {bytes per thread: count}, global stores


def _run(tool: str, *args: str) -> str:
    return subprocess.run([str(BIN / tool), *args], check=True, capture_output=True, text=True).stdout


def disassemble(cubin: bytes) -> tuple[str, str]:
    """``(resource usage, SASS with source lines)`` of a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return _run("cuobjdump", "-res-usage", f.name), _run("nvdisasm", "-g", "-c", f.name)


def parse_sass(sass: str) -> tuple[list[Instr], dict[str, int], list[tuple[int, str]]]:
    """Instructions (with their source line), label addresses, and branches ``(address, target label)``."""
    instrs, labels, branches = [], {}, []
    line, pending = None, []
    for text in sass.splitlines():
        if m := _LINE.search(text):
            line = (m.group(1), int(m.group(2)))
            continue
        if m := _LABEL.match(text):
            pending.append(m.group(1))
            continue
        if m := _INSTR.search(text):
            addr = int(m.group(1), 16)
            for label in pending:
                labels[label] = addr
            pending = []
            instrs.append(Instr(addr, m.group(3), line))
            if m.group(3).startswith("BRA") and (b := _BRANCH.search(text)):
                branches.append((addr, b.group(1)))
    return instrs, labels, branches


def key_loop(instrs: list[Instr], labels: dict[str, int], branches) -> list[Instr]:
    """The body of the loop that holds the most matrix instructions (the key-block loop): from a backward
    branch's target to the branch."""
    best: list[Instr] = []
    for addr, label in branches:
        start = labels.get(label)
        if start is None or start > addr:
            continue
        body = [i for i in instrs if start <= i.addr <= addr]
        mma = sum(kind_of(i.opcode) == "mma" for i in body)
        if (mma, len(body)) > (sum(kind_of(i.opcode) == "mma" for i in best), len(best)):
            best = body
    return best


_POINTER = re.compile(r"tl\.(?:load|store)\(\s*([A-Za-z_]\w*)")


def pointer_of(source: tuple[str, int] | None) -> str:
    """The pointer a ``tl.load`` / ``tl.store`` on this source line reads (``v_ptrs``), else ``file:line``."""
    if source is None:
        return "?"
    path, line = source
    try:
        text = Path(path).read_text().splitlines()[line - 1]
    except (OSError, IndexError):
        text = ""
    m = _POINTER.search(text)
    return m.group(1) if m else f"{Path(path).name}:{line}"


def analyse(kernel) -> Analysis:
    usage, sass = disassemble(kernel.asm["cubin"])
    return analyse_sass(usage, sass, kernel.metadata.shared)


def analyse_sass(usage: str, sass: str, shared_bytes: int) -> Analysis:
    """An :class:`Analysis` from ``disassemble``'s output."""
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    instrs, labels, branches = parse_sass(sass)
    loop = key_loop(instrs, labels, branches)
    loads: dict = collections.defaultdict(collections.Counter)
    stores: dict = collections.defaultdict(collections.Counter)
    for i in instrs:
        base = i.opcode.split(".")[0]
        if base in ("LDG", "LDGSTS"):
            loads[pointer_of(i.source)][access_bytes(i.opcode)] += 1
        elif base == "STG":
            stores[pointer_of(i.source)][access_bytes(i.opcode)] += 1
    return Analysis(
        registers=regs, spill_bytes=stack, shared_bytes=shared_bytes, instructions=len(instrs), loop=loop,
        loop_kinds=dict(collections.Counter(kind_of(i.opcode) for i in loop)),
        loads={k: dict(v) for k, v in loads.items()}, stores={k: dict(v) for k, v in stores.items()})

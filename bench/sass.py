"""Read the machine code of kernels compiled for a GPU that is not here.

Triton compiles for any NVIDIA target on a CPU-only machine, and its wheel ships ``cuobjdump`` and ``nvdisasm``.
:class:`FakeDriver` is what Triton's JIT asks of a driver before compiling (bench/launches.py points the JIT at
one per target); :func:`analyse` reads one compiled kernel: registers, spills, shared memory, and the width of
every global load and store by the operand (the pointer of the source line) it came from. That is what the SASS
proved good at telling without a GPU; a time model built on instruction counts was off by 1.2–22× on an H200.
"""
from __future__ import annotations

import collections
import functools
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


class FakeDriver:
    """What Triton's JIT asks of its driver before compiling: the target, a device key, a stream."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return ("sass", self.target.arch)  # the JIT's per-device cache keeps each target apart

    def get_current_stream(self, device=None):
        return 0


_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*?);")
_LINE = re.compile(r'//## File "([^"]+)", line (\d+)')
_WIDTH = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}
_POINTER = re.compile(r"tl\.(?:load|store)\(\s*([A-Za-z_]\w*)")
OPERANDS = {"a_ptrs": "map", "v_row": "V", "k_col": "K", "q_row": "Q", "o_row": "O", "x_ptrs": "block max"}


def access_bytes(opcode: str) -> int:
    """Bytes per thread of one global load or store (``LDG.E.128`` 16, ``LDG.E.U16`` 2, plain 4)."""
    widths = [_WIDTH[p] for p in opcode.split(".")[1:] if p in _WIDTH]
    return widths[-1] if widths else 4


@dataclass
class Analysis:
    registers: int
    spill_bytes: int  # stack frame (local memory) per thread: spills and register arrays moved to memory
    shared_bytes: int  # dynamic shared memory per block (Triton's pipeline buffers)
    loads: dict = field(default_factory=dict)  # operand -> {bytes per thread: count}, global loads
    stores: dict = field(default_factory=dict)  # operand -> {bytes per thread: count}, global stores


def disassemble(cubin: bytes) -> tuple[str, str]:
    """``(resource usage, SASS with source lines)`` of a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        run = lambda tool, *args: subprocess.run([str(BIN / tool), *args, f.name], check=True,  # noqa: E731
                                                 capture_output=True, text=True).stdout
        return run("cuobjdump", "-res-usage"), run("nvdisasm", "-g", "-c")


@functools.lru_cache(maxsize=None)
def operand_of(source: tuple[str, int] | None) -> str:
    """The operand a ``tl.load`` / ``tl.store`` on this source line reads (``V`` for ``v_row``), else ``file:line``."""
    if source is None:
        return "?"
    path, line = source
    try:
        text = Path(path).read_text().splitlines()[line - 1]
    except (OSError, IndexError):
        text = ""
    m = _POINTER.search(text)
    return OPERANDS.get(m.group(1), m.group(1)) if m else f"{Path(path).name}:{line}"


def analyse(usage: str, sass: str, shared_bytes: int) -> Analysis:
    """An :class:`Analysis` from :func:`disassemble`'s output."""
    loads: dict = collections.defaultdict(collections.Counter)
    stores: dict = collections.defaultdict(collections.Counter)
    source = None
    for text in sass.splitlines():
        if m := _LINE.search(text):
            source = (m.group(1), int(m.group(2)))
        elif m := _INSTR.search(text):
            base = m.group(3).split(".")[0]
            if base in ("LDG", "LDGSTS"):
                loads[operand_of(source)][access_bytes(m.group(3))] += 1
            elif base == "STG":
                stores[operand_of(source)][access_bytes(m.group(3))] += 1
    return Analysis(registers=int(re.search(r"REG:(\d+)", usage).group(1)),
                    spill_bytes=int(re.search(r"STACK:(\d+)", usage).group(1)), shared_bytes=shared_bytes,
                    loads={k: dict(v) for k, v in loads.items()}, stores={k: dict(v) for k, v in stores.items()})

"""Registers read before anything wrote them, in SASS (what ptxas emitted) and in PTX (what Triton emitted).

ptxas 12.8 (Triton 3.6's) miscompiled kernels for sm_90a so that, on the path from the entry into the first
loop iteration, an instruction reads a register nothing has written: the base of a wgmma descriptor
(``UIADD3 UR40, UP0, UR40, 0x20, URZ`` in one-stage kernels) or the 4-bit map's ``F2FP.F16.E5M2.UNPACK_B
R194, R172`` hoisted to the head of the capture loop. ptxas 12.9 (Triton 3.9's below sm_90) still hoists the
F2FP on sm_89; ptxas 13.4 (its choice for sm_90a) does neither. :func:`uninitialised_reads` finds such reads
with a forward must-analysis ("written on every path from the entry"; meet = intersection, to a fixed point)
over the basic blocks of ``nvdisasm -g -c`` output, on R, UR, P and UP registers at the widths the opcodes use
(64-bit pairs, vectors, LDSM/STSM fragments, wgmma accumulators and descriptors, mma.sync fragments); RZ, URZ,
PT and UPT are constants.

The check is general, every read of every instruction: with the filters below it has no finding on any Triton
3.9 build for sm_90a or sm_80 nor on Triton 3.6's fp8/fp16 self-attention builds, and each finding it makes
elsewhere is of a kind that broke kernels (:data:`DANGEROUS`). The filters, each erring towards silence:

- a write under ``@P0`` satisfies only a read under ``@P0`` (any read once ``@!P0`` wrote the register too);
- an instruction that merges into its own destination (LOP3 with constants, PRMT keeping bytes in place, F2FP
  ``MERGE_C``) updates part of it: ptxas builds predicate masks and packed bytes so; that is not a read;
- a read of a register that no other instruction writes has kind ``"undef"`` and does not count: a PTX
  ``undef`` (a don't-care, such as the unused half of a pack) left unallocated, not a write moved too late;
- a wgmma accumulator under a scale-d predicate other than UPT/!UPT is a conditional read, not checked;
- an opcode not modelled writes every register it names (a general register four wide) and reads none; a
  branch without a known target adds no edge; CALL writes everything; unreachable code is not checked.

It cannot see values (a register computed from an unwritten one counts as written, so a path reports only its
first bad read), bits within a register beyond those merges, or memory.

:func:`ptx_undefined_reads` runs the same analysis on PTX virtual registers, to tell ptxas's bugs from the
input's: for the kernels above Triton's PTX reads no register that is written on some paths but not on all.
"""
from __future__ import annotations

import dataclasses
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Finding:
    addr: int  # SASS: the instruction's address; PTX: its line number
    opcode: str
    register: str
    text: str  # the instruction as printed
    kind: str = ""  # see DANGEROUS; PTX: "undef" for a register its function never writes


# the kinds of SASS finding that broke kernels: a wgmma descriptor operand, an integer add whose result reaches
# one, an integer add of a register into itself (a base or counter built on garbage), an F2FP's source
DANGEROUS = ("descriptor", "descriptor base", "self add", "conversion")


def dangerous(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.kind in DANGEROUS]


@dataclass
class _Op:
    """One instruction, reduced to what the analysis needs."""

    addr: int
    opcode: str
    text: str
    guard: str | None  # "P0", "!UP1", "%p3", "!%p3"; the guard's register is among the reads
    reads: list[str]
    writes: list[str]
    flow: str = ""  # "branch", "end" (EXIT, ret), "opaque" (successors unknown), "clobber" (CALL)
    target: str | None = None
    conditional: bool = False  # a branch or exit that may fall through
    descriptors: list[str] = field(default_factory=list)  # the reads that are wgmma descriptors
    line: int | None = None  # the kernel source line it was compiled from (nvdisasm -g, PTX .loc)


# ---- the analysis, shared by SASS and PTX -------------------------------------------------------------------

def _cfg(ops: list[_Op], labels: dict[str, int]) -> tuple[list[range], list[list[int]]]:
    """Basic blocks (ranges of ``ops``) and each one's successors. A branch whose target is unknown adds no
    edge: fewer paths into a block can only make more registers count as written, never fewer."""
    leaders = {0, *labels.values()} | {i + 1 for i, op in enumerate(ops) if op.flow}
    starts = sorted(s for s in leaders if s < len(ops))
    blocks = [range(s, e) for s, e in zip(starts, starts[1:] + [len(ops)])]
    index = {b.start: n for n, b in enumerate(blocks)}
    succ = []
    for n, b in enumerate(blocks):
        last = ops[b.stop - 1]
        out = [index[labels[last.target]]] if last.flow == "branch" and labels.get(last.target) in index else []
        if (last.flow in ("", "clobber") or last.conditional) and n + 1 < len(blocks):
            out.append(n + 1)
        succ.append(out)
    return blocks, succ


def _states(ops: list[_Op], labels: dict[str, int], step, meet):
    """Each reachable instruction's index with the state before it, at the fixed point of ``step`` (which
    updates a state in place for ``ops[i]``) under ``meet`` (``set.intersection``: on every path;
    ``set.union``: on some path). The yielded state is live: read it before asking for the next."""
    if not ops:
        return
    blocks, succ = _cfg(ops, labels)
    preds: list[list[int]] = [[] for _ in blocks]
    for n, out in enumerate(succ):
        for m in out:
            preds[m].append(n)
    state_in: list[set | None] = [None] * len(blocks)  # None: no path reaches it (yet)
    state_out: list[set | None] = [None] * len(blocks)
    work = [0]
    while work:
        n = work.pop()
        ins = [state_out[p] for p in preds[n] if state_out[p] is not None] + ([set()] if n == 0 else [])
        state = meet(*ins)
        state_in[n] = set(state)
        for i in blocks[n]:
            step(state, i)
        if state != state_out[n]:
            state_out[n] = state
            work += [m for m in succ[n] if m not in work]
    for n, b in enumerate(blocks):
        if state_in[n] is not None:
            state = set(state_in[n])
            for i in b:
                yield i, state
                step(state, i)


def _negate(guard: str) -> str:
    return guard[1:] if guard.startswith("!") else "!" + guard


def _undefined_reads(ops: list[_Op], labels: dict[str, int], constant) -> list[tuple[int, str]]:
    """``(instruction index, register)`` for each read of a register not written on every path from the entry.
    Besides register names the state holds ``"P0:R5"``: R5 is written whenever P0 holds (a write under
    ``@P0``), which satisfies a read under ``@P0``; under both P0 and !P0 it is written."""
    universe = {r for op in ops for r in op.writes + op.reads}

    def step(state: set[str], i: int) -> None:
        op = ops[i]
        if op.flow == "clobber":  # a call may write anything
            state |= universe
            return
        written = set(op.writes)
        # a predicate that changes says nothing any more about the writes it guarded
        predicates = [w for w in written if w.lstrip("U").startswith("P") or w.startswith("%p")]
        if predicates:
            state -= {f for f in state if ":" in f and f.split(":")[0].lstrip("!") in predicates}
        if op.guard is None:
            state |= written
        elif op.guard.lstrip("!") not in written:
            for reg in written:
                state.add(reg if f"{_negate(op.guard)}:{reg}" in state else f"{op.guard}:{reg}")

    found = []
    for i, state in _states(ops, labels, step, set.intersection):
        op = ops[i]
        found += [(i, r) for r in dict.fromkeys(op.reads)
                  if r not in state and not constant(r) and not (op.guard and f"{op.guard}:{r}" in state)]
    return found


def _reaches_descriptor(ops: list[_Op], labels: dict[str, int], source: int) -> bool:
    """Whether a value ``ops[source]`` writes flows (through any instruction that reads it) into a wgmma
    descriptor on some path."""
    def step(state: set[str], i: int) -> None:
        op = ops[i]
        if i == source or state & set(op.reads):
            state |= set(op.writes)
        elif op.guard is None:
            state -= set(op.writes)

    return any(state & set(ops[i].descriptors) for i, state in _states(ops, labels, step, set.union))


# ---- SASS -----------------------------------------------------------------------------------------------------

_SASS_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@(!?U?P[0-6T])\s+)?([A-Z][A-Za-z0-9_.]*)\s*(.*?)\s*;")
_SASS_LABEL = re.compile(r"^\s*([.$\w]+):")
_SASS_FUNCTION = re.compile(r"^\s*(?:\.section\s+\.text\.|Function\s*:)", re.M)  # nvdisasm, cuobjdump
_TARGET = re.compile(r"`\(([^)]+)\)|^(0x[0-9a-f]+)\b")
_SASS_LINE = re.compile(r'//## File "[^"]*", line (\d+)')
_PTX_LOC = re.compile(r"^\s*\.loc\s+\d+\s+(\d+)")
_REG = re.compile(r"(?<![\w.])(UR\d+|R\d+|UP\d|P\d|URZ|RZ|UPT|PT)(\.64)?(?!\w)")
_SASS_CONSTANT = {"RZ", "URZ", "PT", "UPT"}
_WIDTH = {"64": 2, "128": 4}

_LOADS = {"LD", "LDG", "LDS", "LDL", "LDC", "LDSM"}
_STORES = {"ST", "STG", "STS", "STL", "STSM", "RED"}
_MEMORY = _LOADS | _STORES | {"LDGSTS"}
_NO_DEST = _STORES | {"LDGSTS", "BRA", "BRX", "JMX", "EXIT", "RET", "CALL", "WARPSYNC", "BSSY", "BSYNC", "BREAK",
                      "NOP", "BAR", "DEPBAR", "LDGDEPBAR", "WARPGROUP", "MEMBAR", "FENCE", "ERRBAR", "CCTL"}
# opcodes whose operands follow the common pattern: destination(s) first, 32-bit registers unless the opcode
# names a width (.64, .128, .WIDE, CS2R's pair)
_PLAIN = _LOADS | {
    "IADD3", "IADD", "IADD32I", "VIADD", "VIADDMNMX", "IMAD", "IMUL", "LOP3", "LOP", "LOP32I", "SHF", "SHL",
    "SHR", "SEL", "FSEL", "PRMT", "LEA", "IABS", "IMNMX", "VIMNMX", "POPC", "FLO", "BMSK", "BREV", "SGXT",
    "ISCADD", "BFE", "BFI", "MOV", "MOV32I", "S2R", "S2UR", "R2UR", "CS2R", "FADD", "FMUL", "FFMA", "FMNMX",
    "FADD32I", "FMUL32I", "FFMA32I", "MUFU", "HADD2", "HMUL2", "HFMA2", "HMNMX2", "HSET2", "FSET", "FSWZADD",
    "F2F", "F2FP", "I2F", "F2I", "I2FP", "F2IP", "FRND", "I2I", "SHFL", "ISETP", "FSETP", "HSETP2", "PLOP3",
    "VOTE", "FCHK", "REDUX"}
_WGMMA = {"HGMMA", "QGMMA", "IGMMA"}
_MMA = {"HMMA", "QMMA", "IMMA"}
_ELEMENT_BYTES = {"F16": 2, "BF16": 2, "TF32": 4, "E4M3": 1, "E5M2": 1, "S8": 1, "U8": 1}
_CONVERSIONS = {"F2F", "I2F", "F2I", "I2I", "FRND"}  # 64-bit forms (F2F.F64.F32) are not modelled
_INTEGER_ADDS = {"IADD3", "IADD", "IADD32I", "VIADD"}


def _expand(name: str, width: int) -> list[str]:
    """``R4`` ``width`` wide as register names; a predicate is one bit whatever the width."""
    if name in _SASS_CONSTANT:
        return []
    if "P" in name:
        return [name]
    prefix, number = re.fullmatch(r"(\D+)(\d+)", name).groups()
    return [f"{prefix}{int(number) + k}" for k in range(width)]


def _registers(operand: str, width: int = 1) -> list[str]:
    """Registers an operand names: ``width`` wide for a plain register; in an address by its own syntax
    (``[R8.64]`` two, ``desc[UR4]`` the 64-bit memory descriptor UR4:UR5)."""
    if "[" not in operand:
        m = _REG.search(operand)
        return _expand(m.group(1), width) if m else []
    return [r for m in _REG.finditer(operand)
            for r in _expand(m.group(1), 2 if m.group(2) or operand[:m.start()].endswith("desc[") else 1)]


def _is_pred(operand: str) -> bool:
    return bool(re.fullmatch(r"!?U?P[0-6T]", operand))


def _unmodelled(operands: list[str]) -> tuple[list[str], list[str]]:
    """An instruction we do not model: every register it names counts as written (a general register four
    wide, as a vector would be) and none as read; it can hide a finding but never make one."""
    return [], [r for o in operands for m in _REG.finditer(o) for r in _expand(m.group(1), 4)]


def _operands(opcode: str, operands: list[str]) -> tuple[list[str], list[str]]:
    """``(reads, writes)`` of one SASS instruction."""
    parts = opcode.split(".")
    base = parts[0][1:] if parts[0][0] == "U" and parts[0][1:] in _PLAIN | _NO_DEST else parts[0]
    if base in _WGMMA:
        return _wgmma(parts, operands)
    if base in _MMA:
        return _mma(parts, operands)
    if base in ("P2R", "R2P"):  # P2R Rd, PR, Ra, mask / R2P PR, Ra, mask: the predicates the mask selects
        preds = [f"P{i}" for i in range(7) if int(operands[-1], 16) >> i & 1]
        if base == "P2R":
            return _registers(operands[2]) + preds, _registers(operands[0])
        return _registers(operands[1]), preds
    if base not in _PLAIN | _NO_DEST or base in _CONVERSIONS and {"F64", "S64", "U64"} & set(parts):
        return _unmodelled(operands)
    width = next((_WIDTH[p] for p in parts[1:] if p in _WIDTH), 1)
    if base in ("LDSM", "STSM"):  # LDSM.16.M88.4: four 8x8 matrices, a register each
        width = int(parts[-1]) if parts[-1] in ("2", "4") else 1
    if base in _NO_DEST:
        dests = 0
    elif _is_pred(operands[0]):  # ISETP P0, P1, ...; SHFL PT, R3, ...; LOP3 P0, R3, ...; but FCHK P0, R2, R3
        dests = 1 if base == "FCHK" else 2
    elif base == "VOTE":  # VOTE.ANY R3, PT, P0
        dests = 2
    else:  # Rd, then any carry-out predicates: IADD3 R2, P0, P1, R4, ...
        dests = 1
        while dests < len(operands) and _is_pred(operands[dests]):
            dests += 1
    reads, writes = [], []
    for i, operand in enumerate(operands):
        w = width if base in _STORES or (base not in _MEMORY and width > 1) else 1  # STG.128 data, UIADD3.64
        if i == 0 and dests:
            w = 2 if base == "CS2R" and "32" not in parts or "WIDE" in parts else width
        if i == dests + 2 and "WIDE" in parts:  # IMAD.WIDE Rd, Ra, Rb, Rc: Rc is 64-bit
            w = 2
        (writes if i < dests else reads).extend(_registers(operand, w))
    if dests and _merges_into_itself(base, opcode, operands):
        reads = [r for r in reads if r not in writes]
    return reads, writes


def _merges_into_itself(base: str, opcode: str, operands: list[str]) -> bool:
    """An update of part of a register that leaves the rest in place: ``LOP3.LUT R8, R8, 0x8, RZ, 0xfc`` (set
    or clear bits by a constant), ``PRMT R5, R4, 0x7610, R5`` (replace bytes, the others stay where they are),
    ``F2FP...MERGE_C R5, R3, R2, R5`` (replace one half; C is the last operand). ptxas builds predicate masks
    and packed bytes so; keeping bits that nothing wrote yet is not a read of them."""
    dest = _registers(operands[0])
    if base == "LOP3":
        return {r for o in operands[1:4] for r in _registers(o)} == set(dest)
    if base == "PRMT" and re.fullmatch(r"0x[0-9a-f]+", operands[2]):
        a, c = _registers(operands[1]), _registers(operands[3])
        nibbles = [int(operands[2], 16) >> 4 * i & 0xF for i in range(4)]  # result byte i <- byte n of c:a
        return dest in (a, c) and all(n < 8 and ((a if n < 4 else c) != dest or n % 4 == i)
                                      for i, n in enumerate(nibbles))
    if base == "F2FP" and "MERGE_C" in opcode:
        others = {r for o in operands[1:-1] for r in _registers(o)}
        return _registers(operands[-1]) == dest and not others & set(dest)
    return False


def _wgmma(parts: list[str], operands: list[str]) -> tuple[list[str], list[str]]:
    """``HGMMA.64xNxK.F32 Rd, [Ra,] gdesc[URx], Rc|RZ [, !UPT|UPn] [, gsb0]``: the accumulator is M*N/128
    registers per thread (half that for F16); A in registers is 64xK bytes/128 threads = 4 registers; URx..URx+3
    hold A's and B's shared-memory descriptors (only B's, URx+2..URx+3, when A is in registers). The accumulator
    is read unless it is RZ or the scale-d predicate is ``!UPT``; under another predicate the read is
    conditional and not checked."""
    m, n, _ = (int(x) for x in parts[1].split("x"))
    acc = m * n // 128 // (2 if parts[2] == "F16" else 1)
    reads = []
    a_in_registers = not operands[1].startswith("gdesc")
    if a_in_registers:
        reads += _registers(operands[1], 4)
        operands = operands[:1] + operands[2:]
    reads += _expand(re.search(r"gdesc\[(UR\d+)\]", operands[1]).group(1), 4)[2 if a_in_registers else 0:]
    scale = next((o for o in operands[3:] if _is_pred(o)), "UPT")
    reads += _registers(scale)
    if scale == "UPT":
        reads += _registers(operands[2], acc)
    return reads, _registers(operands[0], acc)


def _mma(parts: list[str], operands: list[str]) -> tuple[list[str], list[str]]:
    """``HMMA.16816.F32[.BF16] Rd, Ra, Rb, Rc`` (m16n8kK per warp): per thread A is K*bytes/8 registers, B half
    that, C and D 4 (2 for an F16 accumulator)."""
    k = int(parts[1][3:]) if parts[1].startswith("168") and parts[1][3:].isdigit() else 0
    a = k * _ELEMENT_BYTES.get(parts[3] if len(parts) > 3 else "F16", 0) // 8
    if not a:
        return _unmodelled(operands)
    acc = 2 if parts[2] == "F16" else 4
    reads = _registers(operands[1], a) + _registers(operands[2], a // 2) + _registers(operands[3], acc)
    return reads, _registers(operands[0], acc)


def _sass_ops(function: str) -> tuple[list[_Op], dict[str, int]]:
    ops: list[_Op] = []
    labels: dict[str, int] = {}
    source = None
    for line in function.splitlines():
        if m := _SASS_LINE.search(line):
            source = int(m.group(1))
            continue
        if m := _SASS_LABEL.match(line):
            labels[m.group(1)] = len(ops)
        if not (m := _SASS_INSTR.search(line)):
            continue
        addr, guard, opcode, args = int(m.group(1), 16), m.group(2), m.group(3), m.group(4)
        if guard in ("!PT", "!UPT"):  # never executes
            continue
        guard = None if guard in ("PT", "UPT") else guard
        operands = [o.strip() for o in args.split(",")] if args else []
        reads, writes = _operands(opcode, operands)
        op = _Op(addr, opcode, " ".join(m.group(0).split("*/", 1)[1].split()), guard,
                 reads + ([guard.lstrip("!")] if guard else []), writes, line=source)
        if d := re.search(r"gdesc\[(UR\d+)\]", args):
            op.descriptors = [r for r in reads if r in _expand(d.group(1), 4)]
        base = opcode.split(".")[0]
        if base == "BRA":
            t = _TARGET.search(operands[-1]) if operands else None
            op.flow, op.target = ("branch", t.group(1) or t.group(2)) if t else ("opaque", None)
            op.conditional = bool(guard or {"DIV", "CONV"} & set(opcode.split("."))
                                  or any(_is_pred(o) and o.lstrip("!") not in _SASS_CONSTANT for o in operands))
        elif base in ("BRX", "JMX"):
            op.flow, op.conditional = "opaque", bool(guard)
        elif base in ("EXIT", "RET", "KILL"):
            op.flow, op.conditional = "end", bool(guard)
        elif base == "CALL":
            op.flow = "clobber"
        ops.append(op)
    at = {op.addr: i for i, op in enumerate(ops)}  # cuobjdump prints branch targets as addresses
    labels |= {op.target: at[int(op.target, 16)] for op in ops
               if op.target and op.target.startswith("0x") and int(op.target, 16) in at}
    return ops, labels


def _kind(ops: list[_Op], labels: dict[str, int], i: int, reg: str) -> str:
    op = ops[i]
    base = op.opcode.split(".")[0]
    base = base[1:] if base[0] == "U" and base[1:] in _INTEGER_ADDS else base
    if reg in op.descriptors:
        return "descriptor"
    if base == "F2FP":
        return "conversion"
    if base in _INTEGER_ADDS:
        if _reaches_descriptor(ops, labels, i):
            return "descriptor base"
        if reg in op.writes:
            return "self add"
    return ""


def uninitialised_reads(sass: str, ptx: str | None = None) -> list[Finding]:
    """Every read of a register that is not written on every path from the kernel's entry to it, in SASS as
    ``nvdisasm -g -c`` (or ``cuobjdump -sass``) prints it; each function on its own.

    With the kernel's ``ptx`` (and SASS line info), a byte permute (PRMT) of no dangerous kind, compiled from a
    source line where the PTX permutes or packs an LLVM ``undef``, has kind ``"undef"`` too: the don't-care lane of
    a byte vector that LLVM fills later (``prmt ... %undef, 0x3340`` then ``prmt ..., 0x5210`` replaces it), to
    which ptxas gave a register that is written elsewhere."""
    findings, permutes = [], []
    for function in _SASS_FUNCTION.split(sass):
        ops, labels = _sass_ops(function)
        for i, reg in _undefined_reads(ops, labels, lambda r: r in _SASS_CONSTANT):
            op = ops[i]
            kind = _kind(ops, labels, i, reg)
            if not kind and not any(reg in other.writes for j, other in enumerate(ops) if j != i):
                kind = "undef"  # no other instruction writes it: a PTX undef (a don't-care value) kept as is
            findings.append(Finding(op.addr, op.opcode, reg, op.text, kind))
            if not kind and op.opcode.split(".")[0] in ("PRMT", "UPRMT"):
                permutes.append((len(findings) - 1, op.line))
    if permutes and ptx:
        undef_lines = _ptx_undef_lines(ptx)
        for n, line in permutes:
            if line in undef_lines:
                findings[n] = dataclasses.replace(findings[n], kind="undef")
    return findings


def _ptx_undef_lines(ptx: str) -> set[int]:
    """Source lines (``.loc``) of PTX permutes and packs that read an LLVM undef."""
    loc, source = {}, None
    for lineno, text in enumerate(ptx.splitlines(), 1):
        if m := _PTX_LOC.match(text):
            source = int(m.group(1))
        loc[lineno] = source
    return {loc[f.addr] for f in ptx_undefined_reads(ptx)
            if f.kind == "undef" and f.opcode.split(".")[0] in ("prmt", "mov", "cvt")}


# ---- PTX ------------------------------------------------------------------------------------------------------

_PTX_ENTRY = re.compile(r"\.(?:entry|func)\b")
_PTX_LABEL = re.compile(r"([$\w]+):")
_PTX_INSTR = re.compile(r"(?:@(!?[%$\w]+)\s+)?([a-z][\w.:]*)\s*(.*)", re.S)
_PTX_NAME = re.compile(r"%?[A-Za-z_$][\w$]*")
_PTX_NO_DEST = {"st", "red", "bar", "barrier", "membar", "fence", "bra", "brx", "ret", "exit", "trap", "call",
                "prefetch", "prefetchu", "cp", "stmatrix", "griddepcontrol"}


class _Scopes:
    """PTX register declarations by block: ``.reg .b32 %r<12>;`` declares %r0..%r11, ``.reg .pred p;`` one
    name. A name declared in a nested ``{ }`` (inline assembly) is tagged with its block, so it never aliases
    an outer register of the same name."""

    def __init__(self):
        self.stack: list[dict[str, str]] = []  # per open block: name (or "prefix<>" for a range) -> tag
        self.blocks = 0

    def push(self) -> None:
        self.stack.append({})
        self.blocks += 1

    def declare(self, names: str) -> None:
        tag = "" if len(self.stack) == 1 else f"@{self.blocks}"
        for name in (n.strip() for n in names.split(",")):
            m = re.fullmatch(r"(\S+)<\d+>", name)
            self.stack[-1][m.group(1) + "<>" if m else name] = tag

    def resolve(self, token: str) -> str | None:
        m = re.fullmatch(r"(.*?)\d+", token)
        for scope in reversed(self.stack):
            for key in (token, m and m.group(1) + "<>"):
                if key in scope:
                    return token + scope[key]
        return None


def _split_operands(args: str) -> list[str]:
    """Comma-separated operands, keeping ``{%r1, %r2}`` and ``[%rd1+8]`` whole."""
    out, depth, start = [], 0, 0
    for i, c in enumerate(args):
        depth += (c in "{[") - (c in "}]")
        if c == "," and depth == 0:
            out.append(args[start:i].strip())
            start = i + 1
    return out + [args[start:].strip()] if args.strip() else out


def _ptx_op(lineno: int, statement: str, scopes: _Scopes) -> _Op:
    guard, opcode, args = _PTX_INSTR.fullmatch(statement).groups()
    if guard:
        resolved = scopes.resolve(guard.lstrip("!"))
        guard = resolved and ("!" if guard[0] == "!" else "") + resolved
    operands = _split_operands(args)

    def registers(operands: list[str]) -> list[str]:  # names that are no declared register are not tracked
        return [r for o in operands for t in _PTX_NAME.findall(o) if (r := scopes.resolve(t))]

    root = opcode.split(".")[0]
    dests = 0 if root in _PTX_NO_DEST or not operands or operands[0].startswith("[") else 1
    sources = operands[dests:]
    if opcode.startswith("wgmma.mma_async") and sources[2] != "0" and not registers(sources[2:3]):
        sources = operands  # d, a, b, scale-d: d is read too unless scale-d is 0 (or a predicate: not checked)
    op = _Op(lineno, opcode, " ".join(statement.split()), guard,
             registers(sources) + ([guard.lstrip("!")] if guard else []), registers(operands[:dests]))
    if root in ("bra", "brx"):
        op.flow, op.target = ("branch", operands[-1]) if root == "bra" else ("opaque", None)
        op.conditional = guard is not None
    elif root in ("ret", "exit", "trap"):
        op.flow, op.conditional = "end", guard is not None
    return op


def _ptx_functions(ptx: str):
    """``(ops, labels)`` of each ``.entry`` / ``.func`` body."""
    header, scopes, ops, labels, pending = False, _Scopes(), [], {}, ""
    for lineno, line in enumerate(ptx.splitlines(), 1):
        rest = line.split("//")[0].strip()
        if not scopes.stack:
            header = header or bool(_PTX_ENTRY.search(rest))
            if not (header and rest.startswith("{")):
                continue
        rest, pending = (pending + " " + rest).strip(), ""
        while rest:
            if rest[0] == "{":
                scopes.push()
                rest = rest[1:].strip()
            elif rest[0] == "}":
                scopes.stack.pop()
                rest = rest[1:].strip()
                if not scopes.stack:  # the function's closing brace
                    yield ops, labels
                    header, scopes, ops, labels = False, _Scopes(), [], {}
                    break
            elif m := _PTX_LABEL.match(rest):
                labels[m.group(1)] = len(ops)
                rest = rest[m.end():].strip()
            elif ";" not in rest:  # .loc and other directives end with the line; a statement goes on
                pending = "" if rest.startswith(".") else rest
                break
            else:
                statement, _, rest = (x.strip() for x in rest.partition(";"))
                if statement.startswith(".reg"):
                    scopes.declare(re.sub(r"^\.reg\s+(\.v\d+\s+)?\.\w+\s+", "", statement))
                elif statement and not statement.startswith("."):
                    ops.append(_ptx_op(lineno, statement, scopes))


def ptx_undefined_reads(ptx: str) -> list[Finding]:
    """Every read of a virtual register not written on every path from its function's entry (a parameter is
    written once ``ld.param`` loads it); ``addr`` is the line. Kind ``"undef"``: the function writes that
    register nowhere, which is how LLVM spells ``undef`` (a don't-care value, e.g. the unused half of a pack)."""
    findings = []
    for ops, labels in _ptx_functions(ptx):
        written = {r for op in ops for r in op.writes}
        findings += [Finding(ops[i].addr, ops[i].opcode, reg, ops[i].text, "" if reg in written else "undef")
                     for i, reg in _undefined_reads(ops, labels, lambda r: False)]
    return findings


def main(argv: list[str] | None = None) -> int:
    """``python bench/sass_dataflow.py FILE.sass|FILE.ptx ...``: print the findings; exit 1 if any (in PTX, any
    that is not an LLVM undef)."""
    failed = False
    for name in argv if argv is not None else sys.argv[1:]:
        text = Path(name).read_text()
        ptx = name.endswith(".ptx")
        findings = ptx_undefined_reads(text) if ptx else uninitialised_reads(text)
        bad = [f for f in findings if f.kind != "undef"]
        failed |= bool(bad)
        print(f"{name}: {len(bad)} read(s) of unwritten registers" + (f", {len(dangerous(bad))} dangerous"
              if not ptx else f", {len(findings) - len(bad)} LLVM undef"))
        for f in findings:
            where = f"line {f.addr}" if ptx else f"/*{f.addr:04x}*/"
            print(f"  {where}  {f.register:7} {f.kind or '-':15} {f.text}")
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())

"""The read-before-write check of ``bench/sass_dataflow.py`` on short SASS and PTX texts. The instruction lines
are copied from kernels compiled for sm_90a (``nvdisasm -g -c``), some renumbered to make a small program."""
from __future__ import annotations

from bench.sass_dataflow import dangerous, main, ptx_undefined_reads, uninitialised_reads

HEADER = """\
//--------------------- .text.cached_pv_kernel    --------------------------
\t.section\t.text.cached_pv_kernel,"ax",@progbits
cached_pv_kernel:
.text.cached_pv_kernel:
\t//## File "triton_kernels.py", line 165
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   S2R R52, SR_TID.X ;
        /*0020*/                   ULDC.64 UR60, c[0x0][0x208] ;
"""


def found(sass: str) -> list[tuple[int, str]]:
    return [(f.addr, f.register) for f in uninitialised_reads(HEADER + sass)]


def test_a_descriptor_base_incremented_before_anything_set_it():
    """Triton 3.6's one-stage cached_pv on sm_90a: UR40:UR41 is advanced, then copied into the B descriptors the
    wgmma reads, but nothing set it first."""
    sass = """\
        /*0af0*/                   UIADD3 UR40, UP0, UR40, 0x20, URZ ;
        /*0b30*/                   USGXT.U32 UR56, UR60, 0xe ;
        /*0bf0*/                   UIADD3.X UR41, UR41, -0x3ffffff0, URZ, UP0, !UPT ;
        /*0d40*/                   UIADD3 UR38, UP2, UR40, 0x40, URZ ;
        /*0e90*/                   UIADD3.X UR39, UR41, URZ, URZ, UP2, !UPT ;
        /*1000*/                   UMOV UR57, 0x40000040 ;
        /*2210*/                   UMOV UR36, UR56 ;
        /*2220*/                   UMOV UR37, UR57 ;
        /*2230*/                   HGMMA.64x16x16.F32 R40, gdesc[UR36].tnspB, RZ, !UPT ;
"""
    findings = uninitialised_reads(HEADER + sass)
    assert [(f.addr, f.register, f.kind) for f in findings] == [
        (0x0AF0, "UR40", "descriptor base"), (0x0BF0, "UR41", "descriptor base")]
    assert findings[0].text == "UIADD3 UR40, UP0, UR40, 0x20, URZ ;" and dangerous(findings) == findings


def test_an_accumulating_add_on_an_unset_register_is_dangerous_even_away_from_descriptors():
    findings = uninitialised_reads(HEADER + "        /*0680*/                   IADD3 R12, P1, R12, 0x20, RZ ;\n")
    assert [(f.register, f.kind) for f in findings] == [("R12", "self add")]


LOOP = """\
        /*1690*/                   {init}
.L_x_2:
        /*16a0*/                   F2FP.F16.E5M2.UNPACK_B R194, R172 ;
        /*16b0*/                   HADD2.F32 R25, -RZ, R194.H0_H0 ;
        /*2a70*/                   LOP3.LUT R4, R52, 0xff, RZ, 0xc0, !PT ;
        /*2a80*/                   PRMT R172, R4, 0x7610, R172 ;
        /*2a90*/                   ISETP.NE.AND P3, PT, R4, RZ, PT ;
        /*2aa0*/               @P3 BRA `(.L_x_2) ;
        /*2ab0*/                   EXIT ;
"""


def test_a_loop_head_that_reads_what_the_body_writes_later():
    """Triton 3.6's 4-bit capture: the conversion was hoisted to the loop head, so the first iteration reads a
    register the body only writes further down. The PRMT that writes it keeps its upper half in place: a
    partial write, not a read."""
    findings = uninitialised_reads(HEADER + LOOP.format(init="NOP ;"))
    assert [(f.addr, f.register, f.kind) for f in findings] == [(0x16A0, "R172", "conversion")]


def test_a_write_before_the_loop_makes_it_clean():
    assert found(LOOP.format(init="IMAD.MOV.U32 R172, RZ, RZ, RZ ;")) == []


def test_a_write_on_one_branch_only_is_not_enough():
    sass = """\
        /*06d0*/                   ISETP.NE.AND P3, PT, R52, RZ, PT ;
        /*06e0*/               @P3 BRA `(.L_x_0) ;
        /*06f0*/                   IMAD.SHL.U32 R117, R52, 0x10, RZ ;
        /*0700*/                   BRA `(.L_x_1) ;
.L_x_0:
        /*0710*/                   IMAD.SHL.U32 R117, R52, 0x20, RZ ;
.L_x_1:
        /*0720*/                   LOP3.LUT R115, R117, 0x70, RZ, 0xc0, !PT ;
"""
    assert found(sass) == []
    assert found(sass.replace("IMAD.SHL.U32 R117, R52, 0x20, RZ", "NOP")) == [(0x0720, "R117")]


def test_a_predicated_write_counts_only_under_its_predicate():
    load = """\
        /*1660*/                   ISETP.LT.U32.AND P5, PT, R52, 0x40, PT ;
        /*1670*/                   IMAD.WIDE.U32 R38, R52, 0x10, RZ ;
        /*17a0*/               @P5 LDG.E.128 R28, desc[UR60][R38.64] ;
"""
    store = "        /*1eb0*/               {guard}STS.128 [R52+0x4800], R28 ;\n"
    assert found(load + store.format(guard="")) == [(0x1EB0, f"R{r}") for r in range(28, 32)]
    assert found(load + store.format(guard="@P5 ")) == []
    assert found(load + store.format(guard="@!P5 ")) == [(0x1EB0, f"R{r}") for r in range(28, 32)]
    both = ("        /*17b0*/              @!P5 CS2R R28, SRZ ;\n"
            "        /*17c0*/              @!P5 CS2R R30, SRZ ;\n")
    assert found(load + both + store.format(guard="")) == []
    redefined = "        /*17d0*/                   ISETP.GE.AND P5, PT, R52, 0x8, PT ;\n"  # P5 no longer says so
    assert found(load + redefined + store.format(guard="@P5 ")) == [(0x1EB0, f"R{r}") for r in range(28, 32)]


def test_register_widths():
    sass = """\
        /*0090*/                   LDC.64 R10, c[0x0][0x218] ;
        /*00b0*/                   IMAD.WIDE.U32 R148, R52, 0x40, RZ ;
        /*00e0*/                   CS2R R124, SRZ ;
        /*0100*/                   LDG.E.128 R24, desc[UR60][R10.64] ;
        /*0110*/                   LDSM.16.M88.4 R8, [R52+UR60] ;
        /*0120*/                   FADD R2, R11, R149 ;
        /*0130*/                   FADD R3, R125, R27 ;
        /*0140*/                   FADD R4, R8, R11 ;
        /*0150*/                   STG.E.128 desc[UR60][R148.64], R8 ;
        /*0160*/                   IMAD.WIDE.U32 R8, R15, 0x10, R4 ;
        /*0170*/                   FADD R5, R28, R12 ;
        /*0180*/                   STG.E.64 desc[UR60][R20.64], R5 ;
"""
    # R8..R11 from LDSM.x4, R24..R27 from LDG.128, pairs from LDC.64, IMAD.WIDE and CS2R; IMAD.WIDE adds the pair
    # R4:R5; [R20.64] is a pair, desc[UR60] is UR60:UR61 and STG.64 stores R5:R6
    assert found(sass) == [(0x0160, "R15"), (0x0160, "R5"), (0x0170, "R28"), (0x0170, "R12"),
                           (0x0180, "R20"), (0x0180, "R21"), (0x0180, "R6")]


def test_wgmma_descriptors_and_accumulators():
    sass = """\
        /*1e00*/                   USGXT.U32 UR56, UR60, 0xe ;
        /*1e10*/                   UMOV UR57, 0x40000040 ;
        /*1f30*/                   HGMMA.64x32x16.F32 R24, gdesc[UR56].tnspB, RZ, !UPT ;
        /*1f34*/                   UMOV UR58, UR56 ;
        /*1f38*/                   UMOV UR59, 0x80000020 ;
        /*1f40*/                   HGMMA.64x32x16.F32 R24, gdesc[UR56].tnspB, R24 ;
        /*1f50*/                   FADD R0, R39, R40 ;
        /*1f60*/                   HGMMA.64x16x16.F32 R88, R24, gdesc[UR28].tnspB, R88 ;
        /*1f70*/                   UISETP.NE.AND UP0, UPT, UR60, URZ, UPT ;
        /*1f80*/                   HGMMA.64x16x16.F32 R104, gdesc[UR56].tnspB, R104, UP0 ;
        /*1f90*/                   HGMMA.64x16x16.F32 R120, gdesc[UR56].tnspB, R120, !UPT ;
"""
    # gdesc[UR56] is A's descriptor UR56:UR57 and B's UR58:UR59; the 64x32 F32 accumulator R24..R39 is written by
    # the first wgmma (RZ, !UPT: not read) and read by the second; with A in registers (R24..R27) only B's
    # descriptor UR30:UR31 is read, and a 64x16 accumulator is R88..R95; under a scale-d predicate the
    # accumulator is read only if it holds (not checked), under !UPT never
    assert found(sass) == [(0x1F30, "UR58"), (0x1F30, "UR59"), (0x1F50, "R40"), (0x1F60, "UR30"),
                           (0x1F60, "UR31"), *((0x1F60, f"R{r}") for r in range(88, 96))]
    assert uninitialised_reads(HEADER + sass)[0].kind == "descriptor"


def test_zero_registers_and_true_predicates_are_never_unset():
    sass = """\
        /*0040*/                   IMAD.MOV.U32 R128, RZ, RZ, RZ ;
        /*0050*/                   USHF.R.S32.HI UR4, URZ, 0x1f, UR61 ;
        /*0060*/                   ISETP.GE.AND P3, PT, R128, UR4, PT ;
        /*0070*/                   PLOP3.LUT P1, PT, PT, PT, UPT, 0x80, 0x0 ;
        /*0080*/                   SEL R2, RZ, 0x1, !P3 ;
        /*0090*/                   UIADD3.X UR5, URZ, URZ, URZ, UPT, !UPT ;
"""
    assert found(sass) == []


def test_undef_registers_and_unknown_opcodes_do_not_fail_the_check(tmp_path):
    sass = HEADER + """\
        /*0ac0*/                   PRMT R183, R183, 0x3340, R183 ;
        /*0ad0*/                   FOOBAR R4, R60 ;
        /*0ae0*/                   FADD R8, R7, R4 ;
"""
    # no other instruction writes R183: ptxas's image of a PTX undef; FOOBAR is not modelled, so it reads nothing
    # and writes R4..R7 (and R60..R63)
    assert [(f.register, f.kind) for f in uninitialised_reads(sass)] == [("R183", "undef")]
    (tmp_path / "undef.sass").write_text(sass)
    (tmp_path / "bad.sass").write_text(HEADER + LOOP.format(init="NOP ;"))
    assert main([str(tmp_path / "undef.sass")]) == 0
    assert main([str(tmp_path / "undef.sass"), str(tmp_path / "bad.sass")]) == 1


PTX = """\
.visible .entry cached_pv_kernel(
\t.param .u64 .ptr .global .align 1 cached_pv_kernel_param_0,
\t.param .u32 cached_pv_kernel_param_1
)
.reqntid 128
{
\t.reg .pred \t%p<4>;
\t.reg .b32 \t%r<16>;
\t.reg .b64 \t%rd<8>;
\t.loc\t1 165 0                         // triton_kernels.py:165:0
// %bb.0:
\tld.param.b64 \t%rd1, [cached_pv_kernel_param_0];
\tld.param.b32 \t%r1, [cached_pv_kernel_param_1];
\tmov.u32 \t%r2, %tid.x;
\tsetp.lt.s32 \t%p1, %r2, %r1;
\tmov.b32 \t%r3, 0;
\t@%p1 bra \t$L__BB0_2;
// %bb.1:
\tmul.wide.s32 \t%rd2, %r2, 4;
\tadd.s64 \t%rd3, %rd1, %rd2;
\t// begin inline asm
\tmov.u32 %r4, 0x0;
\t@%p1 ld.global.b32 { %r4 }, [ %rd3 + 0 ];
\t// end inline asm
\tmov.b32 \t%r3, %r4;
$L__BB0_2:                              // %__nv_exp2f.exit
\tadd.s32 \t%r5, %r3, %r1;
\t{
\t.reg .pred %p2;
\tsetp.ne.b32 %p2, %r5, 0;
\tselp.b32 %r6, 1, 0, %p2;
\t}
\tst.global.v2.b32 \t[ %rd1 + 0 ], { %r5, %r6 };
\tret;
}
"""


def test_ptx_of_a_clean_kernel():
    """Parameters are written by ld.param, a predicated load preceded by its default is written, both paths
    into $L__BB0_2 write %r3, and the inline-assembly block writes the %p2 it declares."""
    assert ptx_undefined_reads(PTX) == []


def test_ptx_reads_before_writes():
    broken = PTX.replace("\tmov.b32 \t%r3, 0;\n", "").replace("\tmov.u32 %r4, 0x0;\n", "")
    broken = broken.replace("\t.reg .b64", "\t.reg .b16 \t%rs<3>;\n\t.reg .b64")
    broken = broken.replace("\tret;", "\tselp.b32 \t%r7, 1, 0, %p2;\n\tmov.b32 \t%r8, {%rs1, %rs2};\n\tret;")
    findings = ptx_undefined_reads(broken)
    # %r4 is written under %p1 only and %r3 on one path only; the kernel's %p2 (not the block's), %rs1 and %rs2
    # are written nowhere: LLVM's undef
    assert [(f.register, f.kind) for f in findings] == [
        ("%r4", ""), ("%r3", ""), ("%p2", "undef"), ("%rs1", "undef"), ("%rs2", "undef")]
    assert broken.splitlines()[findings[0].addr - 1] == "\tmov.b32 \t%r3, %r4;"

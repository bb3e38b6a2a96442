"""jobs/ncu_roles.py on a small source-page CSV of the shape `ncu --page source --csv --print-source
sass` writes: the roles split at each setmaxnreg, the counts per opcode, group and wavefront
exact, a second kernel's rows left out, and a report without the source counters refused by name."""
import csv
import subprocess
import sys
from pathlib import Path

JOB = Path(__file__).resolve().parents[2] / "jobs" / "ncu_roles.py"
HEAD = ["Address", "Source", "Warp Stall Sampling (All Samples)", "Warp Stall Sampling (Not-issued Samples)",
        "Instructions Executed", "L1 Wavefronts Shared"]


def write(path, blocks, head=HEAD):
    """blocks: [(kernel name, [(sass, instructions, samples, wavefronts)])]"""
    with open(path, "w", newline="") as f:
        w = csv.writer(f, quoting=csv.QUOTE_ALL)
        for name, rows in blocks:
            w.writerow(["Kernel Name", name])
            w.writerow(head)
            for i, (sass, n, s, wf) in enumerate(rows):
                w.writerow([hex(0x1000 + 16 * i), f"      {sass}", str(s), "0", f"{n:,}", str(wf)][:len(head)])


def run(*args):
    return subprocess.run([sys.executable, str(JOB), *map(str, args)], capture_output=True, text=True, timeout=60)


def test_roles_split_at_setmaxnreg_with_exact_counts(tmp_path):
    rows = [("LDC R1, c[0x0][0x28]", 1584, 3, 0),
            ("USETMAXREG.TRY_ALLOC.CTAPOOL UP0, 0xf0", 1000, 1, 0),  # consumers from here
            ("HGMMA.64x64x16.F32 R184, gdesc[UR20], RZ, !UPT", 2_000_000, 40, 16_000_000),
            ("@P0   FMUL R0, R0, UR18", 3_000_000, 7, 0),
            ("UIADD3 UR20, UR31, 0x2, URZ", 5_000_000, 2, 0),
            ("R2UR UR19, R0", 1_000_000, 0, 0),
            ("F2I.NTZ R9, R9", 1_500_000, 5, 0),
            ("USETMAXREG.DEALLOC.CTAPOOL 0x18", 4096, 0, 0),  # the loader from here
            ("LDGSTS.E.BYPASS.128 [R7], desc[UR8][R4.64]", 2_500_000, 9, 2_500_000),
            ("@!P0  BRA 0x7f8d93ce9830", 4_000_000, 11, 0)]
    other = [("USETMAXREG.DEALLOC.CTAPOOL 0x18", 7, 0, 0), ("FMUL R0, R0, R1", 9_999_999, 99, 0)]
    path = tmp_path / "k.csv"
    write(path, [("kernel_a", rows), ("kernel_b", other)])
    r = run(path, "--top", 3)
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    total = sum(x[1] for x in rows)
    assert out[0] == f"== {path}: {total / 1e6:.1f} M warp instructions, 78 stall samples"
    roles = [line for line in out if line.startswith("  role at")]
    assert roles == ["  role at SASS line 0 (LDC): 0.0 M instructions, 3 samples",
                     "  role at SASS line 1 (USETMAXREG.TRY_ALLOC.CTAPOOL): 12.5 M instructions, 55 samples",
                     "  role at SASS line 7 (USETMAXREG.DEALLOC.CTAPOOL): 6.5 M instructions, 20 samples"]
    consumers = out[out.index(roles[1]) + 1:out.index(roles[2])]
    assert consumers[0] == "    opcodes (M): UIADD3 5.0, FMUL 3.0, HGMMA 2.0"
    assert "uniform datapath 6.0" in consumers[1] and "conversions to integer (F2I) 1.5" in consumers[1]
    assert "softmax arithmetic (FMUL, FFMA, FADD, MUFU, F2FP) 3.0" in consumers[1] and "HGMMA 2.0" in consumers[1]
    assert consumers[2] == "    shared wavefronts (M): HGMMA.64x64x16.F32 16.0"
    loader = out[out.index(roles[2]) + 1:]
    assert loader[0] == "    opcodes (M): BRA 4.0, LDGSTS 2.5, USETMAXREG 0.0"
    assert loader[2] == "    shared wavefronts (M): LDGSTS.E.BYPASS.128 2.5"
    assert "9999999" not in r.stdout and "10.0" not in r.stdout  # kernel_b's rows are not counted


def test_a_report_without_source_counters_is_refused_by_name(tmp_path):
    path = tmp_path / "bare.csv"
    write(path, [("kernel_a", [("FMUL R0, R0, R1", 10, 0, 0)])], head=HEAD[:3])
    r = run(path)
    assert r.returncode != 0
    assert "Instructions Executed" in r.stderr and "--section SourceCounters" in r.stderr

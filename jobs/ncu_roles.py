"""Where a warp-specialised kernel's instructions go, per warp role, from Nsight Compute's source
counters: one profiled launch's SASS with the warp instructions executed, the stall samples and
the shared-memory wavefronts of each instruction, split where a role begins (each `setmaxnreg`,
USETMAXREG in SASS: a loader's dec, the consumers' inc). Per role: its instructions and stall
samples, the opcodes that issue most, the opcode groups below, and the shared-memory wavefronts by
opcode (the wgmma operands read from shared memory count under HGMMA). Reports named together are
printed one after another, e.g. our kernel and cuDNN's.

    ncu --clock-control none --section SourceCounters -k regex:attend_bwd_fused --launch-skip 3 -c 1 \\
        -o fixed python3 jobs/bwd_once.py causal:16384:128
    ncu -i fixed.ncu-rep --page source --csv --print-source sass > fixed.csv
    python3 jobs/ncu_roles.py fixed.csv [cudnn.csv] [--top 12]
"""
import argparse
import collections
import csv
import sys

GROUPS = {  # opcode (before its first dot) -> group, for the comparisons in docs/benchmarks-log.md
    "uniform datapath": lambda op: op.startswith("U") or op in ("R2UR", "S2UR"),
    "integer, predicates, branches": lambda op: op in ("ISETP", "LOP3", "SEL", "IADD3", "PLOP3", "BRA"),
    "IMAD, VIADD, LEA, SHF, MOV": lambda op: op in ("IMAD", "VIADD", "LEA", "SHF", "MOV"),
    "softmax arithmetic (FMUL, FFMA, FADD, MUFU, F2FP)": lambda op: op in ("FMUL", "FFMA", "FADD", "MUFU", "F2FP"),
    "FSEL, FSETP": lambda op: op in ("FSEL", "FSETP"),
    "conversions to integer (F2I)": lambda op: op == "F2I",
    "shared loads and stores (LDS, STS, STSM)": lambda op: op in ("LDS", "STS", "STSM"),
    "HGMMA": lambda op: op == "HGMMA",
}


def read(path):
    """[(opcode with its modifiers, warp instructions, stall samples, shared wavefronts)] of the
    first kernel in an `ncu --page source --csv --print-source sass` file, in address order."""
    with open(path, newline="") as f:
        table = list(csv.reader(f))
    start = next((i for i, row in enumerate(table) if row and row[0] == "Address"), None)
    if start is None:
        sys.exit(f"{path}: no 'Address' header (not the source page of an ncu report?)")
    head = table[start]
    try:
        col = [head.index(c) for c in ("Source", "Instructions Executed", "Warp Stall Sampling (All Samples)",
                                       "L1 Wavefronts Shared")]
    except ValueError as e:
        sys.exit(f"{path}: {e} (profile with --section SourceCounters)")
    rows = []
    for row in table[start + 1:]:
        if not row or row[0] in ("Kernel Name", "Address"):
            break  # the next kernel's block
        words = row[col[0]].split()
        if not words:
            continue
        op = words[1] if words[0].startswith("@") else words[0]
        rows.append((op,) + tuple(int(row[c].replace(",", "") or 0) for c in col[1:]))
    return rows


def roles(rows):
    """[(first, end)] index ranges of rows: one before the first USETMAXREG, one from each."""
    cuts = [0] + [i for i, r in enumerate(rows) if r[0].startswith("USETMAXREG")] + [len(rows)]
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def tally(rows):
    """(instructions, samples, {opcode: instructions}, {group: instructions}, {opcode: wavefronts})."""
    ops, waves = collections.Counter(), collections.Counter()
    for op, n, _, w in rows:
        ops[op.split(".")[0]] += n
        if w:
            waves[op] += w
    groups = {g: sum(n for op, n in ops.items() if test(op)) for g, test in GROUPS.items()}
    return sum(r[1] for r in rows), sum(r[2] for r in rows), ops, groups, waves


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reports", nargs="+", help="CSV files of `ncu -i REPORT --page source --csv --print-source sass`")
    ap.add_argument("--top", type=int, default=12, help="opcodes listed per role")
    a = ap.parse_args()
    for path in a.reports:
        rows = read(path)
        total = sum(r[1] for r in rows)
        print(f"== {path}: {total / 1e6:.1f} M warp instructions, {sum(r[2] for r in rows)} stall samples")
        for first, end in roles(rows):
            n, samples, ops, groups, waves = tally(rows[first:end])
            if not n:
                continue
            print(f"  role at SASS line {first} ({rows[first][0]}): {n / 1e6:.1f} M instructions, {samples} samples")
            print("    opcodes (M): " + ", ".join(f"{op} {v / 1e6:.1f}" for op, v in ops.most_common(a.top)))
            print("    groups (M): " + ", ".join(f"{g} {v / 1e6:.1f}" for g, v in groups.items() if v))
            if waves:
                print("    shared wavefronts (M): " + ", ".join(f"{op} {v / 1e6:.1f}"
                                                           for op, v in waves.most_common(a.top)))


if __name__ == "__main__":
    main()

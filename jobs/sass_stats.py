"""What the compiler made of the Hopper kernels, without a GPU: per kernel of a source (every name
expression gpu/loader.py builds, or those matching --match), ptxas' registers, stack and spill bytes,
the register hand-off of warp-specialised kernels (setmaxnreg dec/inc: loader/consumers, '!' where
they ask for more than the block got at launch: it would spin there), and from the SASS the
instructions, the HGMMAs, the local-memory accesses (LDL/STL: all, and the register spills and
refills among them between the first and the last HGMMA, i.e. in the tile loop), the GPU-scope
fences (MEMBAR.SC.GPU, MEMBAR.ALL.GPU), and the order of the wgmma waits and the exponentials
(W1, W0: wgmma.wait_group 1, 0; E n: n MUFU.EX2 in a row; offline.waits_and_exps).
--base REV builds the same names from REV's kernels/ and says per kernel whether the SASS is the same
opcode for opcode (registers aside): a change meant to leave a kernel alone is checked that way.

    python3 jobs/sass_stats.py [--source attend_bwd_fused.cu] [--match REGEX] [--base REV]

Needs nvcc (CUDA 12.8+ for sm_90a) and nvdisasm (the CUDA toolkit's, or `pip install
nvidia-cuda-nvdisasm`). Compiles with the flags of tests/gpu/test_gpu_build.py.
"""
import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hpcattn.gpu import loader, offline  # noqa: E402
from hpcattn.gpu.offline import opcodes, register_handoff, waits_and_exps  # noqa: E402


def tool(name):
    found = offline.find_tool(name)
    if found is None:
        sys.exit(f"{name} not found (CUDA toolkit, or pip install nvidia-cuda-{name})")
    return found


def build(kernel_dir, source, names, work):
    """{demangled kernel: (ptxas properties, SASS instruction lines)} of `names` in kernel_dir/source."""
    unit = Path(work) / f"unit_{abs(hash((str(kernel_dir), source)))}.cu"
    refs = ", ".join(f"(void*)&{n}" for n in names)
    unit.write_text(f'#include "{kernel_dir / source}"\nvoid* hpcattn_kernels[] = {{{refs}}};\n')
    cubin = unit.with_suffix(".cubin")
    arch = "-gencode=arch=compute_90a,code=sm_90a" if source in loader.SM90A else "-arch=sm_90"
    out = subprocess.run([tool("nvcc"), arch, "-std=c++17", f"-I{kernel_dir}", "-cubin", "-Xptxas", "-v",
                          str(unit), "-o", str(cubin)], capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"nvcc failed on {kernel_dir / source}:\n{out.stderr[-3000:]}")
    props, current = {}, None
    for line in out.stderr.splitlines():
        m = re.search(r"(?:Compiling entry function|Function properties for) '?(_Z\w+)", line)
        if m:
            current = m.group(1)
        for key, pat in (("stack", r"(\d+) bytes stack frame"), ("spill st", r"(\d+) bytes spill stores"),
                         ("spill ld", r"(\d+) bytes spill loads"), ("regs", r"Used (\d+) registers")):
            m = re.search(pat, line)
            if m and current:
                props.setdefault(current, {})[key] = int(m.group(1))
    code = offline.sass(cubin.read_bytes(), tool("nvdisasm"))
    names = subprocess.run(["c++filt"], input="\n".join(code), capture_output=True, text=True).stdout.split("\n")
    return {re.sub(r"\(.*", "", d): (props.get(m, {}), code[m]) for m, d in zip(code, names)}


def handoff(name, regs, lines):
    """'dec/inc' of a warp-specialised kernel's setmaxnreg (loader/consumers), '!' appended where
    they ask for more than the block got at launch (offline.register_handoff)."""
    got = register_handoff(name, regs, lines) if isinstance(regs, int) else None
    return "-" if got is None else f"{got[0]}/{got[1]}" + ("" if got[2] else "!")


def stats(props, lines, name):
    ops = opcodes(lines)
    hg = [i for i, op in enumerate(ops) if op.startswith("HGMMA")]
    local = sum(op.startswith(("LDL", "STL")) for op in ops)
    spills = sum("SpillRefill" in x for x in lines[hg[0]:hg[-1] + 1]) if hg else 0
    return (props.get("regs", "?"), props.get("stack", "?"), props.get("spill st", "?"), props.get("spill ld", "?"),
            handoff(name, props.get("regs"), lines), len(ops), len(hg), local, spills, ops.count("MEMBAR.SC.GPU"),
            ops.count("MEMBAR.ALL.GPU"), " ".join(waits_and_exps(lines)))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--source", default="attend_bwd_fused.cu", help="a file of kernels/ (loader.SOURCES)")
    p.add_argument("--match", default="", help="only kernels whose name expression matches this regex")
    p.add_argument("--base", default="", help="a git revision to compare the SASS with")
    a = p.parse_args()
    names = [n for n in loader.every_name(a.source) if re.search(a.match, n)]
    if not names:
        sys.exit(f"no name expression of {a.source} matches {a.match!r}")
    with tempfile.TemporaryDirectory() as work:
        now = build(loader.KERNEL_DIR, a.source, names, work)
        base = {}
        if a.base:
            old = Path(work) / "base"
            old.mkdir()
            root = loader.KERNEL_DIR.parent
            subprocess.run(f"git -C {root} archive {a.base} kernels | tar -x -C {old}", shell=True, check=True)
            base = build(old / "kernels", a.source, names, work)
    head = ("regs", "stack", "spill st", "spill ld", "setmaxnreg", "instr", "HGMMA", "LDL/STL", "loop spills",
            "MEMBAR.SC", "MEMBAR.ALL", "waits, exps") + (("vs " + a.base,) if a.base else ())
    loop = head.index("loop spills")
    print("kernel | " + " | ".join(head))
    for name, (props, lines) in sorted(now.items()):
        row = [str(x) for x in stats(props, lines, name)]
        if a.base:
            was = base.get(name)
            row.append("missing" if was is None else "same SASS" if opcodes(was[1]) == opcodes(lines)
                       else "loop spills {} -> {}".format(stats(*was, name)[loop], row[loop]))
        print(f"{name} | " + " | ".join(row))


if __name__ == "__main__":
    main()

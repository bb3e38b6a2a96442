"""kernels/ compiled without a GPU, the way a GPU machine compiles them: NVRTC through ctypes (what
cupy.RawModule runs) to a log or a cubin, and a cubin's SASS by nvdisasm. For the compile checks
(tests/gpu/test_gpu_build.py, tests/gpu/test_gpu_sass.py) and jobs/sass_stats.py."""
import ctypes
import glob
import os
import re
import shutil
import site
import struct
import subprocess
import tempfile

from . import loader


def _wheel_dirs(sub):
    """`sub` under every site-packages' nvidia/cu* folder (the CUDA pip wheels)."""
    dirs = site.getsitepackages() + [site.getusersitepackages()]
    return sorted(p for d in dirs for p in glob.glob(os.path.join(d, "nvidia", "cu*", sub)))


def find_nvrtc():
    """libnvrtc as CuPy would load it (a CUDA install or the nvidia-cuda-nvrtc wheel), or None."""
    cands = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "lib64", "libnvrtc.so")]
    for d in _wheel_dirs("lib"):
        cands += sorted(glob.glob(os.path.join(d, "libnvrtc.so.*")))
    for c in cands:
        try:
            for b in sorted(glob.glob(os.path.join(os.path.dirname(c), "libnvrtc-builtins.so*"))):
                ctypes.CDLL(b, mode=ctypes.RTLD_GLOBAL)  # found by name, not by path, otherwise
            return ctypes.CDLL(c)
        except OSError:
            continue
    return None


def find_tool(name):
    """A CUDA tool (nvcc, nvdisasm) on PATH, in CUDA_HOME, or from its pip wheel, or None."""
    cands = [shutil.which(name), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", name)]
    cands += [os.path.join(d, name) for d in _wheel_dirs("bin")]
    return next((c for c in cands if c and os.access(c, os.X_OK)), None)


def nvrtc_compile(lib, source, names, cubin=False):
    """kernels/`source` through NVRTC (`lib`: find_nvrtc()) with the name expressions `names` and
    loader's options: (return code, log, the cubin's bytes or None, {name expression: its mangled
    name}). sm_90a for loader.SM90A's sources, else sm_90."""
    prog = ctypes.c_void_p()
    code = (loader.KERNEL_DIR / source).read_bytes()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), code, source.encode(), 0, None, None) == 0
    for name in names:
        assert lib.nvrtcAddNameExpression(prog, name.encode()) == 0
    arch = "-arch=sm_90a" if source in loader.SM90A else "-arch=sm_90"
    opts = [o.encode() for o in (*loader.OPTIONS, f"-I{loader.toolkit_include()}", arch)]
    rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    binary, mangled = None, {}
    if rc == 0 and cubin:
        lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value)
        assert lib.nvrtcGetCUBIN(prog, buf) == 0
        binary = buf.raw
        for name in names:
            low = ctypes.c_char_p()
            assert lib.nvrtcGetLoweredName(prog, name.encode(), ctypes.byref(low)) == 0
            mangled[name] = low.value.decode()
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return rc, log.value.decode(errors="replace"), binary, mangled


def sass(cubin, nvdisasm):
    """{mangled kernel name: its SASS instructions, one string each, addresses dropped} of a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout
    parts = re.split(r"\n\s*\.text\.(\S+):", text)
    return {parts[i]: [re.sub(r"/\*[0-9a-f]+\*/", "", x).strip() for x in parts[i + 1].splitlines()
                       if re.match(r"\s*/\*[0-9a-f]{4,}\*/", x)] for i in range(1, len(parts), 2)}


def opcodes(lines):
    """The opcode of each SASS instruction (a predicate such as @P0 dropped)."""
    return [x.split()[1] if x.startswith("@") else x.split()[0] for x in lines]


def waits_and_exps(lines, run="MUFU.EX2", tag="E"):
    """A kernel's wgmma waits ('W1', 'W0': WARPGROUP.DEPBAR.LE gsb0, 1 or 0) and runs of MUFU.EX2
    ('E n'; or of another opcode `run`, tagged `tag`), in SASS order: where ptxas put the
    exponentials (or that opcode) between the MMAs."""
    seq = []
    for line, op in zip(lines, opcodes(lines)):
        if op == "WARPGROUP.DEPBAR.LE":
            seq.append("W" + line.rstrip(" ;").split(",")[-1].strip()[-1])
        elif op == run:
            if not seq or not seq[-1].startswith(tag):
                seq.append(f"{tag} 0")
            seq[-1] = f"{tag} {int(seq[-1].split()[1]) + 1}"
    return seq


def registers(cubin):
    """{mangled kernel name: registers per thread at launch} of an ELF64 cubin: its .nv.info
    EIATTR_REGCOUNT records (symbol index, count), the symbols named from .symtab."""
    shoff, = struct.unpack_from("<Q", cubin, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)
    secs = [struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * shentsize) for i in range(shnum)]

    def string(table, at):
        start = secs[table][4] + at
        return cubin[start:cubin.index(b"\0", start)].decode()
    sections = {string(shstrndx, s[0]): s for s in secs}
    symtab = next(s for s in secs if s[1] == 2)  # SHT_SYMTAB
    info, counts, i = sections[".nv.info"], {}, 0
    while i < info[5]:
        fmt, attr, size = struct.unpack_from("<BBH", cubin, info[4] + i)
        if fmt != 4:  # EIFMT_SVAL carries a size; the other formats are 4 bytes in all
            i += 4
            continue
        if attr == 0x2F:  # EIATTR_REGCOUNT
            sym, count = struct.unpack_from("<II", cubin, info[4] + i + 4)
            counts[string(symtab[6], struct.unpack_from("<I", cubin, symtab[4] + 24 * sym)[0])] = count
        i += 4 + size
    return counts


def register_handoff(name, launch, lines):
    """(the loader's setmaxnreg.dec count, the consumers' setmaxnreg.inc count, whether they fit)
    of a warp-specialised kernel's SASS (name: its name expression, <T, D, TO, NWG, ...>; launch:
    ptxas' registers per thread, `registers`), or None without one of each. setmaxnreg.inc waits
    until the block's pool holds what it asks for, and the pool is only what the block got at
    launch less what the loader kept: asking for more spins forever."""
    dec = {int(x.rstrip(" ;").split()[-1], 16) for x in lines if "USETMAXREG.DEALLOC" in x}
    inc = {int(x.rstrip(" ;").split()[-1], 16) for x in lines if "USETMAXREG.TRY_ALLOC" in x}
    if len(dec) != 1 or len(inc) != 1:
        return None
    (d,), (i,), nwg = dec, inc, int(name.split("<")[1].split(", ")[3])
    return d, i, d + nwg * i <= launch * (nwg + 1)

"""What ptxas makes of the Hopper kernels, checked without a GPU (runs in CI; needs NVRTC and
nvdisasm, both pip wheels of the test extra): the kernels as the GPU machine builds them (NVRTC
to an sm_90a cubin), disassembled.

The forwards' tile loops: a tile's softmax must run while the previous tile's P V does (every
MUFU.EX2 of the softmax between the wait for the tile's S, WARPGROUP.DEPBAR.LE gsb0, 0x1, and
the wait for all MMAs, ..., 0x0). ptxas moves a wgmma wait to the top of its basic block, which
put the softmax after the second wait until the block was ended before it (kernels/attend_wgmma.cu,
the consumer's softmax).

The one-pass backward's fixed-point form at D = 128 (DK_LATE, kernels/bwd_keys.cuh): the dq
share's conversions to fixed point (F2I.NTZ, 32 a thread) must run while dK does, after the
wait for dV and dQ alone (..., 0x1) and before the wait for dK (..., 0x0); LAG's last item,
after the loop, converts once more after waiting for its dQ.

Every warp-specialised kernel's register hand-off: setmaxnreg.inc waits until the block's pool
holds the registers asked for, and the pool is only what the block got at launch (ptxas' count
per thread, times its threads) less what the loader kept; asking for more spins forever (the
forward's KT 2 forms did, at 232 registers a consumer beside a loader at 48)."""
import functools

import pytest

from gpu_helpers import nvrtc_build
from hpcattn.gpu import loader, offline
from hpcattn.gpu.shapes import bwd_fused_lag, bwd_fused_shape

NVRTC, NVDISASM = offline.find_nvrtc(), offline.find_tool("nvdisasm")
FORWARD = [(source, name) for source in ("attend_wgmma.cu", "attend_fwd_dense.cu") for name in loader.every_name(source)]
HOPPER = [(source, name) for source in loader.SM90A for name in loader.every_name(source)]


@functools.cache
def compiled(source):
    """{name expression: (SASS lines, registers per thread at launch)} of every kernel of a source."""
    if NVRTC is None or loader.toolkit_include() is None or NVDISASM is None:
        pytest.skip("NVRTC, the CUDA headers or nvdisasm not found: the Hopper kernels' SASS was NOT checked "
                    "(pip install nvidia-cuda-nvrtc nvidia-cuda-nvdisasm; set CUDA_HOME)")
    rc, log, cubin, mangled = nvrtc_build(NVRTC, source)
    assert rc == 0, log
    code, regs = offline.sass(cubin, NVDISASM), offline.registers(cubin)
    return {name: (code[m], regs[m]) for name, m in mangled.items()}


@pytest.mark.parametrize("source,name", FORWARD)
def test_softmax_runs_beside_the_previous_tiles_p_v(source, name):
    seq = offline.waits_and_exps(compiled(source)[name][0])
    loop = [i for i, x in enumerate(seq) if x == "W1"]
    assert len(loop) == 1, seq  # the one S wait that leaves P V in flight: the tile loop's
    i = loop[0]
    # the softmax's exponentials (64 x 64 scores per 64 keys of the step over 128 threads, and
    # the two rescale factors), then the wait for P V
    kt = 2 if source == "attend_fwd_dense.cu" else int(name.split(", ")[-2])  # attend_fwd_wgmma<..., SCHED, KT, WIN>
    assert seq[i + 1:i + 3] == [f"E {32 * kt + 2}", "W0"], seq


@pytest.mark.parametrize("name", [n for n in loader.every_name("attend_bwd_fused.cu")
                                  if ", 128, " in n and n.endswith("false, true>")])
def test_fixed_point_dq_staging_runs_beside_dk(name):
    seq = offline.waits_and_exps(compiled("attend_bwd_fused.cu")[name][0], run="F2I.NTZ", tag="F")
    lag = bwd_fused_lag(128, bwd_fused_shape(128, False, True), False, True)
    assert seq.count("F 32") == 1 + lag, seq
    i = seq.index("F 32")
    assert seq[i - 1:i + 2] == ["W1", "F 32", "W0"], seq
    assert not lag or seq[-2:] == ["W0", "F 32"], seq


@pytest.mark.parametrize("source,name", HOPPER)
def test_consumers_take_no_more_registers_than_the_loader_gives_back(source, name):
    lines, launch = compiled(source)[name]
    got = offline.register_handoff(name, launch, lines)  # (dec, inc, whether they fit)
    assert got is not None and got[2], (got, launch)

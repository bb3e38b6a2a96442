"""What ptxas makes of the Hopper forward's tile loop, checked without a GPU (runs in CI; needs
NVRTC and nvdisasm, both pip wheels of the test extra): the kernels as the GPU machine builds them
(NVRTC to an sm_90a cubin), disassembled. In the loop, a tile's softmax must run while the
previous tile's P V does: every MUFU.EX2 of the softmax between the wait for the tile's S
(WARPGROUP.DEPBAR.LE gsb0, 0x1) and the wait for all MMAs (..., 0x0). ptxas moves a wgmma wait
to the top of its basic block, which put the softmax after the second wait until the block was
ended before it (kernels/attend_wgmma.cu, the consumer's softmax)."""
import pytest

from hpcattn.gpu import loader, offline

NVRTC, NVDISASM = offline.find_nvrtc(), offline.find_tool("nvdisasm")
NAMES = loader.SOURCES["attend_wgmma.cu"] + loader.EXPERIMENTAL["attend_wgmma.cu"]


@pytest.fixture(scope="module")
def kernels():
    if NVRTC is None or loader.toolkit_include() is None or NVDISASM is None:
        pytest.skip("NVRTC, the CUDA headers or nvdisasm not found: the forward's SASS was NOT checked "
                    "(pip install nvidia-cuda-nvrtc nvidia-cuda-nvdisasm; set CUDA_HOME)")
    rc, log, cubin, mangled = offline.nvrtc_compile(NVRTC, "attend_wgmma.cu", NAMES, cubin=True)
    assert rc == 0, log
    code = offline.sass(cubin, NVDISASM)
    return {name: code[m] for name, m in mangled.items()}


@pytest.mark.parametrize("name", NAMES)
def test_softmax_runs_beside_the_previous_tiles_p_v(kernels, name):
    seq = offline.waits_and_exps(kernels[name])
    loop = [i for i, x in enumerate(seq) if x == "W1"]
    assert len(loop) == 1, seq  # the one S wait that leaves P V in flight: the tile loop's
    i = loop[0]
    # the softmax's exponentials (64 x 64 scores per tile of the step over 128 threads, and the
    # two rescale factors), then the wait for P V
    kt = int(name.split(", ")[-2])  # attend_fwd_wgmma<..., SCHED, KT, WIN>
    assert seq[i + 1:i + 3] == [f"E {32 * kt + 2}", "W0"], seq

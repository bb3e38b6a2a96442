"""Every kernel in kernels/ compiles with nvcc for sm_90 (sm_90a: loader.SM90A) with no warnings (runs in CI; needs
nvcc, not a GPU), with every name expression hpcattn/gpu/loader.py asks CuPy for instantiated."""
import subprocess
from pathlib import Path

import numpy as np
import pytest

from gpu_helpers import nvrtc_build
from hpcattn.gpu import encode, loader, offline, shapes
from hpcattn.masks import parse

NVCC = offline.find_tool("nvcc")


def test_every_source_in_kernels_is_loaded():
    on_disk = {p.name for p in loader.KERNEL_DIR.glob("*.cu")}
    assert on_disk and on_disk == set(loader.SOURCES)


@pytest.mark.skipif(NVCC is None, reason="NVCC NOT FOUND: kernels/*.cu were NOT compiled "
                    "(install the CUDA toolkit or set CUDA_HOME)")
@pytest.mark.parametrize("source", sorted(loader.SOURCES))
def test_kernel_compiles_for_sm90_without_warnings(source, tmp_path):
    refs = ", ".join(f"(void*)&{name}" for name in loader.every_name(source))
    unit = tmp_path / f"check_{source}"
    unit.write_text(f'#include "{loader.KERNEL_DIR / source}"\n'
                    f"void* hpcattn_kernels[] = {{{refs}}};\n")
    arch = "-gencode=arch=compute_90a,code=sm_90a" if source in loader.SM90A else "-arch=sm_90"
    cmd = [NVCC, arch, "-std=c++17", "-Werror", "all-warnings", f"-I{loader.KERNEL_DIR}",
           "-c", str(unit), "-o", str(tmp_path / "k.o")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr
    assert Path(tmp_path / "k.o").stat().st_size > 0


@pytest.mark.parametrize("spec, words", [
    ("full", [1, 0, 0, 0, 0]),
    ("causal", [1, 1, 0, 0, 0]),
    ("causal+window:3+global:2", [2, 1, 1, 3, 0, 4, 2, 0]),
    ("dilated:4:3+block:16", [2, 0, 2, 12, 3, 3, 16, 0]),
    ("dilated:4611686018427387903:4", [1, 0, 2, 2**62, 4])])
def test_mask_words_encode_every_term(spec, words):
    """The words, then zeros to a fixed length (a warp reads them in one step)."""
    got = encode.mask_words(parse(spec)).tolist()
    assert len(got) == 2 + 3 * encode.MAX_TERMS
    assert got == words + [0] * (len(got) - len(words))


@pytest.mark.parametrize("spec, only", [
    ("full", True), ("causal", True), ("window:256", True), ("causal+window:100", True),
    ("causal+window:3+global:2", False), ("dilated:4:3", False), ("block:96+causal", False), ("global:5", False)])
def test_window_only_picks_the_masks_the_win_forms_take(spec, only):
    """attend_fwd_wgmma's WIN forms evaluate one full or window term (causal or not) and no other."""
    assert encode.window_only(parse(spec)) is only


@pytest.mark.parametrize("qpos, start", [(np.arange(5, 20), 5), (np.array([0]), 0), (np.array([3, 4, 6]), None),
                                         (np.array([4, 3]), None), (np.arange(0, 10, 2), None),
                                         (np.zeros(0, np.int64), None), (np.array([7, 8, 9, 9]), None)])
def test_run_start_finds_rows_in_one_run(qpos, start):
    """encode.run_start: the first position of rows in a run (the tensor-core kernels then take
    no positions array), None otherwise; asked again, the same answer from its cache."""
    assert encode.run_start(qpos) == start and encode.run_start(qpos) == start


def test_head_dim_buckets_and_limits():
    assert [shapes.bucket(d) for d in (8, 64, 65, 128, 256)] == [64, 64, 128, 128, 256]
    with pytest.raises(Exception, match="head dim 257"):
        shapes.bucket(257)


NVRTC, CUDA_INCLUDE = offline.find_nvrtc(), loader.toolkit_include()


@pytest.mark.skipif(NVRTC is None, reason="libnvrtc not found: the runtime (CuPy/NVRTC) compile of "
                    "kernels/*.cu was NOT checked (pip install nvidia-cuda-nvrtc to check it here)")
@pytest.mark.skipif(CUDA_INCLUDE is None, reason="CUDA headers (cuda_fp16.h, mma.h) not found: the runtime "
                    "(CuPy/NVRTC) compile of kernels/*.cu was NOT checked (set CUDA_HOME)")
@pytest.mark.parametrize("source", sorted(loader.SOURCES))
def test_kernel_compiles_with_nvrtc_as_cupy_loads_it(source):
    """The same source and name expressions through NVRTC (what cupy.RawModule does at run
    time), with the options hpcattn/gpu/loader.py passes plus the CUDA headers' directory."""
    rc, log, _, _ = nvrtc_build(NVRTC, source)
    assert rc == 0 and not log.strip(), log


def test_build_takes_another_kernel_tree(tmp_path, monkeypatch):
    """loader.build(kernel_dir=...) (jobs/bwd_ab.py comparing two commits' kernels): the include
    path and the compile cache's stamp of the headers are that tree's, not kernels/'s."""
    monkeypatch.setattr(loader, "cuda_include", lambda: ())
    (tmp_path / "bwd.cuh").write_text("// another commit's header\n")
    (tmp_path / "x.cu").write_text('#include "bwd.cuh"\n')
    assert loader.options(tmp_path) == ("-std=c++17", f"-I{tmp_path}")
    assert loader.options() == loader.OPTIONS
    theirs, ours = loader._stamped(tmp_path / "x.cu", tmp_path), loader._stamped(tmp_path / "x.cu")
    assert theirs != ours and theirs.endswith('#include "bwd.cuh"\n') and ours.endswith('#include "bwd.cuh"\n')

"""The Hopper backward kernels' shape tables (hpcattn/gpu/shapes.py): name expressions that match
the templates in kernels/attend_bwd_wgmma.cu, shared memory within a block's limit, thread counts,
and every default name compiled by the loader."""
import re

import pytest

from hpcattn.gpu import loader, shapes

CTYPES = ("__half", "__nv_bfloat16")
SOURCE = (loader.KERNEL_DIR / "attend_bwd_wgmma.cu").read_text()


def template_params(kernel):
    """The template parameter count of `kernel` in attend_bwd_wgmma.cu."""
    m = re.search(r"template <([^>]*)>\s*__global__ void __launch_bounds__\(.*?\)\s*" + kernel + r"\(", SOURCE)
    assert m, kernel
    return len(m.group(1).split(","))


def test_tables_cover_the_same_head_dims():
    assert set(shapes.BWD_WG_SHAPES) == set(shapes.BWD_WG_Q_SHAPES) == set(shapes.BWD_WG_DIMS)
    for table in (shapes.BWD_WG_SHAPES, shapes.BWD_WG_Q_SHAPES):
        for nwg, st, minb in table.values():
            assert 1 <= nwg <= 3 and st >= 2 and minb >= 1


@pytest.mark.parametrize("D", sorted(shapes.BWD_WG_DIMS))
@pytest.mark.parametrize("ctype", CTYPES)
def test_names_match_the_templates(D, ctype):
    for otype in ("float", ctype):
        for name, kernel, args in ((shapes.bwd_wg_name, "attend_bwd_kv_wg", shapes.BWD_WG_SHAPES[D]),
                                   (shapes.bwd_wg_q_name, "attend_bwd_q_wg", shapes.BWD_WG_Q_SHAPES[D])):
            got = name(ctype, D, otype)
            assert got == f"{kernel}<{ctype}, {D}, {otype}, {', '.join(map(str, args))}>"
            assert got.count(",") + 1 == template_params(kernel)
            assert got in loader.SOURCES["attend_bwd_wgmma.cu"]


@pytest.mark.parametrize("D", sorted(shapes.BWD_WG_DIMS))
def test_shared_memory_fits_a_block(D):
    assert shapes.bwd_wg_smem(D) <= shapes.SMEM_MAX and shapes.bwd_wg_q_smem(D) <= shapes.SMEM_MAX
    nwg, st, _ = shapes.BWD_WG_SHAPES[D]  # ST (Q, dO) stages, K and V, ST stages of lse, delta, positions
    assert shapes.bwd_wg_smem(D) == 2 * st * 64 * D * 2 + 2 * 64 * nwg * D * 2 + st * 64 * 16 + 1024
    nwg, st, _ = shapes.BWD_WG_Q_SHAPES[D]  # ST (K, V) stages, q and dO rows
    assert shapes.bwd_wg_q_smem(D) == 2 * st * 64 * D * 2 + 2 * 64 * nwg * D * 2 + 1024


def test_threads_are_a_loader_and_the_consumer_warpgroups():
    assert shapes.bwd_wg_threads((2, 4, 1)) == 384
    assert shapes.bwd_wg_threads((3, 6, 1)) == 512
    for D in shapes.BWD_WG_DIMS:
        for shape in (shapes.BWD_WG_SHAPES[D], shapes.BWD_WG_Q_SHAPES[D]):
            assert shapes.bwd_wg_threads(shape) <= 1024

"""The GPU kernels' shape table: dtypes, head-dim buckets, tile sizes, the tensor-core kernels'
shapes per head dim, and the name expressions and shared memory those shapes give. Every
constant here mirrors a #define or template argument of kernels/*.cu."""
from ..errors import HpcattnError

CTYPES = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16"}
DMAXES = (64, 128, 256)
BQ, BK, THREADS = 16, 32, 128  # must match kernels/attend.cu
MK = 64  # MK in kernels/tiles.cuh
ROW_WARPS = 4  # RWARPS in kernels/attend_rows.cu
# attend_fwd_mma's shape per head dim: (warps per block, 16-row MMA tiles per warp, q kept in
# registers, K/V buffers, blocks per SM asked of the register allocator): the fastest of
# jobs/mma_tune.py's candidates on an H100 (docs/benchmarks-log.md, "GPU local kernel")
MMA_SHAPES = {32: (2, 2, True, 3, 1), 64: (2, 2, True, 3, 1), 96: (4, 1, True, 2, 1), 128: (4, 1, True, 2, 1)}
MMA_DIMS = tuple(MMA_SHAPES)
# attend_fwd_wgmma's shape per head dim (Hopper, sm_90a): (consumer warpgroups of 64 rows,
# K/V buffers, blocks per SM, q in registers), the fastest of jobs/wgmma_check.py's candidates
# on an H100 (docs/benchmarks-log.md, "GPU local kernel")
WG_SHAPES = {64: (3, 8, 1, False), 128: (2, 5, 1, True)}
WG_DIMS = tuple(WG_SHAPES)


# the tensor-core backward's shape per head dim (kernels/attend_bwd_mma.cu): (attend_bwd_kv's
# warps of 16 keys, its K and V kept in registers, blocks per SM asked of the register
# allocator; attend_bwd_q's warps of 16 query rows, its q and dO kept in registers, its K/V
# buffers, blocks per SM): the fastest of jobs/bwd_tune.py's candidates on an H200
# (docs/benchmarks-log.md, "GPU backward")
BWD_SHAPES = {32: (4, False, 3, 4, True, 2, 3), 64: (4, False, 3, 4, True, 2, 3), 96: (4, False, 1, 4, True, 2, 1),
              128: (4, False, 1, 4, True, 2, 1)}
BWD_DIMS = tuple(BWD_SHAPES)
BWD_ROWS = 64  # BM in kernels/bwd.cuh: query rows per tile of attend_bwd_kv (and attend_bwd_kv_wg)


# the Hopper backward's shapes per head dim (kernels/attend_bwd_wgmma.cu, sm_90a: a loader
# warpgroup and NWG consumer warpgroups): (consumer warpgroups of 64 keys or query rows, ring
# stages, blocks per SM asked of the register allocator) of attend_bwd_kv_wg and of
# attend_bwd_q_wg: the fastest of jobs/wgmma_bwd_check.py's candidates on an H200
# (docs/benchmarks-log.md, "GPU backward")
BWD_WG_SHAPES = {64: (2, 4, 1), 128: (2, 4, 1)}
BWD_WG_Q_SHAPES = {64: (3, 6, 1), 128: (2, 4, 1)}
BWD_WG_DIMS = tuple(BWD_WG_SHAPES)
SMEM_MAX = 227 * 1024  # dynamic shared memory per block on sm_90


def bwd_names(ctype, D, otype, shape=None):
    """The name expressions of the tensor-core backward's two kernels, (attend_bwd_kv,
    attend_bwd_q), writing dq, dk, dv as otype ("float": added into float32 accumulators)."""
    wk, kreg, kminb, wq, qreg, st, qminb = shape or BWD_SHAPES[D]
    return (f"attend_bwd_kv<{ctype}, {D}, {otype}, {wk}, {str(kreg).lower()}, {kminb}>",
            f"attend_bwd_q<{ctype}, {D}, {otype}, {wq}, {str(qreg).lower()}, {st}, {qminb}>")


def bwd_smem(D, shape=None):
    """Shared bytes of (attend_bwd_kv, attend_bwd_q): two stages of q and dO tiles, the block's K
    and V rows, two stages of lse, delta (float32) and positions (int64); ST K/V tile buffers and
    the block's q and dO rows."""
    wk, _, _, wq, _, st, _ = shape or BWD_SHAPES[D]
    ld = D + 8
    return (4 * BWD_ROWS + 2 * 16 * wk) * ld * 2 + 2 * BWD_ROWS * (4 + 4 + 8), (2 * st * MK + 2 * 16 * wq) * ld * 2


def bwd_wg_name(ctype, D, otype, shape=None):
    """attend_bwd_kv_wg's name expression: attend_bwd_kv's drop-in on Hopper."""
    nwg, st, minb = shape or BWD_WG_SHAPES[D]
    return f"attend_bwd_kv_wg<{ctype}, {D}, {otype}, {nwg}, {st}, {minb}>"


def bwd_wg_smem(D, shape=None):
    """Shared bytes of attend_bwd_kv_wg: ST stages of q and dO tiles, the block's K and V rows
    (unpadded: swizzle atoms), ST stages of lse, delta and positions, 1024 for alignment."""
    nwg, st, _ = shape or BWD_WG_SHAPES[D]
    return (2 * st * BWD_ROWS + 2 * 64 * nwg) * D * 2 + st * BWD_ROWS * (4 + 4 + 8) + 1024


def bwd_wg_q_name(ctype, D, otype, shape=None):
    """attend_bwd_q_wg's name expression: attend_bwd_q's drop-in on Hopper."""
    nwg, st, minb = shape or BWD_WG_Q_SHAPES[D]
    return f"attend_bwd_q_wg<{ctype}, {D}, {otype}, {nwg}, {st}, {minb}>"


def bwd_wg_q_smem(D, shape=None):
    """Shared bytes of attend_bwd_q_wg: ST stages of K and V tiles, the block's q and dO rows
    (unpadded: swizzle atoms), 1024 for alignment."""
    nwg, st, _ = shape or BWD_WG_Q_SHAPES[D]
    return (2 * st * MK + 2 * 64 * nwg) * D * 2 + 1024


# attend_bwd_fused_wg's shape per head dim (kernels/attend_bwd_fused.cu, sm_90a): (consumer
# warpgroups of 64 keys, ring stages, blocks per SM); at D = 128 four stages and the two dS
# buffers exceed SMEM_MAX. The fixed-point form at D = 128 adds its dq one item late (LAG, below)
# on two stages: its third dS buffer and own staging leave no room for a third.
BWD_FUSED_SHAPES = {64: (2, 4, 1), 128: (2, 3, 1)}
BWD_FIXED_SHAPES = {64: (2, 4, 1), 128: (2, 2, 1)}
DQ_STAGE = 4 * 2048  # BULK: a consumer's own dq staging, 2 KB a warp (the other 2 KB sit in a dS buffer)


def bwd_fused_shape(D, ordered, bulk):
    """attend_bwd_fused_wg's shape for the form: the fixed-point one's (bulk, not ordered) or the others'."""
    return (BWD_FIXED_SHAPES if bulk and not ordered else BWD_FUSED_SHAPES)[D]


def bwd_fused_lag(D, shape, ordered, bulk):
    """Whether the kernel adds each item's dq during the next item (kernels/bwd_keys.cuh's LAG):
    the fixed-point form where every consumer has a dq slice of every item."""
    return bulk and not ordered and D // 64 == shape[0]


def bwd_fused_name(ctype, D, otype, ordered, shape=None, bulk=False):
    """attend_bwd_fused_wg's name expression: dk, dv as attend_bwd_kv_wg (otype), dq added into
    float32 sums, in key-block order when `ordered` (the same bits on every rerun); `bulk`: into
    dq tiles (kernels/bwd_keys.cuh; tile_rows_out turns them into rows) by bulk reductions of
    each warp's staged share, else into rows by red.global.add from the consumers' registers."""
    nwg, st, minb = shape or bwd_fused_shape(D, ordered, bulk)
    return (f"attend_bwd_fused_wg<{ctype}, {D}, {otype}, {nwg}, {st}, {minb}, {str(ordered).lower()}, "
            f"{str(bulk).lower()}>")


def bwd_fused_smem(D, ordered, shape=None, bulk=False):
    """Shared bytes of attend_bwd_fused_wg: attend_bwd_kv_wg's and two buffers of a tile's dS
    (64 NWG keys x 64 queries); with `bulk`, DQ_STAGE bytes per consumer warpgroup; LAG: three
    dS buffers and twice the staging."""
    shape = shape or bwd_fused_shape(D, ordered, bulk)
    lag = bwd_fused_lag(D, shape, ordered, bulk)
    return (bwd_wg_smem(D, shape) + (3 if lag else 2) * 64 * shape[0] * BWD_ROWS * 2
            + (shape[0] * DQ_STAGE * (2 if lag else 1) if bulk else 0))


def bwd_wg_threads(shape):
    """Threads per block of either Hopper backward kernel: the loader warpgroup and NWG consumers."""
    return 128 * (shape[0] + 1)


def mma_name(ctype, D, otype, shape=None):
    w, rm, qreg, st, minb = shape or MMA_SHAPES[D]
    return f"attend_fwd_mma<{ctype}, {D}, {otype}, {w}, {rm}, {str(qreg).lower()}, {st}, {minb}>"


def mma_smem(D, shape=None):
    """Shared bytes of attend_fwd_mma: its K and V tile buffers (half precision, rows padded by
    8), plus the q rows unless they stay in registers (then they pass through a K/V buffer)."""
    w, rm, qreg, st, _ = shape or MMA_SHAPES[D]
    return (2 * st * MK + (0 if qreg else 16 * rm * w)) * (D + 8) * 2


# attend_fwd_wgmma's SCHED values beyond the default 0: 1 = ping-pong between the consumer
# warpgroups (turns at issuing MMAs by named barriers); the overlap within a warpgroup (S of
# tile i with P V of tile i - 1) is in every SCHED
WG_SCHEDS = (1,)
# attend_fwd_wgmma with KT = 2 (a consumer's step takes two MK-key tiles: one softmax, one O
# rescale and one pair of MMA waits per 2 MK keys; SCHED 0) and WIN (one full or window term):
# its shapes per head dim, those ptxas fits without register refills in the tile loop (at D = 128
# q in shared memory; at D = 64 two consumers: three serialise every wgmma)
WG_KT2_SHAPES = {64: (2, 8, 1, True), 128: (2, 5, 1, False)}


def wg_name(ctype, D, otype, shape=None, sched=0, kt=1, win=False):
    nwg, st, minb, qreg = shape or WG_SHAPES[D]
    return (f"attend_fwd_wgmma<{ctype}, {D}, {otype}, {nwg}, {st}, {minb}, {str(qreg).lower()}, {sched}, {kt}, "
            f"{str(win).lower()}>")


def wg_smem(D, shape=None):
    """Shared bytes of attend_fwd_wgmma: ST K/V tile buffers, two q buffers, 1024 for alignment."""
    nwg, st, _, _ = shape or WG_SHAPES[D]
    return (2 * st * MK + 2 * 64 * nwg) * D * 2 + 1024


# attend_fwd_dense (kernels/attend_fwd_dense.cu: one full or window term over rows in one run,
# 128-key tiles, K and V in rings of their own): (consumer warpgroups of 64 rows, K buffers,
# V buffers, q in registers) per head dim, the fastest of jobs/causal_fwd_bench.py's --dense
# candidates on an H100 (docs/benchmarks-log.md, "A 128-key forward for dense blocks")
DENSE_SHAPES = {64: (3, 5, 4, False), 128: (2, 3, 2, False)}
DENSE_KEYS = 128  # DN in kernels/attend_fwd_dense.cu


def dense_name(ctype, D, otype, shape=None):
    nwg, stk, stv, qreg = shape or DENSE_SHAPES[D]
    return f"attend_fwd_dense<{ctype}, {D}, {otype}, {nwg}, {stk}, {stv}, {str(qreg).lower()}>"


def dense_smem(D, shape=None):
    """Shared bytes of attend_fwd_dense: its K and V buffers, two q buffers, 1024 for alignment."""
    nwg, stk, stv, _ = shape or DENSE_SHAPES[D]
    return ((stk + stv) * DENSE_KEYS + 2 * 64 * nwg) * D * 2 + 1024


def bucket(D):
    """The smallest of DMAXES that holds head dim D (the CUDA-core kernels' template argument)."""
    for m in DMAXES:
        if D <= m:
            return m
    raise HpcattnError(f"head dim {D} is above the GPU kernels' limit {DMAXES[-1]}")

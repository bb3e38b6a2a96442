"""The public entry point: attention over a sequence sharded across the ranks of a communicator."""
import functools
import math
import time
from contextlib import contextmanager

import numpy as np

from . import faults
from .arrays import aligned_copy, array_module, is_device, to_host
from .cpu import grad, local
from .dist.comm import counted
from .dist.variants import Shard, choose
from .errors import HpcattnError, agree_on
from .masks import Mask, parse
from .partition import positions, segments
from .profile import phase

DTYPES = ("float32", "float16", "bfloat16")  # bfloat16: ml_dtypes on the host
LAYOUTS = ("contiguous", "zigzag")


def check_shapes(q_shape, k_shape, v_shape, dtypes):
    """Problem with the (local or global) shapes/dtypes of q, k, v as a message, or None."""
    if len(q_shape) != 4 or len(k_shape) != 4:
        return f"q and k must be 4-D (B, N, H, D); got q {tuple(q_shape)}, k {tuple(k_shape)}"
    if tuple(k_shape) != tuple(v_shape):
        return f"k and v must have the same shape; got k {tuple(k_shape)}, v {tuple(v_shape)}"
    (B, _, H, D), (Bk, _, Hkv, Dk) = q_shape, k_shape
    if B != Bk or D != Dk:
        return f"q {tuple(q_shape)} and k {tuple(k_shape)} disagree in batch or head dim"
    if D < 1:
        return f"head dim must be at least 1; got q {tuple(q_shape)}, k {tuple(k_shape)}"
    if Hkv < 1 or H % Hkv:
        return f"query heads ({H}) must be a positive multiple of kv heads ({Hkv})"
    names = {_dtype_name(d) for d in dtypes}
    if len(names) != 1 or not names <= set(DTYPES):
        return f"q, k, v must share one dtype of {', '.join(DTYPES)}; got {', '.join(map(str, dtypes))}"
    return None


@functools.lru_cache(maxsize=64)
def _dtype_name(dtype):
    """np.dtype(dtype).name, any byte order (NumPy builds the name anew on every read)."""
    return np.dtype(dtype).name


def heads(x, hkv):
    """(B, n, H, D) -> (B, Hkv, H//Hkv, n, D): a view of x in the kernels' head-major order."""
    B, n, H, D = x.shape
    return x.reshape(B, n, hkv, H // hkv, D).transpose(0, 2, 3, 1, 4)


def to_heads(x, hkv):
    """heads(x, hkv), contiguous: x itself where that is already the layout (one head, batch
    1), else a cache-line aligned copy (arrays.aligned_empty), for the variants' exchanges."""
    y = heads(x, hkv)
    return y if y.flags.c_contiguous else aligned_copy(y)


def from_heads(x, dtype):
    """(B, Hkv, G, n, D) -> (B, n, Hkv*G, D) in dtype."""
    B, Hkv, G, n, D = x.shape
    return x.transpose(0, 3, 1, 2, 4).reshape(B, n, Hkv * G, D).astype(dtype, copy=False)


@functools.lru_cache(maxsize=256)
def _parsed(spec):
    """parse(spec), once per spec: repeated calls pass the same Mask on, so what the kernels
    derive from it (plans, device words) is made once."""
    return parse(spec)


@functools.lru_cache(maxsize=256)
def _bound(mask, n):
    """mask bound to n keys, once per (Mask, n)."""
    return mask.bind(n_keys=n)


def _local_problem(q, k, v, mask, layout):
    """(mask, problem): this rank's own argument errors, found without communicating."""
    try:
        mask = mask if isinstance(mask, Mask) else _parsed(mask)
    except HpcattnError as e:
        return None, str(e)
    problem = check_shapes(q.shape, k.shape, v.shape, (q.dtype, k.dtype, v.dtype))
    if not problem and layout not in LAYOUTS:
        problem = f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}"
    return mask, problem


def _positions_problem(q_positions, nq):
    """(problem, largest position): q_positions' own errors; the upper bound needs every rank."""
    qpos = q_positions if is_device(q_positions) else np.asarray(q_positions)  # device: kept there
    if qpos.size and qpos.dtype.kind not in "iu":
        return f"q_positions must be integers, got {qpos.dtype}", -1
    if qpos.shape != (nq,):
        return f"q_positions must have shape ({nq},), got {qpos.shape}", -1
    if nq and qpos.min() < 0:
        return f"q_positions must not be negative; got {qpos.min()}", -1
    return None, int(qpos.max()) if nq else -1


def _grad_problem(q, o, lse, do):
    """The backward's own argument errors (o, do like q; lse (B, H, nq))."""
    if len(q.shape) != 4:
        return None  # check_shapes names it
    B, nq, H, D = q.shape
    for name, x in (("o", o), ("do", do)):
        if x.shape != q.shape:
            return f"{name} must be shaped like q {q.shape}, got {x.shape}"
    if lse.shape != (B, H, nq):
        return f"lse must have shape {(B, H, nq)}, got {lse.shape}"
    return None


def _shard(q, k, v, mask, comm, q_positions, scale, layout, ranks_per_node, problem=None):
    """Validate one rank's pieces and build its Shard (collective: one small allgather, which
    carries either a rank's (nq, nk[, largest query position]) or its argument error, so that
    a bad argument on any rank raises the same HpcattnError on every rank, none left waiting)."""
    mask, local = _local_problem(q, k, v, mask, layout)
    problem = local or problem
    qmax = -1
    if not problem and q_positions is not None:
        problem, qmax = _positions_problem(q_positions, q.shape[1])
    nq_nk = () if problem else (q.shape[1], k.shape[1])
    mine = problem or (nq_nk if q_positions is None else nq_nk + (qmax,))
    if comm.size == 1:  # nothing to agree on: the sizes are this rank's
        if problem:
            raise HpcattnError(problem, collective=True)
        nq, n = q.shape[1], k.shape[1]
        kv_off, q_off, kv_runs, q_runs = _one_piece(n), _one_piece(nq), None, [[nq]]
        if q_positions is None and nq != n:
            raise HpcattnError(f"{nq} query rows but {n} keys: give q_positions", collective=True)
        if q_positions is not None and qmax >= n:
            raise HpcattnError(f"rank 0: q_positions must lie in [0, {n}); got {qmax}", collective=True)
        qpos = positions(((0, n),)) if q_positions is None else _as_int64(q_positions)
    else:
        qpos, n, kv_off, q_off, kv_runs, q_runs = _agree_sizes(comm, mine, q_positions, layout)
    Hkv, D = k.shape[2], q.shape[3]
    if "n_keys" in mask.needs:
        mask = _bound(mask, n)
    if "csr" in mask.needs:
        raise HpcattnError("the mask has a csr term: pass a Mask bound to this rank's rows "
                           "(masks.parse(spec, csr=masks.check_csr(...)))", collective=True)
    layout_of = heads if comm.size == 1 else to_heads  # one rank: the kernel reads the caller's arrays
    return Shard(layout_of(q, Hkv), qpos, layout_of(k, Hkv)[:, :, 0], layout_of(v, Hkv)[:, :, 0],
                 kv_off, mask, float(scale if scale is not None else 1 / math.sqrt(D)),
                 kv_runs=kv_runs, q_runs=q_runs, ranks_per_node=ranks_per_node, q_offsets=q_off)


def _agree_sizes(comm, mine, q_positions, layout):
    """(qpos, n, kv_off, q_off, kv_runs, q_runs) from every rank's sizes (one allgather of
    `mine`: this rank's sizes or its problem, raised on every rank)."""
    pieces = comm.allgather_object(mine)
    agree_on(pieces)
    P, r = comm.size, comm.rank
    sizes = np.array([p[:2] for p in pieces], dtype=np.int64).reshape(-1, 2)
    q_off = np.concatenate([[0], np.cumsum(sizes[:, 0])])
    kv_off = np.concatenate([[0], np.cumsum(sizes[:, 1])])
    n, n_q = int(kv_off[-1]), int(q_off[-1])
    # the checks below see the same numbers on every rank
    if q_positions is not None:
        for i, p in enumerate(pieces):
            if p[2] >= n:
                raise HpcattnError(f"rank {i}: q_positions must lie in [0, {n}); got {p[2]}", collective=True)
    if layout == "zigzag":
        kv_runs = [segments(n, P, i, layout) for i in range(P)]
        q_segs = [segments(n_q, P, i, layout) for i in range(P)]
        want = [(sum(b - a for a, b in qs), sum(b - a for a, b in ks)) for qs, ks in zip(q_segs, kv_runs)]
        if [tuple(x) for x in sizes.tolist()] != want:
            raise HpcattnError(f"layout 'zigzag' needs rank i to hold chunks i and 2P-1-i "
                               f"of 2P even chunks: (q, kv) rows per rank should be {want}, "
                               f"got {[tuple(x) for x in sizes.tolist()]}", collective=True)
        q_runs = [[b - a for a, b in qs] for qs in q_segs]
    else:
        kv_runs, q_segs = None, [[(int(q_off[i]), int(q_off[i + 1]))] for i in range(P)]
        q_runs = [[int(sizes[i, 0])] for i in range(P)]
    if q_positions is None:
        if n_q != n:
            raise HpcattnError(f"{n_q} query rows but {n} keys: give q_positions", collective=True)
        qpos = positions(q_segs[r])
    else:  # the variants plan on the host
        qpos = to_host(_as_int64(q_positions))
    return qpos, n, kv_off, q_off, kv_runs, q_runs


def _as_int64(q_positions):
    """q_positions as int64: a device array stays on the device (the GPU reads it there); a host
    array is copied, so a caller who refills it between calls never meets a stale device copy
    (the device copies are keyed by the array object)."""
    if is_device(q_positions):
        return q_positions.astype("int64", copy=False)
    return np.array(q_positions, dtype=np.int64)


@functools.lru_cache(maxsize=64)
def _one_piece(n):
    """Offsets (0, n) of one rank holding everything (read-only, cached)."""
    off = np.array([0, n], dtype=np.int64)
    off.flags.writeable = False
    return off


_launches = {}  # a one-rank device call's signature -> (gpu.forward.Launch or gpu.backward.OutLaunch, variant)
MAX_LAUNCHES = 256  # shapes kept (a decode loop with a growing key count makes one per step)
_NO_POSITIONS = np.uintp(0)  # the kernel derives row r's position r


def _signature(arrays, args):
    """What a one-rank device call's launch depends on (the arrays' shapes, strides and dtypes,
    the other arguments, the device), or None when it is not cached (a mask given as neither
    spec nor Mask, an array not on the device, rows not 16-byte aligned)."""
    if (not isinstance(args[0], (str, Mask)) or not all(map(is_device, arrays))
            or any(x.data.ptr % 16 for x in arrays)):
        return None
    from cupy.cuda import runtime
    return tuple((x.shape, x.strides, x.dtype) for x in arrays) + (runtime.getDevice(),) + args


def _remember(key, run, name):
    """Keeps a one-rank device call's launch for its signature (at most MAX_LAUNCHES)."""
    if len(_launches) >= MAX_LAUNCHES:
        _launches.clear()
    _launches[key] = run, name


def _direct(run, name, q, k, v, stats, o=None):
    """A one-rank device call through its Launch: o allocated (unless given), one launch; the
    launch reads the caller's (B, N, H, D) arrays at the head-major strides it was made for."""
    if o is None:
        o = array_module(q).empty(q.shape, q.dtype)
    faults.point("compute", 0)
    t = time.perf_counter()
    with phase("local"):
        lse, edges = run(q, _NO_POSITIONS, k, v, o)
    if stats is not None:  # reading the device count waits for the kernel
        edges = int(edges)
        stats.update(compute_s=time.perf_counter() - t, edges=edges, variant=name)
    return o, lse


def attention(q, k, v, mask="full", comm=None, variant="auto", q_positions=None, scale=None,
              stats=None, layout="contiguous", ranks_per_node=None):
    """Attention of this rank's query rows over the whole sharded sequence (collective).

    q: (B, nq, H, D), this rank's query rows; k, v: (B, nk, Hkv, D), this rank's key rows.
    layout 'contiguous': ranks hold contiguous pieces in rank order (any sizes, empty allowed);
    'zigzag': rank r holds chunks r and 2P-1-r of an even cut of the queries and of the keys
    into 2P chunks (partition.zigzag_segments), which balances causal work.
    q_positions: the global positions of this rank's query rows (default: those of its rows in
    the layout, i.e. self-attention, which needs Nq == N). mask: a spec string or Mask.
    comm: an mpi4py communicator or hpcattn Comm (default COMM_WORLD). scale defaults to
    1/sqrt(D). ranks_per_node: simulate nodes of that many ranks (burst's two-level ring).
    Returns (o, lse) on every rank: o (B, nq, H, D) in q's dtype, lse (B, H, nq) float32.
    If `stats` is a dict, compute_s, edges and the variant used are added to it.
    One rank (P = 1) calls the local kernel directly: no exchange, no merge, no collective.
    """
    with _calling(comm) as comm:
        key = None
        if comm.size == 1 and q_positions is None and is_device(q):
            key = _signature((q, k, v), (mask, scale, layout, variant, ranks_per_node))
            if key in _launches:  # the same shapes as an earlier call: its launch, no checks again
                return _direct(*_launches[key], q, k, v, stats)
        shard = _shard(q, k, v, mask, comm, q_positions, scale, layout, ranks_per_node)
        module, name = choose(variant, shard)
        B, nq, H, _ = q.shape
        xp = array_module(q)
        if comm.size == 1:  # the kernel alone, writing the caller's o in its layout and dtype
            o = xp.empty(q.shape, q.dtype)
            if key is not None:
                from .gpu.forward import launch_for
                run = launch_for(shard.q, shard.k, shard.v, heads(o, k.shape[2]), shard.mask, shard.scale)
                if run is not None:
                    _remember(key, run, name)
                    return _direct(run, name, q, k, v, stats, o)
            faults.point("compute", 0)
            # on the GPU, positions 0..n-1 are derived on the device: no copy of them
            qpos = None if xp is not np and q_positions is None else shard.qpos
            t = time.perf_counter()
            with phase("local"):
                _, lse, edges = local.attend(shard.q, qpos, shard.k, shard.v, 0, shard.mask,
                                             shard.scale, out=heads(o, k.shape[2]))
            _record(stats, shard, t, edges)
        else:
            o, lse = module.forward(comm, shard)
            o = from_heads(o, q.dtype)
        if stats is not None:
            stats.update(shard.stats, variant=name)
        return o, xp.ascontiguousarray(lse.reshape(B, H, nq))


def attention_backward(q, k, v, o, lse, do, mask="full", comm=None, variant="auto",
                       q_positions=None, scale=None, stats=None, layout="contiguous",
                       ranks_per_node=None):
    """Gradients (dq, dk, dv) of attention for this rank's rows (collective).

    Arguments as for `attention`, plus the forward's o (like q) and lse (B, H, nq) and the
    output gradient do (like q). Returns dq like q and dk, dv like k, v, in the input dtype
    (accumulated in float32): this rank's rows of the gradients of sum(o * do).
    """
    with _calling(comm) as comm:
        key = None
        if comm.size == 1 and q_positions is None and is_device(q):
            key = _signature((q, k, v, o, lse, do), ("backward", mask, scale, layout, variant, ranks_per_node))
            if key in _launches:  # the same shapes as an earlier call: its launches, no checks again
                return _direct_backward(*_launches[key], q, k, v, o, lse, do, stats)
        shard = _shard(q, k, v, mask, comm, q_positions, scale, layout, ranks_per_node,
                       problem=_grad_problem(q, o, lse, do))
        B, nq, H, D = q.shape
        Hkv = k.shape[2]
        module, name = choose(variant, shard, backward=True)
        if not hasattr(module, "backward"):
            raise HpcattnError(f"variant {name!r} has no backward pass")
        cacheable = key is not None and lse.dtype == np.float32 and lse.flags.c_contiguous  # read in place
        lse = lse.reshape(B, Hkv, H // Hkv, nq).astype("float32", copy=False)
        if comm.size == 1:  # the backward kernels alone, writing the caller's layout and dtypes
            xp = array_module(q)
            grads = tuple(xp.empty(x.shape, x.dtype) for x in (q, k, v))
            out = (heads(grads[0], Hkv),) + tuple(heads(g, Hkv)[:, :, 0] for g in grads[1:])
            if cacheable:
                from .gpu.backward import launch_for
                run = launch_for(shard.q, shard.k, shard.v, heads(o, Hkv), heads(do, Hkv), out, shard.mask,
                                 shard.scale)
                if run is not None:
                    _remember(key, run, name)
                    return _direct_backward(run, name, q, k, v, o, lse, do, stats, grads)
            qpos = None if xp is not np and q_positions is None else shard.qpos
            faults.point("compute", 0)
            t = time.perf_counter()
            with phase("local"):
                edges = grad.backward_out(shard.q, qpos, shard.k, shard.v, shard.mask, shard.scale,
                                          heads(o, Hkv), lse, heads(do, Hkv), out)
            _record(stats, shard, t, edges)
        else:
            dq, dk, dv = module.backward(comm, shard, to_heads(o, Hkv), lse, to_heads(do, Hkv))
            grads = (from_heads(dq, q.dtype), from_heads(dk[:, :, None], k.dtype),
                     from_heads(dv[:, :, None], v.dtype))
        if stats is not None:
            stats.update(shard.stats, variant=name)
        return grads


def _direct_backward(run, name, q, k, v, o, lse, do, stats, grads=None):
    """A one-rank device backward through its OutLaunch: the gradients allocated like q, k, v
    (C-contiguous; unless given), then its launches, which take the caller's arrays by pointer
    at the strides it was made for."""
    if grads is None:
        xp = array_module(q)
        grads = tuple(xp.empty(x.shape, x.dtype) for x in (q, k, v))
    faults.point("compute", 0)
    t = time.perf_counter()
    with phase("local"):
        edges = run(q, k, v, o, lse, do, *grads)
    if stats is not None:  # reading the device count waits for the kernels
        edges = int(edges)
        stats.update(compute_s=time.perf_counter() - t, edges=edges, variant=name)
    return grads


@contextmanager
def _calling(comm):
    """The communicator of one call: comm itself on one rank (nothing to exchange or count),
    else a counted duplicate (dist.comm.counted). None means COMM_WORLD."""
    if comm is None:
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
    if comm.size == 1:
        yield comm
        return
    with counted(comm) as c:
        yield c


def _record(stats, shard, t0, edges):
    """The direct path's compute time and edges; a device edge count is read only here, and
    only when the caller asked for stats."""
    if stats is not None:
        edges = int(edges)  # waits for a device kernel: compute_s then spans it
        shard.stats.update(compute_s=time.perf_counter() - t0, edges=edges)

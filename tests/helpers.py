"""Helpers shared by the test modules (imported as `helpers`: tests/ is on pytest's pythonpath).

Subprocess launches (`mpiexec`, `hpcattn`) always carry a timeout, so a hang fails one test
instead of stalling the suite; `world()` is the communicator of the in-process MPI tests.
"""
import os
import pickle
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
from mpi4py import MPI

from hpcattn.masks import parse
from hpcattn.partition import segments

BIN = Path(sys.executable).parent
LAUNCH_TIMEOUT = 240


def world():
    """MPI.COMM_WORLD: the ranks of `mpiexec -n P python -m mpi4py -m pytest --with-mpi`."""
    return MPI.COMM_WORLD


def mpiexec(n, *args, timeout=LAUNCH_TIMEOUT, env=None):
    """Run `hpcattn ARGS` on n ranks; returns the CompletedProcess (never hangs the suite)."""
    cmd = [str(BIN / "mpiexec"), "-n", str(n), sys.executable, "-m", "hpcattn", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def read_result(path):
    """(o, lse, root attributes, stats by name) of a result file, re-read from disk."""
    with h5py.File(path, "r") as f:
        return f["o"][...], f["lse"][...], dict(f.attrs), {k: f["stats"][k][...] for k in f["stats"]}


def hpcattn(*args, timeout=LAUNCH_TIMEOUT):
    """Run `hpcattn ARGS` as one plain process."""
    return subprocess.run([sys.executable, "-m", "hpcattn", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)



def uneven_offsets(n, P, seed):
    """Random contiguous cuts (same on every rank: one seed), empty pieces allowed."""
    cuts = np.sort(np.random.default_rng(seed).integers(0, n + 1, size=P - 1))
    return np.concatenate([[0], cuts, [n]]).astype(np.int64)


# Masks written plainly, independent of hpcattn.masks

MASK64 = (1 << 64) - 1


def splitmix(z):
    """splitmix64's output function, one Python int at a time (the docstring's algorithm)."""
    z = (z + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def naive_random(seed, i, r, n):
    """Floyd's sampling with u(seed, i, d) = mix(mix(mix(seed) ^ i) ^ d), written plainly."""
    r = min(r, n)
    picked = []
    for d in range(r):
        m = n - r + d
        t = splitmix(splitmix(splitmix(seed) ^ i) ^ d) % (m + 1)
        picked.append(m if t in picked else t)
    return sorted(picked)


def naive_mask(spec, i, j, n, dense):
    """Is (i, j) an edge of spec? Written term by term from the mask grammar, for N = n keys
    and a dense boolean matrix for csr."""
    union, causal, any_term = False, False, False
    for term in spec.split("+"):
        name, *a = term.split(":")
        a = [int(x) for x in a]
        if name == "causal":
            causal = True
            continue
        any_term = True
        union |= {"full": lambda: True,
                  "window": lambda: abs(i - j) <= a[0],
                  "dilated": lambda: abs(i - j) <= a[0] * a[1] and (i - j) % a[1] == 0,
                  "block": lambda: i // a[0] == j // a[0],
                  "global": lambda: i < a[0] or j < a[0],
                  "random": lambda: j in naive_random(a[1] if len(a) > 1 else 0, i, a[0], n),
                  "csr": lambda: bool(dense[i, j])}[name]()
    if not any_term:
        union = True
    return union and (j <= i if causal else True)


# Byte counts of the ring, burst and tree variants, derived from the partition alone

def lanes(P, K):
    """(M, L): nodes of K consecutive ranks; unequal nodes fall back to one ring of P."""
    L = K if P % K == 0 else P
    return P // L, L


def traveller_blocks(P, K, r):
    """Owners of the blocks rank r sends and receives as travellers in the two-level ring with
    nodes of K ranks (node n, lane l; at step s*L+t rank (n, l) holds block (n-s, l-t))."""
    M, L = lanes(P, K)
    n, l = divmod(r, L)

    def at(a, b):
        return (a % M) * L + b % L
    sent = [at(n - s, l - t) for s in range(M) for t in range(L - 1)] + [at(n - s, l) for s in range(M - 1)]
    recv = [at(n - s, l - t - 1) for s in range(M) for t in range(L - 1)] + [at(n - s - 1, l) for s in range(M - 1)]
    first = at(n, l - 1) if L > 1 else at(n - 1, l)  # the block held at step 1
    acc_sent = [q for q in range(P) if q != r]          # every other block's accumulator, once
    acc_recv = [q for q in range(P) if q != first]      # all but step 1's (it starts there), own last
    return sent, recv, acc_sent, acc_recv


def control(P, r, sizes):
    """Bytes of one shard-size allgather (pickled (nq, nk) of every rank)."""
    return (len(pickle.dumps(sizes[r])) * (P - 1),
            sum(len(pickle.dumps(s)) for i, s in enumerate(sizes) if i != r))


def expected_bytes(variant, P, K, r, nq, nk, B, H, Hkv, D, itemsize):
    """(sent, received) per rank for forward + backward, from the partition alone."""
    K = P if variant == "ring" else K
    sent, recv, acc_sent, acc_recv = traveller_blocks(P, K, r)
    kv = [2 * B * Hkv * nk[q] * D * itemsize for q in range(P)]        # K and V of block q
    if variant == "ring":
        travel = kv                                                     # K, V again
        acc = [2 * B * Hkv * nk[q] * D * 4 for q in range(P)]          # dK, dV float32
    else:
        travel = [B * H * nq[q] * (2 * D * itemsize + 2 * 4) + 8 * nq[q] for q in range(P)]  # Q, dO, lse, D, positions
        acc = [B * H * nq[q] * D * 4 for q in range(P)]                # dQ float32
    fwd = (sum(kv[q] for q in sent), sum(kv[q] for q in recv))
    bwd = (sum(travel[q] for q in sent) + sum(acc[q] for q in acc_sent),
           sum(travel[q] for q in recv) + sum(acc[q] for q in acc_recv))
    return fwd, bwd


def node_collective_bytes(P, K, r, nbytes):
    """(sent, received) of one topology-aware allreduce of nbytes: node reduce, leaders'
    allreduce, node broadcast, with nodes of K consecutive ranks (counts of comm.py)."""
    node, lr = r // K, r % K
    L = min(K, P - node * K)
    nodes = -(-P // K)
    sent = recv = 0
    if L > 1:
        if lr == 0:
            recv += nbytes * (L - 1)
            sent += nbytes * (L - 1)
        else:
            sent += nbytes
            recv += nbytes
    if lr == 0 and nodes > 1:
        sent += nbytes
        recv += nbytes
    return sent, recv


def allreduce_bytes(P, K, r, nbytes):
    """(sent, received) of tree's allreduce of nbytes: flat (one send, one receive), or
    topology-aware when nodes of K ranks make more than one node and fewer than P (K None:
    one machine, one node)."""
    if P == 1:
        return 0, 0
    nodes = -(-P // K) if K else 1
    return node_collective_bytes(P, K, r, nbytes) if 1 < nodes < P else (nbytes, nbytes)


def tree_bytes(P, K, r, nq, B, H, D, itemsize, method="packed"):
    """((sent, received) forward, (sent, received) backward) of tree for rank r; nq: every
    rank's query rows. Forward: every rank's query rows (dtype) and positions gathered, the
    partial (o, lse) combined ("packed": one allreduce of [lse, o]; "three": lse, o, weights).
    Backward: q, dO, lse, D gathered as float32 with the positions, dQ summed by one flat
    allreduce."""
    if P == 1:
        return (0, 0), (0, 0)
    Nq, mine = sum(nq), nq[r]

    def gather(row):
        return [mine * row * (P - 1), (Nq - mine) * row]
    fwd = gather(B * H * D * itemsize + 8)
    reduced = [B * H * Nq * 4 * (D + 1)] if method == "packed" else [B * H * Nq * 4 * x for x in (1, D, 1)]
    for nbytes in reduced:
        s, rv = allreduce_bytes(P, K, r, nbytes)
        fwd = [fwd[0] + s, fwd[1] + rv]
    bwd = gather(B * H * (2 * D + 2) * 4 + 8)
    dq = B * H * Nq * D * 4
    return tuple(fwd), (bwd[0] + dq, bwd[1] + dq)


def call_bytes(variant, P, K, r, rows, B, H, Hkv, D, itemsize):
    """(forward, backward) (sent, received) of one attention and one attention_backward call
    of ring, burst or tree through the API (each with its shard-size allgather) on self-attention
    shards of rows[i] rows; None for other variants."""
    if variant == "tree":
        fwd, bwd = tree_bytes(P, K, r, rows, B, H, D, itemsize)
    elif variant in ("ring", "burst"):
        fwd, bwd = expected_bytes(variant, P, K, r, rows, rows, B, H, Hkv, D, itemsize)
    else:
        return None
    c = control(P, r, [(n, n) for n in rows])
    return tuple(a + b for a, b in zip(fwd, c)), tuple(a + b for a, b in zip(bwd, c))


def shard_data(N, B, H, Hkv, D, dtype, spec, seed):
    rng = np.random.default_rng(seed)
    q, do = (rng.standard_normal((B, N, H, D)).astype(dtype) for _ in range(2))
    k, v = (rng.standard_normal((B, N, Hkv, D)).astype(dtype) for _ in range(2))
    P = world().size
    layout = "zigzag" if parse(spec).causal else "contiguous"
    segs = [segments(N, P, i, layout) for i in range(P)]
    return q, k, v, do, layout, segs


def sdpa(q, k, v, spec, qpos, n):
    """PyTorch SDPA over the whole sequence with the mask as a boolean matrix: torch tensors
    q (B, n, H, D) at positions qpos, k, v (B, N, Hkv, D)."""
    import torch
    from hpcattn.masks import parse
    mask = parse(spec)
    mask = mask.bind(n_keys=n) if "n_keys" in mask.needs else mask
    allowed = torch.from_numpy(mask.allowed(np.asarray(qpos)[:, None], np.arange(n)[None, :]))
    G = q.shape[2] // k.shape[2]
    heads = lambda x, g: x.transpose(1, 2).repeat_interleave(g, 1)  # noqa: E731
    o = torch.nn.functional.scaled_dot_product_attention(heads(q, 1), heads(k, G), heads(v, G),
                                                         attn_mask=allowed)
    return o.transpose(1, 2)


def rel(a, b):
    """max |a - b| / max |b| of torch tensors, b the float64 reference."""
    return ((a.double() - b).abs().max() / b.abs().max()).item()


def leaves(shapes, dtype, seed):
    """Random torch leaf tensors that require grad, the same for a seed on every rank."""
    import torch
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in shapes]

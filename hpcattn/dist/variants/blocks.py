"""One rank's query rows against one travelling key block, over their layout segments.

A rank's rows may be several contiguous runs of positions (two in the zigzag layout). The local
kernels are called once per (query run, key run) pair whose mask spans are not empty, so blocks
the mask leaves empty cost no compute, and a query tile never straddles two distant runs.
"""
import numpy as np

from ...arrays import array_module
from ...cpu import grad, local
from ...merge import empty_state, merge
from ...profile import phase


def runs(n_rows, lengths):
    """Row slices of the runs of a block with the given run lengths (they sum to n_rows)."""
    cuts = np.concatenate([[0], np.cumsum(lengths)]).astype(int)
    assert cuts[-1] == n_rows, (cuts, n_rows)
    return [slice(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


def query_runs(qpos, lengths):
    """The plan of a block of query rows at host positions qpos: (row slice, lowest position,
    highest position) of each run (lengths as in `runs`). Made once per block of rows (a
    rank's own rows: once per call), not once per key block they meet."""
    return [(qs, int(qpos[qs].min()), int(qpos[qs].max())) for qs in runs(len(qpos), lengths)]


def _pairs(qplan, kstarts, kruns, mask):
    for qs, lo, hi in qplan:
        for k0, ks in zip(kstarts, kruns):
            if mask.spans(lo, hi, k0, k0 + ks.stop - ks.start):
                yield qs, k0, ks


def forward(q, qpos, qplan, k, v, kstarts, kruns, mask, scale, o, lse, progress=None):
    """Merge the block partial of q's rows over the keys k, v (runs starting at global
    positions kstarts) into (o, lse); returns (o, lse, edges). qplan: query_runs of qpos.
    o = lse = None means no partial yet: the first one that covers every row becomes the
    state as it is (a merge with the identity gives the same bits), else the state starts as
    the identity. progress() is called between kernel calls, so posted transfers advance."""
    edges = 0
    for qs, k0, ks in _pairs(qplan, kstarts, kruns, mask):
        po, pl, n = local.attend(q[:, :, :, qs], qpos[qs], k[:, :, ks], v[:, :, ks], k0, mask, scale)
        if o is None and qs == slice(0, q.shape[3]):
            o, lse = po, pl
        else:
            if o is None:
                o, lse = new_state(q)
            with phase("merge"):
                o[:, :, :, qs], lse[:, :, :, qs] = merge(o[:, :, :, qs], lse[:, :, :, qs], po, pl)
        edges += int(n)
        if progress is not None:
            progress()
    return o, lse, edges


def backward(q, qpos, qplan, do, lse, delta, k, v, kstarts, kruns, mask, scale, dq, dk, dv,
             progress=None):
    """Add the block's gradient contributions into the float32 accumulators dq (q's rows) and
    dk, dv (the block's keys); returns the edges visited. qplan: query_runs of qpos.
    progress() runs after every tile."""
    edges = 0
    for qs, k0, ks in _pairs(qplan, kstarts, kruns, mask):
        sub_dq = dq[:, :, :, qs]
        _, sub_dk, sub_dv, n = grad.backward(q[:, :, :, qs], qpos[qs], k[:, :, ks], v[:, :, ks], k0,
                                             mask, scale, do[:, :, :, qs], lse[:, :, :, qs],
                                             delta[:, :, :, qs], sub_dq, dk[:, :, ks], dv[:, :, ks],
                                             progress)
        dq[:, :, :, qs] = sub_dq
        edges += n
    return edges


def new_state(q):
    """The merge identity for q's rows."""
    B, Hkv, G, nq, D = q.shape
    return empty_state(array_module(q), (B, Hkv, G, nq), D)

"""The one ring helper: a (two-level) ring planned once, the circulation of travelling blocks
with the next transfer posted before each compute, and the relay that carries gradient
accumulators behind their blocks and home.

Ranks are grouped into M nodes of L ranks and ordered by (node, rank); the rank at node n,
lane l holds, at step k = s*L + t, the block of the rank at (n - s, l - t). Inside a node the
blocks move one lane per step (intra-node hops); the block a rank starts an outer step with
also goes to the same lane of the next node, and that one inter-node transfer runs during the
L intra-node steps (BurstAttention's two-level ring). M = 1 is the plain ring. Every rank sees
every block exactly once; every transfer is a posted Irecv/Isend pair, so any P (1 included)
is deadlock-free.
"""
import numpy as np

from ...arrays import aligned_empty, array_module
from ...profile import phase

TAG_INTRA, TAG_INTER, TAG_RELAY = 100, 200, 1000


class RingPlan:
    """Which block a rank holds at each step and who sends it what; pure (no MPI).

    node_of: the node id of every rank (any hashable, equal within a node). Nodes of unequal
    size fall back to a one-level ring over all ranks (levels reports (M, L)).
    """

    def __init__(self, rank, node_of, two_level=True):
        P = len(node_of)
        order = sorted(range(P), key=lambda q: (node_of[q], q))
        counts = {}
        for n in node_of:
            counts[n] = counts.get(n, 0) + 1
        L = next(iter(counts.values()))
        if not two_level or len(set(counts.values())) != 1:
            L = P
        self.P, self.M, self.L, self.rank = P, P // L, L, rank
        self._order = order
        self._pos = {q: i for i, q in enumerate(order)}
        n, l = divmod(self._pos[rank], L)
        self.intra_next, self.intra_prev = self.at(n, l + 1), self.at(n, l - 1)
        self.inter_next, self.inter_prev = self.at(n + 1, l), self.at(n - 1, l)
        self.held = [self._held(rank, k) for k in range(P)]
        # who held my step-k block at step k-1, and who holds it at step k+1 (its home at the end)
        self.prev_holder = [self._holder(self.held[k], k - 1) for k in range(P)]
        self.next_holder = [self._holder(self.held[k], k + 1) if k < P - 1 else self.held[k]
                            for k in range(P)]
        self.last_holder = self._holder(rank, P - 1)

    @property
    def levels(self):
        return self.M, self.L

    def at(self, n, l):
        return self._order[(n % self.M) * self.L + l % self.L]

    def _held(self, q, k):
        n, l = divmod(self._pos[q], self.L)
        s, t = divmod(k, self.L)
        return self.at(n - s, l - t)

    def _holder(self, owner, k):
        n, l = divmod(self._pos[owner], self.L)
        s, t = divmod(k, self.L)
        return self.at(n + s, l + t)


class Buffers:
    """Plan-once receive buffers: `copies` sets of flat arrays as large as the largest block,
    handed out as contiguous views of the shape a block needs. Callers ask for as many copies
    as they use (two alternate; one transfer needs one; none is allowed)."""

    def __init__(self, sizes_dtypes, copies, xp=np):
        self._flat = [[aligned_empty(xp, n, dt) for n, dt in sizes_dtypes] for _ in range(copies)]

    @property
    def copies(self):
        return len(self._flat)

    def views(self, i, shapes):
        return [flat[:int(np.prod(s))].reshape(s) for flat, s in zip(self._flat[i], shapes)]


def circulate(comm, plan, mine, shapes_of):
    """Yield (step, owner, arrays) for every block of the ring in this rank's order.

    mine: this rank's contiguous host or device arrays (the travellers); shapes_of(owner): their shapes
    on that rank. The transfers of the next step are posted before each yield, so they
    overlap the caller's compute; yielded arrays are read-only and valid until the next step.
    """
    P, M, L = plan.P, plan.M, plan.L
    dtypes = [a.dtype for a in mine]
    largest = [max(int(np.prod(shapes_of(q)[i])) for q in range(P)) for i in range(len(mine))]
    spec = list(zip(largest, dtypes))
    xp = array_module(mine[0])
    # M * (L - 1) intra-node and M - 1 inter-node receives alternate between two copies each;
    # a level with one receive (P = 2, or two nodes) needs one copy, a level with none none
    intra = Buffers(spec, min(2, M * (L - 1)), xp)
    inter = Buffers(spec, min(2, M - 1), xp)
    cur, n_intra, n_inter = list(mine), 0, 0
    for s in range(M):
        outer = None
        if s < M - 1:
            nxt = plan.held[(s + 1) * L]
            with phase(f"hop {(s + 1) * L} send/recv"):
                outer = comm.exchange(cur, plan.inter_next, inter.views(n_inter % 2, shapes_of(nxt)),
                                      plan.inter_prev, tag=TAG_INTER)
            n_inter += 1
        for t in range(L):
            k = s * L + t
            hop = None
            if t < L - 1:
                with phase(f"hop {k + 1} send/recv"):
                    hop = comm.exchange(cur, plan.intra_next,
                                        intra.views(n_intra % 2, shapes_of(plan.held[k + 1])),
                                        plan.intra_prev, tag=TAG_INTRA)
                n_intra += 1
            yield k, plan.held[k], cur
            if hop is not None:
                with phase(f"hop {k + 1} wait"):
                    cur = hop.wait()
        if outer is not None:
            with phase(f"hop {(s + 1) * L} wait"):
                cur = outer.wait()


def circulate_accumulating(comm, plan, mine, shapes_of, own, acc_shapes_of):
    """Yield (step, owner, arrays, acc) like `circulate`, with acc the float32 gradient
    accumulators of the held block: `own` (this rank's, shaped acc_shapes_of(rank)) at step 0,
    else zeroed ones that a Relay passes on to the next holder after the caller adds its part.
    When the loop ends, what every other rank added for this rank's block is summed into `own`.
    The caller must run the loop to its end (every rank takes part in every transfer)."""
    relay = Relay(comm, plan, acc_shapes_of, array_module(own[0]))
    for step, owner, arrays in circulate(comm, plan, mine, shapes_of):
        acc = own if step == 0 else relay.part(step)
        yield step, owner, arrays, acc
        if step:
            relay.send(step, acc)
    rest = relay.finish()
    if rest is not None:
        for a, got in zip(own, rest):
            a += got


class Relay:
    """Carries float32 gradient accumulators behind travelling blocks: the holder at step k
    adds its part to what the holder at step k-1 sent and passes it to the holder at step
    k+1, or home after the last step. A block's owner keeps its own (step-0) part, so each
    accumulator makes P-1 hops. shapes_of(owner): the accumulator shapes of owner's block;
    xp: the array module the accumulators live in (numpy or cupy)."""

    def __init__(self, comm, plan, shapes_of, xp=np):
        self.comm, self.plan, self.shapes_of, self.xp = comm, plan, shapes_of, xp
        largest = [max(int(np.prod(s)) for s in (shapes_of(q)[i] for q in range(plan.P)))
                   for i in range(len(shapes_of(plan.rank)))]
        spec = [(n, np.float32) for n in largest]
        hops = plan.P - 1
        # steps 1 .. P-1 fill a part each (two alternate: one may still be in flight); steps
        # 2 .. P-1 receive the previous holder's sum into `incoming`, which then takes the home
        # receive too. P = 2: one part and a home buffer; P = 1: nothing.
        self._parts = Buffers(spec, min(2, hops), xp)
        self._incoming = Buffers(spec, 1 if hops >= 2 else 0, xp)
        self._recv = self._send = None

    def part(self, k):
        """Zeroed accumulators for the block held at step k (k >= 1), posting the receive of
        what the previous holder sends."""
        owner = self.plan.held[k]
        if k >= 2:
            self._recv = self.comm.exchange([], None, self._incoming.views(0, self.shapes_of(owner)),
                                            self.plan.prev_holder[k], tag=TAG_RELAY + 8 * k)
        bufs = self._parts.views((k - 1) % 2, self.shapes_of(owner))
        for b in bufs:
            b.fill(0)
        return bufs

    def send(self, k, bufs):
        """Add what arrived for step k, then pass the accumulators on (to home after the last step)."""
        if self._recv is not None:
            for b, got in zip(bufs, self._recv.wait()):
                b += got
            self._recv = None
        if self._send is not None:
            self._send.wait()
        self._send = self.comm.exchange(bufs, self.plan.next_holder[k], [], None,
                                        tag=TAG_RELAY + 8 * (k + 1))

    def finish(self):
        """This rank's own accumulators as summed by every other rank (None when P == 1)."""
        if self.plan.P == 1:
            return None
        mine = self.shapes_of(self.plan.rank)
        # the last relay receive was added in send(P-1): `incoming` is free (none at P = 2)
        bufs = (self._incoming.views(0, mine) if self.plan.P > 2
                else [self.xp.empty(s, np.float32) for s in mine])
        home = self.comm.exchange([], None, bufs, self.plan.last_holder, tag=TAG_RELAY + 8 * self.plan.P)
        got = home.wait()
        if self._send is not None:
            self._send.wait()
            self._send = None
        return got

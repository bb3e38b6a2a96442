"""A CPU model of kernels/attend_wgmma.cu's SCHED 1 synchronisation (no GPU): the loader (each commit
group signalled once the next is issued), the ST-stage K/V ring and the double-buffered q (mbarriers with
phase counts), and NWG consumers taking turns through named barriers 2 .. 1 + NWG (bar.sync / bar.arrive
of 128 threads each, 256 to a generation), run in random interleavings over random items (tile counts,
each consumer's first and last tile, consumers with no tiles). It reports deadlocks, a barrier generation
completed by anything but its owner's wait and its predecessor's arrival, an mbarrier two phases ahead of
a wait (parity aliasing), and arrivals left at the end.

    python3 jobs/wgmma_turns_model.py [TRIALS]
"""

import random
import sys


def run(seed, NWG, ST, nitems_blk):
    R = random.Random(seed)
    items = []
    for n in range(nitems_blk):
        nt = R.choice([0, 0, 1, 2, 3, 5, 8])
        fl = []
        for w in range(NWG):
            if nt == 0 or R.random() < 0.2:
                fl.append((1, 0))
            else:
                a = R.randrange(nt)
                b = R.randrange(a, nt)
                fl.append((a, b))
        items.append((nt, fl))
    comp = {}  # mbarrier -> completed phases
    cnt = {}  # mbarrier -> arrivals in current phase
    need = {}

    def mb_init(b, n):
        comp[b] = 0
        cnt[b] = 0
        need[b] = n

    def mb_arrive(b):
        cnt[b] += 1
        if cnt[b] == need[b]:
            cnt[b] = 0
            comp[b] += 1

    for b in range(ST):
        mb_init(("full", b), 1)
        mb_init(("empty", b), NWG)
    for s in range(2):
        mb_init(("qfull", s), 1)
        mb_init(("qempty", s), NWG)
    nb = {}  # named barrier id -> list of (kind, who) in current generation
    released = set()  # (who, ticket) of syncs released
    errors = []

    def bar_arrive(i, who):
        op(i, ("arv", who), None)

    def op(i, entry, ticket):
        g = nb.setdefault(i, [])
        g.append((entry, ticket))
        if len(g) == 2:
            kinds = sorted(e[0][0] for e in g)
            if kinds != ["arv", "sync"]:
                errors.append(f"barrier {i} completed by {g}")
            owner = i - 2
            pred = (owner - 1) % NWG
            for (k, w), t in g:
                if k == "sync" and w != owner:
                    errors.append(f"consumer {w} synced on {i}")
                if k == "arv" and w != pred:
                    errors.append(f"consumer {w} arrived on {i}, pred {pred}")
            for e, t in g:
                if t is not None:
                    released.add(t)
            nb[i] = []

    tick = [0]

    def bar_sync(i, who):  # generator: registers then waits
        tick[0] += 1
        t = tick[0]
        op(i, ("sync", who), t)
        yield lambda: t in released

    def wait(b, idx):  # wait for the idx-th completion (0-based); parity aliasing check
        def c():
            if comp[b] > idx + 1:
                errors.append(f"parity alias on {b}: {comp[b]} completions, waiting {idx}")
            return comp[b] >= idx + 1

        return c

    def loader():
        ntile = 0
        pend = None

        def signal():
            if pend is None:
                return
            mb_arrive(("full", pend[1] % ST) if pend[0] == "t" else ("qfull", pend[1]))

        for n, (nt, _) in enumerate(items):
            slot = n & 1
            if n >= 2:
                yield wait(("qempty", slot), n // 2 - 1)
            signal()
            pend = ("q", slot)
            for t in range(nt):
                b = ntile % ST
                if ntile >= ST:
                    yield wait(("empty", b), ntile // ST - 1)
                signal()
                pend = ("t", ntile)
                ntile += 1
        signal()

    def consumer(cw):
        kb = [0]
        fills = [0]  # buffer and fill index of the next tile

        def tile_idx():
            return fills[0] * ST + kb[0]

        def adv():
            kb[0] += 1
            if kb[0] == ST:
                kb[0] = 0
                fills[0] += 1

        def wait_full():
            return wait(("full", kb[0]), fills[0])

        def turn_wait():
            yield from bar_sync(2 + cw, cw)

        def turn_pass():
            bar_arrive(2 + (cw + 1) % NWG, cw)

        def take_turn():  # the next tile's stage full, then this consumer's turn at issuing
            yield wait_full()
            yield from turn_wait()
            turn_pass()

        def skip_tile():  # a tile outside this consumer's rows: an empty turn, the stage released
            yield from take_turn()
            mb_arrive(("empty", kb[0]))
            adv()

        for n, (nt, fl) in enumerate(items):
            slot = n & 1
            if n == 0 and cw == NWG - 1:
                turn_pass()
            yield wait(("qfull", slot), n // 2)
            first, last = fl[cw]
            t = 0
            while t < first and t < nt:
                yield from skip_tile()
                t += 1
            if first <= last:
                yield from take_turn()
                pb = kb[0]
                adv()
                t += 1
                while t <= last:
                    yield from take_turn()
                    mb_arrive(("empty", pb))
                    pb = kb[0]
                    t += 1
                    adv()
                mb_arrive(("empty", pb))
            while t < nt:
                yield from skip_tile()
                t += 1
            mb_arrive(("qempty", slot))
            if cw == 0 and n + 1 == len(items):
                yield from turn_wait()

    procs = {"L": loader(), **{w: consumer(w) for w in range(NWG)}}
    conds = {}
    for k, g in list(procs.items()):
        try:
            conds[k] = next(g)
        except StopIteration:
            del procs[k]
    while procs:
        ready = [k for k in procs if conds[k]()]
        if errors:
            return errors
        if not ready:
            return [f"DEADLOCK seed {seed}: waiting {list(procs)} items {items}"]
        k = R.choice(ready)
        try:
            conds[k] = procs[k].send(None)
        except StopIteration:
            del procs[k]
    left = {i: g for i, g in nb.items() if g}
    if left:
        errors.append(f"barrier left with {left}")
    return errors


def main():
    bad = 0
    for seed in range(int(sys.argv[1]) if len(sys.argv) > 1 else 20000):
        R = random.Random(seed)
        NWG, ST, ni = R.choice([2, 3]), R.choice([3, 4, 5, 8]), R.choice([1, 2, 3, 5, 9])
        e = run(seed, NWG, ST, ni)
        if e:
            bad += 1
            if bad <= 3:
                print(NWG, ST, ni, e[:2])
    print("trials with errors:", bad)


if __name__ == "__main__":
    main()

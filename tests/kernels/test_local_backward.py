"""One process: the local backward kernel, the ring plan (pure) and `run --backward`."""
import h5py
import numpy as np
import pytest
from mpi4py import MPI

import hpcattn
from hpcattn.cpu import grad, local
from hpcattn.api import from_heads, to_heads
from hpcattn.masks import parse
from hpcattn.reference import grad_error, grad_tolerance, reference_backward
from hpcattn.dist.variants.rings import RingPlan

from helpers import hpcattn as hpcattn_cli, mpiexec


def heads(q, k, v, do, hkv):
    return to_heads(q, hkv), to_heads(k, hkv)[:, :, 0], to_heads(v, hkv)[:, :, 0], to_heads(do, hkv)


@pytest.mark.parametrize("spec", ["full", "causal", "window:7", "causal+window:33", "dilated:3:5",
                                  "block:50", "global:4+window:2", "causal+global:5", "block:10+causal"])
@pytest.mark.parametrize("B,N,H,Hkv,D,dtype", [(1, 300, 1, 1, 64, "float32"), (2, 257, 4, 2, 48, "float32"),
                                               (1, 313, 6, 2, 32, "float16"), (1, 200, 2, 1, 64, "bfloat16")])
def test_kernel_over_key_blocks_matches_float64_gradients(rng, spec, B, N, H, Hkv, D, dtype):
    """Three uneven key blocks, summed, give the exact dq, dk, dv (GQA: dk, dv sum over G)."""
    q, do = (rng.standard_normal((B, N, H, D)).astype(dtype) for _ in range(2))
    k, v = (rng.standard_normal((B, N, Hkv, D)).astype(dtype) for _ in range(2))
    mask, scale, pos = parse(spec), 1 / np.sqrt(D), np.arange(N)
    qh, kh, vh, doh = heads(q, k, v, do, Hkv)
    o, lse, _ = local.attend(qh, pos, kh, vh, 0, mask, scale)
    delta = grad.row_delta(doh, o)
    dq, dks, dvs, edges = None, [], [], 0
    for a, b in ((0, 37), (37, 200), (200, N)):
        dq, dk, dv, n = grad.backward(qh, pos, kh[:, :, a:b], vh[:, :, a:b], a, mask, scale, doh, lse, delta, dq=dq)
        dks.append(dk)
        dvs.append(dv)
        edges += n
    want = reference_backward(q, k, v, do, pos, mask, scale)
    got = (from_heads(dq, dtype), from_heads(np.concatenate(dks, 2)[:, :, None], dtype),
           from_heads(np.concatenate(dvs, 2)[:, :, None], dtype))
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert grad_error(g, w) <= grad_tolerance(dtype), name
    assert edges == mask.allowed(pos[:, None], pos[None, :]).sum()


def test_rows_without_edges_and_decode_positions_give_zero_not_nan(rng):
    N, D = 120, 16
    q, do = (rng.standard_normal((1, 4, 2, D)).astype("float32") for _ in range(2))
    k, v = (rng.standard_normal((1, N, 1, D)).astype("float32") for _ in range(2))
    qpos = np.array([5, 60, 118, 119])
    mask = parse("window:0")   # keys [40, 100) only: rows 5, 118, 119 have no edge there
    qh, kh, vh, doh = heads(q, k[:, 40:100], v[:, 40:100], do, 1)
    o, lse, _ = local.attend(qh, qpos, kh, vh, 40, mask, 0.3)
    dq, dk, dv, edges = grad.backward(qh, qpos, kh, vh, 40, mask, 0.3, doh, lse, grad.row_delta(doh, o))
    assert edges == 1 and np.isfinite(dq).all() and np.isfinite(dk).all()
    assert (dq[..., [0, 2, 3], :] == 0).all() and (dv[:, :, [i for i in range(60) if i != 20]] == 0).all()
    mask = parse("causal+block:50")
    o, lse = hpcattn.attention(q, k, v, mask=mask, comm=MPI.COMM_SELF, q_positions=qpos)
    for variant in ("ring", "burst"):
        got = hpcattn.attention_backward(q, k, v, o, lse, do, mask=mask, comm=MPI.COMM_SELF,
                                         q_positions=qpos, variant=variant)
        for g, w in zip(got, reference_backward(q, k, v, do, qpos, mask, 0.25)):
            assert grad_error(g, w) <= 1e-4


@pytest.mark.parametrize("P, K", [(1, 1), (2, 1), (2, 2), (4, 2), (6, 3), (6, 2), (8, 4), (5, 2), (7, 7)])
def test_ring_plan_shows_every_block_once_and_relays_end_home(P, K):
    nodes = [q // K for q in range(P)]
    plans = [RingPlan(r, nodes) for r in range(P)]
    M, L = plans[0].levels
    assert M * L == P and (L == K if P % K == 0 else L == P)
    for r, p in enumerate(plans):
        assert sorted(p.held) == list(range(P)) and p.held[0] == r
        if M > 1:   # intra hops stay in the node, inter hops go to the same lane of the next node
            assert nodes[p.intra_next] == nodes[r] and nodes[p.inter_next] == (nodes[r] + 1) % M
    for k in range(P):   # at every step the ranks hold distinct blocks; relays follow the holders
        assert sorted(p.held[k] for p in plans) == list(range(P))
        for r, p in enumerate(plans):
            if k + 1 < P:
                assert plans[p.next_holder[k]].held[k + 1] == p.held[k]
                assert plans[p.next_holder[k]].prev_holder[k + 1] == r
            else:
                assert p.next_holder[k] == p.held[k] and plans[p.held[k]].last_holder == r


def test_shared_memory_grouping_is_one_node_here():
    comm = hpcattn.Comm(MPI.COMM_SELF)
    assert comm.node_ids() == [0] and comm.node_ids(3) == [0]
    comm.free()


def test_cli_run_backward_on_three_ranks_with_two_per_node(tmp_path):
    inp, out = tmp_path / "in.h5", tmp_path / "out.h5"
    assert hpcattn_cli("gen", inp, "--seq", 150, "--heads", 2, "--head-dim", 16, "--backward",
                       "--dtype", "float16").returncode == 0
    res = mpiexec(3, "run", inp, out, "--mask", "causal+window:30", "--variant", "burst", "--backward",
                  "--ranks-per-node", 2)
    assert res.returncode == 0, res.stderr
    assert "slowest rank" in res.stdout
    with h5py.File(out) as f, h5py.File(inp) as g:
        want = reference_backward(g["q"][...], g["k"][...], g["v"][...], g["do"][...], np.arange(150),
                                  parse("causal+window:30"), f.attrs["scale"])
        for name, w in zip(("dq", "dk", "dv"), want):
            assert f[name].dtype == np.float16 and grad_error(f[name][...], w) <= grad_tolerance("float16")
        assert f.attrs["ranks_per_node"] == 2 and list(f.attrs["ring_levels"]) == [1, 3]
    res = hpcattn_cli("verify", inp, out)
    assert res.returncode == 0 and "dq/dk/dv max rel err" in res.stdout and "PASS" in res.stdout
    with h5py.File(out, "r+") as f:
        f["dk"][0, 7, 1, 3] += 1.0
    res = hpcattn_cli("verify", inp, out)
    assert res.returncode == 1 and "FAIL" in res.stdout


def test_cli_refuses_backward_without_do_and_bad_ranks_per_node(tmp_path):
    inp = tmp_path / "in.h5"
    assert hpcattn_cli("gen", inp, "--seq", 40, "--head-dim", 8).returncode == 0
    res = hpcattn_cli("run", inp, tmp_path / "o.h5", "--mask", "causal", "--backward")
    assert res.returncode == 1 and "no dataset 'do'" in res.stderr
    res = hpcattn_cli("run", inp, tmp_path / "o.h5", "--mask", "causal", "--ranks-per-node", 0)
    assert res.returncode == 1 and "--ranks-per-node must be >= 1" in res.stderr
    assert not (tmp_path / "o.h5").exists()

"""`hpcattn verify`: compare a result file with the float64 dense reference."""
import h5py
import numpy as np

from ..errors import HpcattnError
from ..io import h5io
from ..io.outofcore import bounded
from ..masks import parse
from ..partition import even_offsets
from ..reference import errors, grad_error, grad_tolerance, reference, reference_backward, tolerance
from .launch import on_root

ALL_ROWS_LIMIT = 1 << 30  # Nq * N up to which every row is checked by default
DEFAULT_SAMPLE = 2048


def pick_rows(nq, rows, ranks, seed=0):
    """Row indices to check: all when rows is None, else `rows` random ones plus the first,
    last and shard-boundary rows (where layout bugs show first), sorted and unique."""
    if rows is None or rows >= nq:
        return np.arange(nq)
    edges = even_offsets(nq, max(1, ranks))
    special = np.concatenate([[0, nq - 1], edges[1:-1] - 1, edges[1:-1]])
    picked = np.random.default_rng(seed).choice(nq, size=rows, replace=False)
    return np.unique(np.clip(np.concatenate([special, picked]), 0, nq - 1))


LOCAL_KEYS_FROM = 1 << 24  # longer sequences (or sampled rows of a bounded mask): read only
                           # the keys each row reaches


def _reference_by_spans(f, q, qpos, mask, scale):
    """The float64 reference row by row over only the keys `mask.spans` names for the row,
    so sampled rows of a sequence far larger than memory can be checked."""
    B, nr, H, D = q.shape
    N = f["k"].shape[1]
    o, lse = np.zeros((B, nr, H, D)), np.full((B, H, nr), -np.inf)
    for i in range(nr):  # a loop over the few sampled rows, each with its own key spans
        spans = mask.spans(int(qpos[i]), int(qpos[i]), 0, N)
        if not spans:
            continue
        keys = np.concatenate([np.arange(a, b) for a, b in spans])
        k = np.concatenate([h5io.read(f["k"], np.s_[:, a:b]) for a, b in spans], axis=1)
        v = np.concatenate([h5io.read(f["v"], np.s_[:, a:b]) for a, b in spans], axis=1)
        o[:, i:i + 1], lse[:, :, i:i + 1] = reference(q[:, i:i + 1], k, v, qpos[i:i + 1], mask, scale, keys)
    return o, lse


def verify(in_path, out_path, rows=None):
    """Report dict: rows checked, max relative errors of o and lse, tolerances, passed."""
    meta = h5io.read_meta(in_path)
    with h5io._open(out_path) as f:
        if f.attrs.get("complete", 0) != 1:
            raise HpcattnError(f"{out_path!r} is not a complete result (attribute complete != 1)")
        for name, shape in (("o", (meta["B"], meta["Nq"], meta["H"], meta["D"])),
                            ("lse", (meta["B"], meta["H"], meta["Nq"]))):
            if name not in f or f[name].shape != shape:
                raise HpcattnError(f"{out_path!r}: dataset {name!r} missing or not shaped {shape}")
        mask, scale, ranks = parse(str(f.attrs["mask"])), float(f.attrs["scale"]), int(f.attrs["ranks"])
        if rows is None and meta["Nq"] * meta["N"] > ALL_ROWS_LIMIT:
            rows = DEFAULT_SAMPLE
        idx = pick_rows(meta["Nq"], rows, ranks)
        o, lse = h5io.read(f["o"], np.s_[:, idx]), f["lse"][:, :, idx]
    with h5py.File(in_path, "r") as f:
        q = h5io.read(f["q"], np.s_[:, idx])
        qpos = f["q_positions"][idx].astype(np.int64) if meta["positions"] else idx.astype(np.int64)
    mask = mask.bind(n_keys=meta["N"])
    if "csr" in mask.needs:
        mask = mask.bind(csr=h5io.read_csr(in_path, meta, qpos))
    with h5py.File(in_path, "r") as f:
        if meta["N"] > LOCAL_KEYS_FROM or (len(idx) < meta["Nq"] and bounded(mask)):
            o_ref, lse_ref = _reference_by_spans(f, q, qpos, mask, scale)
        else:
            o_ref, lse_ref = reference(q, h5io.Lazy(f["k"]), h5io.Lazy(f["v"]), qpos, mask, scale)
    o_err, lse_err, empty_ok = errors(o, lse, o_ref, lse_ref)
    o_tol, lse_tol = tolerance(meta["dtype"])
    rep = {"rows": len(idx), "of": meta["Nq"], "o_err": o_err, "lse_err": lse_err,
           "o_tol": o_tol, "lse_tol": lse_tol, "empty_rows_ok": empty_ok,
           "passed": o_err <= o_tol and lse_err <= lse_tol and empty_ok}
    rep.update(_verify_grads(in_path, out_path, meta, mask, scale, len(idx) == meta["Nq"]))
    rep["passed"] = rep["passed"] and rep.get("grad_err", 0.0) <= rep.get("grad_tol", 0.0)
    return rep


def _verify_grads(in_path, out_path, meta, mask, scale, all_rows):
    """grad_err (max over dq, dk, dv) and grad_tol when the output holds gradients; dk and dv
    need every query row, so gradients are checked only when all rows are."""
    with h5py.File(out_path, "r") as f:
        if "dq" not in f:
            return {}
        if not all_rows or not meta["do"]:
            return {"grads": "not checked (needs all rows and do)"}
        got = [h5io.read(f[n]) for n in ("dq", "dk", "dv")]
    with h5py.File(in_path, "r") as f:
        qpos = f["q_positions"][...].astype(np.int64) if meta["positions"] else np.arange(meta["Nq"])
        want = reference_backward(*(h5io.read(f[n]) for n in ("q", "k", "v", "do")), qpos, mask, scale)
    return {"grad_err": max(grad_error(g, w) for g, w in zip(got, want)), "grad_tol": grad_tolerance(meta["dtype"])}


def add_parser(sub):
    v = sub.add_parser("verify", help="compare a result with the float64 reference")
    v.add_argument("input")
    v.add_argument("output")
    v.add_argument("--rows", type=int, help="check K sampled rows (default: all rows when "
                   "Nq*N <= 2^30, else 2048 sampled)")
    return v


def cmd_verify(args, comm):
    rep = on_root(comm, verify, args.input, args.output, args.rows)
    if comm.rank == 0:
        print(f"hpcattn verify: {rep['rows']} of {rep['of']} rows against float64: "
              f"o max rel err {rep['o_err']:.2e} (tol {rep['o_tol']:.0e}), "
              f"lse max rel err {rep['lse_err']:.2e} (tol {rep['lse_tol']:.0e}), "
              f"empty rows {'ok' if rep['empty_rows_ok'] else 'WRONG'}"
              + (f", dq/dk/dv max rel err {rep['grad_err']:.2e} (tol {rep['grad_tol']:.0e})"
                 if "grad_err" in rep else "")
              + f": {'PASS' if rep['passed'] else 'FAIL'}")
    return 0 if rep["passed"] else 1

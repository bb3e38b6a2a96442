"""The tensor-core kernels on small uneven cases (forward and backward, every kernel kind, D = 64
and 128, GQA, masks with empty rows and key tiles), for test_gpu_sanitizer.py to run under
compute-sanitizer: a script, not a test module."""
import math

import cupy as cp
import numpy as np

from hpcattn.gpu import backward, forward, loader
from hpcattn.masks import parse

r = cp.random.default_rng(0)
kinds = ["mma", "wgmma", *backward.FUSED] if loader.wgmma_available() else ["mma"]
for kind in kinds:
    for D in (64, 128):
        for spec in ("causal", "window:64", "block:64+global:2", "causal+window:100"):
            B, Hkv, G, nq, nk = 1, 2, 2, 200, 200
            mask, scale = parse(spec, n_keys=nk), 1 / math.sqrt(D)
            q, do = (r.standard_normal((B, Hkv, G, nq, D), dtype=cp.float32).astype(cp.float16) for _ in range(2))
            k, v = (r.standard_normal((B, Hkv, nk, D), dtype=cp.float32).astype(cp.float16) for _ in range(2))
            pos = np.arange(nq, dtype=np.int64)
            o, lse, _ = forward.attend(q, pos, k, v, 0, mask, scale, kernel_kind="mma" if kind == "mma" else "wgmma")
            if kind == "wgmma":  # rows in one run took attend_fwd_dense where it applies: the general kernel too
                forward.attend(q, cp.asarray(pos), k, v, 0, mask, scale, kernel_kind="wgmma")
            delta = (do.astype(cp.float32) * o).sum(-1)
            backward.backward(q, pos, k, v, 0, mask, scale, do, lse, delta, kernel_kind=kind)
            if kind != "mma":  # the gradients written in float16 (fused: through store_rows or tile_rows_out)
                out = (cp.empty_like(q), cp.empty_like(k), cp.empty_like(v))
                backward.backward_out(q, None, k, v, mask, scale, o.astype(cp.float16), lse, do, out, kernel_kind=kind)
            cp.cuda.Device().synchronize()
print("done", kinds)

"""Each Hopper backward form (jobs/bwd_ab.py's: two passes, then the one-pass forms, ordered and
atomic, with red and with bulk dq adds), or only the comma-separated FORMS, once on MASK:N:D,
float16, H = 8, for a profiler to take one launch of each:

    ncu --clock-control none --set full -k regex:attend_bwd -c 6 -o bwd python3 jobs/bwd_once.py causal:16384:128
    ncu --clock-control none --section MemoryWorkloadAnalysis -k regex:attend_bwd_fused -c 1 \
        python3 jobs/bwd_once.py causal:65536:128 fixed
"""
import sys

import cupy as cp

from bwd_ab import sides  # jobs/ is on the path when this runs as a script
from hpcattn.gpu import loader
from wgmma_bwd_check import bench_inputs

spec = sys.argv[1] if len(sys.argv) > 1 else "causal:16384:128"
only = sys.argv[2].split(",") if len(sys.argv) > 2 else None
_, n, D, H, _, words, q, k, args, tail = bench_inputs(spec)
grads = [cp.zeros(k.shape, cp.float32), cp.zeros(k.shape, cp.float32), cp.zeros(q.shape, cp.float32),
         cp.zeros(1, cp.uint64)]
for name, form in sides(loader.KERNEL_DIR, D, (False, True), only).items():
    form(args, grads, words, tail, n, H)
    cp.cuda.Device().synchronize()
    print(name, "ran", flush=True)

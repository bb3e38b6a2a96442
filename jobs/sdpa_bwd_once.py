"""PyTorch SDPA's causal forward and backward once on (1, 8, N, D) float16 tensors (its default
backend), for a profiler to take its backward's kernels beside jobs/bwd_once.py's:

    ncu --clock-control none --section LaunchStats --section SpeedOfLight --section Occupancy \\
        --section ComputeWorkloadAnalysis --section WarpStateStats python3 jobs/sdpa_bwd_once.py 65536 128
"""
import sys

import torch
import torch.nn.functional as F

n, D = (int(x) for x in sys.argv[1:3]) if len(sys.argv) > 2 else (65536, 128)
q, k, v = (torch.randn(1, 8, n, D, device="cuda", dtype=torch.float16, requires_grad=True) for _ in range(3))
o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
o.backward(torch.randn_like(o))
torch.cuda.synchronize()
print("torch", torch.__version__, "cuDNN", torch.backends.cudnn.version(), flush=True)

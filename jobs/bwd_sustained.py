"""The backward under sustained load: `hpcattn.attention_backward` and PyTorch's backward (SDPA
for causal, as jobs/bwd_bench.py's peer) each called back to back for --secs seconds, in
alternating phases, with nvidia-smi sampling the SM clock, the board power and the throttle
reasons every 200 ms beside; per phase one JSON line: ms a call, the samples' mean and lowest SM
clock, mean power and the throttle reasons seen. A board held at its power cap runs each kernel
at the clock its energy per cycle allows, so a sustained ratio can differ from alternating short
rounds (jobs/bwd_bench.py).

    python3 jobs/bwd_sustained.py [--case causal:65536:128] [--dtype float16] [--secs 10] [--phases api,peer,api,peer]
"""
import argparse
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
import time

SMI_FIELDS = "timestamp,clocks.sm,power.draw,clocks_throttle_reasons.active"


def read_samples(path):
    """[(unix time, SM clock MHz, power W, throttle reasons)] of an nvidia-smi CSV (SMI_FIELDS, no header)."""
    out = []
    for line in open(path):
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 4:
            continue
        t = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").replace(tzinfo=datetime.timezone.utc)
        out.append((t.timestamp(), float(parts[1].split()[0]), float(parts[2].split()[0]), parts[3]))
    return out


def phase_stats(samples, t0, t1, settle=1.0):
    """The samples' mean and lowest clock, mean power and throttle reasons within [t0 + settle, t1]."""
    s = [x for x in samples if t0 + settle <= x[0] <= t1]
    if not s:
        return {"samples": 0}
    return {"samples": len(s), "sm MHz mean": round(statistics.mean(x[1] for x in s)),
            "sm MHz min": min(x[1] for x in s), "W mean": round(statistics.mean(x[2] for x in s)),
            "throttle": sorted({x[3] for x in s})}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="causal:65536:128", help="MASK:N:D")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--secs", type=float, default=10.0)
    ap.add_argument("--phases", default="api,peer,api,peer")
    a = ap.parse_args()
    import cupy as cp
    import torch
    from mpi4py import MPI

    import hpcattn
    from bwd_bench import peer_grad  # jobs/ is on the path when this runs as a script
    from hpcattn.torch import _array

    spec, n, D = a.case.rsplit(":", 2)
    n, D, H = int(n), int(D), a.heads
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v, do = (torch.randn((1, n, H, D), generator=g).to(getattr(torch, a.dtype)).cuda() for _ in range(4))
    aq, ak, av, ado = map(_array, (q, k, v, do))
    o, lse = hpcattn.attention(aq, ak, av, mask=spec, comm=MPI.COMM_SELF)
    peer, _, peer_bwd = peer_grad(spec, n, q, k, v, do)
    sides = {"api": lambda: hpcattn.attention_backward(aq, ak, av, o, lse, ado, mask=spec, comm=MPI.COMM_SELF),
             "peer": peer_bwd}

    def sync():
        torch.cuda.synchronize()
        cp.cuda.Device().synchronize()

    with tempfile.NamedTemporaryFile("w+", suffix=".csv") as log:
        cmd = ["nvidia-smi", f"--query-gpu={SMI_FIELDS}", "--format=csv,noheader", "-lms", "200"]
        smi = subprocess.Popen(cmd + ["-i", cp.cuda.Device().pci_bus_id], stdout=log, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        if smi.poll() is not None:  # this nvidia-smi took no PCI bus id: every GPU's samples (one GPU: its own)
            smi = subprocess.Popen(cmd, stdout=log, stderr=subprocess.DEVNULL)
        phases = []
        try:
            for name in a.phases.split(","):
                fn = sides[name]
                fn()
                sync()
                t0, calls = time.time(), 0
                while time.time() - t0 < a.secs:
                    for _ in range(10):
                        fn()
                    sync()
                    calls += 10
                t1 = time.time()
                phases.append((name, t0, t1, (t1 - t0) / calls))
        finally:
            smi.terminate()
            smi.wait()
        samples = read_samples(log.name)
    for name, t0, t1, dt in phases:
        row = {"case": a.case, "dtype": a.dtype, "H": H, "side": peer if name == "peer" else name,
               "ms": round(dt * 1e3, 3), "secs": round(t1 - t0, 1)}
        print(json.dumps(row | phase_stats(samples, t0, t1)), flush=True)
    if not samples:
        print("no nvidia-smi samples: clocks and power not read", file=sys.stderr)


if __name__ == "__main__":
    main()

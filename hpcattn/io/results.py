"""The result file's `stats` and attributes (DESIGN.md section 2), built here for every run
path (in memory: commands/run.py; out of core: io/outofcore.py), so both write the same keys.

`stats`, one entry per rank (index = rank):
- bytes_sent, bytes_received, comm_s: the communication layer's counters (Comm.counters);
- compute_s: the kernels (host <-> device copies apart); io_s: reading, checking and writing
  (read_s + check_s + write_s, overlapped with compute or not); io_wait_s: time compute waited
  for reads (0 in memory, where every read comes first); attn_s: the attention call alone, no
  file I/O; wall_s, cpu_s: the whole run;
- the phases that split wall_s (PHASES): startup_s (from the start to the first read:
  backend, transport, file checks, output creation), read_s, check_s (the value checks),
  upload_s and download_s (host <-> device copies; 0 on the CPU), write_s, wait_s (time the
  compute stage stood idle: waiting for reads, writes and the other ranks); read, check and
  write may run beside compute (streaming), so the phases can sum past wall_s;
- buffer_bytes: the host buffers of the run's data (streaming: its chunk buffers; in memory:
  the shard, its results and their host copies), the figure the memory budget bounds;
- edges, edges_backward (0 without a backward pass), q_rows, kv_rows: this rank's work;
- chunks, chunks_resumed: query-row chunks computed here and found done by --resume (out of
  core; 0 in memory); max_rss: peak resident bytes;
- with a backward pass also bytes_sent_backward, bytes_received_backward.

Attributes: variant, mask, ranks, nodes, backend (numpy|cupy), transport, hpcattn_version,
scale, input, layout, backward, ranks_per_node, ring_levels, hdf5, out_of_core, chunk_rows (0 in
memory), resumed, cuda_aware_mpi (yes|no|unknown: what the MPI library says of itself; with
backend cupy, transport mpi means device buffers went to it directly); with a backward pass
also variant_backward. h5io.finish writes both and sets
`complete` last. An out-of-core file also keeps the identity that --resume checks (ooc_input,
ooc_mask, ooc_rows, ooc_shape: io/outofcore.py).
"""
import resource
import time

from .. import __version__
from ..dist.transport import cuda_aware_word


PHASES = ("startup_s", "read_s", "check_s", "upload_s", "download_s", "write_s", "wait_s")


class Clock:
    """Started with a run: rank_stats measures wall_s and cpu_s from here."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()


def rank_stats(comm, clock, *, compute_s, io_s, attn_s, edges, q_rows, kv_rows, io_wait_s=0.0,
               chunks=0, chunks_resumed=0, backward=None, phases=None, buffer_bytes=0):
    """This rank's entry of `stats` (call it last: it reads the counters and clocks now).
    backward: the backward pass's {"edges", "bytes_sent", "bytes_received"}, or None.
    phases: seconds of each of PHASES (missing ones 0)."""
    stats = {**comm.counters(), "compute_s": compute_s, "io_s": io_s, "io_wait_s": io_wait_s,
             "attn_s": attn_s, "wall_s": time.perf_counter() - clock.wall,
             "cpu_s": time.process_time() - clock.cpu, "edges": edges,
             "edges_backward": backward["edges"] if backward else 0, "q_rows": q_rows,
             "kv_rows": kv_rows, "chunks": chunks, "chunks_resumed": chunks_resumed,
             "max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
             "buffer_bytes": int(buffer_bytes), **{key: float((phases or {}).get(key, 0.0)) for key in PHASES}}
    if backward:
        stats.update(bytes_sent_backward=backward["bytes_sent"],
                     bytes_received_backward=backward["bytes_received"])
    return stats


def attributes(comm, *, variant, mask, backend, transport, scale, in_path, hdf5, layout="contiguous",
               ranks_per_node=None, ring_levels=None, out_of_core=False, chunk_rows=0, resumed=False,
               variant_backward=None):
    """The result's attributes (collective: counts the nodes). mask: the spec as given;
    variant_backward: the backward pass's variant, None without one."""
    attrs = {"variant": variant, "mask": mask, "ranks": comm.size, "nodes": comm.nodes(),
             "backend": backend, "transport": transport, "hpcattn_version": __version__,
             "scale": scale, "input": str(in_path), "layout": layout,
             "backward": int(variant_backward is not None), "ranks_per_node": ranks_per_node or 0,
             "ring_levels": list(ring_levels or (1, comm.size)), "hdf5": hdf5,
             "out_of_core": int(out_of_core), "chunk_rows": chunk_rows, "resumed": int(resumed),
             "cuda_aware_mpi": cuda_aware_word()}
    if variant_backward is not None:
        attrs["variant_backward"] = variant_backward
    return attrs

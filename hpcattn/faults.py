"""Test-only fault injection: make one rank fail at a named phase, to prove the job still ends.

Set HPCATTN_FAULT="rank=R,phase=NAME[,kind=raise|kill|exit][,hit=K]" in the environment of
every rank. When rank R reaches `point(NAME, rank)` for the K-th time (default the first), it
raises RuntimeError (kind=raise, the default), kills itself with SIGKILL (kind=kill), or
calls os._exit(3) without any MPI cleanup (kind=exit). Unset, `point` costs one dict lookup.

Phases called today: read (after the shard is read), compute (each ring hop, before the
local kernel), write (before this rank writes its rows), finish (before the result is
renamed). New variants call `point("compute", comm.rank)` once per step of their main loop.
"""
import os
import signal

KINDS = ("raise", "kill", "exit")
_plan = None
_hits = {}


def _parse(text):
    """HPCATTN_FAULT text -> dict(rank, phase, kind, hit); ValueError on a malformed spec."""
    usage = f"HPCATTN_FAULT={text!r}: expected rank=R,phase=NAME[,kind=raise|kill|exit][,hit=K]"
    try:
        fields = dict(part.split("=", 1) for part in text.split(",") if part)
        plan = {"rank": int(fields.pop("rank")), "phase": fields.pop("phase"),
                "kind": fields.pop("kind", "raise"), "hit": int(fields.pop("hit", 1))}
    except (ValueError, KeyError):
        raise ValueError(usage) from None
    if fields:
        raise ValueError(usage)
    if plan["kind"] not in KINDS:
        raise ValueError(f"HPCATTN_FAULT={text!r}: kind must be one of {', '.join(KINDS)}")
    return plan


def point(phase, rank):
    """Fail here if HPCATTN_FAULT names this rank (of the job's communicator) and phase."""
    global _plan
    if _plan is None:
        text = os.environ.get("HPCATTN_FAULT", "")
        _plan = _parse(text) if text else {}
    if not _plan or _plan["phase"] != phase:
        return
    if rank != _plan["rank"]:
        return
    _hits[phase] = _hits.get(phase, 0) + 1
    if _hits[phase] != _plan["hit"]:
        return
    if _plan["kind"] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if _plan["kind"] == "exit":
        os._exit(3)
    raise RuntimeError(f"injected fault (HPCATTN_FAULT) on rank {rank} in phase {phase!r}")

"""Run specifications: one TOML file describes a run, a benchmark or a whole scaling sweep.

    name = "strong"
    [input]                 # arguments of `hpcattn gen` (or path = "existing.h5")
    seq = 65536             # keys N; a list sweeps N; weak scaling: seq_per_rank = 16384
    heads = 4
    kv_heads = 2
    head_dim = 64
    [run]
    mask = "causal+window:256"   # a string or a list
    variant = "ring"             # a string or a list
    ranks = [1, 2, 4]            # omitted: the launcher's task count ($SLURM_NTASKS) or 1
    scaling = "strong"           # strong | weak
    repeat = 1
    verify_rows = 256            # 0: no verify
    profile = false              # true: a Chrome trace per point
    launcher = "auto"            # auto | srun | mpiexec
    timeout_s = 3600             # per launched run
    [output]
    dir = "runs/strong"          # inputs, outputs, logs; relative to the current directory
    results = "results.json"     # in dir; a CSV with the same records is written beside it
    keep_outputs = false

Unknown keys are errors (a typo must not silently change a sweep). The points of a sweep are
the product variant x mask x seq x ranks, each repeated `repeat` times.
"""
import itertools
import os
from dataclasses import dataclass

from ..errors import HpcattnError
from .launch import LAUNCHERS

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib

INPUT_KEYS = {"path": str, "seq": (int, list), "seq_per_rank": (int, list), "queries": int,
              "batch": int, "heads": int, "kv_heads": int, "head_dim": int, "dtype": str, "seed": int}
RUN_KEYS = {"mask": (str, list), "variant": (str, list), "ranks": (int, list), "scaling": str,
            "repeat": int, "verify_rows": int, "profile": bool, "launcher": str, "timeout_s": int}
OUTPUT_KEYS = {"dir": str, "results": str, "keep_outputs": bool}
TOP_KEYS = {"name": str, "description": str}
SECTIONS = {"input": INPUT_KEYS, "run": RUN_KEYS, "output": OUTPUT_KEYS}


@dataclass(frozen=True)
class Point:
    """One launched run of a sweep."""
    index: int
    ranks: int
    seq: int
    mask: str
    variant: str
    repeat: int


def _check(table, keys, where, path):
    for key, val in table.items():
        if key not in keys:
            raise HpcattnError(f"job {path}: unknown key {where}{key!r} (known: {', '.join(sorted(keys))})")
        want = keys[key]
        if isinstance(val, bool) and want is not bool:
            ok = False
        else:
            ok = isinstance(val, want)
        if isinstance(val, list):
            inner = [t for t in (want if isinstance(want, tuple) else (want,)) if t is not list]
            ok = ok and bool(val) and all(isinstance(x, tuple(inner)) and not isinstance(x, bool)
                                          for x in val)
        if not ok:
            raise HpcattnError(f"job {path}: {where}{key} = {val!r} has the wrong type")


def _list(x):
    return list(x) if isinstance(x, list) else [x]


def load(path):
    """The validated spec of a job file as a dict with sections input, run, output."""
    try:
        with open(path, "rb") as f:
            spec = tomllib.load(f)
    except FileNotFoundError:
        raise HpcattnError(f"job file {path!r} does not exist") from None
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise HpcattnError(f"job file {path!r}: {e}") from None
    top = {k: v for k, v in spec.items() if k not in SECTIONS}
    _check(top, TOP_KEYS, "", path)
    for name, keys in SECTIONS.items():
        if not isinstance(spec.setdefault(name, {}), dict):
            raise HpcattnError(f"job {path}: [{name}] must be a table")
        _check(spec[name], keys, f"{name}.", path)
    inp, run = spec["input"], spec["run"]
    if "mask" not in run:
        raise HpcattnError(f"job {path}: run.mask is required")
    if sum(k in inp for k in ("path", "seq", "seq_per_rank")) != 1:
        raise HpcattnError(f"job {path}: give exactly one of input.path, input.seq, input.seq_per_rank")
    scaling = run.setdefault("scaling", "weak" if "seq_per_rank" in inp else "strong")
    if scaling not in ("strong", "weak") or (scaling == "weak") != ("seq_per_rank" in inp):
        raise HpcattnError(f"job {path}: run.scaling = {scaling!r}: weak scaling takes "
                           "input.seq_per_rank, strong scaling input.seq or input.path")
    if run.setdefault("launcher", "auto") not in LAUNCHERS:
        raise HpcattnError(f"job {path}: run.launcher must be one of {', '.join(LAUNCHERS)}")
    for key, val in [("ranks", r) for r in _list(run.get("ranks", 1))] + \
                    [("seq", s) for s in _list(inp.get("seq", inp.get("seq_per_rank", 1)))] + \
                    [("repeat", run.get("repeat", 1)), ("timeout_s", run.get("timeout_s", 1))]:
        if val < 1:
            raise HpcattnError(f"job {path}: {key} must be at least 1, got {val}")
    spec.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    return spec


def default_ranks():
    """The launcher's task count: $SLURM_NTASKS inside an allocation, else 1."""
    val = os.environ.get("SLURM_NTASKS", "")
    return int(val) if val.isdigit() else 1


def points(spec, ranks=None):
    """The sweep's points in launch order. `ranks` (a list) overrides run.ranks."""
    inp, run = spec["input"], spec["run"]
    rank_list = ranks or _list(run.get("ranks", default_ranks()))
    seqs = _list(inp.get("seq", inp.get("seq_per_rank", 0)))
    out = []
    for variant, mask, seq, p in itertools.product(_list(run.get("variant", "auto")),
                                                   _list(run["mask"]), seqs, rank_list):
        n = seq * p if run["scaling"] == "weak" else seq
        for rep in range(run.get("repeat", 1)):
            out.append(Point(len(out), p, n, mask, variant, rep))
    return out

"""The benchmark jobs' output: Markdown tables printed row by row, and JSON results files.

    from tables import header, row, save_json   # jobs/ is on sys.path when a job runs

    header("N", "P", "latency s")
    row(f"{n:,}", p, f"{t:.3f}")
"""
import json
from pathlib import Path


def header(*columns):
    """Print a Markdown table's header line and its separator line."""
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))


def row(*cells):
    """Print one table row (cells already formatted, or anything str() shows), flushed so that a
    long benchmark shows each row as soon as it is measured."""
    print("| " + " | ".join(map(str, cells)) + " |", flush=True)


def save_json(path, data):
    """Write data as indented JSON to path (nothing when path is None or empty)."""
    if path:
        Path(path).write_text(json.dumps(data, indent=1))

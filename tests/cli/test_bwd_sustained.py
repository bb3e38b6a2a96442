"""jobs/bwd_sustained.py's reading of nvidia-smi's samples, without a GPU: times, clocks, power
and throttle reasons parsed from its CSV lines, and each phase's figures taken from the samples
inside it (after its first second) alone."""
import importlib.util
from pathlib import Path

JOB = Path(__file__).resolve().parents[2] / "jobs" / "bwd_sustained.py"
spec = importlib.util.spec_from_file_location("bwd_sustained", JOB)
job = importlib.util.module_from_spec(spec)
spec.loader.exec_module(job)

# the shape nvidia-smi prints for SMI_FIELDS (lines as seen on an H100, 2026-12-08)
CSV = """2026/12/08 00:34:26.725, 345 MHz, 72.57 W, 0x0000000000000001
2026/12/08 00:34:28.000, 1980 MHz, 400.00 W, 0x0000000000000000
2026/12/08 00:34:29.500, 1425 MHz, 697.55 W, 0x0000000000000004
2026/12/08 00:34:30.500, 1565 MHz, 699.10 W, 0x0000000000000004
2026/12/08 00:34:31.500, 1500 MHz, 698.00 W, 0x0000000000000004
"""


def test_samples_are_parsed_in_utc_seconds(tmp_path):
    path = tmp_path / "smi.csv"
    path.write_text(CSV + "\n")  # a blank last line is skipped
    s = job.read_samples(path)
    assert len(s) == 5
    assert s[0][1:] == (345.0, 72.57, "0x0000000000000001")
    assert abs(s[2][0] - s[0][0] - 2.775) < 1e-6
    assert s[0][0] == 1796690066.725  # 2026-12-08 00:34:26.725 UTC


def test_a_phase_takes_its_own_samples_after_it_settles(tmp_path):
    path = tmp_path / "smi.csv"
    path.write_text(CSV)
    s = job.read_samples(path)
    t0 = s[1][0] + 0.25  # the phase starts after the 1980 MHz sample; its first second is left out
    stats = job.phase_stats(s, t0, s[4][0])
    assert stats == {"samples": 3, "sm MHz mean": 1497, "sm MHz min": 1425.0, "W mean": 698,
                     "throttle": ["0x0000000000000004"]}
    assert job.phase_stats(s, s[4][0] + 1, s[4][0] + 5) == {"samples": 0}

"""The benchmark script runs end to end (tiny sizes; the numbers mean nothing here)."""

import json
import subprocess
import sys

from conftest import ROOT


def test_benchmark_quick_mode_writes_its_report(tmp_path, synthetic_dir):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "bench.py"),
        "--quick",
        "--data-dir",
        synthetic_dir,
        "--out",
        str(out),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert {"data", "end_to_end", "compute", "kd", "bf16", "peak_gflops"} <= set(report)
    assert "targets:" in done.stdout

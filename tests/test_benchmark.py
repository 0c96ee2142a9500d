"""The benchmark script runs end to end (tiny sizes; the numbers mean nothing here)."""

import json
import subprocess
import sys

import pytest

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


def _kd_table():
    import importlib.util

    spec = importlib.util.spec_from_file_location("kd_table", ROOT / "benchmarks" / "kd_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kd_table_rebuilds_one_table_per_pair_from_its_csv(tmp_path):
    """Rows written before pairs existed count as the demo pair's; each pair's differences are paired
    by seed within that pair (hand values: kd − ce is +1, +2, +3 on the demo pair)."""
    import pandas as pd

    rows = [("ce", s, 60.0 + s) for s in range(3)] + [("kd", s, 61.0 + 2 * s) for s in range(3)]
    old = pd.DataFrame(
        [dict(method=m, seed=s, teacher="t13", val_top1=v, test_top1=v, minutes_alone=1.0) for m, s, v in rows]
    )
    mv2 = old.assign(pair="vgg13-mv2", val_top1=old["val_top1"] - 5)
    df = pd.concat([old, mv2]).assign(commit="abc", processor="cpu (avx512)")
    prefix = str(tmp_path / "untuned")
    df.to_csv(f"{prefix}.csv", index=False)
    kd_table = _kd_table()
    kd_table.main(["--table-only", "--prefix", prefix])
    written = pd.read_csv(f"{prefix}.csv")
    assert sorted(set(written["pair"])) == ["vgg13-mv2", "vgg13-vgg8"] and len(written) == 12
    tables = kd_table.tables(written)
    assert list(tables) == ["vgg13-vgg8", "vgg13-mv2"]  # pairs.py's order
    for t in tables.values():
        assert t.loc["kd", "vs ce"] == 2.0 and t.loc["kd", "runs"] == 3
    md = open(f"{prefix}.md").read()
    assert "### vgg13-vgg8: vgg13 x0.25 teacher, vgg8 x0.125 student" in md and "### vgg13-mv2" in md
    assert (tmp_path / "untuned.png").stat().st_size > 0
    # beside the published numbers: CE's paired difference to KD (-1, -2, -3: CI -2 ± 2.48) spans 0
    versus = kd_table.versus_published(written)["vgg13-vgg8"]
    assert versus.loc["ce", "published"] == 70.36 and versus.loc["ce", "published vs kd"] == pytest.approx(-2.62)
    assert versus.loc["ce", "direction"] == "within noise" and versus.loc["kd", "direction"] == "reference"
    kd_table.main(["--compare-published", "--prefix", prefix])
    assert "### vgg13-mv2 (2 methods" in open(f"{prefix}_vs_published.md").read()

"""The benchmark script runs end to end (tiny sizes; the numbers mean nothing here)."""

import json
import subprocess
import sys

import pandas as pd
import pytest

import methods_table
from conftest import HANG_SECONDS, ROOT


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
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_SECONDS, cwd=ROOT)
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
    # there kd − ce is +2.0, +2.1, +2.2: clearly higher, where the demo pair's +1, +2, +3 spans 0
    mv2.loc[mv2["method"] == "kd", "val_top1"] = [57.0, 58.1, 59.2]
    # the demo pair's rows predate the teacher_amp column (its online teachers ran under bf16)
    mv2["teacher_amp"] = mv2["method"].map({"kd": "cached logits", "ce": "off"})
    df = pd.concat([old, mv2]).assign(commit="abc", processor="cpu (avx512)")
    prefix = str(tmp_path / "untuned")
    df.to_csv(f"{prefix}.csv", index=False)
    kd_table = _kd_table()
    kd_table.main(["--table-only", "--prefix", prefix])
    written = pd.read_csv(f"{prefix}.csv")
    assert sorted(set(written["pair"])) == ["vgg13-mv2", "vgg13-vgg8"] and len(written) == 12
    tables = methods_table.tables(written)
    assert list(tables) == ["vgg13-vgg8", "vgg13-mv2"]  # pairs.py's order
    assert tables["vgg13-vgg8"].loc["kd", "vs ce"] == 2.0 and tables["vgg13-vgg8"].loc["kd", "runs"] == 3
    assert tables["vgg13-mv2"].loc["kd", "vs ce"] == pytest.approx(2.1)
    verdicts = methods_table.across_pairs(tables, "vs ce verdict")
    assert verdicts.loc["kd"].tolist() == ["within noise", "higher", "flips"]
    # a method one pair has not run yet shows no agreement: it ran on one pair only
    one = {"vgg13-vgg8": tables["vgg13-vgg8"], "vgg13-mv2": tables["vgg13-mv2"].drop(index="kd")}
    assert methods_table.across_pairs(one, "vs ce verdict").loc["kd", "holds"] == "one pair"
    assert verdicts.loc["ce", "holds"] == "–"  # the reference is not a verdict
    holds = [methods_table._holds(pd.Series(v)) for v in (["higher", "lower"], ["lower", "within noise", "lower"])]
    assert holds == ["reverses", "flips"]
    md = open(f"{prefix}.md").read()
    assert "### Verdicts across pairs" in md and "| flips |" in md
    assert "the others run it online (vgg13-vgg8: bf16 autocast; vgg13-mv2: fp32)" in md
    assert "6 runs, 6 min had each run alone: about 0.1 h on 2 cores" in md
    assert "### vgg13-vgg8: vgg13 x0.25 teacher, vgg8 x0.125 student" in md and "### vgg13-mv2" in md
    assert (tmp_path / "untuned.png").stat().st_size > 0
    # beside the published numbers: CE's paired difference to KD (-1, -2, -3: CI -2 ± 2.48) spans 0
    versus = methods_table.versus_published(tables)["vgg13-vgg8"]
    assert versus.loc["ce", "published"] == 70.36 and versus.loc["ce", "published vs kd"] == pytest.approx(-2.62)
    assert versus.loc["ce", "direction"] == "within noise" and versus.loc["kd", "direction"] == "reference"
    kd_table.main(["--compare-published", "--prefix", prefix])
    assert "### vgg13-mv2 (2 methods" in open(f"{prefix}_vs_published.md").read()


def test_kd_table_nests_students_in_teachers_when_a_pair_has_two(tmp_path):
    """Hand values: CE 60, 61, 62 under both teachers (it reads none); KD +2 on every seed under t0 and
    +1 under t1. Pooled: mean(2, 1) = 1.5, sd 0.707, se 0.5, t_.975(1) = 12.706: 1.5 ± 6.353, within
    noise, though each teacher alone says higher."""
    import pandas as pd

    rows = []
    for teacher, gain in (("t0", 2.0), ("t1", 1.0)):
        rows += [dict(method="ce", seed=s, teacher=teacher, val_top1=60.0 + s) for s in range(3)]
        rows += [dict(method="kd", seed=s, teacher=teacher, val_top1=60.0 + s + gain) for s in range(3)]
    df = pd.DataFrame(rows).assign(pair="vgg16-vgg11", test_top1=50.0, minutes_alone=1.0, commit="c", processor="p")
    t = methods_table.table(df)
    assert t.loc["kd", "vs ce"] == pytest.approx(1.5) and t.loc["kd", "runs"] == 6
    assert t.loc["kd", "vs ce 95% CI"] == "-4.85 to +7.85" and t.loc["kd", "vs ce verdict"] == "within noise"
    assert bool(t.loc["kd", "vs ce: every teacher agrees"])
    prefix = str(tmp_path / "untuned")
    methods_table.write(df, prefix)
    assert "teachers per pair: vgg16-vgg11 2" in open(f"{prefix}.md").read()


def test_kd_table_tuned_summary_by_hand():
    """Budget = distinct runs (confirmation seeds that repeat a grid cell count once); test of the pick at the
    confirmation seeds, paired with CE by seed: at − ce = +1, +2, +3."""
    import pandas as pd

    rows = [dict(method="ce", param="", value=0.0, seed=s, stage="confirm", test=60.0 + s) for s in range(3)]
    for v in (1.0, 3.0):
        rows += [dict(method="at", param="feat_weight", value=v, seed=s, stage="grid", test=50.0 + v) for s in (0, 1)]
    rows += [dict(method="at", param="feat_weight", value=3.0, seed=s, stage="confirm", test=61.0 + 2 * s)
             for s in range(3)]  # fmt: skip
    df = pd.DataFrame(rows).rename(columns={"test": "test_top1"})
    df["val_top1"], df["minutes_alone"] = df["test_top1"], 1.0
    df["picked"] = (df["method"] == "at") & (df["value"] == 3.0)
    df["pick_on_edge"] = df["method"] == "at"
    t = methods_table.tuned_table(df)
    assert t.loc["at", "pick"] == 3.0 and t.loc["at", "cells"] == 2 and t.loc["at", "runs"] == 5
    assert t.loc["at", "minutes"] == 5.0 and bool(t.loc["at", "edge"])
    assert t.loc["at", "val_top1"] == 53.0 and t.loc["at", "test_top1"] == 63.0
    assert t.loc["at", "vs ce"] == 2.0 and t.loc["ce", "runs"] == 3 and t.loc["ce", "param"] == "–"
    assert t.loc["at", "vs ce verdict"] == "within noise"  # +1, +2, +3: t(2) 4.30 x 1/sqrt(3) = 2.48 > 2
    df = df.astype({"pick_on_edge": object})
    df.loc[df["method"] == "ce", ["param", "pick_on_edge"]] = float("nan")  # CE's empty cells, read from a CSV
    t = methods_table.tuned_table(df)
    assert t.loc["ce", "param"] == "–" and pd.isna(t.loc["ce", "pick"]) and not t.loc["ce", "edge"]


def test_kd_table_method_costs_are_minutes_per_run_over_ce_s_on_the_pair(tmp_path):
    import pandas as pd

    rows = [("vgg13-vgg8", "ce", 2.0), ("vgg13-vgg8", "ce", 4.0), ("vgg13-vgg8", "reviewkd", 27.0)]
    rows += [("vgg13-mv2", "ce", 5.0), ("vgg13-mv2", "kd", 4.0), ("vgg16-vgg11", "kd", 3.0)]
    path = str(tmp_path / "untuned.csv")
    pd.DataFrame(rows, columns=["pair", "method", "minutes_alone"]).to_csv(path, index=False)
    costs = _kd_table().method_costs
    assert costs("vgg13-vgg8", path) == {"ce": 1.0, "reviewkd": 9.0}  # over CE's median, 3 min
    assert costs("vgg13-mv2", path) == {"ce": 1.0, "kd": 0.8}
    assert costs("vgg16-vgg11", path) == {} and costs("vgg13-vgg8", str(tmp_path / "none.csv")) == {}  # no CE: FLOPs


def test_kd_table_says_under_its_tables_which_methods_run_part_of_their_release():
    rows = pd.DataFrame({"pair": ["a", "a", "a", "b"], "method": ["kd", "mlkd", "dkd", "mlkd"]})
    notes = methods_table.partial_notes(rows)  # rows from before the views column: one view
    assert len(notes) == 1 and notes[0].startswith("`mlkd` (a, b): these rows ran the release's first view only")
    rows["views"] = [1, 2, 1, 1]  # pair a's MLKD trained on both views, pair b's on one
    assert methods_table.partial_notes(rows) == [notes[0].replace("(a, b)", "(b)")]
    assert methods_table.partial_notes(rows.iloc[:3]) == []


def test_kd_table_tunes_a_pair_in_groups_of_methods(tmp_path, monkeypatch):
    """A group's rows replace only its own methods' rows on the pair (all of them: a cell its new grid no
    longer has goes); the pair's other groups and the other pairs keep theirs."""
    import pandas as pd

    kd_table, prefix = _kd_table(), str(tmp_path / "tuned")
    grid_values = {"kd": [0.3, 0.9, 2.7], "at": [1000 / 3, 1000.0, 3000.0]}

    def fake_tuned_runs(args):
        rows = []
        for m in args.methods:
            values = grid_values.get(m, [0.0])
            stage = "grid" if m != "ce" else "confirm"
            rows += [dict(method=m, param="" if m == "ce" else "w", value=v, seed=s, stage=stage, test_top1=60.0 + v)
                     for v in values for s in range(2)]  # fmt: skip
            rows += [dict(method=m, param="w", value=values[-1], seed=s, stage="confirm", test_top1=61.0 + s)
                     for s in range(2) if m != "ce"]  # fmt: skip
        df = pd.DataFrame(rows).assign(pair=args.pair, teacher="t", commit="c", processor="p", minutes_alone=1.0)
        df["val_top1"], df["picked"], df["pick_on_edge"] = df["test_top1"], df["value"] == df["value"], False
        return df

    monkeypatch.setattr(kd_table, "tuned_runs", fake_tuned_runs)
    kd_table.main(["--tune", "--prefix", prefix, "--methods", "ce", "kd"])
    kd_table.main(["--tune", "--prefix", prefix, "--methods", "at"])
    kd_table.main(["--tune", "--prefix", prefix, "--methods", "kd", "--pair", "vgg16-vgg11"])
    grid_values["at"] = [1000.0, 3000.0, 9000.0]  # extended past its edge this time
    kd_table.main(["--tune", "--prefix", prefix, "--methods", "at"])
    df = pd.read_csv(f"{prefix}.csv")
    here = df[df["pair"] == "vgg13-vgg8"]
    assert sorted(set(here["method"])) == ["at", "ce", "kd"] and set(df["pair"]) == {"vgg13-vgg8", "vgg16-vgg11"}
    assert sorted(set(here.loc[here["method"] == "at", "value"])) == [1000.0, 3000.0, 9000.0]
    md = open(f"{prefix}.md").read()
    assert "### vgg13-vgg8" in md and "### Verdicts across pairs" in md
    assert (tmp_path / "tuned.png").stat().st_size > 0
    # beside the published numbers: the picks' test top-1 (at 61.5, kd 61.5 on both seeds: a tie, not a CI)
    kd_table.main(["--tune", "--compare-published", "--prefix", prefix])
    versus = open(f"{prefix}_vs_published.md").read()
    assert "tuned `cpu` table" in versus and "### vgg13-vgg8 (3 methods" in versus


def test_kd_table_rows_of_processes_run_side_by_side_are_merged_not_overwritten(tmp_path):
    import pandas as pd

    kd_table, path = _kd_table(), str(tmp_path / "t.csv")
    keys = ["pair", "method", "seed", "teacher"]
    row = dict(pair="vgg13-vgg8", seed=0, teacher="t", val_top1=1.0)
    kd_table.merged(path, pd.DataFrame([dict(row, method="at")]), keys)
    kd_table.merged(path, pd.DataFrame([dict(row, method="nst")]), keys)  # another group's process, later
    kd_table.merged(path, pd.DataFrame([dict(row, method="at", val_top1=2.0)]), keys)  # at again: replaced
    df = pd.read_csv(path).set_index("method")
    assert sorted(df.index) == ["at", "nst"] and df.loc["at", "val_top1"] == 2.0


def test_kd_table_rows_read_back_keep_the_commit_that_trained_them(tmp_path):
    import pandas as pd

    kd_table, path = _kd_table(), str(tmp_path / "t.csv")
    keys, results = ["pair", "method", "seed", "teacher"], ["val_top1", "test_top1"]
    row = dict(pair="vgg13-vgg8", seed=0, teacher="t", val_top1=1.0, test_top1=float("nan"), processor="old cpu")
    # commits that read as numbers (3.3e2182 is inf), as HEAD's once did: kept as text
    kd_table.merged(path, pd.DataFrame([dict(row, method=m, commit="33e2181") for m in ("at", "nst")]), keys)
    again = [dict(row, method="at", commit="1234567", processor="new cpu")]  # read back: the same results
    again += [dict(row, method="nst", val_top1=2.0, commit="1234567", processor="new cpu")]  # trained again
    kd_table.merged(path, pd.DataFrame(again), keys, read_back=results)
    df = methods_table.read_rows(path).set_index("method")
    assert (df.loc["at", "commit"], df.loc["at", "processor"]) == ("33e2181", "old cpu")
    assert (df.loc["nst", "commit"], df.loc["nst", "processor"]) == ("1234567", "new cpu")


def test_kd_table_refuses_to_add_runs_to_a_pair_trained_on_another_processor(tmp_path):
    """Its teacher would be retrained here with other bits, and the new students would be paired by seed
    with students of another teacher: refused before anything trains, naming the way out."""
    import pandas as pd

    prefix = str(tmp_path / "untuned")
    row = dict(pair="vgg13-vgg8", method="ce", seed=0, teacher="t", val_top1=1.0, processor="another cpu (avx2)")
    pd.DataFrame([row]).to_csv(f"{prefix}.csv", index=False)
    with pytest.raises(SystemExit, match=r"another cpu \(avx2\).*--replace-pair"):
        _kd_table().main(["--prefix", prefix, "--methods", "kd"])


def test_kd_table_adds_methods_to_a_pair_only_where_kd_reproduces_its_row(tmp_path):
    """On a fresh machine of the same processor the pair's teacher is retrained: new methods are trained,
    and recorded ones read from the CSV, only once KD seed 0 reproduces its recorded row to the bit."""
    import os
    import shutil

    import pandas as pd

    kd_table, prefix, runs = _kd_table(), str(tmp_path / "untuned"), tmp_path / "runs"
    common = ["--quick", "--prefix", prefix, "--out-dir", str(runs), "--data-dir", str(tmp_path), "--jobs", "1"]
    kd_table.main([*common, "--methods", "kd", "--seeds", "1"])
    shutil.rmtree(runs)  # a new machine: every run, the teacher's included, trains again
    kd_table.main([*common, "--methods", "ce", "--seeds", "1"])
    df = pd.read_csv(f"{prefix}.csv")
    assert sorted(df["method"]) == ["ce", "kd"] and list(df["views"]) == [1, 1]  # one view each (MLKD's: two)
    report = open(f"{prefix}.md").read()  # the networks it trained, not the cpu pair's widths
    assert "### vgg13-vgg8: vgg13 teacher, vgg8 student at the smoke profile's widths" in report
    assert "smoke profile on generated data" in report and "x0.125" not in report
    shutil.rmtree(runs)
    kd_table.main([*common, "--methods", "ce", "kd", "--seeds", "1"])  # both recorded: read from the CSV
    assert not [d for d in os.listdir(runs) if d.startswith("vgg8-") and "-ce-" in d]
    pd.testing.assert_frame_equal(pd.read_csv(f"{prefix}.csv"), df)
    df.loc[df["method"] == "kd", "val_top1"] += 0.01  # as if another teacher had trained the recorded KD run
    df.to_csv(f"{prefix}.csv", index=False)
    shutil.rmtree(runs)
    with pytest.raises(SystemExit, match="does not reproduce.*--replace-pair"):
        kd_table.main([*common, "--methods", "ce", "--seeds", "1"])


def test_kd_table_trains_again_rows_recorded_before_a_method_took_a_second_view(monkeypatch):
    """Rows from before the ``views`` column trained MLKD on one view: the release's two-view recipe is a
    new run, trained rather than read from the CSV; rows trained as now are read back."""
    import argparse

    import pandas as pd

    from config import make_config

    kd_table = _kd_table()
    cfgs = {m: make_config("smoke", method=m, teacher="t") for m in ("kd", "mlkd")}
    assert kd_table.views(cfgs) == {"kd": 1, "mlkd": 2}
    monkeypatch.setattr(kd_table, "configs", lambda args, teacher_seed=0: cfgs)
    here = kd_table.processor()
    rows = pd.DataFrame(
        {"pair": "p", "method": ["kd", "mlkd"], "seed": 0, "teacher": "t", "processor": here, "commit": "c"}
    )
    args = argparse.Namespace(pair="p", seeds=1)
    assert kd_table.recorded_here(rows, args) == {("kd", "t")}  # no views column: one view each
    assert kd_table.recorded_here(rows.assign(views=[1, 2]), args) == {("kd", "t"), ("mlkd", "t")}
    assert kd_table.recorded_here(rows.assign(views=[1, None]), args) == {("kd", "t")}
    with_one_view = {**cfgs, "mlkd": make_config("smoke", method="mlkd", teacher="t", mlkd_strong_view=False)}
    monkeypatch.setattr(kd_table, "configs", lambda args, teacher_seed=0: with_one_view)
    assert kd_table.recorded_here(rows, args) == {("kd", "t"), ("mlkd", "t")}  # --no-mlkd-strong-view: as before


def test_mlkd_views_compares_the_two_variants_with_ce_by_seed(tmp_path):
    import importlib.util

    import pandas as pd

    spec = importlib.util.spec_from_file_location("mlkd_views", ROOT / "benchmarks" / "mlkd_views.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    prefix = str(tmp_path / "views")
    args = ["--quick", "--seeds", "2", "--prefix", prefix, "--out-dir", str(tmp_path / "runs")]
    module.main([*args, "--data-dir", str(tmp_path), "--jobs", "1"])
    df = pd.read_csv(f"{prefix}.csv")
    assert sorted(df.groupby("variant")["seed"].apply(list).to_dict().items()) == [
        ("ce", [0, 1]), ("mlkd, both views (release)", [0, 1]), ("mlkd, first view only", [0, 1])
    ]  # fmt: skip
    report = open(f"{prefix}.md").read()
    assert "`python benchmarks/mlkd_views.py --quick --seeds 2`" in report
    assert "| mlkd, both views (release) − mlkd, first view only | test_top1 | 2 |" in report
    module.main(["--table-only", "--quick", "--prefix", prefix])
    assert open(f"{prefix}.md").read() == report

"""run_records.py: a grid recorded in one session is read back, and picked identically, in the next on
a machine without its run folders; only runs the record holds to the needed epoch are read back."""

from dataclasses import replace

import pandas as pd
import pytest
from test_protocol import peak_at_t6

import run_records
from analysis import time_report
from run_records import RunRecords, main, record_key
from sweeps import cell_runs, sweep
from train_eval import load_history


def never_called(cfg):
    """A run function that fails the test if a run is trained (module level: workers import it)."""
    raise AssertionError(f"trained {cfg.T}, {cfg.ce_weight}, seed {cfg.seed}: the record should hold it")


def test_a_recorded_grid_is_picked_again_without_training_a_run(smoke_cfg, tmp_path):
    base = smoke_cfg(method="kd", teacher=str(tmp_path / "vgg13-teacher"), epochs=1)
    grid = {"T": [1.0, 2.0], "ce_weight,kd_weight": [(0.5, 0.5), (0.0, 1.0)]}
    path = str(tmp_path / "results" / "grid.csv")
    first = sweep(base, grid, seeds=[0, 1], jobs=1, run=peak_at_t6, extend={"T": 2.0}, record=path)
    assert "recorded" not in first and len(pd.read_csv(path)) == len(first) == 16  # 4 T x 2 weightings x 2 seeds
    # a fresh machine: no run folders, the teacher retrained (another folder, same recipe), the grid again
    fresh = replace(base, out_dir=str(tmp_path / "elsewhere"), teacher=str(tmp_path / "b" / "vgg13-teacher"))
    again = sweep(fresh, grid, seeds=[0, 1], jobs=1, run=never_called, extend={"T": 2.0}, record=path)
    assert again.attrs["best"] == first.attrs["best"] and again.attrs["extended"] == first.attrs["extended"]
    pd.testing.assert_series_equal(again["val_top1"], first["val_top1"])
    assert again["recorded"].str.contains(" at ").all()  # processor and commit of each run
    # one cell's runs, as a notebook reads them for a later table: metrics from the record, no weights
    runs = cell_runs(again, fresh, {"T": 4.0, "ce_weight": 0.5, "kd_weight": 0.5}, jobs=1, record=path)
    assert [r.config.seed for r in runs] == [0, 1] and all(r.model is None for r in runs)
    assert [r.history["val_top1"].iloc[-1] for r in runs] == pytest.approx([69.0, 69.1])
    # the runs read back count in the notebook's time as the runs trained here do (1 s each: 16 / 60 min)
    report = time_report([], recorded=again["minutes_alone"])
    assert report.startswith("16 runs: 0.3 min") and "16 of the runs read from a record" in report
    # another teacher recipe is another grid: nothing is read back
    with pytest.raises(RuntimeError, match="should hold it"):
        sweep(
            replace(base, teacher=str(tmp_path / "vgg11-teacher")),
            grid,
            seeds=[0],
            jobs=1,
            run=never_called,
            record=path,
        )


def test_a_record_serves_a_pruning_rung_but_not_a_longer_run(smoke_cfg, tmp_path):
    cfg = smoke_cfg(epochs=4)
    history = pd.DataFrame({"epoch": [1, 2, 3, 4], "val_top1": [10.0, 20.0, 30.0, 40.0], "seconds": 1.0})
    records = RunRecords(str(tmp_path / "r.csv"))
    records.add(cfg, history.head(2), str(tmp_path / "runs" / "run-a"))
    records.save()
    records = RunRecords(str(tmp_path / "r.csv"))  # the next session
    assert records.lookup(cfg) is None  # 2 of 4 epochs
    rung = records.lookup(replace(cfg, stop_after=2))
    assert rung["history"]["val_top1"].tolist() == [10.0, 20.0] and rung["run_dir"].endswith("run-a")
    records.add(cfg, history, str(tmp_path / "runs" / "run-a"))
    assert records.lookup(cfg) is None  # added by this process: its folder is here, read it there
    records.add(cfg, history.head(1), str(tmp_path / "runs" / "run-a"))  # shorter: the longer one stays
    records.save()
    reread = RunRecords(str(tmp_path / "r.csv"))
    assert reread.lookup(cfg)["history"]["val_top1"].tolist() == [10.0, 20.0, 30.0, 40.0]
    assert reread.lookup(replace(cfg, stop_after=3))["history"]["epoch"].tolist() == [1, 2, 3]


def test_the_key_names_the_teacher_by_its_folder_and_keeps_everything_else(smoke_cfg, tmp_path):
    cfg = smoke_cfg(method="kd", teacher="runs/vgg13-w0.25-ce-s0-82f5f549")
    same = replace(cfg, teacher="/elsewhere/vgg13-w0.25-ce-s0-82f5f549/checkpoint.pt", out_dir="/other/runs")
    assert record_key(same) == record_key(cfg)
    assert record_key(replace(cfg, teacher="runs/vgg13-w0.25-ce-s1-32c63ae9")) != record_key(cfg)
    assert record_key(replace(cfg, T=2.0)) != record_key(cfg)
    assert record_key(replace(cfg, seed=1, data_seed=1)) != record_key(cfg)


def test_the_command_records_finished_folders(smoke_teacher, tmp_path):
    path = str(tmp_path / "r.csv")
    assert main([path, smoke_teacher.run_dir, str(tmp_path / "not-a-run")]) == 0
    found = RunRecords(path).lookup(smoke_teacher.config)
    pd.testing.assert_series_equal(
        found["history"]["val_top1"], load_history(smoke_teacher.run_dir)["val_top1"], check_dtype=False
    )


def test_a_commit_that_looks_like_a_number_reads_back_as_text(smoke_cfg, tmp_path, monkeypatch):
    # 9e55246 parses as the float 9 x 10^55246: read as a number, a record said "at inf" and saved that
    monkeypatch.setattr(run_records, "code_commit", lambda: "9e55246")
    path = str(tmp_path / "r.csv")
    history = pd.DataFrame({"epoch": [1], "val_top1": [10.0], "seconds": 1.0})
    records = RunRecords(path)
    records.add(smoke_cfg(epochs=1), history, str(tmp_path / "runs" / "run-a"))
    records.save()
    reread = RunRecords(path)
    assert reread.lookup(smoke_cfg(epochs=1))["recorded"].endswith(" at 9e55246")
    reread.save()  # a later session saving what it read keeps the commit as it was
    assert pd.read_csv(path, dtype=str)["commit"].tolist() == ["9e55246"]


def test_two_processes_sharing_a_record_each_keep_what_the_other_added(smoke_cfg, tmp_path):
    # two method groups tuned side by side, each with the record it read at its start
    path, runs = str(tmp_path / "r.csv"), str(tmp_path / "runs")
    a, b, c = (smoke_cfg(epochs=4, seed=s) for s in (0, 1, 2))
    history = pd.DataFrame({"epoch": [1, 2, 3, 4], "val_top1": [10.0, 20.0, 30.0, 40.0], "seconds": 1.0})
    first, second = RunRecords(path), RunRecords(path)
    first.add(a, history, f"{runs}/a")
    first.add(c, history, f"{runs}/c")  # c in full here ...
    second.add(b, history, f"{runs}/b")
    second.add(c, history.head(2), f"{runs}/c")  # ... and to a pruning rung there
    first.save()
    second.save()  # later: it must neither drop a, nor cut c back to its rung
    merged = RunRecords(path)
    assert [len(merged.lookup(cfg)["history"]) for cfg in (a, b, c)] == [4, 4, 4]

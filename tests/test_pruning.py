"""Grids that stop hopeless cells on validation: the rule, paused runs, and picks that do not change."""

import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from checkpoints import read_checkpoint
from config import check_config
from pruning import Prune, behind
from runs import train
from sweeps import cell_runs, run_all, sweep
from train_eval import TIMING_COLUMNS


def test_rungs_are_epochs_before_the_end():
    assert Prune().epochs(30) == [8, 15]
    assert Prune().epochs(4) == [1, 2]
    assert Prune().epochs(2) == [1]
    assert Prune().epochs(1) == []  # nothing to stop before the only epoch
    with pytest.raises(ValueError, match="fractions of the schedule"):
        Prune(rungs=(0.5, 1.0))
    with pytest.raises(ValueError, match="margin"):
        Prune(margin=-1)


def _rows(cells: dict[str, list[float]]) -> pd.DataFrame:
    return pd.DataFrame([{"w": w, "seed": s, "val_top1": v} for w, vals in cells.items() for s, v in enumerate(vals)])


def test_a_cell_stops_when_the_paired_gap_is_beyond_noise_and_margin():
    # gaps to the best cell "a" (mean 70): "b" 10, 11, 9 -> mean 10, sd 1, lower bound 10 - 4.303/sqrt(3) = 7.52
    # "c" 1, 5, 0 -> mean 2, sd 2.646, lower bound 2 - 4.303 * 2.646 / sqrt(3) = -4.57: within noise
    cells = {"a": [70.0, 71.0, 69.0], "b": [60.0, 60.0, 60.0], "c": [69.0, 66.0, 69.0]}
    t = 4.302652729911275  # t(0.975, 2)
    assert 10 - t / math.sqrt(3) == pytest.approx(7.5159, abs=1e-4)
    assert behind(_rows(cells), ["w"], margin=2.0) == {("b",)}
    assert behind(_rows(cells), ["w"], margin=7.6) == set()  # the gap's lower bound is 7.52
    # the same means, but "b" ahead on one seed: its gaps 20, 21, -11 have a lower bound below 0
    assert behind(_rows({"a": [70.0, 71.0, 69.0], "b": [50.0, 50.0, 80.0]}), ["w"], 2.0) == set()


def test_one_seed_or_a_failed_run_stops_nothing_it_cannot_judge():
    assert behind(_rows({"a": [70.0], "b": [10.0]}), ["w"], 2.0) == set()  # no noise estimate
    # seed 2 failed in "a": judged on seeds 0 and 1, gaps 10, 11: 10.5 - 12.706 * 0.5 = 4.15 > 2
    assert behind(_rows({"a": [70.0, 71.0, np.nan], "b": [60.0, 60.0, 60.0]}), ["w"], 2.0) == {("b",)}
    # gaps 10, 1: 5.5 - 12.706 * 4.5 < 0, within noise
    assert behind(_rows({"a": [70.0, 71.0, np.nan], "b": [60.0, 70.0, 60.0]}), ["w"], 2.0) == set()


def test_a_paused_run_resumes_to_the_bits_of_a_run_never_paused(smoke_cfg, tmp_path):
    cfg = smoke_cfg(epochs=3, threads=1)
    straight = train(replace(cfg, out_dir=str(tmp_path / "a")))
    paused = train(replace(cfg, out_dir=str(tmp_path / "b"), stop_after=1))
    assert list(paused.history["epoch"]) == [1] and "test_top1" not in paused.history  # test not read yet
    assert paused.run_dir.split("/")[-1] == straight.run_dir.split("/")[-1]  # the same run
    again = train(replace(cfg, out_dir=str(tmp_path / "b"), stop_after=1))  # read back, not retrained
    assert read_checkpoint(again.run_dir)["epoch"] == 1
    resumed = train(replace(cfg, out_dir=str(tmp_path / "b")))
    pd.testing.assert_frame_equal(
        straight.history.drop(columns=TIMING_COLUMNS), resumed.history.drop(columns=TIMING_COLUMNS)
    )
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="past the schedule's end"):
        check_config(replace(cfg, stop_after=4))


def test_pruning_stops_the_hopeless_cells_and_keeps_the_full_grids_pick(smoke_cfg, tmp_path):
    # lr 0.002 is hopeless against 0.05 in 4 epochs on the smoke data; 0.03 is close to 0.05
    cfg = smoke_cfg(epochs=4, threads=1)
    grid = {"lr": [0.05, 0.03, 0.002]}
    full = sweep(replace(cfg, out_dir=str(tmp_path / "full")), grid, seeds=range(3), jobs=1)
    pruned = sweep(replace(cfg, out_dir=str(tmp_path / "pruned")), grid, seeds=range(3), jobs=1, prune=Prune())
    assert pruned.attrs["best"] == full.attrs["best"]
    stopped = pruned[pruned["pruned_at"].notna()]
    assert set(stopped["lr"]) == {0.002} and set(stopped["pruned_at"]) <= {1, 2}
    assert stopped["test_top1"].isna().all()  # the test set is never read for a stopped cell
    kept = pruned[pruned["pruned_at"].isna()].reset_index(drop=True)
    same = full[full["lr"] != 0.002].reset_index(drop=True)
    pd.testing.assert_series_equal(kept["val_top1"], same["val_top1"])  # the survivors are the full grid's runs
    assert pruned.attrs["prune"] == {"rungs": [1, 2], "margin": 2.0}
    # a stopped cell's runs are read back where they stopped, not trained on
    at = cell_runs(pruned, replace(cfg, out_dir=str(tmp_path / "pruned")), {"lr": 0.002}, jobs=1)
    assert [len(r.history) for r in at] == [int(e) for e in stopped.sort_values("seed")["pruned_at"]]
    with pytest.raises(ValueError, match="no cell"):
        cell_runs(pruned, cfg, {"lr": 0.1})
    # asked again without pruning, the stopped runs resume to the end: the full grid's table
    resumed = sweep(replace(cfg, out_dir=str(tmp_path / "pruned")), grid, seeds=range(3), jobs=1)
    pd.testing.assert_series_equal(resumed["val_top1"], full["val_top1"])
    # pruned again after that: the same table, its stopped cell read where pruning judged it, not at the end
    again = sweep(replace(cfg, out_dir=str(tmp_path / "pruned")), grid, seeds=range(3), jobs=1, prune=Prune())
    pd.testing.assert_series_equal(again["val_top1"], pruned["val_top1"])
    assert again.attrs["best"] == pruned.attrs["best"] and again.loc[again["lr"] == 0.002, "test_top1"].isna().all()
    at = cell_runs(again, replace(cfg, out_dir=str(tmp_path / "pruned")), {"lr": 0.002}, jobs=1)
    assert [len(r.history) for r in at] == [int(e) for e in stopped.sort_values("seed")["pruned_at"]]


def test_an_empty_batch_of_runs_is_no_runs():
    assert run_all([], jobs=2) == [] and run_all([]) == []  # a check of the pruned cells where none was pruned


def test_pruning_needs_a_validation_split(smoke_cfg):
    with pytest.raises(ValueError, match="decides on validation: set val_size"):
        sweep(smoke_cfg(val_size=0), {"lr": [0.05, 0.01]}, seeds=range(2), prune=Prune())

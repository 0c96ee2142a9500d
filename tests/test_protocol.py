"""The experiment protocol: validation split, published recipes, sweeps, paired statistics."""

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from scipy import stats

import analysis
import data_utils
import train_kd
from conftest import ROOT
from train_eval import load_history, make_config, resolve_recipe, run_dir_for, train
from train_kd import distill, parse_grid, parse_seeds, sweep

# ----------------------------------------------------------------------------- validation split


def test_validation_split_is_disjoint_balanced_and_seeded():
    labels = torch.arange(10).repeat_interleave(50)[torch.randperm(500, generator=torch.Generator().manual_seed(1))]
    train_idx, val_idx = data_utils.validation_split(labels, 100, seed=0)
    assert len(set(train_idx.tolist()) & set(val_idx.tolist())) == 0
    assert sorted(train_idx.tolist() + val_idx.tolist()) == list(range(500))
    assert torch.bincount(labels[val_idx]).tolist() == [10] * 10
    again, _ = data_utils.validation_split(labels, 100, seed=0)
    other, other_val = data_utils.validation_split(labels, 100, seed=1)
    assert torch.equal(train_idx, again) and not torch.equal(val_idx, other_val)
    with pytest.raises(ValueError, match="multiple of the 10 classes"):
        data_utils.validation_split(labels, 105)


def test_students_subset_never_sees_validation_images(synthetic_dir):
    loaders = data_utils.get_cifar10_loaders(
        batch_size=32, data_dir=synthetic_dir, val_size=200, subset_per_class=50, split_seed=3
    )
    as_rows = lambda x: {bytes(img.flatten().tolist()) for img in x}  # noqa: E731
    train_imgs, val_imgs = as_rows(loaders.train.images), as_rows(loaders.val.images)
    assert len(val_imgs) == 200 and len(loaders.train.images) == 500
    assert not train_imgs & val_imgs
    assert torch.bincount(loaders.val.labels).tolist() == [20] * 10
    # the teacher (no subset) trains on everything but the same hold-out
    full = data_utils.get_cifar10_loaders(batch_size=32, data_dir=synthetic_dir, val_size=200, split_seed=3)
    assert len(full.train.images) == 1000 and torch.equal(full.val.images, loaders.val.images)
    assert data_utils.get_cifar10_loaders(batch_size=32, data_dir=synthetic_dir).val is None


def test_metrics_have_validation_columns_and_best_epoch_is_picked_on_validation(smoke_cfg):
    result = train(smoke_cfg(epochs=2))
    history = load_history(result.run_dir)
    assert {"val_loss", "val_top1", "val_top5", "test_top1", "threads", "seconds", "cpu_seconds"} <= set(
        history.columns
    )
    assert len(history) == 2 and (history["cpu_seconds"] > 0).all()
    # minutes_alone reads the CPU time of such a run: one CPU's seconds per thread, never its wall time
    assert analysis.minutes_alone([result.run_dir]).iloc[0] * 60 == pytest.approx(
        (history["cpu_seconds"] / history["threads"]).sum()
    )
    fake = pd.DataFrame(
        {"epoch": [1, 2, 3], "val_top1": [50, 70, 60], "test_top1": [55, 60, 80], "test_top5": [90, 91, 95]}
        | {"seconds": [1, 1, 1]}
    )
    s = analysis.summarize(fake)
    assert (s["best_epoch"], s["best_top1"], s["picked_by"], s["last_top1"]) == (2, 60, "val_top1", 80)
    assert analysis.summarize(fake.drop(columns="val_top1"))["picked_by"] == "test_top1"


# ----------------------------------------------------------------------------- recipes


@pytest.mark.parametrize(
    "method, expected",
    [
        ("kd", dict(ce_weight=0.1, kd_weight=0.9, T=4.0)),  # RepDistiller -r 0.1 -a 0.9, kd_T 4; mdistiller
        ("kd_ls", dict(ce_weight=0.1, kd_weight=9.0, T=2.0)),  # Sun et al.'s release
        ("fitnet", dict(ce_weight=1.0, feat_weight=100.0)),  # RepDistiller -r 1 -a 0 -b 100
        ("at", dict(ce_weight=1.0, feat_weight=1000.0)),
        ("sp", dict(ce_weight=1.0, feat_weight=3000.0)),
        ("pkt", dict(ce_weight=1.0, feat_weight=30000.0)),
        ("at+kd", dict(ce_weight=1.0, kd_weight=1.0, T=4.0, feat_weight=1000.0)),  # RepDistiller -a 1 -b β
        ("dml", dict(peer_T=1.0, peer_weight=1.0)),  # Zhang et al. 2018
    ],
)
def test_default_recipes_are_the_published_ones(method, expected):
    cfg = resolve_recipe(make_config("cpu", method=method, teacher="t"))
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert train_kd.METHODS[method].source


def test_explicit_values_override_the_recipe_and_alpha_is_a_shorthand():
    cfg = resolve_recipe(make_config("cpu", method="kd_ls", T=3.0))
    assert (cfg.T, cfg.kd_weight) == (3.0, 9.0)
    cfg = resolve_recipe(make_config("cpu", method="kd", alpha=0.5))
    assert (cfg.ce_weight, cfg.kd_weight, cfg.alpha) == (0.5, 0.5, None)
    # weights are free: nothing forces them to sum to 1
    cfg = resolve_recipe(make_config("cpu", method="kd", ce_weight=1.0, kd_weight=9.0))
    assert (cfg.ce_weight, cfg.kd_weight, cfg.T) == (1.0, 9.0, 4.0)
    # switching method on an unresolved config never carries the old method's weights
    base = make_config("cpu", method="kd")
    assert resolve_recipe(replace(base, method="kd_ls")).kd_weight == 9.0


def test_kd_ls_run_from_the_command_line_trains_the_released_recipe(synthetic_dir, tmp_path):
    common = ["--profile", "smoke", "--data-dir", synthetic_dir, "--out-dir", str(tmp_path), "--epochs", "1"]
    teacher = train(make_config("smoke", data_dir=synthetic_dir, out_dir=str(tmp_path), epochs=1, model="vgg11"))
    result = train_kd.main([*common, "--teacher", teacher.run_dir, "--method", "kd_ls"])
    saved = pd.read_json(os.path.join(result.run_dir, "config.json"), typ="series")
    assert (saved["ce_weight"], saved["kd_weight"], saved["T"]) == (0.1, 9.0, 2.0)
    history = load_history(result.run_dir)
    assert "train_kd" in history and "val_top1" in history


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(kd_weight=-1.0), "kd_weight must be >= 0"),
        (dict(alpha=1.5), "0 <= alpha <= 1"),
        (dict(T=float("nan")), "not a finite number"),
        (dict(val_size=5005), "multiple of the 10 classes"),
        (dict(val_size=10000, subset=4500), "keep val_size/10 \\+ subset <= 5000"),
        (dict(val_size=-10), "multiple|>= 0"),
    ],
)
def test_bad_protocol_values_are_refused_with_the_valid_range(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config("cpu", **overrides)


def test_all_zero_weights_and_alpha_with_weights_are_refused():
    with pytest.raises(ValueError, match="every loss weight of method 'kd' is zero"):
        resolve_recipe(make_config("cpu", method="kd", ce_weight=0.0, kd_weight=0.0))
    with pytest.raises(ValueError, match="not both"):
        resolve_recipe(make_config("cpu", method="kd", alpha=0.5, kd_weight=1.0))


# ----------------------------------------------------------------------------- sweeps


def test_sweep_results_do_not_depend_on_workers_and_finished_runs_are_reused(smoke_cfg, tmp_path):
    teacher = train(smoke_cfg(model="vgg11", epochs=1))
    base = smoke_cfg(method="kd", teacher=teacher.run_dir, epochs=1)
    grid = {"T": [2.0, 4.0]}
    one = sweep(replace(base, out_dir=str(tmp_path / "a")), grid, seeds=[0, 1], jobs=1)
    two = sweep(replace(base, out_dir=str(tmp_path / "b")), grid, seeds=[0, 1], jobs=2)
    cols = ["T", "seed", "threads", "val_top1", "val_loss", "test_top1", "test_top5"]
    pd.testing.assert_frame_equal(one[cols], two[cols])
    assert len(one) == 4 and one["threads"].eq(1).all() and one["best"].sum() == 2
    assert one.attrs["best"]["T"] == one.groupby("T")["val_top1"].mean().idxmax()
    assert os.path.isfile(one.attrs["path"])
    stamp = os.path.getmtime(os.path.join(one["run_dir"][0], "checkpoint.pt"))
    again = sweep(replace(base, out_dir=str(tmp_path / "a")), grid, seeds=[0, 1], jobs=1)
    assert os.path.getmtime(os.path.join(one["run_dir"][0], "checkpoint.pt")) == stamp
    pd.testing.assert_frame_equal(again[cols], one[cols])


def test_auto_jobs_never_oversubscribe_the_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    assert [train_kd.default_jobs(t) for t in (1, 2, 3, 4, 8)] == [4, 2, 1, 1, 1]
    assert train_kd.default_jobs(0) == 1  # torch's default threads take every core: one run at a time


def fail_on_seed_1(cfg):
    """A run function whose seed-1 runs crash (module level: a spawned worker imports it)."""
    if cfg.seed == 1:
        raise RuntimeError("boom on seed 1")
    return train(cfg)


def test_a_crashed_run_is_reported_and_the_others_finish(smoke_cfg):
    base = smoke_cfg(epochs=1)
    with pytest.raises(RuntimeError, match="1 of 2 runs failed") as err:
        sweep(base, {"lr": [0.05]}, seeds=[0, 1], jobs=2, run=fail_on_seed_1)
    assert "boom on seed 1" in str(err.value)
    ok = err.value.results.query("seed == 0")
    assert os.path.isfile(os.path.join(ok["run_dir"].iloc[0], "checkpoint.pt"))
    # the rerun redoes only the missing one (seed 0 is read back)
    done = sweep(base, {"lr": [0.05]}, seeds=[0, 1], jobs=1)
    assert len(done) == 2 and done["error"].isna().all() if "error" in done else len(done) == 2


def peak_at_t6(cfg):
    """A stand-in run (module level: workers import it) whose validation accuracy peaks at T = 6 and,
    for every T, is higher for the (0.5, 0.5) weights than for (0.0, 1.0)."""
    val = 70 - abs(cfg.T - 6.0) + (1.0 if cfg.ce_weight == 0.5 else 0.0) + 0.1 * cfg.seed
    history = pd.DataFrame(
        {"epoch": [1], "val_top1": [val], "val_loss": [1.0], "test_top1": [val], "test_top5": [99.0], "seconds": [1.0]}
    )
    return SimpleNamespace(
        run_dir=os.path.join(cfg.out_dir, f"fake-T{cfg.T:g}-w{cfg.ce_weight:g}-s{cfg.seed}"), history=history
    )


def test_a_joined_axis_sets_fields_together_and_an_edge_pick_is_extended(smoke_cfg):
    base = smoke_cfg(method="kd", teacher="runs/none", epochs=1)
    grid = {"T": [1.0, 2.0], "ce_weight,kd_weight": [(0.5, 0.5), (0.0, 1.0)]}
    df = sweep(base, grid, seeds=[0, 1], jobs=1, run=peak_at_t6, extend={"T": 2.0})
    # T = 2 is the upper edge: 4 is added, still the edge, then 8, where the pick (T = 4 or 8: |T - 6| = 2) stops
    assert df.attrs["extended"] == {"T": [4.0, 8.0]} and df.attrs["edge"] == {}
    assert df.attrs["keys"] == ["T", "ce_weight", "kd_weight"]
    assert len(df) == 4 * 2 * 2 and set(zip(df["ce_weight"], df["kd_weight"], strict=True)) == {(0.5, 0.5), (0.0, 1.0)}
    assert df.attrs["best"] == {"T": 4.0, "ce_weight": 0.5, "kd_weight": 0.5}  # ties break to the first
    cells = analysis.cell_table(df)
    assert cells.index.names == ["T", "ce_weight", "kd_weight"] and (cells["n"] == 2).all()
    assert cells.loc[(8.0, 0.0, 1.0), "val_top1"] == pytest.approx(68.05)
    # at most max_extensions steps: the pick stays on the edge, and the table says so
    capped = sweep(base, {"T": [1.0, 2.0]}, seeds=[0], jobs=1, run=peak_at_t6, extend={"T": 2.0}, max_extensions=1)
    assert capped.attrs["extended"] == {"T": [4.0]} and capped.attrs["edge"] == {"T": 4.0}
    with pytest.raises(ValueError, match="sets 2 fields together"):
        sweep(base, {"ce_weight,kd_weight": [0.5]}, seeds=[0], run=peak_at_t6)
    with pytest.raises(ValueError, match="not a single-field axis"):
        sweep(base, grid, seeds=[0], run=peak_at_t6, extend={"kd_weight": 2.0})
    with pytest.raises(ValueError, match="sets a field twice"):
        sweep(base, {"T": [1.0], "T,kd_weight": [(1.0, 1.0)]}, seeds=[0], run=peak_at_t6)


def test_grids_swept_together_keep_their_own_picks_and_extensions(smoke_cfg):
    base = smoke_cfg(method="kd", teacher="runs/none", epochs=1)
    grids = {
        "by T": (base, {"T": [1.0, 2.0]}),
        "by weights": (replace(base, T=6.0), {"ce_weight,kd_weight": [(0.5, 0.5), (0.0, 1.0)]}),
    }
    out = train_kd.sweep_grids(grids, seeds=[0, 1], jobs=1, run=peak_at_t6, extend={"by T": {"T": 2.0}})
    assert out["by T"].attrs["best"] == {"T": 4.0} and out["by T"].attrs["extended"] == {"T": [4.0, 8.0]}
    assert out["by weights"].attrs["best"] == {"ce_weight": 0.5, "kd_weight": 0.5}
    assert out["by weights"].attrs["extended"] == {} and len(out["by weights"]) == 4
    # each grid's table is the one sweep gives for it alone
    alone = sweep(replace(base, T=6.0), grids["by weights"][1], seeds=[0, 1], jobs=1, run=peak_at_t6)
    pd.testing.assert_frame_equal(alone, out["by weights"])
    with pytest.raises(ValueError, match="not one of the grids"):
        train_kd.sweep_grids(grids, seeds=[0], run=peak_at_t6, extend={"by X": {"T": 2.0}})


@pytest.mark.parametrize(
    "grid, kwargs, message",
    [
        ({"temperature": [1, 2]}, {}, "not a config field or method parameter; valid: .*T"),
        ({}, {}, "empty grid"),
        ({"T": []}, {}, "empty grid"),
        ({"seed": [1, 2]}, {}, "seeds are not a grid field"),
        ({"kd_weight": [-1.0]}, {}, "kd_weight must be >= 0"),
        ({"T": [2.0]}, {"jobs": 0}, "jobs must be"),
    ],
)
def test_bad_sweeps_fail_before_any_run(smoke_cfg, grid, kwargs, message):
    base = smoke_cfg(method="kd", teacher="no-such-teacher")
    with pytest.raises(ValueError, match=message):
        sweep(base, grid, seeds=[0], **kwargs)
    assert not os.path.exists(base.out_dir)


def test_sweep_command_line_forms():
    assert parse_grid(["T=1,2,4", "kd-weight=1,3,9", "flip=false"]) == {
        "T": [1.0, 2.0, 4.0],
        "kd_weight": [1.0, 3.0, 9.0],
        "flip": [False],
    }
    assert parse_seeds("0-2") == [0, 1, 2] and parse_seeds("0,3,5") == [0, 3, 5]
    with pytest.raises(ValueError, match="not a config field or method parameter"):
        parse_grid(["tau=1"])


def test_scripts_run_as_scripts():
    env = {**os.environ, "KD_PROGRESS": "0"}
    for script in ("train_kd.py", "multi_student.py", "train_eval.py"):
        done = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, cwd=ROOT, env=env)
        assert done.returncode == 0, done.stderr
        assert "--profile" in done.stdout


def test_sweep_from_the_script_with_worker_processes(synthetic_dir, tmp_path, smoke_teacher):
    # spawned workers import the script again (as __mp_main__): its methods must not clash
    args = ["--profile", "smoke", "--data-dir", synthetic_dir, "--out-dir", str(tmp_path), "--epochs", "1"]
    args += ["--teacher", smoke_teacher.run_dir, "--sweep", "T=2,4", "--seeds", "0", "--jobs", "2"]
    env = {**os.environ, "KD_PROGRESS": "0"}
    done = subprocess.run([sys.executable, "train_kd.py", *args], capture_output=True, text=True, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "picked on validation" in done.stdout


def test_sweep_cli_prints_the_pick(synthetic_dir, tmp_path, capsys):
    teacher = train(make_config("smoke", data_dir=synthetic_dir, out_dir=str(tmp_path), epochs=1, model="vgg11"))
    args = ["--profile", "smoke", "--data-dir", synthetic_dir, "--out-dir", str(tmp_path), "--epochs", "1"]
    df = train_kd.main([*args, "--teacher", teacher.run_dir, "--sweep", "T=2,4", "--seeds", "0", "--jobs", "1"])
    assert len(df) == 2 and "picked on validation" in capsys.readouterr().out


# ----------------------------------------------------------------------------- paired statistics


def _runs(values: dict[int, float]):
    return [
        SimpleNamespace(
            config=SimpleNamespace(seed=s),
            history=pd.DataFrame({"epoch": [1], "test_top1": [v], "test_top5": [99.0], "seconds": [1.0]}),
        )
        for s, v in values.items()
    ]


def test_compare_matches_hand_computation_and_scipy():
    a, b = [70.1, 71.3, 69.8], [67.2, 68.9, 68.0]
    # by hand: d = (2.9, 2.4, 1.8), mean 2.3667, sd 0.55076, se 0.31798, t = 7.4428 with 2 dof;
    # t_.975(2) = 4.3027, so CI = 2.3667 ± 1.3682; p = 1 - t / sqrt(t² + 2) for 2 dof = 0.01758
    c = analysis.compare(a, b)
    assert c.n == 3 and c.diff == pytest.approx(2.36667, abs=1e-4)
    assert (c.ci_low, c.ci_high) == (pytest.approx(0.9985, abs=1e-3), pytest.approx(3.7349, abs=1e-3))
    assert c.p == pytest.approx(0.01758, abs=1e-4)
    assert c.p == pytest.approx(stats.ttest_rel(a, b).pvalue) and not c.within_noise
    assert "95% CI +1.00 to +3.73" in str(c)


def test_compare_pairs_runs_by_seed_and_says_within_noise():
    a = _runs({2: 70.0, 0: 71.0, 1: 69.0})
    b = _runs({0: 70.5, 1: 69.5, 2: 69.0, 7: 10.0})  # seed 7 has no partner: left out
    c = analysis.compare(a, b)
    assert c.seeds == (0, 1, 2) and c.diff == pytest.approx((0.5 - 0.5 + 1.0) / 3)
    assert c.within_noise and "within noise" in str(c)
    assert c.p == pytest.approx(stats.ttest_rel([71.0, 69.0, 70.0], [70.5, 69.5, 69.0]).pvalue)
    with pytest.raises(ValueError, match="no seed in common"):
        analysis.compare(_runs({5: 1.0}), b)
    table = analysis.compare_table({"ce": b, "kd": a}, baseline="ce")
    assert table.loc["kd − ce", "verdict"] == "within noise" and table.loc["kd − ce", "n"] == 3
    # named pairs, each its own baseline: b - a is the opposite of a - b, and each row is compare's
    both = analysis.paired_table({"a − b": (a, b), "b − a": (b, a)}, bound=5.0)
    assert both.loc["a − b", "diff"] == pytest.approx(c.diff) and both.loc["b − a", "diff"] == pytest.approx(-c.diff)
    assert (both.loc["a − b", "ci_low"], both.loc["a − b", "ci_high"]) == (
        pytest.approx(c.ci_low),
        pytest.approx(c.ci_high),
    )
    assert set(both["verdict"]) == {"equivalent (±5)"}


def test_paired_table_words_a_neutral_quantity_higher_or_lower():
    """Disagreement has no better direction: a detected drop is "lower", an accuracy drop "worse"."""
    lower = ({0: 1.0, 1: 2.0, 2: 3.0}, {0: 2.0, 1: 3.1, 2: 3.9})  # a − b: −1.0, −1.1, −0.9
    table = analysis.paired_table({"top-1": lower, "disagreement": lower}, neutral=["disagreement"])
    assert table.loc["top-1", "verdict"] == "worse" and table.loc["disagreement", "verdict"] == "lower"
    with pytest.raises(ValueError, match=r"neutral names \['disagrement'\] are not comparisons.*'disagreement'"):
        analysis.paired_table({"disagreement": lower}, neutral=["disagrement"])


def test_equivalence_is_tost_on_the_90_percent_ci():
    d = [0.1, -0.2, 0.3, 0.0, 0.2]
    # by hand: mean 0.08, sd 0.19235, se 0.086023; t_.95(4) = 2.13185 -> 90% CI -0.1034 to 0.2634;
    # t_.975(4) = 2.77645 -> 95% CI -0.1588 to 0.3188 (includes 0)
    c = analysis.compare(d, [0.0] * 5)
    assert c.ci(0.90) == (pytest.approx(-0.1034, abs=1e-3), pytest.approx(0.2634, abs=1e-3))
    assert c.equivalent(0.5) and not c.equivalent(0.25)
    assert c.verdict(0.5) == "equivalent (±0.5)" and c.verdict(0.25) == "within noise" and c.verdict() == "within noise"
    assert analysis.compare([2.0, 3.0, 2.5], [0.0] * 3).verdict(0.5, words=("better", "worse")) == "better"
    table = analysis.compare_columns(
        pd.DataFrame({"g": ["a"] * 5 + ["b"] * 5, "seed": [*range(5)] * 2, "acc": [*d, *[0.0] * 5]}),
        "g",
        "b",
        ["acc"],
        0.5,
    )
    assert table.loc[("a", "acc"), "verdict"] == "equivalent (±0.5)"


def test_compare_nested_pools_over_teachers_with_their_spread():
    a = {"t0": [71.0, 72.0, 73.0], "t1": [70.0, 70.0, 71.0]}
    b = {"t0": [70.0, 70.5, 71.0], "t1": [70.0, 69.5, 70.0]}
    # by hand: t0 d = (1, 1.5, 2), mean 1.5, CI 1.5 ± 4.3027 * 0.5 / sqrt(3) = 0.258 to 2.742 (higher);
    # t1 d = (0, 0.5, 1): -0.742 to 1.742 (within noise); pooled over teachers: mean(1.5, 0.5) = 1.0,
    # sd 0.7071, se 0.5, t_.975(1) = 12.706 -> -5.353 to 7.353
    t = analysis.compare_nested(a, b)
    assert list(t.index) == ["t0", "t1", "pooled"]
    assert (t.loc["t0", "ci_low"], t.loc["t0", "verdict"]) == (pytest.approx(0.2579, abs=1e-3), "higher")
    assert t.loc["t1", "verdict"] == "within noise"
    assert t.loc["pooled", "diff"] == pytest.approx(1.0) and t.loc["pooled", "n"] == 2
    assert (t.loc["pooled", "ci_low"], t.loc["pooled", "ci_high"]) == (
        pytest.approx(-5.3531, abs=1e-3),
        pytest.approx(7.3531, abs=1e-3),
    )
    assert t.loc["pooled", "mean_a"] == pytest.approx(71.1667, abs=1e-3) and not t["same_verdict"].any()
    with pytest.raises(ValueError, match="same teachers"):
        analysis.compare_nested(a, {"t0": b["t0"]})
    both = analysis.nested_table({"a − b": (a, b), "b − a": (b, a)})
    assert list(both.index) == [(n, t) for n in ("a − b", "b − a") for t in ("t0", "t1", "pooled")]
    assert both.loc[("b − a", "pooled"), "diff"] == pytest.approx(-1.0)
    assert both.loc[("b − a", "t0"), "ci_high"] == pytest.approx(-0.2579, abs=1e-3)


def _timed_run(path, seconds, metrics=None, **cfg):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"method": "ce", "width": 0.25, "out_dir": str(path.parent), **cfg}))
    history = {"epoch": range(1, len(seconds) + 1), "seconds": seconds, "threads": 1, **(metrics or {})}
    pd.DataFrame(history).to_csv(path / "metrics.csv", index=False)
    return str(path)


def test_minutes_alone_pools_the_runs_that_differ_only_in_seeds(tmp_path):
    a0 = _timed_run(tmp_path / "a0", [10, 10, 10, 40], seed=0, data_seed=0)  # one epoch beside another job
    a1 = _timed_run(tmp_path / "a1", [10, 10, 30, 10], seed=1, data_seed=1)
    a2 = _timed_run(tmp_path / "a2", [30, 30, 30, 30], seed=2, data_seed=2)  # beside another job throughout
    b = _timed_run(tmp_path / "b", [20, 20], seed=0, data_seed=0, width=0.5)  # other work: never pooled with a
    # the a runs' median epochs: 10, 10, 30 s, their median 10 s; 4 epochs each: 40 s (their sums: 70, 60, 120 s)
    minutes = analysis.minutes_alone([a0, a1, a2, b, a0])
    assert list(minutes.index) == [a0, a1, a2, b]  # a folder given twice counts once
    assert minutes.tolist() == pytest.approx([40 / 60, 40 / 60, 40 / 60, 40 / 60])


def test_time_report_states_minutes_alone_and_the_from_scratch_wall_time(tmp_path, monkeypatch):
    a = _timed_run(tmp_path / "a", [60, 60], seed=0, data_seed=0)
    b = _timed_run(tmp_path / "b", [120, 120], seed=0, data_seed=0, method="kd")
    text = analysis.time_report([a, b], cores=2)
    assert text.startswith("2 runs: 6.0 min had each run been alone") and "about 3.0 min of wall time at 2" in text
    monkeypatch.setattr(analysis.time, "time", lambda: 1000.0 + 90)
    assert analysis.time_report([a], started=1000.0).endswith(
        "this execution: 1.5 min (finished runs are read back, not retrained)"
    )


def test_time_report_counts_a_recorded_run_whose_folder_is_here_once_from_its_folder(tmp_path):
    a = _timed_run(tmp_path / "a", [60, 60], seed=0, data_seed=0)  # a grid run, resumed: 2 min in its folder
    # the record holds a (to its pruning rung: 0.5 min) and c (trained elsewhere: 3 min), by run folder
    recorded = pd.Series([0.5, 3.0], index=["runs/a", "runs/c"])
    text = analysis.time_report([a], recorded=recorded)
    assert text.startswith("2 runs: 5.0 min") and "1 of the runs read from a record" in text
    # minutes without folders (a column with the table's own index) all count
    assert analysis.time_report([a], recorded=[0.5, 3.0]).startswith("3 runs: 5.5 min")


def test_minutes_alone_counts_cpu_time_per_thread_where_the_epochs_have_it(tmp_path):
    cpu = {"cpu_seconds": [float("nan"), 9, 20], "threads": [1, 1, 2]}  # resumed: its first epoch has no CPU time
    c = _timed_run(tmp_path / "c", [12, 30, 30], cpu)  # wall time inflated by a job beside it
    gpu = _timed_run(tmp_path / "gpu", [5, 7, 6], {"cpu_seconds": [1, 1, 1], "threads": 0}, device="cuda")
    minutes = analysis.minutes_alone([c, gpu])
    assert minutes[c] == pytest.approx((10 + 9 + 20 / 2) / 60)  # epoch 1: the median of 12 (wall), 9, 10
    assert minutes[gpu] == pytest.approx(3 * 6 / 60)  # a GPU run's CPU time says nothing of its speed


def test_minutes_alone_pools_the_cpu_time_of_newer_runs_for_older_ones(tmp_path):
    # an older run (no CPU time) and two newer ones, all three beside another job: wall 30 s an epoch
    old = _timed_run(tmp_path / "old", [30, 30], seed=0)
    new = [_timed_run(tmp_path / f"n{s}", [30, 30], {"cpu_seconds": [c, c]}, seed=s) for s, c in ((1, 10), (2, 11))]
    minutes = analysis.minutes_alone([old, *new])
    assert minutes[old] == pytest.approx(2 * 11 / 60)  # the median of the runs' 30, 10 and 11 s epochs
    assert minutes[new[0]] == pytest.approx(2 * 10 / 60)


def test_mean_std_table_shows_n_and_the_confidence_interval():
    table = analysis.mean_std_table({"kd": _runs({0: 70.0, 1: 72.0, 2: 74.0})}, columns=("last_top1",))
    half = stats.t.ppf(0.975, 2) * 2.0 / math.sqrt(3)  # std 2 over 3 seeds
    assert table.loc["kd", "n"] == 3
    assert table.loc["kd", "last_top1"] == f"72.00 ± {half:.2f} (std 2.00)"


def test_kd_ls_with_distill_resolves_before_naming(smoke_cfg):
    # the run folder name of an unresolved config is the one the run is saved under
    teacher = train(smoke_cfg(model="vgg11", epochs=1))
    cfg = smoke_cfg(method="kd_ls", teacher=teacher.run_dir, epochs=1)
    assert distill(cfg).run_dir == run_dir_for(cfg) == run_dir_for(resolve_recipe(cfg))


def test_seeds_alone_run_the_one_configuration_over_those_seeds(synthetic_dir, tmp_path, smoke_teacher, capsys):
    args = ["--profile", "smoke", "--data-dir", synthetic_dir, "--out-dir", str(tmp_path), "--epochs", "1"]
    df = train_kd.main([*args, "--teacher", smoke_teacher.run_dir, "--seeds", "0,1", "--jobs", "1"])
    assert sorted(df["seed"]) == [0, 1] and (df["method"] == "kd").all()
    assert df["run_dir"].nunique() == 2 and "picked on validation" in capsys.readouterr().out

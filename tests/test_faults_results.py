"""Faults in what a run folder reports: truncated checkpoints and cache files, views that disagree
with the checkpoint, checkpoints that do not fit, runs that never learn, and early failures."""

import json
import math
import os
import threading
import warnings
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

import analysis
import runs
import train_eval
from model import create_model, load_checkpoint, read_checkpoint, save_checkpoint
from run_folders import load_config, load_history
from sweeps import mark_best, sweep
from train_eval import RunFailedWarning, RunRecoveredWarning, chance_failure, make_config, run_dir_for, train

# ----------------------------------------------------------------------------- item 3: truncated files


def _lengths(size: int) -> list[int]:
    """Truncation lengths: the first bytes, every 1/40th of the file, and its last bytes."""
    return sorted({0, 1, 2, 3, 4, 10, 30, 100, size // 2, size - 22, size - 1, *range(0, size, max(1, size // 40))})


def test_every_truncation_of_a_checkpoint_names_the_file_and_the_remedy(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(str(path), create_model("vgg8", num_classes=10, width=0.0625), config=make_config("smoke"))
    data = path.read_bytes()
    for n in _lengths(len(data)):
        path.write_bytes(data[:n])
        with pytest.raises(ValueError, match=f"cannot read checkpoint {path}.*truncated: delete it and rerun"):
            read_checkpoint(str(path))


def test_every_truncation_of_a_teacher_cache_file_is_computed_again_and_rewritten(synthetic_dir, tmp_path):
    import data_utils
    from distiller import FrozenTeacher
    from teacher_cache import CachedTeacherLoader

    loader = data_utils.get_cifar10_loaders(batch_size=200, data_dir=synthetic_dir).train
    cache = CachedTeacherLoader(
        loader, FrozenTeacher(create_model("vgg8", num_classes=10, width=0.0625)), str(tmp_path)
    )
    good = cache.epoch_logits(0)
    path = tmp_path / cache.key / "epoch_0000.pt"
    data = path.read_bytes()
    bad = [data[:n] for n in _lengths(len(data))[::6]]
    torch.save(good[:10], path)  # a whole file, but not this stream's logits
    bad.append(path.read_bytes())
    for i, content in enumerate(bad):
        path.write_bytes(content)
        with pytest.warns(UserWarning, match=f"teacher cache file {path} is .*computing it again"):
            assert torch.equal(cache.epoch_logits(0), good)
        assert cache.computed == i + 2
        assert torch.equal(torch.load(path, weights_only=True), good), "the file is rewritten, whole"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(cache.epoch_logits(0), good) and cache.computed == len(bad) + 1  # read, not computed


# ----------------------------------------------------------------------------- item 8: checkpoints that do not fit


@pytest.fixture
def vgg8_checkpoint(tmp_path):
    path = tmp_path / "teacher.pt"
    model = create_model("vgg8", num_classes=10, width=0.0625)
    save_checkpoint(str(path), model, config=None)
    return path, torch.load(path, weights_only=True)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s | {"classifier.weight": torch.zeros(10, 5)}, r"of another shape: classifier.weight \(10, 5\)"),
        (lambda s: s | {"extra.weight": torch.zeros(1)}, "unexpected: extra.weight"),
        (lambda s: {k: v for k, v in s.items() if k != "stages.0.1.running_var"}, "missing: stages.0.1.running_var"),
    ],
    ids=["wrong shape", "extra key", "missing BN buffer"],
)
def test_a_checkpoint_that_does_not_fit_its_network_names_the_file_and_the_key(vgg8_checkpoint, change, message):
    path, ckpt = vgg8_checkpoint
    torch.save(ckpt | {"model": change(ckpt["model"])}, path)
    with pytest.raises(ValueError, match=f"{path} does not hold the weights of a vgg8 .*{message}"):
        load_checkpoint(str(path))


def test_a_state_dict_without_a_classifier_and_a_text_file_name_the_file(vgg8_checkpoint, tmp_path):
    path, ckpt = vgg8_checkpoint
    torch.save({k: v for k, v in ckpt["model"].items() if not k.startswith("classifier")}, path)
    with pytest.raises(ValueError, match=f"{path}: no classifier.weight"):
        load_checkpoint(str(path))
    text = tmp_path / "teacher.txt"
    text.write_text("hello teacher\n")
    with pytest.raises(ValueError, match=f"cannot read checkpoint {text}: not a PyTorch file"):
        load_checkpoint(str(text))


def test_bad_teachers_and_init_files_are_usage_errors_naming_the_file(synthetic_dir, tmp_path, vgg8_checkpoint, capsys):
    import train_kd

    path, ckpt = vgg8_checkpoint
    torch.save(ckpt | {"model": ckpt["model"] | {"classifier.weight": torch.zeros(10, 5)}}, path)
    text = tmp_path / "teacher.txt"
    text.write_text("hello teacher\n")
    common = ["--profile", "smoke", "--data-dir", synthetic_dir, "--out-dir", str(tmp_path / "runs"), "--epochs", "1"]
    for argv, message in [
        (["--method", "kd", "--teacher", str(text)], f"cannot read checkpoint {text}: not a PyTorch file"),
        (["--method", "kd", "--teacher", str(path)], f"{path} does not hold the weights of a vgg8"),
        (["--method", "ce", "--init-from", str(path)], f"{path} does not hold the weights of a vgg8"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            train_kd.main([*common, *argv])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err and "Traceback" not in err, err
    assert not os.path.exists(tmp_path / "runs") or not [
        d for d in os.listdir(tmp_path / "runs") if d not in ("teacher_checks", "teacher_cache")
    ], "a run refused before training leaves no folder behind"


# ----------------------------------------------------------------------------- item 6: the checkpoint is the record


@pytest.fixture
def finished(smoke_cfg):
    cfg = smoke_cfg(epochs=1)
    result = train(cfg)
    files = {name: open(os.path.join(result.run_dir, name)).read() for name in ("config.json", "metrics.csv")}
    return cfg, result, files


@pytest.mark.parametrize(
    "damage",
    [lambda text: text[: len(text) - 20], lambda text: "\x00\x17 garbage \xff,,\n1,2\n", lambda text: ""],
    ids=["truncated", "garbage", "empty"],
)
def test_a_damaged_metrics_csv_is_read_from_the_checkpoint_and_repaired_on_reuse(finished, damage):
    cfg, result, files = finished
    path = os.path.join(result.run_dir, "metrics.csv")
    with open(path, "w") as f:
        f.write(damage(files["metrics.csv"]))
    pd.testing.assert_frame_equal(load_history(result.run_dir), result.history)  # the checkpoint's, not the file's
    assert analysis.minutes_alone([result.run_dir]).iloc[0] > 0
    with pytest.warns(UserWarning, match="metrics.csv disagreed with checkpoint.pt.*rewritten"):
        again = train(cfg)
    assert open(path).read() == files["metrics.csv"]
    pd.testing.assert_frame_equal(again.history, result.history)


def test_a_config_json_edited_by_hand_is_not_believed_and_is_rewritten_on_reuse(finished):
    cfg, result, files = finished
    path = os.path.join(result.run_dir, "config.json")
    edited = json.loads(files["config.json"]) | {"lr": 0.5}
    with open(path, "w") as f:
        json.dump(edited, f)
    assert load_config(result.run_dir).lr == cfg.lr == 0.05
    with pytest.warns(UserWarning, match="config.json disagreed with checkpoint.pt"):
        train(cfg)
    assert open(path).read() == files["config.json"]


def test_a_healthy_folder_is_reused_untouched(finished):
    cfg, result, files = finished
    stamps = {n: os.stat(os.path.join(result.run_dir, n)).st_mtime_ns for n in files}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(cfg)
    assert {n: os.stat(os.path.join(result.run_dir, n)).st_mtime_ns for n in files} == stamps
    assert sorted(os.listdir(result.run_dir)) == [".lock", "checkpoint.pt", "config.json", "metrics.csv"]


def test_a_folder_without_checkpoint_is_read_from_its_files_or_refused_naming_them(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    pd.DataFrame({"epoch": [1, 2], "seconds": [1.0, 2.0], "test_top1": [10.0, 20.0]}).to_csv(
        run / "metrics.csv", index=False
    )
    (run / "config.json").write_text(json.dumps({"lr": 0.1}))
    assert load_history(str(run))["test_top1"].tolist() == [10.0, 20.0] and load_config(str(run)).lr == 0.1
    text = (run / "metrics.csv").read_text()
    for damaged in (text[:-3], text[:-1], "\x00\xff garbage"):
        (run / "metrics.csv").write_text(damaged)
        with pytest.raises(ValueError, match=f"{run / 'metrics.csv'} is truncated or not this project's metrics"):
            load_history(str(run))
        with pytest.raises(ValueError, match="metrics.csv is truncated"):
            analysis.minutes_alone([str(run)])
    (run / "config.json").write_text('{"lr": 0.1')
    with pytest.raises(ValueError, match=f"{run / 'config.json'} is not valid JSON"):
        load_config(str(run))


# ----------------------------------------------------------------------------- item 11: runs that never learn


def _history(top1s, val=True):
    return [
        {"epoch": e + 1, "train_top1": t, **({"val_top1": v} if val else {"test_top1": v})}
        for e, (t, v) in enumerate(top1s)
    ]


def test_the_chance_rule_waits_for_a_few_epochs_and_follows_the_latest():
    stuck = [(10.0, 10.0)] * 3
    assert chance_failure(_history(stuck[:2]), 10, 30) is None  # two epochs: never judged
    assert "at chance after 3 epochs" in chance_failure(_history(stuck), 10, 30)
    assert chance_failure(_history(stuck), 10, 240) is None  # a long run: judged after 24 epochs
    assert chance_failure(_history([(10.0, 10.0)] * 23), 10, 240) is None
    assert "after 24 epochs" in chance_failure(_history([(10.0, 10.0)] * 24), 10, 240)
    assert chance_failure(_history([*stuck, (30.0, 25.0)]), 10, 30) is None  # a slow start that learns
    assert chance_failure(_history([(10.0, 10.0), (11.0, 12.0), (16.0, 14.0)]), 10, 30) is None  # train learns
    assert chance_failure(_history([(1.2, 0.9)] * 3), 100, 30)  # CIFAR-100: chance is 1%
    assert chance_failure(_history([(2.3, 3.0)] * 3), 100, 30) is None
    assert "test_top1" in chance_failure(_history(stuck, val=False), 10, 30)  # no validation split: test
    # a pre-training stage (AB's, say: 3 epochs) is waited out before the 3 epochs of patience
    assert chance_failure(_history([(10.0, 10.0)] * 5), 10, 30, grace=3) is None
    assert "after 6 epochs" in chance_failure(_history([(10.0, 10.0)] * 6), 10, 30, grace=3)


def test_a_run_at_chance_is_warned_about_and_marked_failed_in_its_folder(smoke_cfg):
    cfg = smoke_cfg(epochs=3, lr=0.0)
    with pytest.warns(RunFailedWarning, match=f"run {os.path.basename(run_dir_for(cfg))}, epoch 3: at chance"):
        result = train(cfg)
    reason = result.history["failed"].iloc[-1]
    assert reason.startswith("at chance after 3 epochs") and (result.history["failed"] == reason).all()
    with open(os.path.join(result.run_dir, "FAILED")) as f:
        assert f.read().strip() == reason
    assert read_checkpoint(result.run_dir)["failed"] == reason
    assert pd.read_csv(os.path.join(result.run_dir, "metrics.csv"))["failed"].iloc[0] == reason
    assert analysis.summarize(result.history)["failed"] == reason
    assert train(cfg).history["failed"].iloc[0] == reason  # reused: still failed
    assert load_history(result.run_dir)["failed"].iloc[0] == reason


def test_a_run_that_leaves_chance_is_told_so_and_loses_its_mark(smoke_cfg, monkeypatch):
    # the rule is tested above; here its verdict changes mid-run, as a slow start's does (AT, seed 2, vgg16-vgg11)
    def verdict(history, *args, **kwargs):  # at chance after epoch 1 only
        return "at chance after 1 epoch" if len(history) == 1 else None

    monkeypatch.setattr(train_eval, "chance_failure", verdict)
    with pytest.warns(RunFailedWarning, match="epoch 1: at chance"):
        with pytest.warns(RunRecoveredWarning, match=r"epoch 2: left chance \(top-1 \d+\.\d\d\); no longer failed"):
            result = train(smoke_cfg(epochs=3))
    assert not os.path.exists(os.path.join(result.run_dir, "FAILED"))
    assert read_checkpoint(result.run_dir).get("failed") is None
    assert analysis.summarize(result.history).get("failed") is None


def test_a_healthy_run_and_a_frozen_classifier_are_never_marked(smoke_cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RunFailedWarning)
        result = train(smoke_cfg(epochs=3))
        cfg = smoke_cfg(epochs=3, lr=0.0)
        loaders = train_eval.make_loaders(cfg)
        model = create_model("vgg8", num_classes=10, width=cfg.width)
        model.classifier.requires_grad_(False)  # as FitNets' first stage: at chance by design
        frozen = train_eval.fit(model, loaders.train, loaders.test, cfg, str(smoke_cfg().out_dir) + "/frozen")
    assert "failed" not in result.history and "failed" not in frozen
    assert not os.path.exists(os.path.join(result.run_dir, "FAILED"))
    assert "failed" not in read_checkpoint(result.run_dir) and "failed" not in analysis.summarize(result.history)
    assert list(pd.read_csv(os.path.join(result.run_dir, "metrics.csv")).columns) == list(result.history.columns)


def test_a_diverged_run_is_marked_failed(smoke_cfg, monkeypatch):
    cfg = smoke_cfg(epochs=3)
    real = train_eval.train_one_epoch
    calls = []

    def nan_in_epoch_2(*args):
        rows = real(*args)  # one row per member: here the run alone
        calls.append(1)
        return [rows[0] | {"train_loss": math.nan}] if len(calls) == 2 else rows

    monkeypatch.setattr(train_eval, "train_one_epoch", nan_in_epoch_2)
    with pytest.raises(FloatingPointError, match="diverged in epoch 2.*checkpoint of epoch 1 is kept"):
        train(cfg)
    with open(os.path.join(run_dir_for(cfg), "FAILED")) as f:
        assert f.read().startswith("training diverged in epoch 2 (train loss nan)")
    assert read_checkpoint(run_dir_for(cfg))["epoch"] == 1


def _runs(values: dict, failed=()):
    return [
        SimpleNamespace(
            config=SimpleNamespace(seed=s),
            history=pd.DataFrame(
                {"epoch": [1], "test_top1": [v], "test_top5": [v], "val_top1": [v], "seconds": [1.0]}
                | ({"failed": ["at chance after 3 epochs"]} if s in failed else {})
            ),
        )
        for s, v in values.items()
    ]


def test_failed_runs_are_left_out_of_every_summary_and_counted():
    kd = _runs({0: 70.0, 1: 10.0, 2: 74.0}, failed=(1,))
    ce = _runs({0: 60.0, 1: 62.0, 2: 64.0})
    s = analysis.summarize_seeds(kd)
    assert (s["seeds"], s["last_top1"], s["failed"], s["failed_seeds"]) == (2, 72.0, 1, [1])
    assert "failed" not in analysis.summarize_seeds(ce)
    table = analysis.mean_std_table({"kd": kd, "ce": ce}, columns=("last_top1",))
    assert table.loc["kd", "n"] == 2 and table.loc["kd", "last_top1"].startswith("72.00 ±")
    assert table.loc["kd", "failed"] == "1 of 3 (seed 1)" and table.loc["ce", "failed"] == "0 of 3"
    assert analysis.mean_std_table({"ce": ce}).loc["ce", "failed"] == "0 of 3"  # every table says it
    assert analysis.mean_std_table({"x": _runs({0: 10.0}, failed=(0,))}).loc["x", "last_top1"] == "–"
    c = analysis.compare(kd, ce)
    assert c.seeds == (0, 2) and c.failed == (1,) and c.diff == pytest.approx(10.0)
    assert "seed 1 left out: failed runs" in str(c)
    assert analysis.compare_table({"ce": ce, "kd": kd}, "ce").loc["kd − ce", "failed_seeds"] == "1"
    with pytest.raises(ValueError, match="seeds 1 left out: their runs failed"):
        analysis.compare(_runs({1: 10.0}, failed=(1,)), ce)


def test_a_sweep_picks_only_among_cells_that_trained_and_reports_the_failed_runs(smoke_cfg):
    df = pd.DataFrame(
        {
            "T": [1, 1, 2, 2],
            "seed": [0, 1, 0, 1],
            "val_top1": [50.0, 52.0, 90.0, 10.0],
            "test_top1": [49.0, 51.0, 88.0, 10.0],
            "failed": [None, None, None, "at chance after 3 epochs"],
        }
    )
    picked = mark_best(df, ["T"])
    assert picked.attrs["best"] == {"T": 1} and picked.attrs["failed"] == {"T=2": {"count": 1, "seeds": [1]}}
    table = analysis.cell_table(picked, ["T"])
    assert table.loc[2, "n"] == 1 and table.loc[2, "failed"] == 1 and table.loc[2, "failed_seeds"] == "1"
    assert table.loc[2, "val_top1"] == 90.0 and table.loc[1, "picked"] == "← picked"
    with pytest.raises(ValueError, match="every cell of the sweep has a failed run"):
        mark_best(df[df["T"] == 2], ["T"])
    # a whole sweep: lr 0 stays at chance, lr 1e6 diverges; both are failed runs, not errors
    with pytest.warns(RunFailedWarning):
        result = sweep(smoke_cfg(epochs=3, method="ce"), {"lr": [0.0, 0.05, 1e6]}, seeds=[0, 1], jobs=1)
    assert result.attrs["best"] == {"lr": 0.05}
    assert result.attrs["failed"] == {
        "lr=0.0": {"count": 2, "seeds": [0, 1]},
        "lr=1000000.0": {"count": 2, "seeds": [0, 1]},
    }
    cells = analysis.cell_table(result, ["lr"])
    assert cells["failed"].tolist() == [2, 0, 2] and cells.loc[1e6, "failed_seeds"] == "0, 1"
    assert cells.loc[0.05, "n"] == 2 and not math.isnan(cells.loc[0.05, "val_top1"])


# ----------------------------------------------------------------------------- item 10: early failures


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_folder(smoke_cfg, tmp_path):
    cfg = smoke_cfg(epochs=1, init_from=str(tmp_path / "missing.pt"))
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        train(cfg)
    assert not os.path.exists(run_dir_for(cfg))

    def boom(cfg, student, loader):
        raise KeyboardInterrupt

    cfg = smoke_cfg(epochs=1, lr=0.02)
    os.makedirs(run_dir_for(cfg))
    with open(os.path.join(run_dir_for(cfg), "notes.txt"), "w") as f:
        f.write("a user's file")
    with pytest.raises(KeyboardInterrupt):
        train(cfg, make_task=boom)
    assert sorted(os.listdir(run_dir_for(cfg))) == [".lock", "notes.txt"]  # only what the run created goes


def test_a_run_interrupted_in_its_first_epoch_removes_its_folder_and_one_with_a_checkpoint_is_kept(smoke_cfg):
    class Stop(Exception):
        pass

    def stop(epoch, row):
        raise Stop

    cfg = smoke_cfg(epochs=2)
    real_fit = train_eval.fit

    def fit_then_stop(*args, **kwargs):
        return real_fit(*args, **kwargs, callbacks=(stop,))

    import runs as runs_module

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runs_module.train_eval, "fit", fit_then_stop)
        with pytest.raises(Stop):
            train(cfg)  # stopped after epoch 1's checkpoint: the folder stays
    assert read_checkpoint(run_dir_for(cfg))["epoch"] == 1
    assert train(cfg).history["epoch"].tolist() == [1, 2]

    def fail_in_epoch(*args):
        raise RuntimeError("out of memory")

    cfg = smoke_cfg(epochs=1, lr=0.03)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_eval, "train_one_epoch", fail_in_epoch)
        with pytest.raises(RuntimeError, match="out of memory"):
            train(cfg)
    assert not os.path.exists(run_dir_for(cfg))


def test_a_run_waiting_for_a_lock_whose_folder_is_removed_locks_the_new_one(tmp_path):
    run_dir = str(tmp_path / "run")
    entered, held = threading.Event(), []

    def second():
        entered.set()
        with runs.run_lock(run_dir):
            held.append(os.path.exists(os.path.join(run_dir, ".lock")))

    with runs.run_lock(run_dir):
        waiter = threading.Thread(target=second)
        waiter.start()
        entered.wait()
        waiter.join(0.3)
        assert waiter.is_alive(), "the second run waits for the lock"
        os.remove(os.path.join(run_dir, ".lock"))  # what a run that failed early does with its folder
        os.rmdir(run_dir)
        assert not os.path.exists(run_dir)
    waiter.join(5)
    assert held == [True], "it locked a lock file that exists, not the removed one"

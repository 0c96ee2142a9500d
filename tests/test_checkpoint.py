"""Checkpoints rebuild their model; an interrupted run resumes to exactly the same result."""

import os

import pytest
import torch

from model import create_model, load_checkpoint, read_checkpoint, save_checkpoint
from train_eval import TIMING_COLUMNS, fit, make_loaders, run_dir_for


def test_round_trip_rebuilds_model_without_its_name(tmp_path, smoke_cfg):
    model = create_model("vgg13", num_classes=100, width=0.25).eval()
    cfg = smoke_cfg()
    path = tmp_path / "ckpt" / "checkpoint.pt"
    save_checkpoint(str(path), model, config=cfg, metrics=[{"epoch": 1, "test_top1": 12.5}])
    assert os.listdir(path.parent) == ["checkpoint.pt"], "no temporary file may stay behind"
    loaded, ckpt = load_checkpoint(str(path.parent))  # a run folder works as well as the file
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded.eval()(x), model(x))
    assert loaded.arch == {"name": "vgg13", "num_classes": 100, "width": 0.25}
    assert ckpt["config"]["model"] == cfg.model and ckpt["metrics"][0]["test_top1"] == 12.5


def test_missing_checkpoint_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*run folder"):
        load_checkpoint(str(tmp_path / "nothing"))


class Interrupt(Exception):
    pass


def _train(cfg, run_dir, callbacks=()):
    train_loader, _, test_loader = make_loaders(cfg)
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, num_classes=10, width=cfg.width)
    return fit(model, train_loader, test_loader, cfg, run_dir, callbacks)


def test_interrupted_run_resumes_to_identical_weights_and_metrics(smoke_cfg, tmp_path):
    cfg = smoke_cfg(epochs=4, schedule="multistep", milestones=[2])
    full = _train(cfg, str(tmp_path / "a"))

    def stop_after_second_epoch(epoch, row):
        if epoch == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        _train(cfg, str(tmp_path / "b"), callbacks=(stop_after_second_epoch,))
    assert read_checkpoint(str(tmp_path / "b"))["epoch"] == 2
    resumed = _train(cfg, str(tmp_path / "b"))
    a, b = read_checkpoint(str(tmp_path / "a")), read_checkpoint(str(tmp_path / "b"))
    assert b["epoch"] == 4
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert full.drop(columns=TIMING_COLUMNS).equals(resumed.drop(columns=TIMING_COLUMNS))
    assert resumed["lr"].tolist() == pytest.approx([0.05, 0.05, 0.005, 0.005])


def test_changed_config_in_same_folder_is_refused(smoke_cfg, tmp_path):
    cfg = smoke_cfg(epochs=1)
    _train(cfg, str(tmp_path / "run"))
    with pytest.raises(RuntimeError, match="different config"):
        _train(smoke_cfg(epochs=1, lr=0.1), str(tmp_path / "run"))


def test_run_names_follow_the_config(smoke_cfg):
    assert run_dir_for(smoke_cfg()) == run_dir_for(smoke_cfg(device="cpu", n_seeds=5))
    assert run_dir_for(smoke_cfg()) != run_dir_for(smoke_cfg(seed=1))
    assert run_dir_for(smoke_cfg()) == run_dir_for(smoke_cfg(T=2.0))  # unused without distillation
    assert run_dir_for(smoke_cfg(method="kd", teacher="t")) != run_dir_for(smoke_cfg(method="kd", teacher="t", T=2.0))

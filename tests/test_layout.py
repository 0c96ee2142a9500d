"""The layout's promises: methods declare their own parameters, the registry is the only authority on
what a method needs, nothing trains silently as something else, and no call changes hidden state."""

import json
import os
from dataclasses import replace

import pytest
import torch
from torch import nn

import distributed
import train_eval
from config import FIELDS, build_parser, config_from_args, make_config
from distiller import distill
from registry import METHODS, Param, method_params, positive, register_method
from run_folders import run_identity
from sweeps import run_many


@pytest.fixture
def toy_method():
    """A method as a new file in methods/ would add it: a loss with a parameter of its own."""

    class Scaled(nn.Module):
        def __init__(self, gain):
            super().__init__()
            self.gain = gain

        def forward(self, logits_s, logits_t, target, **_):
            return {"ce": self.gain * nn.functional.cross_entropy(logits_s, target)}

    gain = Param("toy_gain", float, "toy: the loss's scale", default=1.0, check=positive)
    register_method("toy", source="a test", params=(gain,), toy_gain=2.0)(
        lambda cfg, student, teacher: Scaled(cfg.toy_gain)
    )
    yield
    METHODS.pop("toy")


def test_config_has_no_method_parameter_among_its_fields():
    assert not set(FIELDS) & set(method_params())
    assert {"T", "hint_stage", "nckd_weight", "crd_negatives", "peer_weight", "probe_member"} <= set(method_params())


def test_a_new_methods_parameter_reaches_config_cli_config_json_and_identity(toy_method):
    cfg = make_config("smoke", method="toy")
    assert cfg.toy_gain == 1.0  # unset: the declared default until the recipe fills it in
    assert replace(cfg, toy_gain=3.0).toy_gain == 3.0 and replace(cfg, toy_gain=3.0).params == {"toy_gain": 3.0}
    args = build_parser(argv=["--method", "toy"]).parse_args(
        ["--profile", "smoke", "--method", "toy", "--toy-gain", "4"]
    )
    assert config_from_args(args).toy_gain == 4.0
    assert run_identity(cfg)["toy_gain"] == 2.0  # the recipe's value
    assert "toy_gain" not in run_identity(replace(cfg, toy_gain=1.0))  # at its default: left out
    with pytest.raises(ValueError, match="toy_gain must be > 0"):
        make_config("smoke", method="toy", toy_gain=-1.0)
    with pytest.raises(TypeError, match="unknown config field.*toy_gian"):
        make_config("smoke", toy_gian=1.0)


def test_the_new_method_trains_and_saves_its_parameter(toy_method, smoke_cfg, smoke_teacher):
    result = distill(smoke_cfg(method="toy", teacher=smoke_teacher.run_dir, epochs=1))
    with open(os.path.join(result.run_dir, "config.json")) as f:
        saved = json.load(f)
    assert saved["toy_gain"] == 2.0 and "params" not in saved
    assert "train_ce" in result.history


def test_a_method_that_would_train_nothing_cannot_be_registered():
    with pytest.raises(TypeError, match="exactly one of a loss builder or run="):
        register_method("nothing", source="a test")(None)
    assert "nothing" not in METHODS


def test_partition_trains_the_specialists_first_stage_not_a_ce_student(smoke_cfg, smoke_teacher):
    """``train_kd.py --method partition`` used to train a plain CE student into a -partition- folder."""
    cfg = smoke_cfg(method="partition", teacher=smoke_teacher.run_dir, members=2, epochs=1)
    result = distill(cfg)
    assert type(result.model).__name__ == "Specialists" and len(result.model.members) == 2
    assert {"train_mse_0", "train_mse_1", "val_r2"} <= set(result.history.columns)
    assert "train_ce" not in result.history
    with pytest.raises(ValueError, match="--init-from runs/<partition run>"):
        distill(replace(cfg, method="specialists"))


# what a method cannot run without, besides a teacher
NEEDED = {"specialists": {"init_from": "x"}, "class_specialist": {"special_classes": "3,5"}}


def test_every_run_method_needs_what_the_registry_says(smoke_cfg):
    for name in METHODS.names():
        m = METHODS[name]
        assert (m.build is None) != (m.run is None), name
        if m.needs_teacher:
            with pytest.raises(ValueError, match="needs a teacher"):
                distill(smoke_cfg(method=name, members=2, warmup=1.0, **NEEDED.get(name, {})))


def test_an_in_process_sweep_leaves_progress_bars_as_they_were(smoke_cfg, monkeypatch):
    monkeypatch.delenv("KD_PROGRESS", raising=False)
    assert train_eval.progress_enabled()
    run_many([smoke_cfg(epochs=1)], jobs=1)
    assert train_eval.progress_enabled() and "KD_PROGRESS" not in os.environ


def test_asking_whether_this_is_a_distributed_run_starts_nothing(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="init_distributed"):
        distributed.distributed()
    assert not torch.distributed.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.distributed() == (0, 1)


def test_help_groups_options_and_shows_the_chosen_profile_and_method():
    text = build_parser("x", argv=["--profile", "smoke", "--method", "dkd"]).format_help()
    for title in ("data:", "optimisation:", "method: ", "parameters of method dkd"):
        assert title in text
    assert "(smoke: 2)" in text and "_MISSING_TYPE" not in text  # epochs of the smoke profile
    assert "--nckd-weight" in text and "recipe 6.0" in text and "--crd-negatives" not in text
    everything = build_parser("x", argv=[]).format_help()
    assert "--crd-negatives" in everything and "(cpu: 30)" in everything

"""Run folder names are pinned: finished runs are found again after any refactoring.

A run's folder name hashes its identity (``run_identity``): the fields that decide what it
computes. These names were computed at commit edd8600, before the modules were split; every one
must stay the same, or finished runs would be retrained under new names. The data set's digest is
replaced by a constant so the names do not depend on which copy of the data is present.
"""

import json
from dataclasses import replace

import pytest

import data_utils
from train_eval import load_config, make_config, run_name
from train_kd import teacher_config


def pinned_configs() -> dict:
    smoke = make_config("smoke", out_dir="runs", data_dir="./data/synthetic")
    cpu = make_config("cpu", out_dir="runs", data_dir="./data")
    paper = make_config("paper", out_dir="runs", data_dir="./data")
    t = "runs/vgg13-w0.25-ce-s0-0000"  # a path without a file: the identity holds the path itself
    return {
        "teacher_smoke": teacher_config(smoke),
        "teacher_cpu": teacher_config(cpu),
        "teacher_paper": teacher_config(paper),
        "ce_smoke": replace(smoke, method="ce"),
        "ce_cpu_s3": replace(cpu, method="ce", seed=3, data_seed=3),
        "ce_cpu_all": replace(cpu, method="ce", subset=0, epochs=60),
        "kd_cpu_cached": replace(cpu, method="kd", teacher=t, teacher_cache=True),
        "kd_cpu_grid": replace(cpu, method="kd", teacher=t, teacher_cache=True, T=2.0, ce_weight=0.1, kd_weight=9.0),
        "kd_cpu_alpha": replace(cpu, method="kd", teacher=t, alpha=0.5),
        "kd_cpu_online_bf16": replace(cpu, method="kd", teacher=t, teacher_amp="bf16"),
        "kd_paper": replace(paper, method="kd", teacher=t),
        "kd_ls_cpu": replace(cpu, method="kd_ls", teacher=t, teacher_cache=True),
        "kd_ls_cpu_tau3": replace(cpu, method="kd_ls", teacher=t, teacher_cache=True, T=3.0),
        "dkd_cpu": replace(cpu, method="dkd", teacher=t, teacher_cache=True, warmup=2.5),
        "dkd_cpu_beta2": replace(cpu, method="dkd", teacher=t, teacher_cache=True, warmup=2.5, nckd_weight=2.0),
        "dkd_smoke": replace(smoke, method="dkd", teacher=t, warmup=1.0),
        "fitnet_cpu": replace(cpu, method="fitnet", teacher=t, teacher_amp="bf16", crd_negatives=4096),
        "fitnet_cpu_stage3": replace(
            cpu, method="fitnet", teacher=t, teacher_amp="bf16", hint_stage=3, feat_weight=10.0
        ),
        "fitnet+kd_cpu": replace(cpu, method="fitnet+kd", teacher=t, teacher_amp="bf16", feat_weight=100.0),
        "fitnet+kd_init": replace(cpu, method="fitnet+kd", teacher=t, init_from="runs/stage1", seed=2, data_seed=2),
        "fitnet_stage1": replace(cpu, method="fitnet_stage1", teacher=t, teacher_amp="bf16", epochs=10),
        "kd_after_stage1": replace(cpu, method="kd", teacher=t, teacher_cache=True, init_from="runs/stage1"),
        "at_cpu": replace(cpu, method="at", teacher=t, teacher_amp="bf16", feat_weight=1.0),
        "at+kd_cpu": replace(cpu, method="at+kd", teacher=t, teacher_amp="bf16"),
        "sp_cpu": replace(cpu, method="sp", teacher=t, teacher_amp="bf16"),
        "pkt_cpu": replace(cpu, method="pkt", teacher=t, teacher_amp="bf16"),
        "rkd_cpu": replace(cpu, method="rkd", teacher=t, teacher_amp="bf16"),
        "rkd+kd_cpu": replace(cpu, method="rkd+kd", teacher=t, teacher_amp="bf16"),
        "crd_cpu": replace(cpu, method="crd", teacher=t, teacher_amp="bf16", crd_negatives=4096),
        "crd_cpu_beta8": replace(cpu, method="crd", teacher=t, teacher_amp="bf16", crd_negatives=4096, feat_weight=8.0),
        "crd+kd_cpu": replace(cpu, method="crd+kd", teacher=t, teacher_amp="bf16", crd_negatives=4096),
        "dml_cpu": replace(cpu, method="dml", members=2, width=0.086, teacher=t, budget=247050, teacher_cache=True),
        "dml_cpu_pick": replace(
            cpu, method="dml", members=2, width=0.086, peer_weight=0.25, peer_T=1.0, seed=4, data_seed=4
        ),
        "dml+kd_cpu": replace(
            cpu, method="dml+kd", members=2, width=0.086, teacher=t, teacher_cache=True, peer_weight=0.25
        ),
        "partition_cpu": replace(
            cpu, method="partition", members=4, width=0.121, teacher=t, teacher_amp="bf16", budget=247050
        ),
        "partition_ce": replace(cpu, method="partition", members=4, width=0.121, teacher=t, ce_weight=1.0),
        "partition_std": replace(cpu, method="partition", members=4, width=0.121, teacher=t, standardize_targets=True),
        "specialists_head": replace(
            cpu, method="specialists", members=4, width=0.121, teacher=t, init_from="runs/p", epochs=10
        ),
        "specialists_probe": replace(
            cpu, method="specialists", members=4, width=0.121, teacher=t, init_from="runs/p", epochs=10, probe_member=2
        ),
        "ensemble_member_kd": replace(
            cpu, method="kd", width=0.086, teacher=t, teacher_cache=True, budget=247050, seed=5, data_seed=2
        ),
        "ce_smoke_named": replace(smoke, method="ce", name="my-run"),
        "ce_cpu_sgd_multistep": replace(
            cpu, method="ce", schedule="multistep", milestones=[10, 20], optimizer="adam", lr=1e-4
        ),
    }


PINNED = {
    "teacher_smoke": "vgg11-w0.125-ce-s0-b05a6abd",
    "teacher_cpu": "vgg13-w0.25-ce-s0-73c90aeb",
    "teacher_paper": "vgg13-w1-ce-s0-bd490283",
    "ce_smoke": "vgg8-w0.0625-ce-s0-9cf16383",
    "ce_cpu_s3": "vgg8-w0.125-ce-s3-29861dda",
    "ce_cpu_all": "vgg8-w0.125-ce-s0-96de26c0",
    "kd_cpu_cached": "vgg8-w0.125-kd-s0-5f09d9ba",
    "kd_cpu_grid": "vgg8-w0.125-kd-s0-6036dfb2",
    "kd_cpu_alpha": "vgg8-w0.125-kd-s0-b8f0fdad",
    "kd_cpu_online_bf16": "vgg8-w0.125-kd-s0-5afd90a9",
    "kd_paper": "vgg8-w1-kd-s0-9a047c8d",
    "kd_ls_cpu": "vgg8-w0.125-kd_ls-s0-511fe95e",
    "kd_ls_cpu_tau3": "vgg8-w0.125-kd_ls-s0-89f4b597",
    "dkd_cpu": "vgg8-w0.125-dkd-s0-111f0109",
    "dkd_cpu_beta2": "vgg8-w0.125-dkd-s0-f255663b",
    "dkd_smoke": "vgg8-w0.0625-dkd-s0-377ac451",
    "fitnet_cpu": "vgg8-w0.125-fitnet-s0-2f41e799",
    "fitnet_cpu_stage3": "vgg8-w0.125-fitnet-s0-3ce07c04",
    "fitnet+kd_cpu": "vgg8-w0.125-fitnet+kd-s0-b70ab32b",
    "fitnet+kd_init": "vgg8-w0.125-fitnet+kd-s2-1df53a55",
    "fitnet_stage1": "vgg8-w0.125-fitnet_stage1-s0-4a70a6cc",
    "kd_after_stage1": "vgg8-w0.125-kd-s0-1771b609",
    "at_cpu": "vgg8-w0.125-at-s0-0d6e27c7",
    "at+kd_cpu": "vgg8-w0.125-at+kd-s0-20f9e27e",
    "sp_cpu": "vgg8-w0.125-sp-s0-ff2ad2fa",
    "pkt_cpu": "vgg8-w0.125-pkt-s0-f37ad0a2",
    "rkd_cpu": "vgg8-w0.125-rkd-s0-7d3659fb",
    "rkd+kd_cpu": "vgg8-w0.125-rkd+kd-s0-452bb001",
    "crd_cpu": "vgg8-w0.125-crd-s0-d9771ac3",
    "crd_cpu_beta8": "vgg8-w0.125-crd-s0-179a490c",
    "crd+kd_cpu": "vgg8-w0.125-crd+kd-s0-f52d9559",
    "dml_cpu": "vgg8-w0.086-k2-dml-s0-5595a74f",
    "dml_cpu_pick": "vgg8-w0.086-k2-dml-s4-a123c735",
    "dml+kd_cpu": "vgg8-w0.086-k2-dml+kd-s0-4585f03d",
    "partition_cpu": "vgg8-w0.121-k4-partition-s0-d3dd31df",
    "partition_ce": "vgg8-w0.121-k4-partition-s0-dc091786",
    "partition_std": "vgg8-w0.121-k4-partition-s0-521c63d7",
    "specialists_head": "vgg8-w0.121-k4-specialists-s0-9d901c99",
    "specialists_probe": "vgg8-w0.121-k4-specialists-s0-d21bab0c",
    "ensemble_member_kd": "vgg8-w0.086-kd-s5-325b398c",
    "ce_smoke_named": "my-run",
    "ce_cpu_sgd_multistep": "vgg8-w0.125-ce-s0-dd36d765",
}


@pytest.fixture
def constant_data_digest(monkeypatch):
    monkeypatch.setattr(data_utils, "data_digest", lambda name, root: f"data-{name}")


def test_every_pinned_run_keeps_its_folder_name(constant_data_digest):
    names = {key: run_name(cfg) for key, cfg in pinned_configs().items()}
    assert names == PINNED


def test_a_config_json_written_before_the_split_still_loads(tmp_path, constant_data_digest):
    """config.json stays flat: method parameters (T, nckd_weight, ...) beside the other fields."""
    cfg = pinned_configs()["dkd_cpu_beta2"]
    flat = {**{k: v for k, v in vars(cfg).items() if k != "params"}, **getattr(cfg, "params", {})}
    (tmp_path / "config.json").write_text(json.dumps(flat))
    loaded = load_config(str(tmp_path))
    assert loaded.nckd_weight == 2.0 and loaded.warmup == 2.5
    assert run_name(loaded) == PINNED["dkd_cpu_beta2"]


def test_a_run_saved_before_its_recipe_gained_a_parameter_keeps_what_it_trained(tmp_path, constant_data_digest):
    """MLKD's recipe gained ``mlkd_strong_view`` (True); a run saved before has no such key and trained
    on one view: read back, it is the one-view run, not the recipe's two-view one."""
    from run_folders import same_run

    before = make_config("cpu", method="mlkd", teacher="", T=4.0, ce_weight=0.1, kd_weight=0.9)
    saved = {**{k: v for k, v in vars(before).items() if k != "params"}, **before.params}
    assert "mlkd_strong_view" not in saved  # the resolved config as the older recipe saved it
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert load_config(str(tmp_path)).mlkd_strong_view is False
    assert same_run(saved, replace(before, mlkd_strong_view=False))
    assert not same_run(saved, before)  # the recipe now: both views, another run
    assert run_name(replace(before, mlkd_strong_view=False)) != run_name(before)

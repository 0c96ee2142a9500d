"""The loop really learns; evaluation is right; the command lines and the demo work."""

import glob
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch
from torch import nn

import train_kd
from conftest import HANG_SECONDS, ROOT
from train_eval import evaluate, make_config, train


def test_smoke_run_learns(smoke_cfg):
    result = train(smoke_cfg(epochs=3))
    h = result.history
    assert h["train_loss"].iloc[-1] < 0.5 * h["train_loss"].iloc[0]
    assert h["test_top1"].iloc[-1] > 60  # chance is 10%
    expected = {
        "epoch",
        "lr",
        "train_loss",
        "train_ce",
        "train_top1",
        "train_images_per_s",
        "test_loss",
        "test_top1",
        "test_top5",
        "seconds",
    }
    assert expected <= set(h.columns)
    on_disk = pd.read_csv(os.path.join(result.run_dir, "metrics.csv"))
    assert len(on_disk) == 3 and os.path.isfile(os.path.join(result.run_dir, "config.json"))


def test_finished_run_is_reused_not_retrained(smoke_cfg):
    first = train(smoke_cfg(epochs=1))
    stamp = os.path.getmtime(os.path.join(first.run_dir, "checkpoint.pt"))
    again = train(smoke_cfg(epochs=1))
    assert again.run_dir == first.run_dir
    assert os.path.getmtime(os.path.join(first.run_dir, "checkpoint.pt")) == stamp
    assert again.history["test_top1"].tolist() == first.history["test_top1"].tolist()


class FixedLogits(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(logits)

    def forward(self, x):
        return self.logits[x[:, 0, 0, 0].long()]


def test_evaluate_top1_top5_and_loss_by_hand():
    logits = torch.tensor([[5.0, 4, 3, 2, 1, 0], [0, 1, 2, 3, 4, 5], [0, 0, 0, 0, 0, 9]])
    x = torch.arange(3).float().view(3, 1, 1, 1).expand(3, 3, 32, 32)
    y = torch.tensor([0, 0, 4])  # hit; in none of the top 5; in the top 5 but not top 1
    out = evaluate(FixedLogits(logits), [(x, y)])
    assert out["top1"] == pytest.approx(100 / 3) and out["top5"] == pytest.approx(200 / 3)
    assert out["loss"] == pytest.approx(nn.functional.cross_entropy(logits, y).item(), rel=1e-6)


def test_kd_student_trains_from_saved_teacher(smoke_cfg):
    teacher = train(smoke_cfg(model="vgg11", width=0.125, epochs=2))
    kd = train_kd.distill(smoke_cfg(method="kd", teacher=teacher.run_dir, epochs=2))
    assert {"train_ce", "train_kd"} <= set(kd.history.columns)
    assert kd.history["test_top1"].iloc[-1] > 20  # chance is 10%
    assert kd.history["train_loss"].iloc[-1] < kd.history["train_loss"].iloc[0]


def test_demo_smoke_writes_table_and_plot(smoke_cfg):
    cfg = smoke_cfg()
    table = train_kd.run_demo(cfg)
    assert table["run"].tolist() == ["teacher", "independent", "kd"]
    assert (table["params"] > 0).all() and (table["MFLOPs"] > 0).all()
    out = os.path.join(cfg.out_dir, "demo-smoke")
    assert os.path.isfile(os.path.join(out, "results.csv")) and os.path.isfile(os.path.join(out, "curves.png"))


def _cli(script, *args):
    env = {**os.environ, "KD_PROGRESS": "0"}
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=HANG_SECONDS,
    )


def test_command_lines(synthetic_dir, tmp_path):
    common = ["--profile", "smoke", "--data-dir", synthetic_dir, "--out-dir", str(tmp_path), "--epochs", "1"]
    teacher = _cli("train_eval.py", *common, "--model", "vgg11", "--width", "0.125")
    assert teacher.returncode == 0, teacher.stderr
    assert "test_top1" not in teacher.stderr and "last_top1" in teacher.stdout
    run = teacher.stdout.split("run folder: ")[1].split()[0]
    kd = _cli("train_kd.py", *common, "--teacher", run, "--student", "vgg8", "--T", "2", "--alpha", "0.5")
    assert kd.returncode == 0, kd.stderr
    assert "-kd-" in kd.stdout.split("run folder: ")[1].split()[0]
    feature = _cli("train_kd.py", *common, "--teacher", run, "--method", "at+kd")
    assert feature.returncode == 0, feature.stderr
    assert "-at+kd-" in feature.stdout.split("run folder: ")[1].split()[0]
    bad = _cli("train_eval.py", *common, "--model", "resnet")
    assert bad.returncode != 0 and "registered: vgg8" in bad.stderr
    no_teacher = _cli("train_kd.py", *common)
    assert no_teacher.returncode != 0 and "--teacher" in no_teacher.stderr


def test_real_cifar10_one_epoch_beats_45_percent(real_cifar10, tmp_path):
    # one epoch on the 45,000 training images reaches 54.0% on the AMD EPYC (two: 56.6%, twice the time)
    cfg = make_config(
        "cpu",
        data_dir=real_cifar10,
        out_dir=str(tmp_path),
        model="vgg8",
        width=0.25,
        subset=0,
        epochs=1,
        schedule="constant",
    )
    result = train(cfg)
    assert result.history["test_top1"].iloc[-1] > 45


def test_bf16_autocast_path_trains(smoke_cfg):
    # the CUDA default; opt-in on CPUs with bf16 units. Only checks the path runs and learns.
    result = train(smoke_cfg(amp="bf16", epochs=2))
    assert result.history["test_top1"].iloc[-1] > 30


def test_torch_compile_path_trains(smoke_cfg):
    # off by default (no training speed-up measured on CPU); checks the option stays usable
    result = train(smoke_cfg(compile=True, epochs=1))
    assert result.history["test_top1"].iloc[-1] > 20


def test_measure_cost_reports_speed_memory_and_adapters(smoke_cfg):
    teacher = train(smoke_cfg(model="vgg11", width=0.125, epochs=1))
    ce = train_kd.measure_cost(smoke_cfg(), steps=2)
    cost = train_kd.measure_cost(smoke_cfg(method="fitnet", teacher=teacher.run_dir), steps=2)
    assert cost["seconds_per_step"] > 0 and cost["images_per_s"] > 0
    assert cost["extra_params"] > 0 and ce["extra_params"] == 0  # the hint regressor
    # tensor bytes, not the process: the teacher's weights and its activations are visible
    assert 0 < ce["state_mb"] < cost["state_mb"] < 50
    assert 0 < ce["step_peak_mb"] < cost["step_peak_mb"]
    assert cost["peak_memory_mb"] == pytest.approx(cost["state_mb"] + cost["step_peak_mb"])
    # a run that reads stored teacher logits is measured reading them, not running the teacher
    cached = smoke_cfg(method="kd", teacher=teacher.run_dir, teacher_cache=True)
    train_kd.measure_cost(cached, steps=2)
    assert glob.glob(os.path.join(cached.out_dir, "teacher_cache", "*", "epoch_0000.pt"))


def test_tensor_memory_counts_live_storages_at_their_peak():
    with train_kd.TensorMemory() as memory:
        a = torch.empty(1000, 1000)  # 4 MB
        b = a * 2  # 8 MB live
        del b  # 4 MB
        c = a.t() + 1  # the view shares a's storage: 8 MB
        assert memory.current == 8_000_000
    assert memory.peak == 8_000_000
    w = torch.randn(100, 100, requires_grad=True)  # existed before: seen, never counted
    with train_kd.TensorMemory() as memory:
        (w @ w).sum().backward()  # the product, then two partial gradients and their sum: 40 kB each
    assert 2 * 40_000 < memory.peak <= 4 * 40_000
    assert 40_000 <= memory.current < 41_000  # only w's gradient outlives the step
    del c


def test_state_bytes_counts_the_frozen_teacher_and_optimizer_state():
    student, teacher = nn.Linear(10, 10), nn.Linear(10, 1000)
    task = train_kd.Distiller(student, teacher, train_kd.KDLoss(4.0, 0.1, 0.9))
    opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
    student(torch.randn(2, 10)).sum().backward()
    opt.step()  # momentum buffers: one per student parameter
    params = lambda m: sum(p.numel() for p in m.parameters()) * 4  # noqa: E731
    assert train_kd.state_bytes(task, opt) == 2 * params(student) + params(teacher)


def test_the_fast_teacher_precision_is_bf16_only_where_the_cpu_runs_it_natively(monkeypatch):
    import cost

    for flags, expected in [
        ("flags : fpu sse2 avx2 avx512f avx512bw avx512_vnni", "off"),  # oneDNN emulates bf16 here
        ("flags : fpu avx2 avx512f avx512_bf16", "bf16"),
        ("flags : fpu avx2 avx512f amx_tile amx_bf16", "bf16"),
        ("", "off"),  # /proc/cpuinfo unreadable
    ]:
        monkeypatch.setattr(cost, "_cpuinfo", lambda flags=flags: flags)
        assert cost.fast_teacher_amp("cpu") == expected, flags


def test_the_processor_names_its_model_and_widest_vector_instructions(monkeypatch):
    import cost

    for info, expected in [
        ("model name\t: Xeon X\nflags\t: fpu avx2 avx512f\n", "Xeon X (avx512)"),
        ("model name\t: EPYC Y\nflags\t: fpu avx2\n", "EPYC Y (avx2)"),
        ("model name\t: Z\nflags\t: fpu neon\n", "Z (other)"),
    ]:
        monkeypatch.setattr(cost, "_cpuinfo", lambda info=info: info)
        assert cost.processor() == expected
    monkeypatch.setattr(cost, "_cpuinfo", lambda: "")  # not Linux: the platform's own name, never empty
    assert cost.processor()


def test_a_method_that_cannot_run_is_an_error_of_measure_cost_not_a_hang(smoke_cfg, smoke_teacher):
    from cost import measure_cost

    # FSP needs equal channels; the smoke student (x1/16) and teacher (x1/8) differ: the fresh
    # process fails while building the loss, and the caller must hear it instead of waiting forever
    with pytest.raises(ValueError, match="FSP compares"):
        measure_cost(smoke_cfg(method="fsp", teacher=smoke_teacher.run_dir), steps=1)

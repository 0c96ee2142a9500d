"""Teachers written by other codebases: RepDistiller/mdistiller files, bare state_dicts,
pytorch-cifar-models' torchvision-layout VGGs (also through hub:, download mocked), and the
export back to RepDistiller's layout. Each foreign network is built here from its layout's
description and must give the same outputs as the model loaded from its file."""

import os
import subprocess
import sys
import urllib.error

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import vgg
from checkpoints import file_digest as teacher_digest
from conftest import ROOT
from model import HUB_URLS, create_model, export_repdistiller, load_checkpoint
from train_eval import run_identity
from train_kd import distill


class RepDistillerLayoutVGG(nn.Module):
    """RepDistiller's models/vgg.py module layout, from its description: attributes block0..block4
    (conv-BN-ReLU, the last ReLU left out), ReLU then max-pool after blocks 0-2 on 32x32 inputs,
    global average pooling, one linear layer on 512 features."""

    def __init__(self, stages, num_classes, batch_norm=True):
        super().__init__()
        c_in = 3
        for i, widths in enumerate(stages):
            layers = []
            for c in widths:
                layers += [nn.Conv2d(c_in, c, 3, padding=1), *([nn.BatchNorm2d(c)] if batch_norm else [])]
                layers.append(nn.ReLU(inplace=True))
                c_in = c
            setattr(self, f"block{i}", nn.Sequential(*layers[:-1]))
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x):
        for i in range(5):
            x = F.relu(getattr(self, f"block{i}")(x))
            if i < 3:
                x = F.max_pool2d(x, 2)
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))


class TorchvisionLayoutVGG(nn.Module):
    """pytorch-cifar-models' VGG: torchvision's ``make_layers`` features (a pool after every stage)
    and a 512-512-K classifier with dropout, on the flattened 1x1 map."""

    def __init__(self, cfg_key, num_classes):
        super().__init__()
        self.features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs[cfg_key], batch_norm=True)
        self.classifier = vgg.mlp_head(512, 512, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


class RepDistillerLayoutMobileNetV2(nn.Module):
    """RepDistiller's and mdistiller's models/mobilenetv2.py module layout, from its description:
    ``conv1`` (3x3 stride-2 conv-BN-ReLU), ``blocks``: one Sequential per (t, c, n, s) row of
    inverted residuals whose ``conv`` is 1x1-BN-ReLU, 3x3 depthwise-BN-ReLU, 1x1-BN (first row t = 1),
    ``conv2`` (1x1 conv-BN-ReLU to 1280), average pooling, ``classifier`` = Sequential(Linear)."""

    ROWS = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

    class Block(nn.Module):
        def __init__(self, c_in, c_out, stride, t):
            super().__init__()
            h = c_in * t
            self.res = stride == 1 and c_in == c_out
            self.conv = nn.Sequential(
                nn.Conv2d(c_in, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU(),
                nn.Conv2d(h, h, 3, stride, 1, groups=h, bias=False), nn.BatchNorm2d(h), nn.ReLU(),
                nn.Conv2d(h, c_out, 1, bias=False), nn.BatchNorm2d(c_out),
            )  # fmt: skip

        def forward(self, x):
            return x + self.conv(x) if self.res else self.conv(x)

    def __init__(self, width, num_classes):
        super().__init__()
        c = int(32 * width)
        self.conv1 = nn.Sequential(nn.Conv2d(3, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.blocks = nn.ModuleList()
        for t, c_out, n, s in self.ROWS:
            layers = []
            for stride in [s] + [1] * (n - 1):
                layers.append(self.Block(c, int(c_out * width), stride, t))
                c = int(c_out * width)
            self.blocks.append(nn.Sequential(*layers))
        self.conv2 = nn.Sequential(nn.Conv2d(c, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.ReLU())
        self.classifier = nn.Sequential(nn.Linear(1280, num_classes))

    def forward(self, x):
        x = self.conv1(x)
        for block in self.blocks:
            x = block(x)
        return self.classifier(F.adaptive_avg_pool2d(self.conv2(x), 1).flatten(1))


def randomized(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics and affine terms, so that a wrong key mapping shows in the outputs."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
    return model.eval()


def same_outputs(foreign: nn.Module, ours: nn.Module) -> float:
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        return (foreign(x) - ours.eval()(x)).abs().max().item()


@pytest.mark.parametrize("name", ["vgg8", "vgg13"])
def test_repdistiller_teacher_file_loads_with_identical_outputs(name, tmp_path):
    theirs = randomized(RepDistillerLayoutVGG(vgg.STAGES[name], num_classes=100))
    path = tmp_path / f"{name}_bn.pth"
    torch.save({"model": theirs.state_dict(), "epoch": 240, "accuracy": 74.64, "optimizer": {}}, path)
    model, ckpt = load_checkpoint(str(path))
    assert ckpt["format"] == "repdistiller" and ckpt["arch"] == {"name": name, "num_classes": 100, "width": 1.0}
    assert ckpt["epoch"] == 240 and ckpt["accuracy"] == 74.64
    assert same_outputs(theirs, model) < 1e-5


@pytest.mark.parametrize("width", [0.5, 0.35, 0.25])
def test_repdistiller_mobilenetv2_file_loads_with_identical_outputs(width, tmp_path):
    theirs = randomized(RepDistillerLayoutMobileNetV2(width, num_classes=100))
    path = tmp_path / "mobile_half.pth"
    torch.save({"model": theirs.state_dict(), "epoch": 240, "accuracy": 64.6}, path)
    model, ckpt = load_checkpoint(str(path))
    assert ckpt["format"] == "repdistiller"
    assert ckpt["arch"] == {"name": "mobilenetv2", "num_classes": 100, "width": width}
    assert same_outputs(theirs, model) < 1e-5
    # their f0..f4 are the stem and the ends of blocks 1, 2, 4 and 6: this model's five stages
    _, feats = model(torch.randn(2, 3, 32, 32), features=True)
    assert [f.shape[1] for f in feats["stages"]] == [int(c * width) for c in (32, 24, 32, 96, 320)]


def test_mobilenetv2_exports_to_their_layout_and_back(tmp_path):
    ours = randomized(create_model("mobilenetv2", num_classes=10, width=0.5))
    export_repdistiller(ours, str(tmp_path / "mv2.pth"), epoch=30, accuracy=60.0)
    theirs = RepDistillerLayoutMobileNetV2(0.5, num_classes=10)
    theirs.load_state_dict(torch.load(tmp_path / "mv2.pth", weights_only=True)["model"])  # strict
    assert same_outputs(theirs.eval(), ours) == 0
    back, ckpt = load_checkpoint(str(tmp_path / "mv2.pth"), arch="mobilenetv2")
    assert same_outputs(ours, back) == 0 and ckpt["epoch"] == 30


def test_mobilenetv2_of_another_expansion_is_read_from_its_shapes(tmp_path):
    ours = randomized(create_model("mobilenetv2", num_classes=10, width=0.25, expansion=4))
    torch.save(ours.state_dict(), tmp_path / "w.pt")
    model, ckpt = load_checkpoint(str(tmp_path / "w.pt"))
    assert ckpt["arch"] == {"name": "mobilenetv2", "num_classes": 10, "width": 0.25, "expansion": 4}
    assert same_outputs(ours, model) == 0


@pytest.mark.parametrize(("cfg_key", "name"), [("A", "vgg11"), ("D", "vgg16")])
def test_pytorch_cifar_models_vgg_loads_with_identical_outputs(cfg_key, name, tmp_path):
    theirs = randomized(TorchvisionLayoutVGG(cfg_key, num_classes=10))
    path = tmp_path / f"cifar10_{name}_bn.pt"
    torch.save(theirs.state_dict(), path)  # their release files are bare state_dicts
    model, ckpt = load_checkpoint(str(path))
    assert ckpt["format"] == "torchvision" and ckpt["arch"]["name"] == f"{name}_tv"
    assert same_outputs(theirs, model) < 1e-5
    _, feats = model(torch.randn(2, 3, 32, 32), features=True)
    assert [f.shape[-1] for f in feats["stages"]] == [32, 16, 8, 4, 2]  # the block before each pool
    assert feats["pooled"].shape == (2, 512)


def test_bare_state_dict_in_this_layout_infers_width_and_checks_a_named_arch(tmp_path):
    ours = randomized(create_model("vgg11", num_classes=10, width=0.25))
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in ours.state_dict().items()}}, path)  # DataParallel
    model, ckpt = load_checkpoint(str(path), arch="vgg11")
    assert ckpt["arch"] == {"name": "vgg11", "num_classes": 10, "width": 0.25} and ckpt["format"] == "state_dict"
    assert same_outputs(ours, model) == 0
    with pytest.raises(ValueError, match="holds a vgg11 .* not the vgg13"):
        load_checkpoint(str(path), arch="vgg13")


def test_foreign_files_that_cannot_load_say_why(tmp_path):
    no_bn = RepDistillerLayoutVGG(vgg.STAGES["vgg13"], num_classes=100, batch_norm=False)
    torch.save({"model": no_bn.state_dict()}, tmp_path / "vgg13.pth")
    with pytest.raises(ValueError, match="not a VGG with batch norm"):
        load_checkpoint(str(tmp_path / "vgg13.pth"))
    torch.save({"model": {"conv1.weight": torch.zeros(8, 3, 3, 3)}}, tmp_path / "resnet.pth")
    with pytest.raises(ValueError, match="unknown key layout .*conv1.weight"):
        load_checkpoint(str(tmp_path / "resnet.pth"))
    torch.save({"epoch": 3}, tmp_path / "empty.pth")
    with pytest.raises(ValueError, match="no state_dict found"):
        load_checkpoint(str(tmp_path / "empty.pth"))


def test_export_to_repdistiller_layout_loads_in_their_module(tmp_path):
    ours = randomized(create_model("vgg8", num_classes=100))
    export_repdistiller(ours, str(tmp_path / "vgg8.pth"), epoch=30, accuracy=70.1)
    saved = torch.load(tmp_path / "vgg8.pth", weights_only=True)
    theirs = RepDistillerLayoutVGG(vgg.STAGES["vgg8"], num_classes=100)
    theirs.load_state_dict(saved["model"])  # strict: every key and shape matches
    assert saved["epoch"] == 30 and same_outputs(theirs.eval(), ours) == 0
    with pytest.raises(ValueError, match="width 1"):
        export_repdistiller(create_model("vgg8", width=0.25), str(tmp_path / "x.pth"))


@pytest.fixture
def hub_dir(tmp_path):
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub"
    torch.hub.set_dir(old)


def test_hub_teacher_downloads_once_into_the_hub_cache(hub_dir, monkeypatch):
    theirs = randomized(TorchvisionLayoutVGG("B", num_classes=100))
    calls = []

    def fake_download(url, dst, **_):
        calls.append(url)
        torch.save(theirs.state_dict(), dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    model, ckpt = load_checkpoint("hub:cifar100_vgg13_bn")
    assert calls == [HUB_URLS["cifar100_vgg13_bn"]] and ckpt["arch"]["name"] == "vgg13_tv"
    assert same_outputs(theirs, model) < 1e-5
    load_checkpoint("hub:cifar100_vgg13_bn")
    assert len(calls) == 1  # the cached file is reused
    assert os.path.isfile(hub_dir / "checkpoints" / os.path.basename(calls[0]))


def test_hub_offline_and_unknown_names_say_what_to_do(hub_dir, monkeypatch):
    def offline(url, dst, **_):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(
        FileNotFoundError, match=r"Offline: fetch that file .*--teacher path/to/cifar100_vgg16_bn-7d8c4031"
    ):
        load_checkpoint("hub:cifar100_vgg16_bn")
    with pytest.raises(KeyError, match="known: cifar10_vgg11_bn"):
        load_checkpoint("hub:cifar100_resnet56")


def test_distil_from_a_bare_state_dict_teacher_same_identity_as_its_run(smoke_cfg, smoke_teacher, tmp_path):
    file = tmp_path / "teacher_state.pt"
    torch.save(smoke_teacher.model.state_dict(), file)
    assert teacher_digest(str(file)) == teacher_digest(smoke_teacher.run_dir)  # same weights, same teacher
    from_file = smoke_cfg(method="kd", teacher=str(file), epochs=1)
    assert (
        run_identity(from_file)["teacher"]
        == run_identity(smoke_cfg(method="kd", teacher=smoke_teacher.run_dir, epochs=1))["teacher"]
    )
    result = distill(from_file)
    assert len(result.history) == 1 and result.history["train_kd"].notna().all()


def test_multi_student_script_reports_bad_values_as_usage_errors():
    env = {**os.environ, "KD_PROGRESS": "0"}
    done = subprocess.run(
        [sys.executable, "multi_student.py", "--profile", "smoke", "--width", "-1"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    assert done.returncode == 2 and "width must be > 0" in done.stderr and "Traceback" not in done.stderr


def test_hub_teacher_from_the_command_line(synthetic_dir, tmp_path):
    # a released file already in torch.hub's cache (as after one download): distil from it by name
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    theirs = randomized(TorchvisionLayoutVGG("A", num_classes=10))
    torch.save(theirs.state_dict(), cache / os.path.basename(HUB_URLS["cifar10_vgg11_bn"]))
    env = {**os.environ, "KD_PROGRESS": "0", "TORCH_HOME": str(tmp_path / "torch")}
    args = ["--profile", "smoke", "--data-dir", synthetic_dir, "--out-dir", str(tmp_path / "runs"), "--epochs", "1"]
    args += ["--teacher", "hub:cifar10_vgg11_bn", "--method", "at+kd"]
    done = subprocess.run([sys.executable, "train_kd.py", *args], capture_output=True, text=True, cwd=ROOT, env=env)
    assert done.returncode == 2 and "near chance" in done.stderr  # random weights: the teacher check refuses
    assert "teacher hub:cifar10_vgg11_bn: test_top1" in done.stdout  # measured once, printed, stored
    done = subprocess.run(
        [sys.executable, "train_kd.py", *args, "--trust-teacher"], capture_output=True, text=True, cwd=ROOT, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "run folder" in done.stdout and "at+kd" in done.stdout

"""The original study as a profile: its values, and all four arms end to end on generated
CIFAR-100 with the hub teacher's download mocked (a random torchvision-layout VGG16 at 1/16 width)."""

import pytest
import torch

import original_study
from checkpoints import HUB_URLS, load_checkpoint
from config import make_config
from model import create_model


def test_the_profile_is_the_studys_configuration():
    cfg = make_config("original")
    assert (cfg.dataset, cfg.model, cfg.width, cfg.teacher) == ("cifar100", "vgg11_tv", 1.0, "hub:cifar100_vgg16_bn")
    assert (cfg.optimizer, cfg.lr, cfg.epochs, cfg.schedule, cfg.weight_decay) == ("adam", 1e-4, 20, "constant", 0.0)
    assert (cfg.T, cfg.ce_weight, cfg.kd_weight) == (3.0, 0.4, 0.6)  # KD's alpha 0.6: (1 - alpha) CE + alpha T^2 KL
    arms = original_study.arm_configs(seed=2)
    assert [c.method for c in arms.values()] == ["ce", "kd", "fitnet+kd", "partition"]
    assert arms["specialists"].members == 4 and arms["specialists"].ce_weight == 0.0
    assert all(c.seed == c.data_seed == 2 for c in arms.values())


@pytest.fixture
def mocked_hub(tmp_path, monkeypatch):
    """A fresh hub cache whose download writes a random vgg16_tv; returns the calls it saw."""
    # a hub folder of its own: never the user's cache (another test may have set torch's hub dir already)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "torch" / "hub"))
    torch.manual_seed(0)
    teacher = create_model("vgg16_tv", num_classes=100, width=0.0625)
    calls = []

    def fake_download(url, dst, **_):
        calls.append(url)
        torch.save(teacher.state_dict(), dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    return calls


def test_every_arm_runs_on_generated_cifar100_and_the_table_has_the_published_numbers(
    synthetic_dir, tmp_path, mocked_hub, monkeypatch
):
    overrides = dict(data_dir=synthetic_dir, synthetic=True, download=False, out_dir=str(tmp_path / "runs"))
    overrides |= dict(width=0.0625, epochs=1, val_size=200, batch_size=64, trust_teacher=True, threads=1)
    teacher, _ = load_checkpoint(make_config("original").teacher)  # downloads (mocked) into the hub cache
    assert mocked_hub == [HUB_URLS["cifar100_vgg16_bn"]]
    monkeypatch.setattr(original_study, "HEAD_EPOCHS", 1)
    df = original_study.run_study(seeds=(0, 1), jobs=1, **overrides)
    assert len(mocked_hub) == 1  # every arm read the cached file
    assert sorted(df.groupby("arm")["seed"].apply(list).items()) == [
        (arm, [0, 1]) for arm in sorted(original_study.ARMS)
    ]
    assert df["test_top1"].between(0, 100).all() and df["val_top1"].notna().all()
    table = original_study.study_table(df)
    assert list(table.index) == list(original_study.ARMS)
    assert table.loc["hint + KD", "published"] == "56.8" and table.loc["student alone", "seeds"] == 2
    diff = df[df.arm == "KD"]["test_top1"].values - df[df.arm == "student alone"]["test_top1"].values
    assert table.loc["KD", "vs alone"] == pytest.approx(diff.mean())


def test_specialists_of_a_torchvision_layout_teacher_read_through_its_own_mlp_head(synthetic_dir, tmp_path, mocked_hub):
    import multi_student as ms

    cfg = original_study.arm_configs(
        data_dir=synthetic_dir, synthetic=True, download=False, out_dir=str(tmp_path / "runs"), width=0.0625,
        epochs=1, val_size=200, batch_size=64, trust_teacher=True, threads=1,
    )["specialists"]  # fmt: skip
    teacher, _ = load_checkpoint(cfg.teacher)
    stage1, stage2 = ms.train_specialists(cfg, head_epochs=1)
    assert isinstance(stage1.model.head, torch.nn.Sequential)
    for ours, theirs in zip(
        stage1.model.head.state_dict().values(), teacher.classifier.state_dict().values(), strict=True
    ):
        assert torch.equal(ours, theirs)  # stage 1 reads through the teacher's own head, frozen
    assert not torch.equal(stage2.model.head[0].weight, teacher.classifier[0].weight)  # stage 2 trains it
    assert len(stage1.model.members) == 4 and sum(stage1.model.out_dims) == teacher.embed_dim

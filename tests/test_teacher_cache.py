"""Teacher-output reuse: the same student as online KD; any change of key recomputes."""

import os

import pytest
import torch

from data_utils import CifarLoader, load_cifar
from model import create_model, read_checkpoint
from teacher_cache import CachedTeacherLoader
from train_eval import train
from train_kd import FrozenTeacher, distill


def _loader(synthetic_dir, seed=0, crop_pad=4, subset=None):
    x, y = load_cifar("cifar10", synthetic_dir, train=True)
    if subset:
        x, y = x[:subset], y[:subset]
    return CifarLoader(
        x, y, 64, mean=(0.5,) * 3, std=(0.25,) * 3, train=True, aug={"crop_pad": crop_pad, "flip": True}, seed=seed
    )


def _teacher(seed=0):
    torch.manual_seed(seed)
    return FrozenTeacher(create_model("vgg8", num_classes=10, width=0.125))


def test_cached_logits_are_the_teachers_outputs_on_the_same_views(synthetic_dir, tmp_path):
    loader, teacher = _loader(synthetic_dir), _teacher()
    cache = CachedTeacherLoader(loader, teacher, str(tmp_path), dtype=torch.float32)
    cache.set_epoch(1)
    for (x, y, extras), (x2, y2) in zip(cache, loader, strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)
        assert torch.allclose(extras["teacher_logits"], teacher(x), atol=1e-5)
    assert cache.computed == 1
    again = CachedTeacherLoader(loader, teacher, str(tmp_path), dtype=torch.float32)
    again.set_epoch(1)
    list(again)
    assert again.computed == 0, "a second student must read the stored logits"
    assert os.listdir(os.path.join(str(tmp_path), cache.key)) == ["epoch_0001.pt"]


def test_every_key_component_changes_the_key(synthetic_dir, tmp_path):
    base = CachedTeacherLoader(_loader(synthetic_dir), _teacher(), str(tmp_path)).key
    variants = {
        "stream seed": CachedTeacherLoader(_loader(synthetic_dir, seed=1), _teacher(), str(tmp_path)),
        "augmentation": CachedTeacherLoader(_loader(synthetic_dir, crop_pad=2), _teacher(), str(tmp_path)),
        "data": CachedTeacherLoader(_loader(synthetic_dir, subset=500), _teacher(), str(tmp_path)),
        "teacher": CachedTeacherLoader(_loader(synthetic_dir), _teacher(seed=1), str(tmp_path)),
        "dtype": CachedTeacherLoader(_loader(synthetic_dir), _teacher(), str(tmp_path), dtype=torch.float32),
        "precision": CachedTeacherLoader(_loader(synthetic_dir), _teacher(), str(tmp_path), amp=True),
    }
    for what, cache in variants.items():
        assert cache.key != base, what
        list(cache)
        assert cache.computed == 1, what


def test_kd_with_reuse_trains_the_same_student(smoke_cfg):
    teacher = train(smoke_cfg(model="vgg11", width=0.125, epochs=2))
    common = dict(method="kd", teacher=teacher.run_dir, epochs=2)
    online = distill(smoke_cfg(**common))
    cached = distill(smoke_cfg(**common, teacher_cache=True, cache_dtype="float32"))
    assert cached.run_dir != online.run_dir
    cache_root = os.path.join(smoke_cfg().out_dir, "teacher_cache")
    assert sum(len(files) for _, _, files in os.walk(cache_root)) == 2  # one file per epoch
    a, b = read_checkpoint(online.run_dir)["model"], read_checkpoint(cached.run_dir)["model"]
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-4, rtol=1e-4), key
    assert cached.history["train_kd"].tolist() == pytest.approx(online.history["train_kd"].tolist(), rel=1e-4)
    half = distill(smoke_cfg(**common, teacher_cache=True))  # float16 storage: close, not identical
    assert half.history["test_top1"].iloc[-1] == pytest.approx(online.history["test_top1"].iloc[-1], abs=3)

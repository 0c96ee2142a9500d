"""Reading the official layouts, batched augmentation, loaders and their errors."""

import os
import pickle

import pytest
import torch
import torch.nn.functional as F

import data_utils
from data_utils import CifarLoader, apply_views, get_cifar10_loaders, get_cifar100_loaders, load_cifar


def test_cifar10_layout_round_trip(synthetic_dir):
    folder = os.path.join(synthetic_dir, "cifar-10-batches-py")
    expected = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
    assert sorted(os.listdir(folder)) == sorted([*expected, data_utils.GENERATED_MARK])
    with open(os.path.join(folder, "data_batch_1"), "rb") as f:
        batch = pickle.load(f, encoding="latin1")
    assert batch["data"].dtype.name == "uint8" and batch["data"].shape[1] == 3072
    assert isinstance(batch["labels"], list)
    x, y = load_cifar("cifar10", synthetic_dir, train=True)
    assert x.shape == (1200, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert torch.equal(x[: len(batch["labels"])].reshape(-1, 3072), torch.from_numpy(batch["data"]))
    assert y[: len(batch["labels"])].tolist() == batch["labels"]
    assert torch.bincount(y).tolist() == [120] * 10
    assert data_utils.class_names("cifar10", synthetic_dir)[0] == "airplane"


def test_cifar100_layout_round_trip(synthetic_dir):
    folder = os.path.join(synthetic_dir, "cifar-100-python")
    assert sorted(os.listdir(folder)) == sorted(["meta", "test", "train", data_utils.GENERATED_MARK])
    with open(os.path.join(folder, "train"), "rb") as f:
        train = pickle.load(f, encoding="latin1")
    assert {"data", "fine_labels", "coarse_labels", "filenames"} <= set(train)
    assert max(train["coarse_labels"]) == 19
    x, y = load_cifar("cifar100", synthetic_dir, train=False)
    assert x.shape == (200, 3, 32, 32) and int(y.max()) == 99
    assert len(data_utils.class_names("cifar100", synthetic_dir)) == 100
    train_loader, _, test_loader = get_cifar100_loaders(batch_size=50, data_dir=synthetic_dir)
    assert next(iter(train_loader))[0].shape == (50, 3, 32, 32)


def reference_view(img, dy, dx, flip, pad=4):
    """The same view the slow way: zero pad, slice, flip."""
    padded = F.pad(img, (pad, pad, pad, pad))
    crop = padded[:, dy : dy + 32, dx : dx + 32]
    return crop.flip(-1) if flip else crop


def test_batched_views_equal_per_image_crops_and_flips():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=gen)
    views = data_utils.random_views(64, 4, True, gen)
    out = apply_views(images, views, 4)
    for i in range(64):
        assert torch.equal(out[i], reference_view(images[i], *views[i].tolist()))
    assert len({tuple(v) for v in views.tolist()}) > 32, "views must be drawn per sample"
    assert 0 < views[:, 2].sum() < 64


def test_train_loader_is_per_sample_label_preserving_and_seeded(synthetic_dir):
    x, y = load_cifar("cifar10", synthetic_dir, train=True)
    common = dict(mean=(0.5,) * 3, std=(0.25,) * 3, train=True, aug={"crop_pad": 4, "flip": True})
    loader = CifarLoader(x, y, 100, seed=3, **common)
    order, views = loader.epoch_plan()
    xb, yb = next(iter(loader))
    assert torch.equal(yb, y[order[:100]])
    raw = apply_views(x[order[:100]], views[:100], 4)
    assert torch.allclose(xb, (raw.float() / 255 - 0.5) / 0.25, atol=1e-5)
    assert len({tuple(v) for v in views[:100].tolist()}) > 50
    again = CifarLoader(x, y, 100, seed=3, **common)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(loader, again, strict=True))
    other = CifarLoader(x, y, 100, seed=4, **common)
    assert not torch.equal(next(iter(other))[1], yb)
    loader.set_epoch(1)
    assert not torch.equal(next(iter(loader))[1], yb)


def test_test_loader_is_deterministic_and_complete(synthetic_dir):
    test = get_cifar10_loaders(batch_size=64, data_dir=synthetic_dir, test_batch_size=64).test
    first = [b for b in test]
    second = [b for b in test]
    assert len(first) == 4 and sum(len(b[1]) for b in first) == 200  # no drop_last
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, second, strict=True))
    _, y = load_cifar("cifar10", synthetic_dir, train=False)
    assert torch.equal(torch.cat([b[1] for b in first]), y)


def test_drop_last_balanced_subset_and_shards(synthetic_dir):
    train = get_cifar10_loaders(batch_size=64, data_dir=synthetic_dir, subset_per_class=30).train
    assert len(train) == 300 // 64 and torch.bincount(train.labels).tolist() == [30] * 10
    x, y = load_cifar("cifar10", synthetic_dir, train=True)
    shards = [
        CifarLoader(x, y, 10, mean=(0,) * 3, std=(1,) * 3, train=True, num_shards=2, shard=k).epoch_plan()[0]
        for k in range(2)
    ]
    assert len(set(shards[0].tolist()) | set(shards[1].tolist())) == 1200
    assert not set(shards[0].tolist()) & set(shards[1].tolist())


def test_missing_data_error_says_where_and_how(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_cifar("cifar10", str(tmp_path), train=True)
    message = str(err.value)
    assert str(tmp_path / "cifar-10-batches-py") in message
    assert "download" in message and "prepare_cifar10.py" in message


def test_bad_options_are_rejected(synthetic_dir):
    x, y = load_cifar("cifar10", synthetic_dir, train=False)
    common = dict(mean=(0,) * 3, std=(1,) * 3, train=True)
    with pytest.raises(ValueError, match="unknown augmentation 'cutout'.*crop_pad"):
        CifarLoader(x, y, 10, aug={"cutout": 8}, **common)
    with pytest.raises(TypeError, match="flip"):
        CifarLoader(x, y, 10, aug={"flip": "yes"}, **common)
    with pytest.raises(ValueError, match="batch_size"):
        CifarLoader(x, y, 0, **common)
    with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
        load_cifar("svhn", synthetic_dir, train=True)
    with pytest.raises(ValueError, match="only 20 images"):
        data_utils.balanced_subset(y, 25)

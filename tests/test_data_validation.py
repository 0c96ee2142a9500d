"""Every CIFAR file is validated on read: layout, dtype, label range and count, with the file named.

Each case writes a small generated set in the official layout, spoils one file the way a
hand-made copy would, and expects a ValueError naming that file and the offending value
(before these checks, (a)-(e) loaded silently and trained on scrambled or near-black pixels,
or failed later with "val_size must be a multiple of the 11 classes").
"""

import pickle

import numpy as np
import pytest
import torch

import data_utils
from data_utils import load_cifar

N_TRAIN, N_TEST = 60, 20


@pytest.fixture
def cifar10_dir(tmp_path):
    data_utils.write_synthetic_cifar(str(tmp_path), "cifar10", n_train=N_TRAIN, n_test=N_TEST, seed=0)
    return tmp_path


@pytest.fixture
def cifar100_dir(tmp_path):
    data_utils.write_synthetic_cifar(str(tmp_path), "cifar100", n_train=200, n_test=100, seed=1)
    return tmp_path


def rewrite(path, **changes):
    """Replace entries of one official pickle (``None`` deletes the entry); returns the old ones."""
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    old = dict(entry)
    for key, value in changes.items():
        if value is None:
            entry.pop(key)
        else:
            entry[key] = value
    with open(path, "wb") as f:
        pickle.dump(entry, f)
    return old


def batch_path(root, name="data_batch_2"):
    return str(root / "cifar-10-batches-py" / name)


def load_error(root, dataset="cifar10", train=True) -> str:
    with pytest.raises(ValueError) as err:
        load_cifar(dataset, str(root), train=train)
    return str(err.value)


def test_a_valid_generated_set_loads_in_the_official_layout(cifar10_dir, cifar100_dir):
    path = batch_path(cifar10_dir)
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="latin1")
    assert batch["data"].dtype == np.uint8 and batch["data"].shape[1] == 3072
    x, y = load_cifar("cifar10", str(cifar10_dir), train=True)
    assert x.shape == (N_TRAIN, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert sorted(y.unique().tolist()) == list(range(10))
    x, y = load_cifar("cifar10", str(cifar10_dir), train=False)
    assert x.shape == (N_TEST, 3, 32, 32)
    x, y = load_cifar("cifar100", str(cifar100_dir), train=True)
    assert x.shape == (200, 3, 32, 32) and int(y.max()) == 99 and int(y.min()) == 0
    assert len(data_utils.class_names("cifar100", str(cifar100_dir))) == 100


def test_labels_as_an_integer_array_are_accepted(cifar10_dir):
    path = batch_path(cifar10_dir)
    with open(path, "rb") as f:
        labels = pickle.load(f, encoding="latin1")["labels"]
    rewrite(path, labels=np.asarray(labels, dtype=np.uint8))
    _, y = load_cifar("cifar10", str(cifar10_dir), train=True)
    assert y.dtype == torch.int64 and len(y) == N_TRAIN


def test_images_stored_height_width_channel_are_refused(cifar10_dir):
    path = batch_path(cifar10_dir)
    with open(path, "rb") as f:
        data = pickle.load(f, encoding="latin1")["data"]
    n = len(data)
    rewrite(path, data=np.ascontiguousarray(data.reshape(n, 3, 32, 32).transpose(0, 2, 3, 1)))  # (N, 32, 32, 3)
    message = load_error(cifar10_dir)
    assert path in message
    assert f"uint8 array of shape ({n}, 32, 32, 3)" in message
    assert "(N, 3072)" in message and "prepare_cifar10.py" in message and "--download" in message


def test_images_stored_channel_first_but_not_flattened_are_refused(cifar10_dir):
    path = batch_path(cifar10_dir)
    with open(path, "rb") as f:
        data = pickle.load(f, encoding="latin1")["data"]
    rewrite(path, data=data.reshape(-1, 3, 32, 32))
    message = load_error(cifar10_dir)
    assert path in message and f"shape ({len(data)}, 3, 32, 32)" in message and "(N, 3072)" in message


def test_float_images_in_zero_one_are_refused(cifar10_dir):
    path = batch_path(cifar10_dir)
    with open(path, "rb") as f:
        data = pickle.load(f, encoding="latin1")["data"]
    rewrite(path, data=(data / 255).astype(np.float32))
    message = load_error(cifar10_dir)
    assert path in message
    assert f"float32 array of shape ({len(data)}, 3072)" in message and "near-black" in message
    assert "expected a uint8 array" in message


@pytest.mark.parametrize("bad_label", [10, -1])
def test_cifar10_labels_out_of_range_name_the_label_its_index_and_the_file(cifar10_dir, bad_label):
    path = batch_path(cifar10_dir, "data_batch_4")
    with open(path, "rb") as f:
        labels = pickle.load(f, encoding="latin1")["labels"]
    labels[7] = bad_label
    rewrite(path, labels=labels)
    message = load_error(cifar10_dir)
    assert path in message
    assert f"label {bad_label} at index 7" in message and "0..9" in message
    assert "multiple of" not in message


def test_cifar10_bad_test_labels_are_refused_too(cifar10_dir):
    path = batch_path(cifar10_dir, "test_batch")
    with open(path, "rb") as f:
        labels = pickle.load(f, encoding="latin1")["labels"]
    labels[0] = 10
    rewrite(path, labels=labels)
    message = load_error(cifar10_dir, train=False)
    assert path in message and "label 10 at index 0" in message


def test_cifar100_fine_label_300_is_refused(cifar100_dir):
    path = str(cifar100_dir / "cifar-100-python" / "train")
    with open(path, "rb") as f:
        labels = pickle.load(f, encoding="latin1")["fine_labels"]
    labels[3] = 300
    rewrite(path, fine_labels=labels)
    message = load_error(cifar100_dir, "cifar100")
    assert path in message
    assert "label 300 at index 3 of 'fine_labels'" in message and "0..99" in message


def test_a_label_count_unlike_the_image_count_is_refused(cifar10_dir):
    path = batch_path(cifar10_dir)
    with open(path, "rb") as f:
        labels = pickle.load(f, encoding="latin1")["labels"]
    rewrite(path, labels=labels[:-1])
    message = load_error(cifar10_dir)
    assert path in message
    assert f"{len(labels)} images but {len(labels) - 1} labels in 'labels'" in message
    assert "prepare_cifar10.py" in message


def test_non_integer_labels_and_missing_entries_are_refused(cifar10_dir):
    path = batch_path(cifar10_dir)
    with open(path, "rb") as f:
        labels = pickle.load(f, encoding="latin1")["labels"]
    rewrite(path, labels=[float(y) for y in labels])
    message = load_error(cifar10_dir)
    assert path in message and "float64" in message and "integer class indices" in message
    rewrite(path, labels=None)
    message = load_error(cifar10_dir)
    assert path in message and "no 'labels' entry" in message
    rewrite(path, labels=labels, data=None)
    message = load_error(cifar10_dir)
    assert path in message and "no 'data' entry" in message


def test_a_pickle_that_is_not_a_dictionary_is_refused(cifar10_dir):
    path = batch_path(cifar10_dir)
    with open(path, "wb") as f:
        pickle.dump([1, 2, 3], f)
    message = load_error(cifar10_dir)
    assert path in message and "holds a list" in message


def test_bad_labels_fail_at_read_time_not_as_a_val_size_error(cifar10_dir):
    """Before, label 10 gave "val_size must be a multiple of the 11 classes" from the split."""
    path = batch_path(cifar10_dir)
    with open(path, "rb") as f:
        labels = pickle.load(f, encoding="latin1")["labels"]
    labels[0] = 10
    rewrite(path, labels=labels)
    with pytest.raises(ValueError) as err:
        data_utils.get_cifar10_loaders(batch_size=10, data_dir=str(cifar10_dir), val_size=20)
    message = str(err.value)
    assert path in message and "label 10 at index 0" in message and "classes" in message
    assert "val_size" not in message


def test_a_meta_file_without_the_class_names_is_refused(cifar10_dir):
    path = batch_path(cifar10_dir, "batches.meta")
    rewrite(path, label_names=["airplane"])
    with pytest.raises(ValueError) as err:
        data_utils.class_names("cifar10", str(cifar10_dir))
    assert path in str(err.value) and "expected the 10 class names" in str(err.value)
    rewrite(path, label_names=None)
    with pytest.raises(ValueError, match="'label_names' is missing") as err:
        data_utils.class_names("cifar10", str(cifar10_dir))
    assert path in str(err.value)

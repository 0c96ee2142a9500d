"""CIFAR-10/100 as tensors: read the official pickles, augment whole batches at once.

The whole split lives as one uint8 tensor on the target device; every batch is cropped,
flipped and normalised with a handful of batched tensor ops (no PIL, no DataLoader
workers competing for the two cores). The random stream of an epoch (order, crops,
flips) is a pure function of ``(seed, epoch)``, independent of the model seed, so a
resumed run, or a second student, sees exactly the same batches.

    train_loader, val_loader, test_loader = get_cifar10_loaders(batch_size=128, data_dir="./data", val_size=5000)
    for x, y in train_loader:   # x: (B, 3, 32, 32) float32, normalised; y: (B,) int64
        ...
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from randaugment import apply_strong, random_strong_params

# Per-channel statistics of the training splits (official binary releases).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


@dataclass(frozen=True)
class CifarSpec:
    folder: str
    url: str
    archive: str
    md5: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str
    num_classes: int
    train_per_class: int  # images of each class in the official training split
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


DATASETS = {
    "cifar10": CifarSpec(
        folder="cifar-10-batches-py",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        archive="cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        meta_file="batches.meta",
        label_key="labels",
        names_key="label_names",
        num_classes=10,
        train_per_class=5000,
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
    ),
    "cifar100": CifarSpec(
        folder="cifar-100-python",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        archive="cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        train_files=("train",),
        test_files=("test",),
        meta_file="meta",
        label_key="fine_labels",
        names_key="fine_label_names",
        num_classes=100,
        train_per_class=500,
        mean=CIFAR100_MEAN,
        std=CIFAR100_STD,
    ),
}


def _spec(name: str) -> CifarSpec:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {sorted(DATASETS)}")
    return DATASETS[name]


# ----------------------------------------------------------------------------- reading


def _missing_data_message(spec: CifarSpec, tried: list[str]) -> str:
    lines = [f"CIFAR data not found: no complete '{spec.folder}' folder. Looked in:"]
    lines += [f"  {p}" for p in tried]
    lines += [
        "To get it: pass download=True (command line: --download) on a machine with a network,",
        f"or unpack {spec.url} into the data directory,",
        "or, on the project machines, run: python ../shared/data/prepare_cifar10.py ./data",
    ]
    return "\n".join(lines)


def find_dataset_dir(name: str, root: str) -> str:
    """The folder holding the official pickles: ``root/<folder>`` or ``root`` itself."""
    spec = _spec(name)
    candidates = [os.path.join(root, spec.folder), root]
    for path in candidates:
        files = spec.train_files + spec.test_files
        if all(os.path.isfile(os.path.join(path, f)) for f in files):
            return path
    raise FileNotFoundError(_missing_data_message(spec, [os.path.abspath(p) for p in candidates]))


def download_cifar(name: str, root: str) -> str:
    """Download and unpack the official archive into ``root`` (skipped if already there)."""
    spec = _spec(name)
    try:
        return find_dataset_dir(name, root)
    except FileNotFoundError:
        pass
    from torchvision.datasets.utils import download_and_extract_archive

    try:
        download_and_extract_archive(spec.url, root, filename=spec.archive, md5=spec.md5)
    except Exception as err:  # network errors come in many types; all mean the same here
        raise RuntimeError(
            f"downloading {spec.url} into {os.path.abspath(root)} failed ({err}). "
            f"Without a network, copy the unpacked '{spec.folder}' folder there instead "
            "(project machines: python ../shared/data/prepare_cifar10.py <data dir>)."
        ) from err
    return find_dataset_dir(name, root)


# A generated data set carries this file, so that no run mistakes it for the real one.
GENERATED_MARK = "GENERATED_NOT_CIFAR"


def is_generated(name: str, root: str) -> bool:
    return os.path.isfile(os.path.join(find_dataset_dir(name, root), GENERATED_MARK))


def _remedy(path: str) -> str:
    """What to do about a bad file: both ways of making the folder skip one that is already there."""
    return (
        f"Re-create the data folder: delete {os.path.dirname(os.path.abspath(path))} and run again with "
        "--download, or run python ../shared/data/prepare_cifar10.py <data dir> (both keep an existing folder)."
    )


def _read_pickle(path: str) -> dict:
    """One of the official pickles. They are the data set's own format and must be unpickled:
    read them only from a data folder you trust (the README's security note)."""
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as err:
        raise ValueError(
            f"cannot read {path} ({type(err).__name__}: {err}): the file is truncated or not a CIFAR pickle. "
            + _remedy(path)
        ) from err
    if not isinstance(entry, dict):
        raise ValueError(f"{path} holds a {type(entry).__name__}, not a CIFAR dictionary. " + _remedy(path))
    return entry


def _describe(x) -> str:
    """An entry as a message shows it: dtype and shape of an array, the type of anything else."""
    if isinstance(x, np.ndarray):
        return f"{x.dtype} array of shape {x.shape}"
    return f"{type(x).__name__}" + (f" of length {len(x)}" if hasattr(x, "__len__") else "")


def _check_batch(entry: dict, path: str, spec: CifarSpec, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A batch's ``(images uint8 (N, 3, 32, 32), labels int64 (N,))``, refused unless it is in the
    official layout: ``data`` a uint8 array (N, 3072), each row 1024 red, then 1024 green, then 1024
    blue values; ``spec.label_key`` N integers in [0, num_classes). Cheap: a few vectorised passes.

    Anything else (images stored (N, 32, 32, 3), which would train on scrambled pixels; floats in
    [0, 1], which would train on near-black ones; labels out of range) is a ValueError naming the
    file, what it holds, what is expected and what to do.
    """
    for key in ("data", spec.label_key):
        if key not in entry:
            raise ValueError(
                f"{path} has no {key!r} entry (keys: {sorted(map(str, entry))}): not a {name} batch. " + _remedy(path)
            )
    data = entry["data"]
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
        hint = ""
        if isinstance(data, np.ndarray):
            if data.shape[1:] == (32, 32, 3):
                hint = " (images stored height x width x channel: read as CIFAR rows their pixels would be scrambled)"
            elif data.shape[1:] == (3, 32, 32):
                hint = " (images not flattened into rows)"
            if np.issubdtype(data.dtype, np.floating):
                lo, hi = (float(data.min()), float(data.max())) if data.size else (0.0, 0.0)
                hint += f" (floats in [{lo:.3g}, {hi:.3g}], not bytes 0..255"
                hint += ": cast to bytes they would be near-black pixels)" if hi <= 1 else ")"
        raise ValueError(
            f"{path}: 'data' is a {_describe(data)}{hint}; expected a uint8 array of shape (N, 3072), the official "
            "layout (each row 1024 red, then 1024 green, then 1024 blue values, 0..255). " + _remedy(path)
        )
    raw = entry[spec.label_key]
    try:
        labels = np.asarray(raw)
    except ValueError:  # ragged nested lists
        labels = np.asarray(raw, dtype=object)
    if labels.size == 0 and labels.ndim == 1:
        labels = labels.astype(np.int64)  # an empty list reads as float64
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{path}: {spec.label_key!r} is a {type(raw).__name__} of {labels.dtype} values with shape "
            f"{labels.shape}; expected a list of N integer class indices in 0..{spec.num_classes - 1}. " + _remedy(path)
        )
    if len(labels) != len(data):
        raise ValueError(
            f"{path} holds {len(data)} images but {len(labels)} labels in {spec.label_key!r}; expected one label "
            "per image. " + _remedy(path)
        )
    bad = (labels < 0) | (labels >= spec.num_classes)
    if bad.any():
        i = int(bad.argmax())
        raise ValueError(
            f"{path}: label {int(labels[i])} at index {i} of {spec.label_key!r} is outside the valid range "
            f"0..{spec.num_classes - 1} ({name} has {spec.num_classes} classes; {int(bad.sum())} of {len(labels)} "
            "labels are out of range). " + _remedy(path)
        )
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64, copy=False)


def data_digest(name: str, root: str) -> str:
    """Content hash of a data set's split files (read once per file state): part of every run's
    identity, so runs on generated, corrupted and real copies never reuse each other's results."""
    spec = _spec(name)
    folder = find_dataset_dir(name, root)
    stats = tuple(
        (os.path.abspath(p), st.st_size, st.st_mtime_ns)
        for p in (os.path.join(folder, f) for f in spec.train_files + spec.test_files)
        for st in [os.stat(p)]
    )
    return _files_digest(stats)


@functools.lru_cache(maxsize=16)
def _files_digest(stats: tuple) -> str:
    digest = hashlib.sha1()
    for path, *_ in stats:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def load_cifar(name: str, root: str, train: bool, download: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One split as ``(images uint8 (N, 3, 32, 32), labels int64 (N,))``, read from the pickles.

    The md5 check of torchvision is skipped on purpose: regenerated copies (like the
    project machines' JPEG-derived CIFAR-10) are valid data with different bytes. Instead every
    file is checked on read (layout, dtype, label range; ``_check_batch``), with the file named.
    """
    spec = _spec(name)
    folder = download_cifar(name, root) if download else find_dataset_dir(name, root)
    images, labels = [], []
    for fname in spec.train_files if train else spec.test_files:
        path = os.path.join(folder, fname)
        x, y = _check_batch(_read_pickle(path), path, spec, name)
        images.append(x)
        labels.append(y)
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def class_names(name: str, root: str) -> list[str]:
    spec = _spec(name)
    path = os.path.join(find_dataset_dir(name, root), spec.meta_file)
    meta = _read_pickle(path)
    names = meta.get(spec.names_key)
    if isinstance(names, (str, bytes)) or not hasattr(names, "__len__") or len(names) != spec.num_classes:
        found = f"is a {_describe(names)}" if spec.names_key in meta else f"is missing (keys: {sorted(map(str, meta))})"
        raise ValueError(
            f"{path}: {spec.names_key!r} {found}; expected the {spec.num_classes} class names of {name}. "
            + _remedy(path)
        )
    return list(names)


# ----------------------------------------------------------------------------- synthetic data


def _class_templates(num_classes: int, gen: torch.Generator) -> torch.Tensor:
    """One mean image per class, (K, 3, 32, 32): a colour plus a stripe pattern."""
    colours = torch.rand(num_classes, 3, 1, 1, generator=gen) * 160 + 48
    freq = 1 + torch.arange(num_classes) % 5
    coord = torch.arange(32).float()
    stripes = torch.sin(coord[None, :] * freq[:, None] * 0.4)  # (K, 32)
    horizontal = (torch.arange(num_classes) // 5 % 2).bool()[:, None, None]
    pattern = torch.where(horizontal, stripes[:, :, None], stripes[:, None, :])  # (K, 32, 32)
    return colours + 40 * pattern[:, None]  # (K, 3, 32, 32)


def _synthetic_split(n: int, templates: torch.Tensor, gen: torch.Generator) -> tuple[np.ndarray, list]:
    """Balanced labels; each image is its class template plus strong pixel noise."""
    num_classes = len(templates)
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=gen)]
    noise = torch.randn(n, 3, 32, 32, generator=gen) * 60
    images = (templates[labels] + noise).clamp(0, 255).to(torch.uint8)
    return images.reshape(n, -1).numpy(), labels.tolist()


def write_synthetic_cifar(
    root: str, name: str = "cifar10", n_train: int = 1000, n_test: int = 200, seed: int = 0
) -> str:
    """Write a small learnable dataset in the exact official layout; returns its folder.

    CIFAR-10: ``data_batch_1..5``, ``test_batch``, ``batches.meta`` (keys ``data``,
    ``labels``, ``filenames``, ``batch_label``). CIFAR-100: ``train``, ``test``, ``meta``
    (keys ``data``, ``fine_labels``, ``coarse_labels``, ``filenames``).
    """
    spec = _spec(name)
    folder = os.path.join(root, spec.folder)
    os.makedirs(root, exist_ok=True)
    # written beside, then renamed into place: a reader never sees half a data set, and two first
    # runs generating it at once both end with one complete folder
    tmp = tempfile.mkdtemp(dir=root, prefix=f".{spec.folder}-")
    gen = torch.Generator().manual_seed(seed)
    templates = _class_templates(spec.num_classes, gen)
    train = _synthetic_split(n_train, templates, gen)
    test = _synthetic_split(n_test, templates, gen)
    if name == "cifar10":
        _write_cifar10_files(tmp, train, test)
    else:
        _write_cifar100_files(tmp, train, test)
    with open(os.path.join(tmp, GENERATED_MARK), "w") as f:
        f.write(f"generated by data_utils.write_synthetic_cifar (seed {seed}): not CIFAR\n")
    try:
        os.rename(tmp, folder)
    except OSError:  # already there (another writer won the race, or it existed): keep that one
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _dump(obj: dict, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        pickle.dump(obj, f)
    os.replace(tmp, path)


def _write_cifar10_files(folder: str, train, test) -> None:
    data, labels = train
    chunks = np.array_split(np.arange(len(labels)), 5)
    for i, idx in enumerate(chunks, start=1):
        _dump(
            {
                "batch_label": f"training batch {i} of 5",
                "labels": [labels[j] for j in idx],
                "data": data[idx],
                "filenames": [f"synthetic_{j:05d}.png" for j in idx],
            },
            os.path.join(folder, f"data_batch_{i}"),
        )
    _dump(
        {
            "batch_label": "testing batch 1 of 1",
            "labels": test[1],
            "data": test[0],
            "filenames": [f"synthetic_test_{j:05d}.png" for j in range(len(test[1]))],
        },
        os.path.join(folder, "test_batch"),
    )
    meta = {"label_names": list(CIFAR10_CLASSES), "num_cases_per_batch": len(chunks[0]), "num_vis": 3072}
    _dump(meta, os.path.join(folder, "batches.meta"))


def _write_cifar100_files(folder: str, train, test) -> None:
    for split, (data, labels) in (("train", train), ("test", test)):
        _dump(
            {
                "filenames": [f"synthetic_{split}_{j:05d}.png" for j in range(len(labels))],
                "batch_label": f"{split}ing batch 1 of 1",
                "fine_labels": labels,
                "coarse_labels": [y // 5 for y in labels],  # the real set has 20 superclasses
                "data": data,
            },
            os.path.join(folder, split),
        )
    meta = {
        "fine_label_names": [f"class_{k:02d}" for k in range(100)],
        "coarse_label_names": [f"superclass_{k:02d}" for k in range(20)],
    }
    _dump(meta, os.path.join(folder, "meta"))


# ----------------------------------------------------------------------------- augmentation


def random_views(n: int, pad: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """Sample one crop+flip view per image: ``(n, 3)`` int64 rows of ``(dy, dx, flip)``.

    With pad 4 there are 9 * 9 * 2 = 162 views per image; a view is exactly reproducible
    from these three integers (used to key cached teacher outputs).
    """
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=gen)
    flips = torch.randint(0, 2, (n, 1), generator=gen) if flip else torch.zeros(n, 1, dtype=torch.int64)
    return torch.cat([offsets, flips], dim=1)


def apply_views(images: torch.Tensor, views: torch.Tensor, pad: int) -> torch.Tensor:
    """Crop and flip each image of a uint8 batch by its own view, in two gathers.

    images: (B, C, H, W); views: (B, 3) as from ``random_views``. Zero padding, as
    torchvision's ``RandomCrop(32, padding=4)``.
    """
    B, C, H, W = images.shape
    if pad == 0 and not views[:, 2].any():
        return images
    x = torch.nn.functional.pad(images, (pad, pad, pad, pad))  # (B, C, H+2p, W+2p)
    views = views.to(images.device)
    dy, dx, fl = views[:, 0:1], views[:, 1:2], views[:, 2:3].bool()
    ar_h = torch.arange(H, device=images.device)
    ar_w = torch.arange(W, device=images.device)
    rows = dy + ar_h  # (B, H)
    cols = dx + torch.where(fl, W - 1 - ar_w, ar_w)  # (B, W); a flip reverses the column order
    x = x.gather(2, rows[:, None, :, None].expand(B, C, H, W + 2 * pad))  # (B, C, H, W+2p)
    return x.gather(3, cols[:, None, None, :].expand(B, C, H, W))  # (B, C, H, W)


# ----------------------------------------------------------------------------- loader

AUG_KEYS = {"crop_pad": int, "flip": bool}
# the second view's generator is seeded apart from the first's: (seed, epoch) never gives both the same seed
STRONG_SEED_OFFSET = 1 << 48


def _check_aug(aug: dict | None) -> dict:
    aug = dict(aug or {})
    for key, value in aug.items():
        if key not in AUG_KEYS:
            raise ValueError(f"unknown augmentation {key!r}; valid keys are {sorted(AUG_KEYS)}")
        if not isinstance(value, AUG_KEYS[key]):
            raise TypeError(f"augmentation {key!r} must be {AUG_KEYS[key].__name__}, got {value!r}")
    if aug.get("crop_pad", 0) < 0:
        raise ValueError(f"crop_pad must be >= 0, got {aug['crop_pad']}")
    return {"crop_pad": aug.get("crop_pad", 0), "flip": aug.get("flip", False)}


def balanced_subset(labels: torch.Tensor, per_class: int, seed: int = 0) -> torch.Tensor:
    """Indices of ``per_class`` images of every class, chosen by ``seed``, in sorted order."""
    gen = torch.Generator().manual_seed(seed)
    chosen = []
    for k in labels.unique().tolist():
        idx = (labels == k).nonzero().flatten()
        if len(idx) < per_class:
            raise ValueError(f"class {k} has only {len(idx)} images; asked for {per_class} per class")
        chosen.append(idx[torch.randperm(len(idx), generator=gen)[:per_class]])
    return torch.cat(chosen).sort().values


def validation_split(labels: torch.Tensor, val_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Hold ``val_size`` images out of a training split, the same number from every class.

    Returns ``(train_idx, val_idx)``, disjoint, sorted, covering ``labels``. The choice depends
    only on ``seed`` (a split seed, kept apart from model and stream seeds), so every run of an
    experiment, teacher and students alike, holds out the same images.
    """
    num_classes = len(labels.unique())
    if val_size < 0 or val_size % num_classes:
        raise ValueError(
            f"val_size={val_size} must be a non-negative multiple of the {num_classes} classes "
            f"(class-balanced hold-out), e.g. {num_classes * max(1, round(val_size / num_classes))}"
        )
    if val_size == 0:
        return torch.arange(len(labels)), torch.arange(0)
    val = balanced_subset(labels, val_size // num_classes, seed=seed)
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[val] = False
    return keep.nonzero().flatten(), val


class CifarLoader:
    """Batches of normalised images from a whole split held as one uint8 tensor.

    Shuffling and augmentation are drawn from a generator seeded with ``(seed, epoch)``;
    call ``set_epoch`` (the training loop does) to move to the next epoch's stream.
    ``num_shards``/``shard`` split every epoch's order across distributed ranks. With
    ``with_index`` every batch is ``(x, y, {"index": i})``, ``i`` the images' positions in this
    loader's split (what a per-sample memory bank is indexed by). With ``strong_view`` every batch
    also carries ``{"strong": x2}``, a second view of the same images: its own crop and flip, then
    RandAugment and Cutout (``randaugment.py``), drawn from a generator of its own, so the first
    view's stream is the same with or without it.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        train: bool = False,
        aug: dict | None = None,
        seed: int = 0,
        drop_last: bool | None = None,
        device: str | torch.device = "cpu",
        channels_last: bool = False,
        num_shards: int = 1,
        shard: int = 0,
        with_index: bool = False,
    ):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= shard < num_shards:
            raise ValueError(f"shard {shard} outside 0..{num_shards - 1}")
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device)
        self.batch_size = batch_size
        self.train = train
        self.aug = _check_aug(aug) if train else _check_aug(None)
        self.seed = seed
        self.drop_last = train if drop_last is None else drop_last
        self.channels_last = channels_last
        self.mean, self.std = tuple(mean), tuple(std)
        self.num_shards, self.shard = num_shards, shard
        self.with_index = with_index
        self.strong_view = False  # set by the loop for a method that trains on a second view
        self.epoch = 0
        c = images.shape[1]
        # fold /255 and the normalisation into one multiply-add per pixel
        self._scale = (1 / (255 * torch.tensor(std, device=self.device))).view(1, c, 1, 1)
        self._shift = (-torch.tensor(mean, device=self.device) / torch.tensor(std, device=self.device)).view(1, c, 1, 1)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _shard_size(self) -> int:
        return len(self.images) // self.num_shards

    def _num_batches(self, n: int, drop_last: bool) -> int:
        return n // self.batch_size if drop_last else -(-n // self.batch_size)

    def __len__(self) -> int:
        return self._num_batches(self._shard_size(), self.drop_last)

    def epoch_plan(self, epoch: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This shard's image order and views for an epoch: ``(indices (n,), views (n, 3) or None)``."""
        epoch = self.epoch if epoch is None else epoch
        n = len(self.images)
        if not self.train:
            order = torch.arange(n)
            return order[self.shard :: self.num_shards], None
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=gen)
        views = random_views(n, self.aug["crop_pad"], self.aug["flip"], gen)
        per = self._shard_size()  # equal shards so every rank runs the same number of steps
        keep = slice(self.shard * per, (self.shard + 1) * per)
        return order[keep], views[keep]

    def strong_plan(self, epoch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """This shard's second views for an epoch, by position in its order: ``(views (n, 3),
        RandAugment draws (n, 7))``, from a generator apart from the first view's."""
        epoch = self.epoch if epoch is None else epoch
        n = len(self.images)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + STRONG_SEED_OFFSET)
        views = random_views(n, self.aug["crop_pad"], self.aug["flip"], gen)
        params = random_strong_params(n, gen)
        per = self._shard_size()
        keep = slice(self.shard * per, (self.shard + 1) * per)
        return views[keep], params[keep]

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() * self._scale + self._shift  # (B, C, H, W) float32
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def batches(self, epoch: int | None = None, drop_last: bool | None = None, extras: bool = True):
        """The batches of an epoch (default: the current one), in the epoch plan's order; with
        ``extras`` False, ``(x, y)`` alone (what a teacher needs to run over the stream)."""
        order, views = self.epoch_plan(epoch)
        order = order.to(self.device)  # one host-to-device copy per epoch, none per batch
        views = None if views is None else views.to(self.device)
        strong = self.strong_plan(epoch) if extras and self.strong_view and self.train else None
        drop_last = self.drop_last if drop_last is None else drop_last
        bs = self.batch_size
        for i in range(self._num_batches(len(order), drop_last)):
            idx = order[i * bs : (i + 1) * bs]
            rows = slice(i * bs, (i + 1) * bs)
            raw = self.images[idx]  # (B, C, H, W) uint8
            x = raw if views is None else apply_views(raw, views[rows], self.aug["crop_pad"])
            named = {"index": idx} if extras and self.with_index else {}
            if strong is not None:
                x2 = apply_views(raw, strong[0][rows].to(self.device), self.aug["crop_pad"])  # one gather, two views
                named["strong"] = self.normalise(apply_strong(x2, strong[1][rows]))  # (B, C, H, W)
            batch = (self.normalise(x), self.labels[idx])
            yield (*batch, named) if named else batch

    def __iter__(self):
        return self.batches()

    def fingerprint(self) -> dict:
        """What decides this loader's stream: content hash of the data, augmentation, seed, shard."""
        digest = hashlib.sha1(self.images.cpu().numpy().tobytes())
        digest.update(self.labels.cpu().numpy().tobytes())
        return {
            "data": digest.hexdigest(),
            "normalise": [self.mean, self.std],
            "aug": self.aug,
            "train": self.train,
            "seed": self.seed,
            "shard": [self.shard, self.num_shards],
        }


def unaugmented(loader: CifarLoader, batch_size: int = 1000) -> CifarLoader:
    """The same images, in order and without augmentation (e.g. accuracy on the training set)."""
    return CifarLoader(
        loader.images,
        loader.labels,
        batch_size,
        mean=loader.mean,
        std=loader.std,
        train=False,
        device=loader.device,
        channels_last=loader.channels_last,
    )


class CifarLoaders(NamedTuple):
    train: CifarLoader
    val: CifarLoader | None  # None without a validation split
    test: CifarLoader


def get_cifar_loaders(
    dataset: str = "cifar10",
    batch_size: int = 128,
    data_dir: str = "./data",
    *,
    download: bool = False,
    device: str | torch.device = "cpu",
    subset_per_class: int | None = None,
    val_size: int = 0,
    split_seed: int = 0,
    aug: dict | None = None,
    seed: int = 0,
    test_batch_size: int | None = None,
    channels_last: bool = False,
    num_shards: int = 1,
    shard: int = 0,
) -> CifarLoaders:
    """``(train, val, test)`` loaders: training shuffled, augmented, drop_last; val and test neither.

    ``val_size`` images (class-balanced, chosen by ``split_seed``) are held out of the official
    training split first; ``subset_per_class`` then draws the training subset from the rest
    (also by ``split_seed``), so validation images never reach any training run.
    """
    spec = _spec(dataset)
    aug = {"crop_pad": 4, "flip": True} if aug is None else aug
    x_train, y_train = load_cifar(dataset, data_dir, train=True, download=download)
    x_test, y_test = load_cifar(dataset, data_dir, train=False)
    train_idx, val_idx = validation_split(y_train, val_size, seed=split_seed)
    x_val, y_val = x_train[val_idx], y_train[val_idx]
    x_train, y_train = x_train[train_idx], y_train[train_idx]
    if subset_per_class:
        keep = balanced_subset(y_train, subset_per_class, seed=split_seed)
        x_train, y_train = x_train[keep], y_train[keep]
    common = dict(mean=spec.mean, std=spec.std, device=device, channels_last=channels_last)
    train = CifarLoader(
        x_train,
        y_train,
        batch_size,
        train=True,
        aug=aug,
        seed=seed,
        num_shards=num_shards,
        shard=shard,
        **common,
    )
    eval_batch = test_batch_size or max(batch_size, 500)
    val = CifarLoader(x_val, y_val, eval_batch, train=False, **common) if len(val_idx) else None
    test = CifarLoader(x_test, y_test, eval_batch, train=False, **common)
    return CifarLoaders(train, val, test)


def get_cifar10_loaders(batch_size: int = 128, data_dir: str = "./data", **kwargs):
    """CIFAR-10 ``(train, val, test)`` loaders; see ``get_cifar_loaders`` for the options."""
    return get_cifar_loaders("cifar10", batch_size, data_dir, **kwargs)


def get_cifar100_loaders(batch_size: int = 128, data_dir: str = "./data", **kwargs):
    """CIFAR-100 ``(train, val, test)`` loaders; see ``get_cifar_loaders`` for the options."""
    return get_cifar_loaders("cifar100", batch_size, data_dir, **kwargs)

"""The batched strong view against Pillow, op by op and composed as MLKD's release composes them."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

import data_utils
import randaugment as ra

# Each op as the release calls it on a PIL image (``mdistiller/dataset/cifar100.py``), written here from Pillow's API
PIL_OPS = {
    "auto_contrast": lambda im, v: ImageOps.autocontrast(im),
    "brightness": lambda im, v: ImageEnhance.Brightness(im).enhance(v),
    "color": lambda im, v: ImageEnhance.Color(im).enhance(v),
    "contrast": lambda im, v: ImageEnhance.Contrast(im).enhance(v),
    "equalize": lambda im, v: ImageOps.equalize(im),
    "identity": lambda im, v: im,
    "posterize": lambda im, v: ImageOps.posterize(im, max(1, int(v))),
    "rotate": lambda im, v: im.rotate(v),
    "sharpness": lambda im, v: ImageEnhance.Sharpness(im).enhance(v),
    "shear_x": lambda im, v: im.transform(im.size, Image.AFFINE, (1, v, 0, 0, 1, 0)),
    "shear_y": lambda im, v: im.transform(im.size, Image.AFFINE, (1, 0, 0, v, 1, 0)),
    "solarize": lambda im, v: ImageOps.solarize(im, v),
    "translate_x": lambda im, v: im.transform(im.size, Image.AFFINE, (1, 0, v * im.size[0], 0, 1, 0)),
    "translate_y": lambda im, v: im.transform(im.size, Image.AFFINE, (1, 0, 0, 0, 1, v * im.size[1])),
}


def pil_cutout(im, side, centre_x, centre_y):
    if side <= 0:
        return im
    v = side * im.size[0]
    x0, y0 = int(max(0, centre_x - v / 2.0)), int(max(0, centre_y - v / 2.0))
    x1, y1 = min(im.size[0], x0 + v), min(im.size[1], y0 + v)
    im = im.copy()
    ImageDraw.Draw(im).rectangle((x0, y0, x1, y1), ra.CUTOUT_FILL)
    return im


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """64 images with structure (blocks, noise), a third of them low-contrast, some constant channels."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(64):
        img = np.kron(rng.integers(0, 256, (3, 8, 8)), np.ones((4, 4))) + rng.normal(0, 20, (3, 32, 32))
        img = np.clip(img, 0, 255)
        if i % 3 == 0:
            lo, hi = sorted(rng.integers(0, 256, 2))
            img = lo + img / 255 * (hi - lo)
        if i % 16 == 5:
            img[1] = 77  # a constant channel: auto-contrast and equalise leave it
        out.append(img.astype(np.uint8))
    return torch.tensor(np.stack(out))  # (64, 3, 32, 32)


def to_pil(a: torch.Tensor) -> Image.Image:
    return Image.fromarray(a.numpy().transpose(1, 2, 0))


def from_pil(im: Image.Image) -> torch.Tensor:
    return torch.tensor(np.asarray(im).transpose(2, 0, 1).copy())


@pytest.mark.parametrize("k", range(len(ra.OPS)), ids=[name for name, _, _ in ra.OPS])
def test_each_op_gives_pillows_pixels(images, k):
    name = ra.OPS[k][0]
    v = ra.magnitude(k, torch.rand(len(images), dtype=torch.float64, generator=torch.Generator().manual_seed(k)))
    ours = ra.OP_FUNCTIONS[name](images, v) if name != "identity" else images
    ref = torch.stack([from_pil(PIL_OPS[name](to_pil(a), m)) for a, m in zip(images, v.tolist(), strict=True)])
    assert torch.equal(ours, ref)


def test_geometric_ops_at_their_extremes(images):
    for name, (lo, hi) in {"rotate": (-30, 30), "shear_x": (-0.3, 0.3), "translate_y": (-0.3, 0.3)}.items():
        v = torch.tensor([lo, hi, 0.0, lo / 3] * 4, dtype=torch.float64)
        ref = torch.stack([from_pil(PIL_OPS[name](to_pil(a), m)) for a, m in zip(images[:16], v.tolist(), strict=True)])
        assert torch.equal(ra.OP_FUNCTIONS[name](images[:16], v), ref), name


def test_cutout_is_the_releases_square(images):
    g = torch.Generator().manual_seed(5)
    side, ux, uy = (torch.rand(len(images), dtype=torch.float64, generator=g) for _ in range(3))
    side = side * ra.CUTOUT_MAX
    side[:4] = 0.0  # no square at all
    ours = ra.cutout(images, side, ux, uy)
    w = images.shape[3]  # the release's np.random.uniform(w): uniform between w and 1
    ref = [
        pil_cutout(to_pil(a), s, w + (1 - w) * a_, w + (1 - w) * b_)
        for a, s, a_, b_ in zip(images, side, ux, uy, strict=True)
    ]
    assert torch.equal(ours, torch.stack([from_pil(im) for im in ref]))
    assert torch.equal(ours[:4], images[:4])
    painted = (ours != images).any(1).flatten(1).sum(1)  # (B,) pixels changed per image
    assert painted[4:].max() > 0


def test_the_composed_view_is_the_releases_pipeline(images):
    params = ra.random_strong_params(len(images), torch.Generator().manual_seed(1))
    assert params.shape == (64, len(ra.COLUMNS)) and params.dtype == torch.float64
    ours = ra.apply_strong(images, params)
    for a, p, got in zip(images, params.tolist(), ours, strict=True):
        im = to_pil(a)
        for slot in range(ra.N_OPS):
            k = int(p[2 * slot])
            im = PIL_OPS[ra.OPS[k][0]](im, float(ra.magnitude(k, torch.tensor(p[2 * slot + 1]))))
        w = a.shape[2]
        im = pil_cutout(im, p[4] * ra.CUTOUT_MAX, w + (1 - w) * p[5], w + (1 - w) * p[6])
        assert torch.equal(got, from_pil(im))


def test_draws_cover_every_op_and_their_ranges():
    params = ra.random_strong_params(20000, torch.Generator().manual_seed(0))
    ops = params[:, [0, 2]].long()
    counts = torch.bincount(ops.flatten(), minlength=len(ra.OPS)).double() / ops.numel()
    assert counts.min() > 0.8 / len(ra.OPS) and counts.max() < 1.2 / len(ra.OPS)  # uniform, with replacement
    assert (ops[:, 0] == ops[:, 1]).double().mean().item() == pytest.approx(1 / len(ra.OPS), abs=0.01)
    u = params[:, [1, 3, 4, 5, 6]]
    assert u.min() >= 0 and u.max() < 1
    assert torch.equal(params, ra.random_strong_params(20000, torch.Generator().manual_seed(0)))


def test_the_loader_adds_a_second_view_and_leaves_the_first_stream_alone(synthetic_dir):
    plain = data_utils.get_cifar10_loaders(batch_size=100, data_dir=synthetic_dir, val_size=200).train
    two = data_utils.get_cifar10_loaders(batch_size=100, data_dir=synthetic_dir, val_size=200).train
    two.strong_view = True
    two.set_epoch(3)
    plain.set_epoch(3)
    for (x, y), (x1, y1, extras) in zip(plain, two, strict=True):
        assert torch.equal(x, x1) and torch.equal(y, y1)  # the first view's stream is unchanged
        assert extras["strong"].shape == x.shape and extras["strong"].dtype == x.dtype
        assert not torch.equal(extras["strong"], x)
    again = list(two.batches(3))
    assert torch.equal(again[0][2]["strong"], next(iter(two))[2]["strong"])  # a pure function of (seed, epoch)
    assert not torch.equal(two.batches(4).__next__()[2]["strong"], again[0][2]["strong"])
    # the second view of batch 0 is exactly its images, cropped and flipped by the strong plan, then augmented
    order, _ = two.epoch_plan(3)
    views, params = two.strong_plan(3)
    raw = data_utils.apply_views(two.images[order[:100]], views[:100], two.aug["crop_pad"])
    assert torch.equal(again[0][2]["strong"], two.normalise(ra.apply_strong(raw, params[:100])))

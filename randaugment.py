"""FixMatch-style RandAugment with Cutout, batched on uint8 tensors: the "strong" view of MLKD's release.

Each image gets, after its own crop and flip, two ops drawn with replacement from ``OPS``, each at a
magnitude uniform in its range, and then a Cutout of side uniform in [0, ½) of the image
(``RandAugment(2, 10)`` of ``mdistiller/dataset/cifar100.py`` in Jin-Ying/Multi-Level-Logit-Distillation;
the 10 is unused there). Every op reproduces Pillow's (13.0) on the same magnitude, pixel for pixel:
``tests/test_randaugment.py`` compares them op by op. All draws of an epoch are one ``(n, 7)`` tensor
(``random_strong_params``), so a view is a pure function of the stream seed, as the crops are.

    params = random_strong_params(n, generator)         # (n, 7) float64
    x_strong = apply_strong(x_uint8, params)            # (B, C, H, W) uint8 -> uint8
"""

from __future__ import annotations

import math

import torch

# (name, low, high) of the release's ``augment_list``, in its order (an op's index is its position)
OPS = (
    ("auto_contrast", 0.0, 1.0),
    ("brightness", 0.05, 0.95),
    ("color", 0.05, 0.95),
    ("contrast", 0.05, 0.95),
    ("equalize", 0.0, 1.0),
    ("identity", 0.0, 1.0),
    ("posterize", 4.0, 8.0),
    ("rotate", -30.0, 30.0),
    ("sharpness", 0.05, 0.95),
    ("shear_x", -0.3, 0.3),
    ("shear_y", -0.3, 0.3),
    ("solarize", 0.0, 256.0),
    ("translate_x", -0.3, 0.3),
    ("translate_y", -0.3, 0.3),
)
N_OPS = 2
CUTOUT_MAX = 0.5  # of the image side
CUTOUT_FILL = (125, 123, 114)  # the release's grey, per channel
# columns of a params row: two (op, u) slots with the magnitude as u ∈ [0, 1) of its range, then Cutout's side
# as u ∈ [0, 1) of CUTOUT_MAX and its centre's two uniforms
COLUMNS = ("op1", "u1", "op2", "u2", "cutout", "cutout_x", "cutout_y")


def random_strong_params(n: int, gen: torch.Generator) -> torch.Tensor:
    """One strong view's draws per image, ``(n, 7)`` float64 in ``COLUMNS`` order."""
    ops = torch.randint(0, len(OPS), (n, N_OPS), generator=gen).double()
    u = torch.rand(n, N_OPS + 3, generator=gen, dtype=torch.float64)
    return torch.stack([ops[:, 0], u[:, 0], ops[:, 1], u[:, 1], u[:, 2], u[:, 3], u[:, 4]], dim=1)


def magnitude(op: int, u: torch.Tensor) -> torch.Tensor:
    """The release's ``low + (high - low) * random()``, in float64 as Python computes it."""
    _, low, high = OPS[op]
    return low + (high - low) * u


def apply_strong(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """RandAugment's two ops, then Cutout, each image by its own row of ``params``: (B, C, H, W) uint8."""
    x = images.clone()
    params = params.to(images.device)
    for slot in range(N_OPS):
        ops, u = params[:, 2 * slot].long(), params[:, 2 * slot + 1]
        for k, (name, _, _) in enumerate(OPS):
            rows = (ops == k).nonzero().flatten()
            if len(rows) and name != "identity":
                x[rows] = OP_FUNCTIONS[name](x[rows], magnitude(k, u[rows]))
    return cutout(x, params[:, 4] * CUTOUT_MAX, params[:, 5], params[:, 6])


# ----------------------------------------------------------------------------- colour ops (lookup tables)


def _apply_lut(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Map every pixel through its image's and channel's table: x (B, C, H, W) uint8, lut (B, C, 256)."""
    B, C, H, W = x.shape
    return lut.to(torch.uint8).gather(2, x.reshape(B, C, H * W).long()).reshape(B, C, H, W)


def _histogram(x: torch.Tensor) -> torch.Tensor:
    """Per image and channel pixel counts, (B, C, 256) int64."""
    B, C = x.shape[:2]
    flat = x.reshape(B * C, -1).long()
    counts = torch.zeros(B * C, 256, dtype=torch.int64, device=x.device)
    return counts.scatter_add_(1, flat, torch.ones_like(flat)).reshape(B, C, 256)


def auto_contrast(x: torch.Tensor, v: torch.Tensor | None = None) -> torch.Tensor:
    """Each channel stretched to 0..255: ``int(i * 255/(hi-lo) - lo * 255/(hi-lo))``, clipped
    (``ImageOps.autocontrast``, no cut-off); a constant channel is left as is."""
    flat = x.flatten(2)
    lo, hi = flat.amin(2, keepdim=True).double(), flat.amax(2, keepdim=True).double()  # (B, C, 1)
    scale = torch.full_like(lo, 255.0) / (hi - lo).clamp(min=1)  # not 255.0 / t: torch takes a reciprocal
    i = torch.arange(256, dtype=torch.float64, device=x.device)
    lut = torch.trunc(i * scale + -lo * scale).clamp(0, 255)  # (B, C, 256)
    lut = torch.where(hi > lo, lut, i)
    return _apply_lut(x, lut)


def equalize(x: torch.Tensor, v: torch.Tensor | None = None) -> torch.Tensor:
    """Histogram equalisation per channel (``ImageOps.equalize``): step = (N − count of the top
    level) // 255, table ``(step // 2 + pixels below i) // step``; identity when step is 0."""
    h = _histogram(x)  # (B, C, 256)
    levels = torch.arange(256, device=x.device)
    top = torch.where(h > 0, levels, -1).amax(2, keepdim=True)  # (B, C, 1) highest level present
    step = (h.sum(2, keepdim=True) - h.gather(2, top)) // 255
    below = h.cumsum(2) - h  # pixels at levels < i
    lut = (step // 2 + below) // step.clamp(min=1)
    lut = torch.where(step > 0, lut, levels).clamp(0, 255)
    return _apply_lut(x, lut)


def posterize(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Keep the top ``max(1, int(v))`` bits of every value (``ImageOps.posterize``)."""
    bits = v.long().clamp(min=1)  # int() of a positive float truncates
    mask = (~((1 << (8 - bits)) - 1)) & 255  # (b,)
    return x & mask.to(torch.uint8).view(-1, 1, 1, 1)


def solarize(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Invert every value at or above the threshold ``v`` (``ImageOps.solarize``)."""
    return torch.where(x.double() < v.view(-1, 1, 1, 1), x, 255 - x)


def _luma(x: torch.Tensor) -> torch.Tensor:
    """Pillow's RGB -> L: (19595 R + 38470 G + 7471 B + 2¹⁵) >> 16, (B, 1, H, W) int64."""
    r, g, b = x.long().unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).unsqueeze(1)


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Pillow's ``Image.blend(degenerate, x, factor)`` for a factor in [0, 1]: in float32, truncated,
    as its C loop computes ``(UINT8)(in1 + alpha * (in2 - in1))``."""
    a = factor.float().view(-1, 1, 1, 1)
    d = degenerate.float()
    return (d + a * (x.float() - d)).trunc().clamp(0, 255).to(torch.uint8)


def brightness(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Blend with black (``ImageEnhance.Brightness``)."""
    return _blend(torch.zeros_like(x), x, v)


def color(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Blend with the image's grey version (``ImageEnhance.Color``)."""
    return _blend(_luma(x).expand_as(x), x, v)


def contrast(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Blend with the image's mean grey level, rounded half up (``ImageEnhance.Contrast``)."""
    mean = _luma(x).double().mean((1, 2, 3))  # (b,)
    grey = torch.floor(mean + 0.5).long().view(-1, 1, 1, 1)
    return _blend(grey.expand_as(x), x, v)


# Pillow's SMOOTH kernel, by rows, each weight already divided by the kernel's sum (13) in float32
_SMOOTH = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], dtype=torch.float32) / 13


def _smooth(x: torch.Tensor) -> torch.Tensor:
    """``ImageFilter.SMOOTH``: the 3x3 kernel on the interior, summed row by row as Pillow's C loop
    does (row below, own row, row above; left to right), rounded half up; the border rows and
    columns kept."""
    f = x.float()
    k = _SMOOTH.to(x.device)
    H, W = x.shape[2:]
    acc = torch.zeros_like(f[:, :, 1:-1, 1:-1])  # (B, C, H-2, W-2)
    for r, dy in enumerate((1, 0, -1)):
        rows = f[:, :, 1 + dy : H - 1 + dy]
        line = rows[..., 0 : W - 2] * k[r, 0] + rows[..., 1 : W - 1] * k[r, 1] + rows[..., 2:W] * k[r, 2]
        acc = acc + line
    out = x.clone()
    out[:, :, 1:-1, 1:-1] = (acc + 0.5).floor().clamp(0, 255).to(torch.uint8)
    return out


def sharpness(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Blend with the smoothed image (``ImageEnhance.Sharpness``; factors below 1 blur)."""
    return _blend(_smooth(x), x, v)


# ----------------------------------------------------------------------------- geometric ops (affine, nearest)


def _affine(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Pillow's ``Image.transform(size, AFFINE, m)`` with nearest sampling and black fill, each image
    by its own row ``m = (a, b, c, d, e, f)`` (b, 6) float64: output pixel (x, y) reads the input at
    ``(a(x+½) + b(y+½) + c, d(x+½) + e(y+½) + f)``. Pillow steps through the pixels in 16.16 fixed
    point (each coefficient and the origin rounded to 1/65536, the sum floored), which decides the
    pixels whose source lands near an integer: so does this. (Pure translations Pillow samples in floating
    point; the two could differ only for a source within 2⁻¹⁶ of a pixel edge, and the tests found none.)"""
    B, C, H, W = x.shape
    fix = torch.floor(m * 65536.0 + 0.5).long()  # (B, 6) the coefficients in fixed point
    ox = torch.floor((m[:, 2] + m[:, 1] * 0.5 + m[:, 0] * 0.5) * 65536.0 + 0.5).long()  # (B,)
    oy = torch.floor((m[:, 5] + m[:, 4] * 0.5 + m[:, 3] * 0.5) * 65536.0 + 0.5).long()
    ys = torch.arange(H, device=x.device).view(1, H, 1)
    xs = torch.arange(W, device=x.device).view(1, 1, W)
    v = lambda t: t.view(B, 1, 1)  # noqa: E731
    sx = (v(ox) + v(fix[:, 0]) * xs + v(fix[:, 1]) * ys) >> 16  # (B, H, W)
    sy = (v(oy) + v(fix[:, 3]) * xs + v(fix[:, 4]) * ys) >> 16
    inside = (sx >= 0) & (sx < W) & (sy >= 0) & (sy < H)
    index = (sy.clamp(0, H - 1) * W + sx.clamp(0, W - 1)).view(B, 1, H * W).expand(B, C, H * W)
    out = x.reshape(B, C, H * W).gather(2, index).reshape(B, C, H, W)
    return out * inside.unsqueeze(1)


def _matrix(x: torch.Tensor, a=1.0, b=0.0, c=0.0, d=0.0, e=1.0, f=0.0) -> torch.Tensor:
    cols = [torch.as_tensor(t, dtype=torch.float64, device=x.device).expand(len(x)) for t in (a, b, c, d, e, f)]
    return torch.stack(cols, dim=1)  # (b, 6)


def shear_x(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Affine ``(1, v, 0, 0, 1, 0)``: each row shifted by v times its height."""
    return _affine(x, _matrix(x, b=v))


def shear_y(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Affine ``(1, 0, 0, v, 1, 0)``."""
    return _affine(x, _matrix(x, d=v))


def translate_x(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Shift left by v of the width (affine ``(1, 0, v·W, 0, 1, 0)``)."""
    return _affine(x, _matrix(x, c=v * x.shape[3]))


def translate_y(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Shift up by v of the height."""
    return _affine(x, _matrix(x, f=v * x.shape[2]))


def rotate(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Rotate by v degrees counter-clockwise about the centre (``Image.rotate``: its matrix, its
    cosines and sines rounded to 15 decimals as it does; 0 and 180 degrees by its exact fast paths)."""
    H, W = x.shape[2:]
    rows = []
    for deg in v.tolist():  # the matrix in Python floats, exactly as Pillow builds it
        a = -math.radians(deg % 360.0)
        cos, sin = round(math.cos(a), 15), round(math.sin(a), 15)
        cx, cy = W / 2, H / 2
        rows.append((cos, sin, cos * -cx + sin * -cy + cx, -sin, cos, -sin * -cx + cos * -cy + cy))
    out = _affine(x, torch.tensor(rows, dtype=torch.float64, device=x.device).view(-1, 6))
    angle = v.remainder(360.0).view(-1, 1, 1, 1)
    out = torch.where(angle == 0, x, out)
    return torch.where(angle == 180, x.flip(2, 3), out)


# ----------------------------------------------------------------------------- cutout


def cutout(x: torch.Tensor, side: torch.Tensor, ux: torch.Tensor, uy: torch.Tensor) -> torch.Tensor:
    """The release's ``Cutout``: a square of side ``side`` (fraction of the width) filled with
    ``CUTOUT_FILL``, none when side is 0. Its centre is ``np.random.uniform(w)``, which NumPy reads
    as uniform between w and its default high of 1, so in (1, w]; the corner is
    ``int(max(0, centre − v/2))``, the far corner ``min(w, corner + v)``, both edges included, as
    ``ImageDraw.rectangle`` draws it with the coordinates truncated."""
    B, C, H, W = x.shape
    v = side.double() * W  # (B,)
    x0 = torch.trunc((W + (1 - W) * ux.double() - v / 2).clamp(min=0))
    y0 = torch.trunc((H + (1 - H) * uy.double() - v / 2).clamp(min=0))
    x1, y1 = (
        torch.trunc(torch.minimum(x0 + v, torch.full_like(v, W))),
        torch.trunc(torch.minimum(y0 + v, torch.full_like(v, H))),
    )
    cols = torch.arange(W, device=x.device).view(1, 1, W)
    rows = torch.arange(H, device=x.device).view(1, H, 1)
    box = (
        (cols >= x0.view(B, 1, 1))
        & (cols <= x1.view(B, 1, 1))
        & (rows >= y0.view(B, 1, 1))
        & (rows <= y1.view(B, 1, 1))
    )
    box &= (v > 0).view(B, 1, 1)  # (B, H, W)
    fill = torch.tensor(CUTOUT_FILL[:C], dtype=torch.uint8, device=x.device).view(1, C, 1, 1)
    return torch.where(box.unsqueeze(1), fill, x)


OP_FUNCTIONS = {
    "auto_contrast": auto_contrast,
    "brightness": brightness,
    "color": color,
    "contrast": contrast,
    "equalize": equalize,
    "posterize": posterize,
    "rotate": rotate,
    "sharpness": sharpness,
    "shear_x": shear_x,
    "shear_y": shear_y,
    "solarize": solarize,
    "translate_x": translate_x,
    "translate_y": translate_y,
}

"""MobileNetV2 for 32x32 inputs, the cross-family student of the CIFAR KD benchmarks.

Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018, in the CIFAR
layout that RepDistiller and mdistiller use for their VGG13 -> MobileNetV2 pair (``mobile_half``:
expansion 6, width 0.5): a stride-2 3x3 stem (32 -> 16), seven groups of inverted-residual blocks,
a 1x1 conv to 1,280 channels, global average pooling and one linear head. Architecture as data,
as in ``vgg.py``:

    model = mobilenetv2(num_classes=100, width=0.5)
    logits, feats = model(x, features=True)
    feats["stages"]   # 5 stage outputs: the stem (16x16), then groups 0-1 (16x16), 2 (8x8), 3-4 (4x4), 5-6 (2x2)
    feats["preact"]   # the same before their last nonlinearity (the stem's ReLU); a group ends in a
                      # linear bottleneck, so its output is its own pre-activation, negatives kept
    feats["pooled"]   # (B, 1280) embedding fed to the head

The five stages are where the reference codebases tap this network for feature methods (their
``f0``-``f4``), so a hint, an attention map or a review path sees the same tensors there and here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vgg import init_weights

# (expansion t, output channels c, blocks n, first block's stride s), one row per group
GROUPS: list[tuple[int, int, int, int]] = [
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]
STAGE_GROUPS = [(), (0, 1), (2,), (3, 4), (5, 6)]  # stage 0 is the stem alone
STEM_CHANNELS = 32
LAST_CHANNELS = 1280


def conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out)]


class InvertedResidual(nn.Module):
    """1x1 expansion, 3x3 depthwise (stride s), 1x1 linear projection; identity shortcut where the shapes allow.

    y = x + P(D(E(x))) when s = 1 and c_in = c_out, else P(D(E(x))); E and D end in ReLU (the
    reference codebases' ReLU, not the paper's ReLU6), P has no nonlinearity (the linear bottleneck).
    """

    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int):
        super().__init__()
        hidden = c_in * expansion
        self.residual = stride == 1 and c_in == c_out
        self.conv = nn.Sequential(
            *conv_bn(c_in, hidden, 1),
            nn.ReLU(inplace=True),
            *conv_bn(hidden, hidden, 3, stride, groups=hidden),
            nn.ReLU(inplace=True),
            *conv_bn(hidden, c_out, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


def scale_width(channels: int, width: float) -> int:
    """The reference codebases truncate (``int(c * w)``), so their checkpoints' shapes are these."""
    return max(1, int(channels * width))


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 100, width: float = 1.0, expansion: int = 6):
        super().__init__()
        c = scale_width(STEM_CHANNELS, width)
        stages = [nn.Sequential(*conv_bn(3, c, 3, stride=2))]  # the stem; its ReLU is applied in forward
        for groups in STAGE_GROUPS[1:]:
            blocks = []
            for t, c_out, n, s in (GROUPS[g] for g in groups):
                c_out, t = scale_width(c_out, width), (t if t == 1 else expansion)
                for stride in [s] + [1] * (n - 1):
                    blocks.append(InvertedResidual(c, c_out, stride, t))
                    c = c_out
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        # the reference keeps 1,280 channels below width 1 and widens them above it
        self.embed_dim = int(LAST_CHANNELS * width) if width > 1.0 else LAST_CHANNELS
        self.last = nn.Sequential(*conv_bn(c, self.embed_dim, 1), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(self.embed_dim, num_classes)
        self.num_classes = num_classes
        stem = scale_width(STEM_CHANNELS, width)
        self.stage_channels = [stem] + [scale_width(GROUPS[g[-1]][1], width) for g in STAGE_GROUPS[1:]]
        # input size / feature-map size of each stage on 32x32 inputs: 16, 16, 8, 4, 2
        self.stage_strides = [2, 2, 4, 8, 16]
        init_weights(self)

    def forward(self, x: torch.Tensor, features: bool = False):
        pre = self.stages[0](x)  # (B, C_0, 16, 16)
        x = F.relu(pre)  # not in place: the pre-activation must survive
        stages, preact = [x], [pre]
        for stage in self.stages[1:]:
            x = stage(x)  # ends in a linear bottleneck: no ReLU follows, so stage and pre-activation coincide
            stages.append(x)
            preact.append(x)
        pooled = F.adaptive_avg_pool2d(self.last(x), 1).flatten(1)  # (B, embed_dim)
        logits = self.classifier(pooled)  # (B, num_classes)
        if not features:
            return logits
        return logits, {"stages": stages, "preact": preact, "pooled": pooled}


def mobilenetv2(num_classes: int = 100, width: float = 1.0, expansion: int = 6) -> MobileNetV2:
    """MobileNetV2 for CIFAR; ``width=0.5`` is the reference codebases' ``mobile_half``."""
    return MobileNetV2(num_classes=num_classes, width=width, expansion=expansion)


# ----------------------------------------------------------------------------- the reference codebases' key layout
# RepDistiller's and mdistiller's module names: ``conv1`` (the stem), ``blocks.<group>.<i>`` (one
# Sequential per row of GROUPS), ``conv2`` (the 1x1 conv to 1,280), ``classifier.0`` (the head).


def _block_renames() -> dict[str, str]:
    """``blocks.<g>.<i>.`` -> ``stages.<s>.<j>.``: a stage's blocks are its groups' blocks in order."""
    out = {}
    for s, groups in enumerate(STAGE_GROUPS):
        j = 0
        for g in groups:
            for i in range(GROUPS[g][2]):
                out[f"blocks.{g}.{i}."] = f"stages.{s}.{j}."
                j += 1
    return out


def _renames() -> dict[str, str]:
    return {"conv1.": "stages.0.", "conv2.": "last.", "classifier.0.": "classifier.", **_block_renames()}


def _rename(state: dict, renames: dict[str, str]) -> dict:
    out = {}
    for key, value in state.items():
        old = next((p for p in renames if key.startswith(p)), None)
        out[renames[old] + key[len(old) :] if old else key] = value
    return out


def from_reference_layout(state: dict) -> dict:
    """A RepDistiller/mdistiller MobileNetV2 state dict in this module's key layout (same tensors)."""
    return _rename(state, _renames())


def to_reference_layout(state: dict) -> dict:
    """This module's state dict in RepDistiller/mdistiller's key layout, which their
    ``mobilenetv2_T_w`` (``mobile_half`` at width 0.5) loads."""
    return _rename(state, {new: old for old, new in _renames().items()})


def is_reference_layout(state: dict) -> bool:
    return "conv1.0.weight" in state and any(k.startswith("blocks.") for k in state)


def infer_arch(state: dict) -> dict:
    """Width, expansion and class count of a MobileNetV2 state dict in this layout, read from shapes:
    the last group's 320 x width channels (the stem's 32 x width truncates too coarsely to recover
    the width), the first expanding block's hidden/input ratio, the head's rows."""
    width = state["last.0.weight"].shape[1] / GROUPS[-1][1]
    hidden, c_in = state["stages.1.1.conv.0.weight"].shape[:2]  # group 1's first block: c_in x expansion
    arch = {"name": "mobilenetv2", "num_classes": state["classifier.weight"].shape[0], "width": width}
    return arch if hidden // c_in == 6 else {**arch, "expansion": hidden // c_in}

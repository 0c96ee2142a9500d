"""VGG with batch norm for 32x32 inputs, the family used by the CIFAR KD benchmarks.

Architecture as data: each model is a list of five stages, each a list of conv widths.
Max-pool follows the first three stages (32 -> 16 -> 8 -> 4), stages 4 and 5 both work
at 4x4, then global average pooling and one linear head (Simonyan & Zisserman 2015, in
the CIFAR layout of Tian et al., "Contrastive Representation Distillation", ICLR 2020).

    model = vgg8(num_classes=100)
    logits = model(x)                          # (B, 100)
    logits, feats = model(x, features=True)
    feats["stages"]   # 5 post-ReLU stage outputs, (B, C_i, H_i, W_i)
    feats["preact"]   # the same before their last ReLU
    feats["pooled"]   # (B, C_5) embedding fed to the head

``tv_vgg`` builds the same stages in torchvision's layout, as chenyaofo/pytorch-cifar-models trains
its ``cifar10/100_vgg*_bn``: a max-pool after all five stages (32 -> 1) and a 512-512-K head
with ReLU and dropout; ``model.py`` registers them as ``vgg11_tv`` ... ``vgg19_tv``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

STAGES: dict[str, list[list[int]]] = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}
POOL_AFTER = (0, 1, 2)  # on 32x32 inputs a fourth pool would leave 2x2 maps
TV_POOL_AFTER = (0, 1, 2, 3, 4)  # torchvision's layout pools after every stage: 1x1 maps at the end


def scale_width(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


def make_stage(c_in: int, widths: list[int]) -> nn.Sequential:
    """conv3x3-BN-ReLU blocks; the last ReLU is left to ``forward`` so the pre-activation is kept."""
    layers: list[nn.Module] = []
    for c_out in widths:
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        c_in = c_out
    return nn.Sequential(*layers[:-1])


def mlp_head(c_in: int, hidden: int, num_classes: int) -> nn.Sequential:
    """torchvision's VGG classifier (Linear-ReLU-Dropout twice, then Linear), at CIFAR size."""
    return nn.Sequential(
        nn.Linear(c_in, hidden),
        nn.ReLU(True),
        nn.Dropout(),
        nn.Linear(hidden, hidden),
        nn.ReLU(True),
        nn.Dropout(),
        nn.Linear(hidden, num_classes),
    )


def init_weights(model: nn.Module) -> None:
    """The CIFAR KD codebases' init: He (fan-out) convs, unit BN, small-normal linear layers, zero biases."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


class VGG(nn.Module):
    def __init__(
        self,
        stages: list[list[int]],
        num_classes: int = 100,
        width: float = 1.0,
        pool_after: tuple[int, ...] = POOL_AFTER,
        mlp: bool = False,
    ):
        super().__init__()
        widths = [[scale_width(c, width) for c in stage] for stage in stages]
        self.stage_channels = [stage[-1] for stage in widths]
        self.pool_after = pool_after
        # input size / feature-map size of each stage: 32x32 inputs give 32, 16, 8, 4, 4 (torchvision: ..., 2)
        self.stage_strides = [2 ** sum(p < i for p in pool_after) for i in range(len(widths))]
        self.embed_dim = self.stage_channels[-1]
        self.num_classes = num_classes
        c_in = 3
        blocks = []
        for stage in widths:
            blocks.append(make_stage(c_in, stage))
            c_in = stage[-1]
        self.stages = nn.ModuleList(blocks)
        self.pool = nn.MaxPool2d(2)
        if mlp:
            self.classifier = mlp_head(self.embed_dim, scale_width(512, width), num_classes)
        else:
            self.classifier = nn.Linear(self.embed_dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        init_weights(self)

    def forward(self, x: torch.Tensor, features: bool = False):
        stages, preact = [], []
        for i, block in enumerate(self.stages):
            x = block(x)
            preact.append(x)
            x = F.relu(x)  # not in place: the pre-activation above must survive
            stages.append(x)
            if i in self.pool_after:
                x = self.pool(x)
        pooled = F.adaptive_avg_pool2d(x, 1).flatten(1)  # (B, C_5); torchvision layout: the 1x1 map itself
        logits = self.classifier(pooled)  # (B, num_classes)
        if not features:
            return logits
        return logits, {"stages": stages, "preact": preact, "pooled": pooled}


def _vgg(name: str, num_classes: int, width: float) -> VGG:
    return VGG(STAGES[name], num_classes=num_classes, width=width)


def vgg8(num_classes: int = 100, width: float = 1.0) -> VGG:
    """VGG-8 (5 convs): the usual CIFAR KD student."""
    return _vgg("vgg8", num_classes, width)


def vgg11(num_classes: int = 100, width: float = 1.0) -> VGG:
    """VGG-11 with batch norm (8 convs)."""
    return _vgg("vgg11", num_classes, width)


def vgg13(num_classes: int = 100, width: float = 1.0) -> VGG:
    """VGG-13 with batch norm (10 convs): the usual CIFAR KD teacher."""
    return _vgg("vgg13", num_classes, width)


def vgg16(num_classes: int = 100, width: float = 1.0) -> VGG:
    """VGG-16 with batch norm (13 convs)."""
    return _vgg("vgg16", num_classes, width)


def vgg19(num_classes: int = 100, width: float = 1.0) -> VGG:
    """VGG-19 with batch norm (16 convs)."""
    return _vgg("vgg19", num_classes, width)


def tv_vgg(name: str, num_classes: int = 100, width: float = 1.0) -> VGG:
    """``name``'s stages in torchvision's layout (five pools, MLP head), e.g. ``tv_vgg("vgg16")`` is the
    network of chenyaofo/pytorch-cifar-models' ``cifar100_vgg16_bn``."""
    return VGG(STAGES[name], num_classes=num_classes, width=width, pool_after=TV_POOL_AFTER, mlp=True)

"""Knowledge review (Chen et al., CVPR 2021): each student stage, fused with what the deeper stages carry,
is matched to the teacher's stage at several pooling levels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from methods._feature import register_feature
from registry import WARMUP, warmup_check

# The VGG mapping of the authors' release (dvlab-research/ReviewKD CIFAR-100/model/reviewkd.py, ``'vgg'``:
# in_channels [128, 256, 512, 512, 512], shapes [1, 4, 4, 8, 16]): stages 1-4 and the pooled embedding,
# the teacher's stages pre-ReLU (its train.py: ``teacher(..., preact=True)[1:]``; mdistiller ReviewKD.py:
# ``preact_feats[1:]`` + pooled), the student's post-ReLU (mdistiller cfg.py REVIEWKD.STU_PREACT False).
STAGES = (1, 2, 3, 4)
LEVELS = (4, 2, 1)  # HCL's pooling sizes (mdistiller ReviewKD.py ``hcl_loss``)
MAX_MID = 512  # mdistiller cfg.py REVIEWKD.MAX_MID_CHANNEL (ReviewKD.py: min(512, deepest student width))


class ABF(nn.Module):
    """Attention-based fusion (Chen et al. 2021, "Distilling Knowledge via Knowledge Review", Fig. 3).

    x_m = BN(W₁ ∗ x) (1×1 conv to the middle width). With the deeper stage's residual r:
    r' = nearest-resize(r, size of x), (a, b) = sigmoid(W_a ∗ [x_m; r'] + b_a) (two spatial maps), and the
    fused map f = a·x_m + b·r'; without one (the deepest stage) f = x_m. f is resized (nearest) to the
    teacher's map size; it is the residual for the next, shallower stage, and the output is BN(W₃ ∗ f)
    (3×3 conv to the teacher's width).
    """

    def __init__(self, c_in: int, c_mid: int, c_out: int, fuse: bool):
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(c_in, c_mid, 1, bias=False), nn.BatchNorm2d(c_mid))
        self.out = nn.Sequential(nn.Conv2d(c_mid, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out))
        self.attention = nn.Sequential(nn.Conv2d(2 * c_mid, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.reduce[0].weight, a=1)  # as the release
        nn.init.kaiming_uniform_(self.out[0].weight, a=1)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, residual): the teacher-shaped output and the fused map handed to the shallower stage."""
        f = self.reduce(x)  # (B, C_mid, H, W)
        if self.attention is not None:
            r = F.interpolate(residual, size=f.shape[-2:], mode="nearest")  # (B, C_mid, H, W)
            a = self.attention(torch.cat([f, r], dim=1))  # (B, 2, H, W)
            f = f * a[:, :1] + r * a[:, 1:]  # (B, C_mid, H, W)
        if f.shape[-1] != size:
            f = F.interpolate(f, size=(size, size), mode="nearest")  # (B, C_mid, H_t, W_t)
        return self.out(f), f  # (B, C_t, H_t, W_t), (B, C_mid, H_t, W_t)


def hcl(fs: torch.Tensor, ft: torch.Tensor, levels: tuple[int, ...] = LEVELS) -> torch.Tensor:
    """Hierarchical context loss (Chen et al. 2021) between two maps of one shape (B, C, H, H).

    HCL = (MSE(f_s, f_t) + Σ_j 2^−j · MSE(P_l(f_s), P_l(f_t))) / (1 + Σ_j 2^−j), P_l the average pooling to
    l×l for the levels l < H, j = 1, 2, ... counting them in order (4, 2, 1 by default); MSE the mean
    over elements.
    """
    fs, ft = fs.float(), ft.float()
    loss, weight, total = F.mse_loss(fs, ft), 1.0, 1.0
    for level in levels:
        if level >= fs.shape[-1]:
            continue
        weight /= 2
        pooled_s, pooled_t = F.adaptive_avg_pool2d(fs, level), F.adaptive_avg_pool2d(ft, level)  # (B, C, l, l)
        loss = loss + weight * F.mse_loss(pooled_s, pooled_t)
        total += weight
    return loss / total


class ReviewKDLoss(nn.Module):
    """Knowledge review (Chen et al., CVPR 2021, "Distilling Knowledge via Knowledge Review").

    The student's features F_s^1..F_s^n (stages 1-4 post-ReLU and the pooled embedding as a 1×1 map) are
    reviewed from the deepest: ABF_n(F_s^n) gives the output O_n and a residual, and each shallower stage is
    fused with the residual of the one below, (O_k, R_k) = ABF_k(F_s^k, R_{k+1}) (``ABF``). The loss is
    L = min((epoch + 1) / warm-up, 1) · Σ_k w_k · HCL(O_k, F_t^k) (``hcl``), F_t^k the teacher's stages
    pre-ReLU and its pooled embedding, each O_k shaped as F_t^k. Released recipe (mdistiller
    ``mdistiller/distillers/ReviewKD.py`` on ``engine/cfg.py``): CE 1, ReviewKD weight 1, 20 warm-up epochs
    (of 240; mdistiller's epochs count from 1, so epoch e of this 0-based loop weighs (e + 1)/20),
    middle width min(512, the student's embedding width), HCL levels 4, 2, 1, stage weights w_k = 1.
    """

    def __init__(
        self,
        s_channels: list[int],
        t_channels: list[int],
        warmup: float = 20.0,
        levels: tuple[int, ...] = LEVELS,
        stage_weights: tuple[float, ...] | None = None,
        max_mid: int = MAX_MID,
    ):
        super().__init__()
        n, mid = len(s_channels), min(max_mid, s_channels[-1])
        pairs = enumerate(zip(s_channels, t_channels, strict=True))
        self.abfs = nn.ModuleList(ABF(c_s, mid, c_t, fuse=k < n - 1) for k, (c_s, c_t) in pairs)  # deepest: no fusion
        self.levels, self.warmup = levels, warmup
        self.stage_weights = (1.0,) * n if stage_weights is None else tuple(stage_weights)
        if len(self.stage_weights) != n:
            raise ValueError(f"ReviewKD reviews {n} features; got {len(self.stage_weights)} stage weights")
        self.ramp = 1.0 if not warmup else min(1 / warmup, 1.0)

    @classmethod
    def between(cls, student: nn.Module, teacher: nn.Module, warmup: float = 20.0, **kwargs) -> ReviewKDLoss:
        for who, model in (("student", student), ("teacher", teacher)):
            if len(getattr(model, "stage_channels", ())) <= max(STAGES):
                raise ValueError(
                    f"ReviewKD reviews stages 1-4 and the pooled embedding; the {who} ({type(model).__name__}) does "
                    "not declare five stages (model.stage_channels): use the registered VGGs, or another method"
                )
        s_channels = [student.stage_channels[k] for k in STAGES] + [student.embed_dim]
        t_channels = [teacher.stage_channels[k] for k in STAGES] + [teacher.embed_dim]
        return cls(s_channels, t_channels, warmup, **kwargs)

    def set_epoch(self, epoch: int) -> None:
        self.ramp = 1.0 if not self.warmup else min((epoch + 1) / self.warmup, 1.0)

    @staticmethod
    def features(feats: dict, key: str) -> list[torch.Tensor]:
        """Stages 1-4 (``key``: "stages" or "preact") and the pooled embedding as a 1×1 map, shallow to deep."""
        return [feats[key][k] for k in STAGES] + [feats["pooled"][:, :, None, None]]  # ..., (B, C, 1, 1)

    def review(self, s_maps: list[torch.Tensor], sizes: list[int]) -> list[torch.Tensor]:
        """The ABF outputs O_1..O_n, shallow to deep, O_k of size ``sizes[k]``."""
        outputs, residual = [None] * len(s_maps), None
        for k in reversed(range(len(s_maps))):
            outputs[k], residual = self.abfs[k](s_maps[k], residual, sizes[k])
        return outputs

    def forward(self, s_feats: dict, t_feats: dict, **_) -> torch.Tensor:
        targets = [t.float() for t in self.features(t_feats, "preact")]
        outputs = self.review(self.features(s_feats, "stages"), [t.shape[-1] for t in targets])
        terms = [w * hcl(o, t, self.levels) for w, o, t in zip(self.stage_weights, outputs, targets, strict=True)]
        return self.ramp * sum(terms)


check_reviewkd = warmup_check("ReviewKD")


def build_review(cfg, student: nn.Module, teacher: nn.Module, **_) -> ReviewKDLoss:
    return ReviewKDLoss.between(student, teacher, cfg.warmup)


register_feature(
    "reviewkd",
    build_review,
    1.0,
    "Chen et al. 2021; mdistiller mdistiller/distillers/ReviewKD.py and engine/cfg.py (REVIEWKD: CE_WEIGHT 1, "
    "REVIEWKD_WEIGHT 1, WARMUP_EPOCHS 20, MAX_MID_CHANNEL 512, STU_PREACT False; HCL levels 4, 2, 1); VGG "
    "stages and shapes from dvlab-research/ReviewKD CIFAR-100/model/reviewkd.py",
    params=(WARMUP,),
    benchmark="",
    check=check_reviewkd,
    warmup=20.0,
)

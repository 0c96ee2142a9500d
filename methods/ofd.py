"""Overhaul of feature distillation (Heo et al., ICCV 2019): pre-ReLU teacher features through a margin ReLU,
matched by a connector on the student's pre-ReLU features under a partial L2."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from methods._feature import register_feature

# mdistiller OFD.py distils ``preact_feats[1:]`` of both networks with the teacher's ``get_bn_before_relu()``,
# which for its VGGs is the last batch norm of blocks 1-4: stages 1-4 here.
STAGES = (1, 2, 3, 4)
RARE = 0.001  # below this share of negative responses the release takes the margin as −3σ


def negative_mean(gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Per channel, the margin m = E[x | x < 0] for x ~ N(β, γ²): what a batch norm γ·x̂ + β gives
    when x̂ is standard normal (the paper's assumption), from its affine parameters alone.

    m = β − |γ|·φ(β/|γ|) / Φ(−β/|γ|), φ and Φ the standard normal density and distribution; where
    Φ(−β/|γ|) ≤ 0.001 (almost no negative responses) m = −3|γ| (the release's choice); where γ = 0 the
    channel is the constant β and m = min(β, 0).
    """
    s, mu = gamma.detach().double().abs(), beta.detach().double()  # (C,), (C,)
    z = mu / s.clamp_min(1e-300)  # (C,)
    below = torch.special.ndtr(-z)  # (C,) Φ(−β/|γ|), the share of negative responses
    density = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)  # (C,) φ(β/|γ|)
    m = torch.where(below > RARE, mu - s * density / below.clamp_min(RARE), -3 * s)  # (C,)
    return torch.where(s > 0, m, mu.clamp(max=0)).float()


def preact_batchnorm(model: nn.Module, stage: int) -> nn.BatchNorm2d:
    """The batch norm whose output is ``model``'s stage ``stage`` pre-activation: the stage's last layer."""
    stages = getattr(model, "stages", None)
    if stages is None or stage >= len(stages):
        raise ValueError(
            f"OFD reads the teacher's stages 1-4 (model.stages), which {type(model).__name__} does not have: "
            "use one of the registered VGGs as the teacher, or another method"
        )
    leaves = [m for m in stages[stage].modules() if next(m.children(), None) is None]
    if not leaves or not isinstance(leaves[-1], nn.BatchNorm2d):
        last = type(leaves[-1]).__name__ if leaves else "nothing"
        raise ValueError(
            f"OFD takes its margins from the batch norm that produces each teacher stage's pre-activation, but "
            f"stage {stage} of the teacher ({type(model).__name__}) ends with {last}: use a teacher with batch norm "
            "before each stage's last ReLU (every registered VGG), or another method"
        )
    return leaves[-1]


def connector(c_s: int, c_t: int, kernel_size: int = 1) -> nn.Sequential:
    """The student's connector r: conv (no bias, He init on fan-out) + BN, student width to teacher width."""
    conv = nn.Conv2d(c_s, c_t, kernel_size, padding=(kernel_size - 1) // 2, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return nn.Sequential(conv, nn.BatchNorm2d(c_t))


def partial_l2(s: torch.Tensor, t: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """d_p(σ_m(t), s) summed over channels and positions, averaged over the batch.

    σ_m(t) = max(t, m) (the margin ReLU, m per channel); d_p(T, S) = Σ_i (T_i − S_i)² except where
    S_i ≤ T_i ≤ 0: a student already below a negative target is not pushed up.
    """
    target = torch.maximum(t, margin)  # (B, C, H, W)
    s = s.float()
    counted = (s > target) | (target > 0)  # (B, C, H, W)
    return ((s - target).pow(2) * counted).sum() / s.shape[0]


class OFDLoss(nn.Module):
    """Overhaul of feature distillation (Heo et al., ICCV 2019, "A Comprehensive Overhaul of Feature Distillation").

    L = Σ_k d_p(σ_m(F_t^k), r_k(F_s^k)) / 2^(n−1−i(k)) over the stages k = 1-4 (i(k) = 0..n−1, so the
    deepest stage weighs 1, each shallower one half the next), F the pre-ReLU stage outputs, r_k the
    connector (1×1 conv + BN), σ_m the margin ReLU with the teacher's per-channel margin m = E[F_t | F_t < 0]
    from its batch norm (``negative_mean``), d_p the partial L2 (``partial_l2``). The teacher map is
    average-pooled to the student's size where they differ (a smaller one, as the torchvision layout's 2×2
    stage 4, is repeated). Released recipe (mdistiller ``mdistiller/distillers/OFD.py``, ``engine/cfg.py``;
    clovaai/overhaul-distillation ``CIFAR-100/distiller.py``, ``train_with_distillation.py``): CE 1,
    β 0.001, 1×1 connector, stages 1-4 of the VGGs, loss summed over C·H·W and averaged over the batch.
    """

    def __init__(
        self,
        s_channels: list[int],
        t_channels: list[int],
        margins: list[torch.Tensor],
        stages: tuple[int, ...] = STAGES,
        kernel_size: int = 1,
    ):
        super().__init__()
        self.stages = stages
        pairs = zip(s_channels, t_channels, strict=True)
        self.connectors = nn.ModuleList(connector(c_s, c_t, kernel_size) for c_s, c_t in pairs)
        for k, m in zip(stages, margins, strict=True):  # fixed by the frozen teacher: rebuilt, never checkpointed
            self.register_buffer(f"margin{k}", m.view(1, -1, 1, 1), persistent=False)  # (1, C_t, 1, 1)

    @classmethod
    def between(cls, student: nn.Module, teacher: nn.Module, stages: tuple[int, ...] = STAGES, kernel_size: int = 1):
        margins = [negative_mean(bn.weight, bn.bias) for bn in (preact_batchnorm(teacher, k) for k in stages)]
        s_channels = [student.stage_channels[k] for k in stages]
        t_channels = [teacher.stage_channels[k] for k in stages]
        return cls(s_channels, t_channels, margins, stages, kernel_size)

    def forward(self, s_feats: dict, t_feats: dict, **_) -> torch.Tensor:
        n, total = len(self.stages), 0.0
        for i, (k, connect) in enumerate(zip(self.stages, self.connectors, strict=True)):
            s = connect(s_feats["preact"][k])  # (B, C_t, H_s, W_s)
            t = F.adaptive_avg_pool2d(t_feats["preact"][k].float(), s.shape[-2:])  # (B, C_t, H_s, W_s)
            total = total + partial_l2(s, t, getattr(self, f"margin{k}")) / 2 ** (n - 1 - i)
        return total


def build_ofd(cfg, student: nn.Module, teacher: nn.Module, **_) -> OFDLoss:
    return OFDLoss.between(student, teacher)


register_feature(
    "ofd",
    build_ofd,
    0.001,
    "Heo et al. 2019; mdistiller mdistiller/distillers/OFD.py and engine/cfg.py (OFD.LOSS: CE_WEIGHT 1, "
    "FEAT_WEIGHT 0.001; CONNECTOR.KERNEL_SIZE 1; stages 1-4 of its VGGs), as clovaai/overhaul-distillation "
    "CIFAR-100/train_with_distillation.py (loss summed, / batch / 1000)",
    benchmark="",  # not in RepDistiller's benchmark: β is mdistiller's
)

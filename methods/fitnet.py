"""FitNets (Romero et al., ICLR 2015): a regressor maps a student stage onto the teacher's (the hint).

Registered as ``fitnet`` and ``fitnet+kd`` (one stage, trained with the rest of the student), and
``fitnet_stage1`` (the paper's first stage: the hint alone; stage 2 is any run with ``init_from``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from methods._feature import register_feature
from registry import Param, register_method


def _stage(name: str, value) -> None:
    if not 0 <= value < 5:
        raise ValueError(f"{name}={value}: the VGGs have stages 0-4 (the benchmark's hint is stage 2)")


HINT_STAGE = Param("hint_stage", int, "FitNets: the stage whose output is the hint", default=2, check=_stage)

INPUT_SIZE = 32


class ConvReg(nn.Module):
    """The FitNets regressor: conv + BN + ReLU from a student map onto a teacher map.

    The convolution is chosen from the two shapes: 1x1 for equal sizes, 3x3 stride 2 when the
    student map is twice the teacher's, a 4x4 stride-2 transposed conv when it is half, and a
    (1 + H_s - H_t) kernel otherwise (any student map larger than the teacher's).
    """

    def __init__(self, c_s: int, c_t: int, h_s: int, h_t: int):
        super().__init__()
        if h_s == h_t:
            conv = nn.Conv2d(c_s, c_t, 1)
        elif h_s == 2 * h_t:
            conv = nn.Conv2d(c_s, c_t, 3, stride=2, padding=1)
        elif 2 * h_s == h_t:
            conv = nn.ConvTranspose2d(c_s, c_t, 4, stride=2, padding=1)
        elif h_s > h_t:
            conv = nn.Conv2d(c_s, c_t, 1 + h_s - h_t)
        else:
            raise ValueError(f"no regressor from a {h_s}x{h_s} student map to a {h_t}x{h_t} teacher map")
        self.body = nn.Sequential(conv, nn.BatchNorm2d(c_t), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)  # (B, C_t, H_t, W_t)


def stage_shape(model: nn.Module, stage: int) -> tuple[int, int]:
    """(channels, height) of a stage's output for 32x32 inputs, from the model's declaration."""
    return model.stage_channels[stage], INPUT_SIZE // model.stage_strides[stage]


class HintLoss(nn.Module):
    """FitNets hints (Romero et al., ICLR 2015): L = mean over elements of (r(F_s^(k)) - F_t^(k))².

    F^(k) is the post-ReLU output of stage k; r is the regressor (``ConvReg`` by default).
    """

    def __init__(self, regressor: nn.Module, s_stage: int, t_stage: int | None = None):
        super().__init__()
        self.regressor = regressor
        self.s_stage, self.t_stage = s_stage, s_stage if t_stage is None else t_stage

    @classmethod
    def between(cls, student: nn.Module, teacher: nn.Module, s_stage: int, t_stage: int | None = None):
        t_stage = s_stage if t_stage is None else t_stage
        (c_s, h_s), (c_t, h_t) = stage_shape(student, s_stage), stage_shape(teacher, t_stage)
        return cls(ConvReg(c_s, c_t, h_s, h_t), s_stage, t_stage)

    def forward(self, s_feats: dict, t_feats: dict, **_) -> torch.Tensor:
        guided = self.regressor(s_feats["stages"][self.s_stage])  # (B, C_t, H_t, W_t)
        return F.mse_loss(guided, t_feats["stages"][self.t_stage].float())


class HintPretrain(nn.Module):
    """Stage 1 of the FitNets schedule (Romero et al. 2015): only the hint term.

    Freezes (``requires_grad=False``) every student parameter after the hint stage, so the one
    loop's optimizer holds just the stages up to the hint layer and the regressor. Stage 2 is
    a normal run (``kd`` or ``fitnet+kd``) started from this run's weights (``init_from``).
    """

    def __init__(self, hint: HintLoss, student: nn.Module):
        super().__init__()
        self.hint = hint
        student.requires_grad_(False)  # the head, and whatever else follows the stages (MobileNetV2's last conv)
        for stage in student.stages[: hint.s_stage + 1]:
            stage.requires_grad_(True)

    def forward(self, logits_s, logits_t, target, s_feats=None, t_feats=None, **_) -> dict[str, torch.Tensor]:
        return {"hint": self.hint(s_feats, t_feats)}


def build_hint(cfg, student: nn.Module, teacher: nn.Module, **_) -> HintLoss:
    return HintLoss.between(student, teacher, cfg.hint_stage)


register_feature("fitnet", build_hint, 100.0, "Romero et al. 2015", params=(HINT_STAGE,))


@register_method(
    "fitnet_stage1",
    source="Romero et al. 2015, stage 1: the hint term alone",
    params=(HINT_STAGE,),
    needs_features=True,
)
def build_stage1(cfg, student: nn.Module, teacher: nn.Module, **_) -> HintPretrain:
    return HintPretrain(HintLoss.between(student, teacher, cfg.hint_stage), student)

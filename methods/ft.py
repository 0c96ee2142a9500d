"""Factor transfer (Kim et al., NeurIPS 2018): match the teacher's paraphrased factor with a translated student's.

Registered as ``ft`` and ``ft+kd``, with the release's init stage (``methods/_init_stage.py``): the
paraphraser is first trained alone to reconstruct the teacher's last stage map, then frozen while the
student and its translator train on CE + β·L_FT.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from methods._init_stage import register_with_init
from registry import Param, positive


def _block(c_in: int, c_out: int, bn: bool, transposed: bool = False) -> list[nn.Module]:
    """A size-keeping 3x3 (transposed) convolution, batch norm if ``bn``, LeakyReLU(0.1)."""
    conv = (nn.ConvTranspose2d if transposed else nn.Conv2d)(c_in, c_out, 3, padding=1)
    return [conv, *([nn.BatchNorm2d(c_out)] if bn else []), nn.LeakyReLU(0.1)]


def factor_channels(c_t: int, rate: float) -> int:
    c_f = int(c_t * rate)
    if c_f < 1:
        raise ValueError(
            f"FT's paraphrase rate {rate:g} leaves no factor channel of the teacher's {c_t}: raise --ft-rate "
            f"to at least {1 / c_t:g}"
        )
    return c_f


class Paraphraser(nn.Module):
    """FT's paraphraser: an autoencoder of the teacher's map T (C_t channels).

    encoder: C_t → C_t → k·C_t → k·C_t, decoder: k·C_t → k·C_t → C_t → C_t, each a 3x3 (transposed
    for the decoder) convolution and LeakyReLU(0.1), no batch norm (RepDistiller ``models/util.py``);
    k is the paraphrase rate. The factor is the encoder's output F_T = enc(T).
    """

    def __init__(self, c_t: int, rate: float = 0.5):
        super().__init__()
        c_f = factor_channels(c_t, rate)
        self.encoder = nn.Sequential(*_block(c_t, c_t, False), *_block(c_t, c_f, False), *_block(c_f, c_f, False))
        self.decoder = nn.Sequential(
            *_block(c_f, c_f, False, True), *_block(c_f, c_t, False, True), *_block(c_t, c_t, False, True)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(t))  # (B, C_t, H, W)


class Translator(nn.Module):
    """FT's translator: the student's map S (C_s channels) to a factor F_S = tr(S) of the teacher's
    factor channels: C_s → C_s → k·C_t → k·C_t, 3x3 convolutions with batch norm and LeakyReLU(0.1)."""

    def __init__(self, c_s: int, c_t: int, rate: float = 0.5):
        super().__init__()
        c_f = factor_channels(c_t, rate)
        self.encoder = nn.Sequential(*_block(c_s, c_s, True), *_block(c_s, c_f, True), *_block(c_f, c_f, True))

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return self.encoder(s)  # (B, k·C_t, H, W)


def factor_map(f: torch.Tensor) -> torch.Tensor:
    """φ(F): the per-sample L2-normalised spatial energy mean_c F², (B, H*W)."""
    return F.normalize(f.float().pow(2).mean(dim=1).flatten(1), dim=1)


class FTLoss(nn.Module):
    """Factor transfer (Kim et al., NeurIPS 2018, "Paraphrasing Complex Network").

    On the last stage's outputs (post-ReLU): init stage, the paraphraser alone,
    L_init = mean (P(T) − T)² (reconstruction); main stage, with the paraphraser frozen,
    L_FT = mean_{b,hw} |φ(F_S) − φ(F_T)|^p, F_T = enc(T), F_S = tr(S), p = 1, where the larger factor
    is average-pooled to the smaller one's size. The paper normalises the whole C·H·W factor
    vector; RepDistiller's ``distiller_zoo/FT.py``, whose β 200 we take, first reduces it to its
    spatial energy φ (as attention transfer does), which we follow.
    """

    def __init__(self, paraphraser: Paraphraser, translator: Translator, p: int = 1, stage: int = 4):
        super().__init__()
        self.paraphraser, self.translator, self.p, self.stage = paraphraser, translator, p, stage

    @classmethod
    def between(cls, student: nn.Module, teacher: nn.Module, rate: float = 0.5, p: int = 1, stage: int = 4):
        c_s, c_t = student.stage_channels[stage], teacher.stage_channels[stage]
        return cls(Paraphraser(c_t, rate), Translator(c_s, c_t, rate), p, stage)

    def forward(self, s_feats: dict, t_feats: dict, **_) -> torch.Tensor:
        f_s = self.translator(s_feats["stages"][self.stage])  # (B, k·C_t, H_s, W_s)
        with torch.no_grad():  # frozen after its init stage: no gradient, so the optimiser leaves it
            f_t = self.paraphraser.encoder(t_feats["stages"][self.stage].float())  # (B, k·C_t, H_t, W_t)
        size = min(f_s.shape[-2], f_t.shape[-2]), min(f_s.shape[-1], f_t.shape[-1])
        f_s, f_t = F.adaptive_avg_pool2d(f_s, size), F.adaptive_avg_pool2d(f_t, size)
        return (factor_map(f_s) - factor_map(f_t)).abs().pow(self.p).mean()

    def init_loss(self, s_feats: dict, t_feats: dict) -> torch.Tensor:
        t = t_feats["stages"][self.stage].float()  # (B, C_t, H_t, W_t)
        return F.mse_loss(self.paraphraser(t).float(), t)


def _norm(name: str, value) -> None:
    if value not in (1, 2):
        raise ValueError(f"{name} is the norm between the factors: 1 (the release) or 2, got {value}")


PARAMS = (
    Param("ft_rate", float, "FT: paraphrase rate k, factor channels over the teacher's", check=positive),
    Param("ft_p", int, "FT: the norm between the normalised factors, 1 or 2", check=_norm),
)


def build_ft(cfg, student: nn.Module, teacher: nn.Module, **_) -> FTLoss:
    return FTLoss.between(student, teacher, cfg.ft_rate, cfg.ft_p)


register_with_init(
    "ft",
    build_ft,
    200.0,
    "Kim et al. 2018; RepDistiller distiller_zoo/FT.py (p1 2, p2 1) and models/util.py Paraphraser/Translator "
    "(k 0.5, last stage map); train_student.py: the paraphraser alone in the init stage (nn.MSELoss), "
    "frozen after it, the translator trained with the student",
    params=PARAMS,
    ft_rate=0.5,
    ft_p=1,
)

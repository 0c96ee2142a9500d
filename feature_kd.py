"""Feature distillation: losses on intermediate representations, each a small module.

Every method is registered with train_kd's method registry under its name (``fitnet``,
``at``, ``sp``, ``pkt``) and with Hinton's KD term added (``fitnet+kd``, ...):

    python train_kd.py --profile cpu --teacher runs/<teacher> --method at
    python train_kd.py --profile cpu --teacher runs/<teacher> --method fitnet+kd --hint-stage 2

Without KD the loss is w_ce·CE + β·feature term, with KD w_ce·CE + w_kd·T²·KL + β·feature term.
Unset weights take each method's published recipe (``DEFAULT_BETA``: the CIFAR-100 benchmark of
Tian et al., ICLR 2020, with CE 1; ``+kd``: CE 1, KD 1, T 4 as RepDistiller combines them);
``--feat-weight``, ``--ce-weight``, ``--kd-weight``, ``--T`` override them. Adapters (the FitNets
regressor) are submodules of the loss, so the one training loop optimises and checkpoints them
with the student; the teacher is never optimised.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from train_eval import Config, register_method
from train_kd import KDLoss

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


def attention_map(f: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Spatial attention of a feature map: the per-sample L2-normalised mean_c |F|^p, (B, H*W)."""
    return F.normalize(f.float().abs().pow(p).mean(dim=1).flatten(1), dim=1)


class ATLoss(nn.Module):
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017).

    L = Σ_k mean_{b, hw} (a(F_s^(k)) - a(F_t^(k)))², a(F) = normalise(mean_c |F|^p), p = 2, over
    stages 1-4 by default; the larger map is average-pooled when the two sizes differ.
    """

    def __init__(self, stages: tuple[int, ...] = (1, 2, 3, 4), p: float = 2.0):
        super().__init__()
        self.stages, self.p = stages, p

    def forward(self, s_feats: dict, t_feats: dict, **_) -> torch.Tensor:
        total = 0.0
        for k in self.stages:
            fs, ft = s_feats["stages"][k], t_feats["stages"][k]
            size = min(fs.shape[-1], ft.shape[-1])
            fs, ft = F.adaptive_avg_pool2d(fs, size), F.adaptive_avg_pool2d(ft, size)
            total = total + (attention_map(fs, self.p) - attention_map(ft, self.p)).pow(2).mean()
        return total


def batch_similarity(f: torch.Tensor) -> torch.Tensor:
    """Row-normalised Gram matrix of a batch's flattened features, (B, B)."""
    flat = f.float().flatten(1)  # (B, C*H*W)
    return F.normalize(flat @ flat.t(), dim=1)


class SPLoss(nn.Module):
    """Similarity-preserving KD (Tung & Mori, ICCV 2019).

    L = ‖G_s - G_t‖²_F / B², G = row-normalised F Fᵀ over the batch, on the last stage's output:
    the student must find the same images alike that the teacher does, whatever its width.
    """

    def __init__(self, stage: int = -1):
        super().__init__()
        self.stage = stage

    def forward(self, s_feats: dict, t_feats: dict, **_) -> torch.Tensor:
        g_s = batch_similarity(s_feats["stages"][self.stage])  # (B, B)
        g_t = batch_similarity(t_feats["stages"][self.stage])  # (B, B)
        return (g_s - g_t).pow(2).sum() / g_s.shape[0] ** 2


def cosine_kernel(f: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Conditional probabilities P[i, j] ∝ (cos(f_i, f_j) + 1) / 2 within a batch, (B, B)."""
    f = F.normalize(f.float(), dim=1, eps=eps)
    k = (f @ f.t() + 1) / 2
    return k / k.sum(dim=1, keepdim=True)


class PKTLoss(nn.Module):
    """Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018).

    L = mean_{i,j} P_t[i,j] · log(P_t[i,j] / P_s[i,j]), with P the cosine-similarity kernel of
    the pooled embeddings normalised per row (the mean over all B² entries, as the benchmark).
    """

    def __init__(self, eps: float = 1e-7):
        super().__init__()
        self.eps = eps

    def forward(self, s_feats: dict, t_feats: dict, **_) -> torch.Tensor:
        p_s = cosine_kernel(s_feats["pooled"], self.eps)  # (B, B)
        p_t = cosine_kernel(t_feats["pooled"], self.eps)  # (B, B)
        return (p_t * torch.log((p_t + self.eps) / (p_s + self.eps))).mean()


def pairwise_distances(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Euclidean distances between the rows of a batch, (B, B), zero on the diagonal."""
    sq = e.pow(2).sum(1)  # (B,)
    d2 = (sq[:, None] + sq[None, :] - 2 * e @ e.t()).clamp(min=eps)  # (B, B)
    return d2.sqrt() * (1 - torch.eye(len(e), device=e.device, dtype=e.dtype))


def triplet_angles(e: torch.Tensor) -> torch.Tensor:
    """cos ∠(e_i, e_j, e_k) for every triplet: <(e_i − e_j)/‖·‖, (e_k − e_j)/‖·‖>, flattened (B³,)."""
    diff = F.normalize(e[None, :, :] - e[:, None, :], p=2, dim=2)  # (B, B, D): [j, i] = e_i − e_j, unit
    return torch.bmm(diff, diff.transpose(1, 2)).flatten()  # [j, i, k]


class RKDLoss(nn.Module):
    """Relational KD (Park et al., CVPR 2019): match the *relations* between a batch's embeddings.

    L = w_d · Σ smooth_l1(ψ_D(s_i, s_j), ψ_D(t_i, t_j)) / B² + w_a · Σ smooth_l1(ψ_A(s_i, s_j, s_k), ψ_A(t…)) / B³,
    ψ_D = ‖e_i − e_j‖ / μ with μ the mean distance over pairs i ≠ j of the batch, ψ_A the cosine of the
    angle at e_j (``triplet_angles``), on the pooled embeddings. Released weights (mdistiller
    ``engine/cfg.py``; RepDistiller): w_d = 25, w_a = 50, and the term enters with β = 1, CE 1.
    """

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0):
        super().__init__()
        self.distance_weight, self.angle_weight = distance_weight, angle_weight

    @staticmethod
    def _normalised_distances(e: torch.Tensor) -> torch.Tensor:
        d = pairwise_distances(e)  # (B, B)
        return d / d[d > 0].mean()

    def forward(self, s_feats: dict, t_feats: dict, **_) -> torch.Tensor:
        s, t = s_feats["pooled"].float(), t_feats["pooled"].float()  # (B, D_s), (B, D_t)
        distance = F.smooth_l1_loss(self._normalised_distances(s), self._normalised_distances(t))
        angle = F.smooth_l1_loss(triplet_angles(s), triplet_angles(t))
        return self.distance_weight * distance + self.angle_weight * angle


def nce_loss(scores: torch.Tensor, n_data: int, eps: float = 1e-7) -> torch.Tensor:
    """NCE of CRD: column 0 of ``scores`` (B, K+1) is the positive, the K others noise drawn
    uniformly (P_n = 1/N). L = −(1/B) Σ_b [log h(x⁺) + Σ_k log(1 − h(x_k))], h(x) = x / (x + K·P_n)."""
    k = scores.shape[1] - 1
    noise = k / n_data  # K·P_n
    log_pos = torch.log(scores[:, 0] / (scores[:, 0] + noise + eps))  # (B,)
    log_neg = torch.log(noise / (scores[:, 1:] + noise + eps))  # (B, K)
    return -(log_pos.sum() + log_neg.sum()) / scores.shape[0]


class CRDLoss(nn.Module):
    """Contrastive representation distillation (Tian et al., ICLR 2020).

    Both pooled embeddings go through a trained linear head to ``dim`` and are L2-normalised:
    v_s, v_t. Two memory banks hold one such vector per training image (m_s, m_t, N × dim, updated
    as m[i] ← normalise(μ·m[i] + (1 − μ)·v[i])). For sample i, the student's v_s is scored against
    the teacher bank at i (positive) and at K random indices (negatives), s = exp(<v, m>/τ) / Z,
    and the teacher's v_t against the student bank likewise; Z is fixed on the first batch as
    N × the mean score. L = NCE(student scores) + NCE(teacher scores) (``nce_loss``).
    Released recipe (RepDistiller; mdistiller ``engine/cfg.py``): dim 128, K 16384, τ 0.07, μ 0.5,
    β 0.8 with CE 1. The banks are buffers: checkpointed and resumed with the run.
    """

    needs_index = True

    def __init__(self, s_dim: int, t_dim: int, n_data: int, dim=128, negatives=16384, T=0.07, momentum=0.5):
        super().__init__()
        if negatives >= n_data:
            raise ValueError(
                f"CRD draws {negatives} negatives per sample but the training set holds {n_data} images: "
                f"set crd_negatives below {n_data} (the release draws 16384 of 50,000, about a third)"
            )
        self.embed_s, self.embed_t = nn.Linear(s_dim, dim), nn.Linear(t_dim, dim)
        self.n_data, self.negatives, self.T, self.momentum = n_data, negatives, T, momentum
        bound = 1 / (dim / 3) ** 0.5
        self.register_buffer("memory_s", torch.rand(n_data, dim).mul_(2 * bound).add_(-bound))
        self.register_buffer("memory_t", torch.rand(n_data, dim).mul_(2 * bound).add_(-bound))
        self.register_buffer("Z", torch.full((2,), -1.0))  # normalisers of student, teacher scores; < 0: unset

    def sample(self, index: torch.Tensor) -> torch.Tensor:
        """(B, K+1) memory indices: the sample itself, then K uniform draws (global RNG: resumable)."""
        noise = torch.randint(0, self.n_data, (len(index), self.negatives), device=index.device)
        return torch.cat([index[:, None], noise], 1)

    def scores(self, v_s: torch.Tensor, v_t: torch.Tensor, contrast: torch.Tensor):
        """exp(<v, m>/τ) / Z of each anchor against the other network's bank rows, each (B, K+1)."""
        # Scoring against the whole bank and picking the K+1 scalars is ~25x faster on a CPU than
        # gathering (B, K+1, dim) bank rows (B·(K+1)·dim floats moved twice a step) for the same dot products.
        # The banks are cloned because backward needs them as they were before this step's update.
        s = torch.exp(torch.gather(v_s @ self.memory_t.clone().T, 1, contrast) / self.T)  # (B, N) -> (B, K+1)
        t = torch.exp(torch.gather(v_t @ self.memory_s.clone().T, 1, contrast) / self.T)  # (B, N) -> (B, K+1)
        if self.Z[0] < 0:
            self.Z.copy_(torch.stack([s.mean(), t.mean()]).detach() * self.n_data)
        return s / self.Z[0], t / self.Z[1]

    @torch.no_grad()
    def update(self, v_s: torch.Tensor, v_t: torch.Tensor, index: torch.Tensor) -> None:
        for bank, v in ((self.memory_s, v_s), (self.memory_t, v_t)):
            bank[index] = F.normalize(bank[index] * self.momentum + v.detach() * (1 - self.momentum), dim=1)

    def forward(self, s_feats: dict, t_feats: dict, index: torch.Tensor | None = None, **_) -> torch.Tensor:
        if index is None:
            raise ValueError(
                "CRD needs each batch's sample indices (batch extra 'index'): CifarLoader(with_index=True)"
            )
        v_s = F.normalize(self.embed_s(s_feats["pooled"].float()), dim=1)  # (B, dim)
        v_t = F.normalize(self.embed_t(t_feats["pooled"].float()), dim=1)  # (B, dim)
        score_s, score_t = self.scores(v_s, v_t, self.sample(index))
        loss = nce_loss(score_s, self.n_data) + nce_loss(score_t, self.n_data)
        if self.training:
            self.update(v_s, v_t, index)
        return loss


class FeatureKD(nn.Module):
    """w_ce·CE (or Hinton's KD loss, when ``kd`` is given, with its own weights) plus β times a feature term.

    Returns the weighted terms, e.g. ``{"ce": w_ce·CE, "at": β·L_AT}`` or
    ``{"ce": w_ce·CE, "kd": w_kd·T²·KL, "fitnet": β·L_hint}``.
    """

    needs_features = True

    def __init__(self, name: str, feature: nn.Module, beta: float, kd: KDLoss | None = None, ce_weight: float = 1.0):
        super().__init__()
        self.name, self.feature, self.beta, self.kd, self.ce_weight = name, feature, beta, kd, ce_weight

    @property
    def needs_index(self) -> bool:
        return getattr(self.feature, "needs_index", False)

    def forward(self, logits_s, logits_t, target, s_feats=None, t_feats=None, **extras) -> dict[str, torch.Tensor]:
        if self.kd is not None:
            terms = self.kd(logits_s, logits_t, target)
        else:
            terms = {"ce": self.ce_weight * F.cross_entropy(logits_s, target)}
        terms[self.name] = self.beta * self.feature(s_feats, t_feats, **extras)
        return terms


class HintPretrain(nn.Module):
    """Stage 1 of the FitNets schedule (Romero et al. 2015): only the hint term.

    Freezes (``requires_grad=False``) every student parameter after the hint stage, so the one
    loop's optimizer holds just the stages up to the hint layer and the regressor. Stage 2 is
    a normal run (``kd`` or ``fitnet+kd``) started from this run's weights (``init_from``).
    """

    needs_features = True

    def __init__(self, hint: HintLoss, student: nn.Module):
        super().__init__()
        self.hint = hint
        for i, stage in enumerate(student.stages):
            stage.requires_grad_(i <= hint.s_stage)
        student.classifier.requires_grad_(False)

    def forward(self, logits_s, logits_t, target, s_feats=None, t_feats=None, **_) -> dict[str, torch.Tensor]:
        return {"hint": self.hint(s_feats, t_feats)}


@register_method(
    "fitnet_stage1",
    source="Romero et al. 2015, stage 1: the hint term alone",
    needs_features=True,
    reads=("hint_stage",),
)
def _build_stage1(cfg: Config, student: nn.Module, teacher: nn.Module, **_) -> HintPretrain:
    return HintPretrain(HintLoss.between(student, teacher, cfg.hint_stage), student)


@torch.no_grad()
def stage_outputs(model: nn.Module, loader, n: int = 1000) -> list[torch.Tensor]:
    """The first ``n`` images' stage outputs (post-ReLU), flattened: a list of (n, C*H*W) tensors."""
    model.eval()
    device = next(model.parameters()).device
    chunks, seen = [], 0
    for x, *_ in loader:
        chunks.append([f.flatten(1).float().cpu() for f in model(x.to(device), features=True)[1]["stages"]])
        seen += len(x)
        if seen >= n:
            break
    return [torch.cat(parts)[:n] for parts in zip(*chunks, strict=True)]


# β of each method in the CIFAR-100 benchmark, with CE weight 1 and no KD term: RepDistiller's
# scripts (train_student.py --distill <m> -r 1 -a 0 -b β), the same values in mdistiller's configs.
DEFAULT_BETA = {"fitnet": 100.0, "at": 1000.0, "sp": 3000.0, "pkt": 30000.0, "rkd": 1.0, "crd": 0.8}
SOURCES = {
    "fitnet": "Romero et al. 2015",
    "at": "Zagoruyko & Komodakis 2017",
    "sp": "Tung & Mori 2019",
    "pkt": "Passalis & Tefas 2018",
    "rkd": "Park et al. 2019 (distance 25, angle 50)",
    "crd": "Tian et al. 2020 (dim 128, 16384 negatives, τ 0.07, momentum 0.5)",
}
BENCHMARK = "β of the CIFAR-100 benchmark of Tian et al. 2020 (RepDistiller scripts, -r 1 -a 0 -b β; mdistiller cfg.py)"
# `+kd`: RepDistiller's way of adding KD to any method (README: "-a 1 -b β", -r defaulting to 1),
# i.e. CE 1 + KD 1 (T = 4) + β·feature term, as in their CRD+KD row.
WITH_KD = "; + KD as RepDistiller combines it (-r 1 -a 1 -b β, kd_T 4)"
CRD_RECIPE = dict(crd_negatives=16384, crd_dim=128, crd_T=0.07, crd_momentum=0.5)


def _crd(cfg: Config, student: nn.Module, teacher: nn.Module, train_size: int) -> CRDLoss:
    return CRDLoss(
        student.embed_dim, teacher.embed_dim, train_size, cfg.crd_dim, cfg.crd_negatives, cfg.crd_T, cfg.crd_momentum
    )


FEATURES = {
    "fitnet": lambda cfg, student, teacher, **_: HintLoss.between(student, teacher, cfg.hint_stage),
    "at": lambda cfg, student, teacher, **_: ATLoss(),
    "sp": lambda cfg, student, teacher, **_: SPLoss(),
    "pkt": lambda cfg, student, teacher, **_: PKTLoss(),
    "rkd": lambda cfg, student, teacher, **_: RKDLoss(),
    "crd": lambda cfg, student, teacher, train_size=None, **_: _crd(cfg, student, teacher, train_size),
}


def _build(
    name: str, cfg: Config, student: nn.Module, teacher: nn.Module, with_kd: bool = False, **context
) -> FeatureKD:
    kd = KDLoss(cfg.T, cfg.ce_weight, cfg.kd_weight) if with_kd else None
    feature = FEATURES[name](cfg, student, teacher, **context)
    return FeatureKD(name, feature, cfg.feat_weight, kd, ce_weight=cfg.ce_weight)


for _name, _beta in DEFAULT_BETA.items():
    _source = f"{SOURCES[_name]}; {BENCHMARK}"
    _needs = dict(
        needs_features=True,
        needs_index=_name == "crd",
        reads=("hint_stage",) if _name == "fitnet" else (),
        **(CRD_RECIPE if _name == "crd" else {}),
    )
    register_method(_name, source=_source, ce_weight=1.0, feat_weight=_beta, **_needs)(partial(_build, _name))
    register_method(
        f"{_name}+kd", source=_source + WITH_KD, T=4.0, ce_weight=1.0, kd_weight=1.0, feat_weight=_beta, **_needs
    )(partial(_build, _name, with_kd=True))

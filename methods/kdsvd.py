"""KD with singular value decomposition (Lee et al., ECCV 2018): match how the dominant channel patterns of
consecutive stages relate.

Recipe, from the released code: the post-ReLU outputs of stages 1-4 (RepDistiller ``train_student.py``,
``feat_s[1:-1]``; mdistiller ``distillers/KDSVD.py``, ``feats[1:]``), k = 1 teacher singular vector per
stage and k + 3 student candidates (RepDistiller ``distiller_zoo/KDSVD.py`` ``k=1``, ``self.k + 3``;
mdistiller ``engine/cfg.py`` ``KDSVD.K``), the Gaussian kernel's σ = 8 (both, ``/ 8``), β 1 with CE 1
(mdistiller ``engine/cfg.py`` ``KDSVD.LOSS.FEAT_WEIGHT``; RepDistiller's scripts give KDSVD no β).

Where the two releases disagree this file follows RepDistiller, whose reading of the map is the
paper's: an (H·W) × C matrix whose right singular vectors live in channel space. mdistiller reshapes
the map to (C·H) × W, so its singular vectors run over the image's columns: not the paper's method.
"""

from __future__ import annotations

import torch
from torch import nn

from methods._feature import register_feature
from methods.fitnet import stage_shape
from registry import Param, positive

STAGES = (1, 2, 3, 4)
EXTRA = 3  # the student offers k + 3 candidates for the teacher's k vectors (both releases)
SIGMA = 8.0  # width of the Gaussian kernel between two stages' vectors (both releases)


def _tolerance(lam: torch.Tensor) -> torch.Tensor:
    """(B, 1, 1): how far apart two eigenvalues of a Gram matrix must be to be told apart in its dtype."""
    return lam[:, :1, None] * torch.finfo(lam.dtype).eps * lam.shape[1]


class _TopRightSingular(torch.autograd.Function):
    """The n leading right singular vectors V (B, C, n) and singular values (B, n) of x (B, M, C).

    Forward: the eigenvectors of the smaller Gram matrix, xᵀx (C x C, its eigenvectors are V) or xxᵀ
    (M x M, its eigenvectors U give V = xᵀU / s), 2-4x faster than an SVD on a CPU; V's columns of
    zero singular value are left zero in the second case (x has no direction there to follow).
    Backward: perturbation theory for the eigenvectors of G = xᵀx (λ = s²),
    dv_i = Σ_{j≠i} v_j · v_jᵀ dG v_i / (λ_i − λ_j), summed for each kept i over every other j, the
    null space of x (λ_j = 0) included. Pairs whose gap vanishes are dropped, where the derivative is
    undefined. Torch's own SVD backward divides by the gap between *every* two singular values, so the
    repeated zeros of dead ReLU channels (routine in thin students) turn the whole gradient into NaN,
    although no kept vector depends on them.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, n: int):
        xt = x.transpose(1, 2)  # (B, C, M)
        if x.shape[1] >= x.shape[2]:
            lam, v = torch.linalg.eigh(xt @ x)  # (B, C) ascending, (B, C, C)
            lam, v = lam.flip(-1).clamp_min(0), v.flip(-1)  # r = C
        else:
            lam, u = torch.linalg.eigh(x @ xt)  # (B, M) ascending, (B, M, M)
            lam, u = lam.flip(-1).clamp_min(0), u.flip(-1)  # r = M
            s = lam.sqrt()[:, None, :]  # (B, 1, M)
            kept = lam[:, None, :] > _tolerance(lam)  # (B, 1, M)
            v = torch.where(kept, (xt @ u) / s.where(kept, 1.0), 0.0)  # (B, C, M)
        ctx.save_for_backward(x, lam, v)
        ctx.n = n
        top_s = lam[:, :n].sqrt()
        ctx.mark_non_differentiable(top_s)
        return v[:, :, :n].contiguous(), top_s

    @staticmethod
    def backward(ctx, grad_v: torch.Tensor, _grad_s):
        x, lam, v = ctx.saved_tensors
        n = ctx.n
        tol = _tolerance(lam)  # (B, 1, 1)
        gap = lam[:, None, :n] - lam[:, :, None]  # (B, r, n): [j, i] = λ_i − λ_j
        coupling = v.transpose(1, 2) @ grad_v  # (B, r, n): v_jᵀ g_i
        within = torch.where(gap.abs() > tol, coupling / gap.where(gap.abs() > tol, 1.0), 0.0)  # (B, r, n)
        top = v[:, :, :n]  # (B, C, n)
        dgram = v @ within  # (B, C, n): Σ_j v_j·[j, i], the part of dG's effect inside V's span
        if v.shape[1] > v.shape[2]:  # rank-deficient shape (M < C): x's null space also couples, λ_j = 0
            outside = grad_v - v @ coupling  # (B, C, n): the part of g outside V's span
            lam_top = lam[:, None, :n]  # (B, 1, n)
            dgram = dgram + torch.where(lam_top > tol, outside / lam_top.where(lam_top > tol, 1.0), 0.0)
        m = dgram @ top.transpose(1, 2)  # (B, C, C): dL/dG
        return x @ (m + m.transpose(1, 2)), None  # dG = dxᵀx + xᵀdx


def right_singular_vectors(f: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The n leading right singular vectors (B, C, n) and singular values (B, n) of each sample's map
    read as an (H·W) × C matrix. A singular vector's sign is arbitrary; each is turned so its entries
    sum to ≥ 0 (for a post-ReLU map's first vector: its all-non-negative Perron vector), which makes
    the loss a function of the maps alone rather than of the SVD routine's sign convention."""
    x = f.flatten(2).transpose(1, 2)  # (B, H*W, C)
    v, s = _TopRightSingular.apply(x, n)
    sign = torch.where(v.sum(1, keepdim=True) < 0, -1.0, 1.0)  # (B, 1, n), piecewise constant
    return v * sign, s


def align(candidates: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """For each target vector (B, C, k), the candidate (B, C, k') most parallel or anti-parallel to
    it, turned to point its way, (B, C, k)."""
    cos = (candidates.transpose(1, 2) @ target).detach()  # (B, k', k)
    pick = cos.abs().argmax(1)  # (B, k)
    sign = cos.gather(1, pick[:, None, :]).sign()  # (B, 1, k)
    chosen = candidates.gather(2, pick[:, None, :].expand(-1, candidates.shape[1], -1))  # (B, C, k)
    return chosen * sign


def stage_kernel(v: torch.Tensor, v_prev: torch.Tensor, sigma: float = SIGMA) -> torch.Tensor:
    """G[b, m, n, j] = exp(−(v[b, m, j] − v_prev[b, n, j])² / σ) between two stages' vectors,
    (B, C_l, C_{l−1}, k)."""
    return torch.exp(-(v[:, :, None, :] - v_prev[:, None, :, :]).pow(2) / sigma)


class KDSVDLoss(nn.Module):
    """KD with singular value decomposition (Lee et al., ECCV 2018).

    Each stage's map is read as an (H·W) × C matrix per sample. The teacher's k leading right singular
    vectors V_t (C × k) and its singular values s (normalised to a unit k-vector ŝ) are kept; of the
    student's k + 3 leading ones, the one most (anti-)parallel to each teacher vector is taken and turned
    its way (V_s). Both are scaled by the teacher's ŝ. Between consecutive stages l−1, l, the Gaussian
    kernel of every pair of channel entries

        G^(l)[m, n, j] = exp(−(V^(l)[m, j] − V^(l−1)[n, j])² / σ), σ = 8,

    is matched: L = Σ_l Σ_{m,n,j} (G_s^(l) − G_t^(l))² summed over the batch and divided by B, over
    stages 1-4 (three pairs). The singular vectors live in channel space, so a student stage whose
    width differs from the teacher's goes through a trained bias-free 1x1 conv onto the teacher's
    channels first (the releases support equal widths only; their align step fails otherwise).
    """

    def __init__(self, projections: dict[int, nn.Module], k: int = 1, stages: tuple[int, ...] = STAGES):
        super().__init__()
        if len(stages) < 2:
            raise ValueError(f"KDSVD relates consecutive stages: it needs at least two, got {stages}")
        self.stages, self.k = stages, k
        self.projections = nn.ModuleDict({str(s): p for s, p in projections.items()})

    @classmethod
    def between(cls, student: nn.Module, teacher: nn.Module, k: int = 1, stages=STAGES) -> KDSVDLoss:
        projections = {}
        for stage in stages:
            (c_s, h_s), (c_t, h_t) = stage_shape(student, stage), stage_shape(teacher, stage)
            for who, hw, need in (("student", h_s * h_s, k + EXTRA), ("teacher", h_t * h_t, k)):
                if min(hw, c_t) < need:
                    raise ValueError(
                        f"KDSVD takes {need} singular vectors of the {who}'s stage-{stage} map "
                        f"({hw} positions x {c_t} channels), which has only {min(hw, c_t)}: "
                        f"lower kdsvd_k (now {k}) or use wider networks with larger maps at that stage"
                    )
            if c_s != c_t:
                projections[stage] = nn.Conv2d(c_s, c_t, kernel_size=1, bias=False)
        return cls(projections, k, stages)

    def forward(self, s_feats: dict, t_feats: dict, **_) -> torch.Tensor:
        with torch.autocast(
            s_feats["stages"][0].device.type, enabled=False
        ):  # eigh has no bf16 kernel; Grams need fp32
            return self._loss(s_feats, t_feats)

    def _loss(self, s_feats: dict, t_feats: dict) -> torch.Tensor:
        total, prev = 0.0, None
        for stage in self.stages:
            # fp32 whatever the autocast made them: the maps (B, C_s, H_s, W_s), (B, C_t, H_t, W_t)
            fs, ft = s_feats["stages"][stage].float(), t_feats["stages"][stage].float()
            if str(stage) in self.projections:
                fs = self.projections[str(stage)](fs)  # (B, C_t, H_s, W_s)
            with torch.no_grad():
                v_t, s_t = right_singular_vectors(ft, self.k)  # (B, C_t, k), (B, k)
            v_s, _ = right_singular_vectors(fs, self.k + EXTRA)  # (B, C_t, k + 3)
            weight = (s_t / s_t.norm(dim=1, keepdim=True).clamp_min(1e-12))[:, None, :]  # (B, 1, k): ŝ
            v_s, v_t = align(v_s, v_t) * weight, v_t * weight  # (B, C_t, k) each
            if prev is not None:
                g_s, g_t = stage_kernel(v_s, prev[0]), stage_kernel(v_t, prev[1])  # (B, C_l, C_{l-1}, k)
                total = total + (g_s - g_t).pow(2).sum() / fs.shape[0]
            prev = v_s, v_t
        return total


PARAMS = (Param("kdsvd_k", int, "KDSVD: the teacher's singular vectors kept per stage", check=positive),)


def build_kdsvd(cfg, student: nn.Module, teacher: nn.Module, **_) -> KDSVDLoss:
    return KDSVDLoss.between(student, teacher, cfg.kdsvd_k)


register_feature(
    "kdsvd",
    build_kdsvd,
    1.0,
    "Lee et al. 2018 (stages 1-4, k 1 with k + 3 student candidates, σ 8: RepDistiller distiller_zoo/KDSVD.py "
    "and train_student.py, mdistiller distillers/KDSVD.py; β 1: mdistiller engine/cfg.py)",
    params=PARAMS,
    benchmark="",  # β from mdistiller (RepDistiller's scripts give KDSVD none)
    kdsvd_k=1,
)

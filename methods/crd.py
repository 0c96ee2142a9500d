"""Contrastive representation distillation (Tian et al., ICLR 2020): NCE against memory banks of embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from methods._feature import register_feature
from registry import Param, fraction, positive


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
        # Scoring against the whole bank and picking the K+1 scalars is much faster on a CPU than
        # gathering (B, K+1, dim) bank rows (B·(K+1)·dim floats moved twice a step) for the same dot products:
        # one matmul instead of a memory-bound gather.
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


PARAMS = (
    Param("crd_negatives", int, "CRD: negatives drawn from the memory bank per sample", check=positive),
    Param("crd_dim", int, "CRD: embedding size of both heads and of the memory bank", check=positive),
    Param("crd_T", float, "CRD: NCE temperature", check=positive),
    Param("crd_momentum", float, "CRD: memory-bank update momentum", check=fraction),
)


def build_crd(cfg, student: nn.Module, teacher: nn.Module, train_size: int | None = None, **_) -> CRDLoss:
    if train_size is None:
        raise ValueError("method 'crd' is sized by the training set: pass train_size=len(training images)")
    return CRDLoss(
        student.embed_dim, teacher.embed_dim, train_size, cfg.crd_dim, cfg.crd_negatives, cfg.crd_T, cfg.crd_momentum
    )


register_feature(
    "crd",
    build_crd,
    0.8,
    "Tian et al. 2020 (dim 128, 16384 negatives, τ 0.07, momentum 0.5)",
    params=PARAMS,
    needs_index=True,
    crd_negatives=16384,
    crd_dim=128,
    crd_T=0.07,
    crd_momentum=0.5,
)

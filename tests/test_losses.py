"""KD loss against values worked out by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

from train_kd import KDLoss, kd_loss


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))


def softmax(z):
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def test_three_class_example_by_hand():
    # teacher p = (1/2, 1/4, 1/4), student uniform: KL = 1/2 ln(3/2) + 1/2 ln(3/4) = 1/2 ln(9/8)
    s = torch.tensor([[0.0, 0.0, 0.0]])
    t = torch.tensor([[math.log(2.0), 0.0, 0.0]])
    assert kd_loss(s, t, T=1.0).item() == pytest.approx(0.5 * math.log(9 / 8), rel=1e-5)
    # at T = 2 the teacher's tempered distribution is softmax(ln2 / 2, 0, 0), i.e. (√2, 1, 1) / (√2 + 2)
    p_t = [math.sqrt(2) / (math.sqrt(2) + 2), 1 / (math.sqrt(2) + 2), 1 / (math.sqrt(2) + 2)]
    expected = 4 * kl(p_t, [1 / 3] * 3)
    assert kd_loss(s, t, T=2.0).item() == pytest.approx(expected, rel=1e-5)
    # full loss with label 0: 0.1 · CE + 0.9 · T²·KL, CE of a uniform student = ln 3
    terms = KDLoss(T=2.0, ce_weight=0.1, kd_weight=0.9)(s, t, torch.tensor([0]))
    assert terms["ce"].item() == pytest.approx(0.1 * math.log(3), rel=1e-5)
    assert terms["kd"].item() == pytest.approx(0.9 * expected, rel=1e-5)


def test_batch_mean_over_samples():
    s = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]])
    t = torch.tensor([[3.0, 2.0, 1.0], [0.0, 0.0, 1.0]])
    per_sample = [kl(softmax((t[i] / 4).tolist()), softmax((s[i] / 4).tolist())) for i in range(2)]
    assert kd_loss(s, t, T=4.0).item() == pytest.approx(16 * sum(per_sample) / 2, rel=1e-5)


def test_zero_when_logits_equal():
    z = torch.randn(8, 10)
    assert kd_loss(z, z.clone(), T=4.0).abs().item() < 1e-6


def test_t_squared_keeps_scale_at_high_temperature():
    # for large T, T²·KL -> (1/2K) Σ_i (d_i - mean d)², d = z_s - z_t (Hinton et al. 2015, sec. 2.1)
    s = torch.tensor([[1.0, -2.0, 0.5, 3.0]])
    t = torch.tensor([[0.0, 1.0, 2.0, -1.0]])
    d = (s - t)[0].tolist()
    mean = sum(d) / len(d)
    limit = sum((v - mean) ** 2 for v in d) / (2 * len(d))
    assert kd_loss(s.double(), t.double(), T=1000.0).item() == pytest.approx(limit, rel=1e-3)
    # without the T² factor the term would vanish like 1/T²
    assert kd_loss(s, t, T=10.0).item() / 100 < 0.05 * kd_loss(s, t, T=1.0).item()


def test_zero_kd_weight_is_cross_entropy():
    s, t, y = torch.randn(16, 10), torch.randn(16, 10), torch.randint(0, 10, (16,))
    terms = KDLoss(T=4.0, ce_weight=1.0, kd_weight=0.0)(s, t, y)
    assert sum(terms.values()).item() == pytest.approx(F.cross_entropy(s, y).item(), rel=1e-5)


def test_bad_hyperparameters_rejected():
    with pytest.raises(ValueError, match="weights >= 0"):
        KDLoss(T=4.0, ce_weight=-0.5, kd_weight=1.5)
    with pytest.raises(ValueError, match="T > 0"):
        KDLoss(T=0.0)

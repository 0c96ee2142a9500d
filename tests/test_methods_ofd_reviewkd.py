"""OFD (Heo et al. 2019) and ReviewKD (Chen et al. 2021): the losses pinned to values computed by hand from
their papers' equations, their runs (training, resuming; cohorts: test_methods_all.py), and their
builders on every model."""

import math
from dataclasses import replace

import pytest
import torch
from torch import nn

import train_eval
from conftest import assert_same_run, interrupted_then_resumed
from distiller import distill, get_method
from methods.ofd import OFDLoss, negative_mean
from methods.reviewkd import ABF, ReviewKDLoss, hcl
from model import create_model, list_models
from train_eval import load_history, make_config

# ----------------------------------------------------------------------------- OFD


def _phi(x):  # standard normal distribution function
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def _margin_by_hand(gamma, beta):
    """E[x | x < 0], x ~ N(β, γ²): β − |γ|·φ(β/|γ|)/Φ(−β/|γ|); −3|γ| where Φ(−β/|γ|) ≤ 0.001 (the release)."""
    s = abs(gamma)
    if s == 0:
        return min(beta, 0.0)
    if _phi(-beta / s) <= 0.001:
        return -3 * s
    density = math.exp(-((beta / s) ** 2) / 2) / math.sqrt(2 * math.pi)
    return beta - s * density / _phi(-beta / s)


def test_ofd_margin_is_the_mean_of_the_negative_responses():
    gamma = [1.0, 2.0, -0.5, 1.0, 0.0, 0.0, 0.7]
    beta = [0.0, 1.0, 0.3, 5.0, -1.0, 1.0, -2.0]
    margins = negative_mean(torch.tensor(gamma), torch.tensor(beta))
    assert margins.tolist() == pytest.approx([_margin_by_hand(g, b) for g, b in zip(gamma, beta, strict=True)])
    # closed forms: the half-normal mean −√(2/π); almost no negatives (Φ(−5) ≈ 3e-7): −3σ; a constant channel
    assert margins[0].item() == pytest.approx(-math.sqrt(2 / math.pi), rel=1e-6)
    assert margins[3].item() == -3.0 and margins[4].item() == -1.0 and margins[5].item() == 0.0


def test_ofd_reads_its_margins_from_the_teachers_batch_norm_before_each_stage_relu():
    torch.manual_seed(0)
    student, teacher = create_model("vgg8", width=0.0625), create_model("vgg11", width=0.125)
    for stage in teacher.stages:
        nn.init.normal_(stage[-1].weight), nn.init.normal_(stage[-1].bias)
    loss = OFDLoss.between(student, teacher)
    for k in (1, 2, 3, 4):
        bn = teacher.stages[k][-1]  # the stage's last layer: its output is feats["preact"][k]
        expected = [_margin_by_hand(g, b) for g, b in zip(bn.weight.tolist(), bn.bias.tolist(), strict=True)]
        assert getattr(loss, f"margin{k}").flatten().tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert not any(k.startswith("margin") for k in loss.state_dict())  # fixed by the teacher: not checkpointed


def _partial_l2_by_loops(s, t, margin):
    """Σ over b, c, h, w of (T − S)² except where S ≤ T ≤ 0, T = max(t, m_c); divided by the batch size."""
    B, C, H, W = len(s), len(s[0]), len(s[0][0]), len(s[0][0][0])
    total = 0.0
    for b in range(B):
        for c in range(C):
            for i in range(H):
                for j in range(W):
                    target, x = max(t[b][c][i][j], margin[c]), s[b][c][i][j]
                    if not (x <= target <= 0):
                        total += (target - x) ** 2
    return total / B


def _block_means(t, size):
    """Average pooling of nested lists (B, C, H, W) to size x size, by loops."""
    k = len(t[0][0]) // size
    return [
        [
            [[sum(ch[i * k + a][j * k + b] for a in range(k) for b in range(k)) / k**2 for j in range(size)]
             for i in range(size)]
            for ch in sample
        ]
        for sample in t
    ]  # fmt: skip


def test_ofd_partial_l2_with_margin_relu_and_stage_weights_by_hand():
    torch.manual_seed(1)
    s0, t0 = torch.randn(2, 2, 2, 2), torch.randn(2, 2, 2, 2)
    s1, t1 = torch.randn(2, 2, 2, 2), torch.randn(2, 2, 4, 4)  # the teacher's map larger: average-pooled
    m0, m1 = [-0.3, -1.2], [-0.5, -0.05]
    loss = OFDLoss([2, 2], [2, 2], [torch.tensor(m0), torch.tensor(m1)], stages=(0, 1))
    loss.connectors = nn.ModuleList([nn.Identity(), nn.Identity()])
    value = loss({"preact": [s0, s1]}, {"preact": [t0, t1]})
    d0 = _partial_l2_by_loops(s0.tolist(), t0.tolist(), m0)
    d1 = _partial_l2_by_loops(s1.tolist(), _block_means(t1.tolist(), 2), m1)
    assert value.item() == pytest.approx(d0 / 2 + d1, rel=1e-5)  # the deeper stage weighs 1, the one before 1/2
    # closed forms: a positive target is matched everywhere; a student below a negative target is left alone
    one = OFDLoss([2], [2], [torch.tensor(m0)], stages=(0,))
    one.connectors = nn.ModuleList([nn.Identity()])
    assert one({"preact": [torch.zeros(2, 2, 2, 2)]}, {"preact": [torch.ones(2, 2, 2, 2)]}).item() == 8.0
    below = one({"preact": [torch.full((2, 2, 2, 2), -2.0)]}, {"preact": [torch.full((2, 2, 2, 2), -0.1)]})
    assert below.item() == 0.0
    # under the margin the target is the margin: (−0.1 − (−0.3))² and (−0.1 − (−1.2))², 4 positions x 2 samples / 2
    above = one({"preact": [torch.full((2, 2, 2, 2), -0.1)]}, {"preact": [torch.full((2, 2, 2, 2), -5.0)]})
    assert above.item() == pytest.approx(4 * (0.2**2 + 1.1**2), rel=1e-5)


def test_ofd_refuses_a_teacher_without_batch_norm_before_its_stage_relu():
    student, teacher = create_model("vgg8", width=0.0625), create_model("vgg11", width=0.125)
    teacher.stages[2] = nn.Sequential(*list(teacher.stages[2])[:-1])  # the stage now ends with its convolution
    with pytest.raises(ValueError, match="stage 2 of the teacher \\(VGG\\) ends with Conv2d: use a teacher with"):
        OFDLoss.between(student, teacher)
    with pytest.raises(ValueError, match="OFD reads the teacher's stages 1-4.*Linear"):
        OFDLoss.between(student, nn.Linear(2, 2))


# ----------------------------------------------------------------------------- ReviewKD


def _mse(a, b):
    flat_a, flat_b = torch.tensor(a).flatten().tolist(), torch.tensor(b).flatten().tolist()
    return sum((x - y) ** 2 for x, y in zip(flat_a, flat_b, strict=True)) / len(flat_a)


def _hcl_by_hand(fs, ft):
    """(MSE + ½ MSE at the first pooling level below H + ¼ at the next + ...) / (1 + ½ + ¼ + ...), levels 4, 2, 1."""
    h = len(fs[0][0])
    loss, weight, total = _mse(fs, ft), 1.0, 1.0
    for level in (4, 2, 1):
        if level < h:
            weight /= 2
            loss += weight * _mse(_block_means(fs, level), _block_means(ft, level))
            total += weight
    return loss / total


def test_hcl_pools_at_levels_4_2_1_below_the_map_size_by_hand():
    torch.manual_seed(2)
    for size in (8, 4, 2, 1):
        fs, ft = torch.randn(2, 3, size, size), torch.randn(2, 3, size, size)
        assert hcl(fs, ft).item() == pytest.approx(_hcl_by_hand(fs.tolist(), ft.tolist()), rel=1e-5), size
    # 4x4: levels 2 and 1, weights 1, 1/2, 1/4 over 1.75
    fs, ft = torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)
    fs[0, 0, 0, 0] = 4.0  # full map: 16/16; 2x2 means: one of 1 → 1/4; global mean 1/4 → 1/16
    assert hcl(fs, ft).item() == pytest.approx((1 + 0.5 * 0.25 + 0.25 / 16) / 1.75)
    # closed form: a constant offset c is the same at every level, HCL = c²
    assert hcl(ft + 3.0, ft).item() == pytest.approx(9.0)


def test_abf_fuses_the_stage_with_the_deeper_residual_by_hand():
    abf = ABF(1, 1, 1, fuse=True)
    abf.reduce, abf.out = nn.Identity(), nn.Identity()  # leave the attention: a = σ(x), b = σ(0.5 − r)
    with torch.no_grad():
        abf.attention[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, -1.0]]).view(2, 2, 1, 1))
        abf.attention[0].bias.copy_(torch.tensor([0.0, 0.5]))
    x, r = torch.tensor([[[[1.0, -2.0], [0.5, 3.0]]]]), torch.tensor([[[[2.0]]]])  # the residual 1x1: upsampled
    out, residual = abf(x, r, size=2)

    def sig(v):
        return 1 / (1 + math.exp(-v))

    fused = [[sig(v) * v + sig(0.5 - 2.0) * 2.0 for v in row] for row in x[0, 0].tolist()]
    assert torch.allclose(out[0, 0], torch.tensor(fused)) and torch.equal(out, residual)
    out4, residual4 = abf(x, r, size=4)  # resized (nearest) to the teacher's size before the output conv
    assert torch.allclose(out4[0, 0], torch.tensor([[fused[i // 2][j // 2] for j in range(4)] for i in range(4)]))
    assert torch.equal(out4, residual4)
    assert ABF(1, 1, 1, fuse=False).attention is None  # the deepest stage has nothing to fuse


def test_reviewkd_reviews_from_the_deepest_stage_weighs_stages_and_warms_up():
    torch.manual_seed(3)
    student, teacher = create_model("vgg8", width=0.0625), create_model("vgg11", width=0.125)
    loss = ReviewKDLoss.between(student, teacher, warmup=4, stage_weights=(1.0, 2.0, 0.5, 0.0, 3.0)).eval()
    x = torch.randn(3, 3, 32, 32)
    s_feats = student(x, features=True)[1]
    with torch.no_grad():
        t_feats = teacher(x, features=True)[1]
    s_maps, targets = loss.features(s_feats, "stages"), loss.features(t_feats, "preact")
    assert [tuple(t.shape[1:]) for t in targets] == [(16, 16, 16), (32, 8, 8), (64, 4, 4), (64, 4, 4), (64, 1, 1)]
    outputs = loss.review(s_maps, [t.shape[-1] for t in targets])
    assert [o.shape for o in outputs] == [t.shape for t in targets]
    stages = zip(loss.stage_weights, outputs, targets, strict=True)
    by_hand = sum(w * _hcl_by_hand(o.tolist(), t.tolist()) for w, o, t in stages)
    for epoch, ramp in [(0, 0.25), (2, 0.75), (3, 1.0), (10, 1.0)]:
        loss.set_epoch(epoch)
        assert loss(s_feats, t_feats).item() == pytest.approx(ramp * by_hand, rel=1e-4)
    # each stage sees itself and the deeper ones: changing the shallowest changes only its own output
    changed = loss.review([s_maps[0] + 1, *s_maps[1:]], [t.shape[-1] for t in targets])
    assert [torch.equal(a, b) for a, b in zip(outputs, changed, strict=True)] == [False, True, True, True, True]
    changed = loss.review([*s_maps[:-1], s_maps[-1] + 1], [t.shape[-1] for t in targets])
    assert not any(torch.equal(a, b) for a, b in zip(outputs, changed, strict=True))


def test_reviewkd_refuses_a_warm_up_longer_than_the_run():
    with pytest.raises(ValueError, match="warm-up \\(20 epochs\\) is longer than the run \\(2 epochs\\).*--warmup"):
        train_eval.resolve_recipe(make_config("smoke", method="reviewkd", teacher="t"))


# ----------------------------------------------------------------------------- the builders on every model


@pytest.mark.parametrize("method", ["ofd", "reviewkd"])
def test_the_builders_work_for_a_vgg8_student_and_every_registered_teacher(method):
    torch.manual_seed(4)
    cfg = make_config("smoke", method=method, teacher="t", warmup=1.0)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    for name in list_models():
        student, teacher = create_model("vgg8", width=0.0625), create_model(name, width=0.125).eval()
        loss = get_method(method)(cfg, student, teacher)
        logits_s, s_feats = student(x, features=True)
        with torch.no_grad():
            logits_t, t_feats = teacher(x, features=True)
        terms = loss(logits_s, logits_t, y, s_feats=s_feats, t_feats=t_feats)
        terms[method].backward()
        assert torch.isfinite(terms[method]) and terms[method] > 0, name
        assert all(p.grad is not None for p in loss.parameters()), name  # every adapter learns
        half = {k: [t.bfloat16() for t in v] if isinstance(v, list) else v.bfloat16() for k, v in t_feats.items()}
        bf16 = loss(logits_s, logits_t, y, s_feats=s_feats, t_feats=half)[method]  # a bf16 teacher's features
        assert bf16.dtype == torch.float32 and bf16.item() == pytest.approx(terms[method].item(), rel=0.1), name


# ----------------------------------------------------------------------------- runs


@pytest.mark.parametrize("method, extra", [("ofd", {}), ("reviewkd", {"warmup": 1.0})])
def test_ofd_and_reviewkd_train_in_the_smoke_profile(method, extra, smoke_cfg, smoke_teacher):
    result = distill(smoke_cfg(method=method, teacher=smoke_teacher.run_dir, epochs=3, **extra))
    h = load_history(result.run_dir)
    assert h["train_loss"].iloc[-1] < h["train_loss"].iloc[0] and h["val_top1"].iloc[-1] > 20
    term = f"train_{method}"
    assert term in h and torch.isfinite(torch.tensor(h[term].values)).all()


class Interrupt(Exception):
    pass


def test_reviewkd_interrupted_mid_warm_up_resumes_bit_identically(smoke_cfg, smoke_teacher, tmp_path, monkeypatch):
    cfg = smoke_cfg(method="reviewkd", teacher=smoke_teacher.run_dir, epochs=2, warmup=2.0)
    straight = distill(replace(cfg, out_dir=str(tmp_path / "a")))
    assert_same_run(straight, interrupted_then_resumed(replace(cfg, out_dir=str(tmp_path / "b")), monkeypatch))

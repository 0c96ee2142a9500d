"""VID, NST, CC and KDSVD: each loss pinned to values computed by hand from its paper's equations, then
trained in the smoke profile, resumed after an interruption (every method's cohort: tests/test_methods_all.py)."""

import math
from dataclasses import replace

import pytest
import torch

from checkpoints import read_checkpoint
from conftest import assert_same_run, interrupted_then_resumed
from distiller import distill
from methods.cc import CCLoss, taylor_rbf
from methods.kdsvd import KDSVDLoss, right_singular_vectors
from methods.nst import NSTLoss
from methods.vid import VIDLoss, VIDStage
from model import create_model
from train_eval import load_history

METHODS = ("vid", "nst", "cc", "kdsvd")


def _maps(*maps):
    return {"stages": [torch.tensor(m, dtype=torch.float32) for m in maps]}


# ----------------------------------------------------------------------------- VID


def _vid_with_identity_mean(c, variances):
    """A VID stage whose mean network is the identity (on non-negative maps) and whose variances are given."""
    stage = VIDStage(c, c, init_var=5.0, eps=1e-5)
    with torch.no_grad():
        for conv in stage.mean[::2]:
            conv.weight.copy_(torch.eye(c)[:, :, None, None])
        stage.alpha.copy_(torch.tensor([math.log(math.expm1(v - 1e-5)) for v in variances]))
    return stage


def test_vid_variance_starts_at_five_and_the_bound_is_zero_for_a_perfect_unit_variance_prediction():
    stage = VIDStage(3, 4)
    assert stage.variance().tolist() == pytest.approx([5.0] * 4, rel=1e-6)
    f = torch.rand(2, 2, 3, 3)
    assert _vid_with_identity_mean(2, [1.0, 1.0])(f, f).item() == pytest.approx(0.0, abs=1e-6)  # ½·log 1


def test_vid_against_the_gaussian_likelihood_by_hand():
    s = [[[[1.0, 3.0, 0.0, 2.0]] * 4, [[0.0, 0.0, 4.0, 4.0]] * 4]]  # (1, 2, 4, 4): pooled to 2x2
    t = [[[[1.0, 0.0], [2.0, 2.0]], [[0.5, 3.0], [0.0, 1.0]]]]  # (1, 2, 2, 2)
    variances = [2.0, 0.5]
    pooled = [[[sum(s[0][c][2 * h + i][2 * w + j] for i in range(2) for j in range(2)) / 4 for w in range(2)]
               for h in range(2)] for c in range(2)]  # fmt: skip
    expected = (
        sum(
            0.5 * ((pooled[c][h][w] - t[0][c][h][w]) ** 2 / variances[c] + math.log(variances[c]))
            for c in range(2)
            for h in range(2)
            for w in range(2)
        )
        / 8
    )
    stage = _vid_with_identity_mean(2, variances)
    assert stage(torch.tensor(s), torch.tensor(t).bfloat16()).item() == pytest.approx(expected, rel=1e-5)
    # the whole loss sums the stages' terms; the second one here is 0 (perfect prediction, σ² = 1)
    loss = VIDLoss({0: stage, 1: _vid_with_identity_mean(2, [1.0, 1.0])})
    assert loss(_maps(s, t), _maps(t, t)).item() == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------- NST


def _mmd2_by_hand(fs, ft):
    """Huang & Wang's MMD² with k(x, y) = (xᵀy)², each channel's map normalised, written out with loops."""

    def unit(v):
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v]

    def k(a, b):
        return sum(x * y for x, y in zip(a, b, strict=True)) ** 2

    s = [unit([x for row in ch for x in row]) for ch in fs]
    t = [unit([x for row in ch for x in row]) for ch in ft]
    return (
        sum(k(a, b) for a in t for b in t) / len(t) ** 2
        + sum(k(a, b) for a in s for b in s) / len(s) ** 2
        - 2 * sum(k(a, b) for a in s for b in t) / (len(s) * len(t))
    )


def test_nst_mmd_pinned_to_a_closed_form_and_to_loops():
    # s: the channels e1, e2; t: (1, 1)/√2 and e1 → k_tt mean 3/4, k_ss 1/2, k_st 1/2 → MMD² = 1/4
    fs = [[[1.0, 0.0], [0.0, 0.0]], [[0.0, 1.0], [0.0, 0.0]]]
    ft = [[[1.0, 1.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]]]
    nst = NSTLoss(stages=(0,))
    assert nst(_maps([fs]), _maps([ft])).item() == pytest.approx(0.25, rel=1e-6)
    assert nst(_maps([ft]), _maps([ft])).item() == pytest.approx(0.0, abs=1e-7)
    assert nst(_maps([fs]), _maps([[[[3.0, 0.0], [0.0, 0.0]], [[0.0, 0.5], [0.0, 0.0]]]])).item() == pytest.approx(
        0.0, abs=1e-7
    )  # each channel is normalised: its scale does not count
    # three student channels at 4x4 (pooled to 2x2) against two teacher channels, two samples, two stages
    torch.manual_seed(0)
    s4, t2 = torch.rand(2, 3, 4, 4), torch.rand(2, 2, 2, 2)
    s2 = torch.nn.functional.avg_pool2d(s4, 2)
    expected = sum(_mmd2_by_hand(s2[b].tolist(), t2[b].tolist()) for b in range(2)) / 2
    value = NSTLoss(stages=(0, 1))({"stages": [s4, s2]}, {"stages": [t2, t2]})
    assert value.item() == pytest.approx(2 * expected, rel=1e-5)


# ----------------------------------------------------------------------------- CC


def _cc_identity(dim):
    cc = CCLoss(dim, dim, dim=dim, gamma=0.4, order=2)
    with torch.no_grad():
        for embed in (cc.embed_s, cc.embed_t):
            embed.weight.copy_(torch.eye(dim))
            embed.bias.zero_()
    return cc


def test_cc_pinned_to_the_taylor_expanded_gaussian_kernel_by_hand():
    g = 0.4

    def k(cos):  # e^{−2γ}·Σ_{p≤2} (2γ·cos)^p / p!
        return math.exp(-2 * g) * (1 + 2 * g * cos + (2 * g * cos) ** 2 / 2)

    s, t = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[2.0, 0.0], [1.0, 1.0]])  # cos 0 and 1/√2
    expected = 2 * (k(0.0) - k(1 / math.sqrt(2))) ** 2 / 4  # the diagonals agree; two of four entries differ
    cc = _cc_identity(2)
    assert cc({"pooled": s}, {"pooled": t.bfloat16()}).item() == pytest.approx(expected, rel=1e-5)
    assert cc({"pooled": 3 * t}, {"pooled": t}).item() == pytest.approx(0.0, abs=1e-7)
    # the series converges to the kernel itself: exp(−γ‖x − y‖²) = exp(−γ(2 − 2cos)) for unit rows
    e = torch.nn.functional.normalize(t.double(), dim=1)
    exact = math.exp(-g * (2 - 2 / math.sqrt(2)))
    assert taylor_rbf(e, g, 30)[0, 1].item() == pytest.approx(exact, rel=1e-9)
    assert taylor_rbf(e, g, 30)[0, 0].item() == pytest.approx(1.0, rel=1e-9)


def test_cc_trains_both_embeddings():
    cc = CCLoss(4, 6, dim=3)
    cc({"pooled": torch.randn(5, 4)}, {"pooled": torch.randn(5, 6)}).backward()
    assert cc.embed_s.weight.grad.abs().sum() > 0 and cc.embed_t.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- KDSVD

H4 = [[0.5, 0.5, 0.5, 0.5], [0.5, 0.5, -0.5, -0.5], [0.5, -0.5, 0.5, -0.5], [0.5, -0.5, -0.5, 0.5]]


def _map(rows):
    """A (1, C, 2, 2) map from its (H·W) × C matrix, rows = positions."""
    return [[[[rows[2 * h + w][c] for w in range(2)] for h in range(2)] for c in range(len(rows[0]))]]


def _rank_one(position, channel):
    return _map([[a * v for v in channel] for a in position])


def test_kdsvd_pinned_to_singular_vectors_known_by_construction():
    # teacher: rank one, so its first right singular vector is the channel pattern itself
    v_t0, v_t1 = [2 / 5, 1 / 5, 2 / 5, 4 / 5], [1 / 5, 2 / 5, 4 / 5, 2 / 5]
    t0, t1 = _rank_one([1.0, 2.0, 0.0, 1.0], v_t0), _rank_one([0.0, 1.0, 3.0, 1.0], v_t1)
    # student stage 0: singular values 4, 3, 2, 1 with the columns of H4 as right singular vectors;
    # |cos| with v_t0 = 0.9, 0.3, 0.1, 0.3 → H4's first column, sign +
    s0 = _map([[sigma * H4[c][i] for c in range(4)] for i, sigma in enumerate([4.0, 3.0, 2.0, 1.0])])
    # student stage 1: singular vectors −e_c; |cos| with v_t1 = 0.2, 0.4, 0.8, 0.4 → −e_3, turned to +e_3
    s1 = _map([[-sigma * (c == i) for c in range(4)] for i, sigma in enumerate([4.0, 3.0, 2.0, 1.0])])
    v_s0, v_s1 = [0.5] * 4, [0.0, 0.0, 1.0, 0.0]

    def kernel(v, w):  # G[m, n] = exp(−(v_m − w_n)² / 8); ŝ = 1 for k = 1
        return [[math.exp(-((v[m] - w[n]) ** 2) / 8) for n in range(4)] for m in range(4)]

    g_s, g_t = kernel(v_s1, v_s0), kernel(v_t1, v_t0)
    expected = sum((g_s[m][n] - g_t[m][n]) ** 2 for m in range(4) for n in range(4))
    loss = KDSVDLoss({}, k=1, stages=(0, 1))
    assert loss(_maps(s0, s1), _maps(t0, t1)).item() == pytest.approx(expected, rel=1e-5)
    # two samples: the sum over the batch is divided by B
    both = {"stages": [torch.cat([torch.tensor(a)] * 2) for a in (s0, s1)]}
    assert loss(both, {"stages": [torch.cat([torch.tensor(a)] * 2) for a in (t0, t1)]}).item() == pytest.approx(
        expected, rel=1e-5
    )
    # identical maps: the student's first vector is the teacher's, so the kernels agree
    torch.manual_seed(0)
    f = {"stages": [torch.rand(3, 6, 4, 4) for _ in range(3)]}
    assert KDSVDLoss({}, k=2, stages=(0, 1, 2))(f, f).item() == pytest.approx(0.0, abs=1e-6)


def test_kdsvd_singular_vectors_and_their_gradient():
    torch.manual_seed(0)
    for shape in [(2, 3, 3, 2), (2, 7, 2, 1)]:  # (B, C, H, W): more positions than channels, then fewer
        f = torch.rand(shape, dtype=torch.float64, requires_grad=True)
        v, s = right_singular_vectors(f, 2)
        x = f.detach().flatten(2).transpose(1, 2)  # (B, HW, C)
        assert torch.allclose(s, torch.linalg.svdvals(x)[:, :2])
        assert torch.allclose(x.transpose(1, 2) @ x @ v, v * s[:, None, :] ** 2)  # xᵀx v = s² v
        assert (v.sum(1) >= 0).all()
        assert torch.autograd.gradcheck(lambda f: right_singular_vectors(f, 2)[0], (f,))
    # dead channels give repeated zero singular values: torch's SVD backward would be NaN everywhere
    f = torch.zeros(2, 8, 4, 4)
    f[:, :3] = torch.rand(2, 3, 4, 4)
    f.requires_grad_(True)
    KDSVDLoss({}, k=1, stages=(0, 1))({"stages": [f, f.roll(1, 1)]}, {"stages": [f.detach().sqrt()] * 2}).backward()
    assert torch.isfinite(f.grad).all() and f.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- every model, every method


@pytest.mark.parametrize("teacher, amp", [("vgg11", False), ("vgg13_tv", True)])
def test_every_method_runs_between_a_thin_student_and_each_teacher_layout(teacher, amp):
    """bf16 teacher features, and with ``amp`` the student's too, as a CUDA run's autocast makes them."""
    torch.manual_seed(0)
    student = create_model("vgg8", num_classes=10, width=0.0625)
    big = create_model(teacher, num_classes=10, width=0.125)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        _, t_feats = big(x, features=True)
    t_feats = {k: [f.bfloat16() for f in v] if isinstance(v, list) else v.bfloat16() for k, v in t_feats.items()}
    terms = [
        VIDLoss.between(student, big),
        NSTLoss(),
        CCLoss(student.embed_dim, big.embed_dim),
        KDSVDLoss.between(student, big),
    ]
    for term in terms:
        student.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            _, s_feats = student(x, features=True)
            value = term(s_feats, t_feats)
        assert torch.isfinite(value) and value > 0, type(term).__name__
        value.backward()
        assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)


def test_kdsvd_refuses_maps_with_too_few_singular_vectors():
    student, teacher = create_model("vgg11_tv", width=0.0625), create_model("vgg13_tv", width=0.125)
    KDSVDLoss.between(student, teacher, k=1)  # 2x2 last maps: 4 candidates, just enough
    with pytest.raises(ValueError, match="5 singular vectors of the student's stage-4 map \\(4 positions.*kdsvd_k"):
        KDSVDLoss.between(student, teacher, k=2)


# ----------------------------------------------------------------------------- runs


SMALL = dict(subset=26)  # 260 training images, 4 batches an epoch: the bits, not the accuracy, are under test


@pytest.mark.parametrize("method", METHODS)
def test_each_trains_in_the_smoke_profile(method, smoke_cfg, smoke_teacher):
    h = load_history(distill(smoke_cfg(method=method, teacher=smoke_teacher.run_dir, epochs=3)).run_dir)
    assert h["train_loss"].iloc[-1] < h["train_loss"].iloc[0] and h["val_top1"].iloc[-1] > 20
    assert f"train_{method}" in h and torch.isfinite(torch.tensor(h[f"train_{method}"].values)).all()


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("method", METHODS)
def test_an_interrupted_run_resumes_bit_identically(method, smoke_cfg, smoke_teacher, tmp_path, monkeypatch):
    cfg = smoke_cfg(method=method, teacher=smoke_teacher.run_dir, epochs=2, **SMALL)
    straight = distill(replace(cfg, out_dir=str(tmp_path / "a")))
    assert_same_run(straight, interrupted_then_resumed(replace(cfg, out_dir=str(tmp_path / "b")), monkeypatch))
    task = read_checkpoint(straight.run_dir)["train_state"]["task"]  # regressors, variances, embeddings
    assert any(k.startswith("loss.feature.") for k in task) == (method != "nst")  # NST has nothing to train

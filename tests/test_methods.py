"""The method contract (named batch extras, the epoch, builder context, registry declarations) and
the losses pinned to values computed by hand from their papers' equations: DKD, CRD, RKD, AT, SP,
PKT, FitNets hints."""

import math
from functools import partial

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import data_utils
import train_eval
from feature_kd import ATLoss, CRDLoss, HintLoss, PKTLoss, RKDLoss, SPLoss, nce_loss, triplet_angles
from methods.rkd import triplet_angles_by_differences
from model import create_model, read_checkpoint
from train_eval import METHODS, TIMING_COLUMNS, load_history, make_config, run_identity
from train_kd import Distiller, DKDLoss, distill, dkd_terms, kd_loss

# ----------------------------------------------------------------------------- DKD


def test_dkd_terms_by_hand_on_three_classes():
    s = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    t = torch.tensor([[math.log(2.0), 0.0, 0.0]] * 2)  # teacher p = (1/2, 1/4, 1/4), student uniform
    tckd, nckd = dkd_terms(s, t, torch.tensor([0, 1]), T=1.0)
    # target 0: b_t = (1/2, 1/2), b_s = (1/3, 2/3); p̂_t = p̂_s = (1/2, 1/2)
    assert tckd[0].item() == pytest.approx(0.5 * math.log(1.5) + 0.5 * math.log(0.75), rel=1e-5)
    assert nckd[0].item() == pytest.approx(0.0, abs=1e-7)
    # target 1: b_t = (1/4, 3/4), b_s = (1/3, 2/3); p̂_t = (2/3, 1/3), p̂_s = (1/2, 1/2)
    assert tckd[1].item() == pytest.approx(0.25 * math.log(0.75) + 0.75 * math.log(9 / 8), rel=1e-5)
    assert nckd[1].item() == pytest.approx(2 / 3 * math.log(4 / 3) + 1 / 3 * math.log(2 / 3), rel=1e-5)


def test_dkd_with_beta_one_minus_teacher_target_probability_is_kd():
    torch.manual_seed(0)
    s, t, y, T = torch.randn(8, 10) * 3, torch.randn(8, 10) * 3, torch.randint(0, 10, (8,)), 2.0
    tckd, nckd = dkd_terms(s, t, y, T)
    p_target = F.softmax(t / T, dim=1).gather(1, y[:, None]).squeeze(1)
    per_sample_kd = torch.stack([kd_loss(s[i : i + 1], t[i : i + 1], T) for i in range(8)])
    assert torch.allclose(tckd + (1 - p_target) * nckd, per_sample_kd, rtol=1e-5, atol=1e-6)


def test_dkd_warm_up_ramps_with_the_epoch_and_must_fit_the_run():
    loss = DKDLoss(T=4.0, ce_weight=1.0, alpha=1.0, beta=6.0, warmup=4)
    s, t, y = torch.randn(4, 10), torch.randn(4, 10), torch.randint(0, 10, (4,))
    full = DKDLoss(T=4.0, ce_weight=1.0, alpha=1.0, beta=6.0, warmup=0)(s, t, y)
    for epoch, ramp in [(0, 0.25), (2, 0.75), (3, 1.0), (10, 1.0)]:
        loss.set_epoch(epoch)
        terms = loss(s, t, y)
        assert terms["nckd"].item() == pytest.approx(ramp * full["nckd"].item(), rel=1e-6)
        assert terms["ce"].item() == pytest.approx(full["ce"].item())
    with pytest.raises(ValueError, match="warm-up \\(20 epochs\\) is longer than the run \\(2 epochs\\).*--warmup"):
        train_eval.resolve_recipe(make_config("smoke", method="dkd", teacher="t"))


# ----------------------------------------------------------------------------- CRD


def test_nce_loss_by_hand():
    scores = torch.tensor([[0.5, 0.1, 0.2]])  # positive, then K = 2 noise samples; N = 4: K·P_n = 0.5
    expected = -(math.log(0.5 / 1.0) + math.log(0.5 / 0.6) + math.log(0.5 / 0.7))
    assert nce_loss(scores, n_data=4).item() == pytest.approx(expected, rel=1e-5)


def test_crd_scores_normaliser_and_memory_update_by_hand():
    crd = CRDLoss(s_dim=2, t_dim=2, n_data=4, dim=2, negatives=2, T=0.5, momentum=0.5)
    e = torch.eye(2)
    crd.memory_t.copy_(torch.stack([e[0], e[1], -e[0], -e[1]]))
    crd.memory_s.copy_(torch.stack([e[1], e[0], -e[1], -e[0]]))
    v_s, v_t = e[:1], e[1:]  # one sample, index 0
    contrast = torch.tensor([[0, 1, 2]])
    s, t = crd.scores(v_s, v_t, contrast)
    raw_s = torch.exp(torch.tensor([1.0, 0.0, -1.0]) / 0.5)  # <v_s, m_t[j]> = 1, 0, -1
    raw_t = torch.exp(torch.tensor([1.0, 0.0, -1.0]) / 0.5)  # <v_t, m_s[j]> = 1, 0, -1
    assert crd.Z.tolist() == pytest.approx([raw_s.mean().item() * 4, raw_t.mean().item() * 4])
    assert torch.allclose(s[0], raw_s / crd.Z[0]) and torch.allclose(t[0], raw_t / crd.Z[1])
    crd.update(torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([0]))
    r = 1 / math.sqrt(2)  # normalise(0.5·m + 0.5·v) of two orthogonal unit vectors
    assert crd.memory_s[0].tolist() == pytest.approx([0.0, 1.0])  # m = v: unchanged
    assert crd.memory_t[0].tolist() == pytest.approx([1.0, 0.0])
    crd.update(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([1]))
    assert crd.memory_s[1].tolist() == pytest.approx([1.0, 0.0])
    crd.update(torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([1]))
    assert crd.memory_s[1].tolist() == pytest.approx([r, r]) and crd.memory_t[1].tolist() == pytest.approx([r, r])


def test_crd_refuses_more_negatives_than_samples():
    with pytest.raises(ValueError, match="16384 negatives per sample but the training set holds 1000"):
        CRDLoss(8, 8, n_data=1000)


# ----------------------------------------------------------------------------- RKD and the other feature losses


def _smooth_l1(x):
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def _rkd_by_hand(s, t):
    """Park et al.'s equations, written out with loops."""
    n = len(s)

    def dist(e, i, j):
        return math.dist(e[i], e[j])

    def mu(e):
        return sum(dist(e, i, j) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))

    def angle(e, i, j, k):
        a = [e[i][d] - e[j][d] for d in range(len(e[0]))]
        b = [e[k][d] - e[j][d] for d in range(len(e[0]))]
        na, nb = math.hypot(*a), math.hypot(*b)
        return 0.0 if na == 0 or nb == 0 else sum(x * y for x, y in zip(a, b, strict=True)) / (na * nb)

    ms, mt = mu(s), mu(t)
    pairs = [(i, j) for i in range(n) for j in range(n)]
    d = sum(_smooth_l1(dist(s, i, j) / ms - dist(t, i, j) / mt) for i, j in pairs) / n**2
    triples = [(i, j, k) for i in range(n) for j in range(n) for k in range(n)]
    a = sum(_smooth_l1(angle(s, i, j, k) - angle(t, i, j, k)) for i, j, k in triples) / n**3
    return 25 * d + 50 * a


def test_rkd_against_the_papers_equations():
    s = [[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]
    t = [[0.0, 0.0, 1.0], [3.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.5, -1.0, 2.0]]
    s = s + [[2.0, 2.0]]
    value = RKDLoss()({"pooled": torch.tensor(s)}, {"pooled": torch.tensor(t)})
    assert value.item() == pytest.approx(_rkd_by_hand(s, t), rel=1e-5)
    same = RKDLoss()({"pooled": torch.tensor(s) * 3}, {"pooled": torch.tensor(s)})
    assert same.item() == pytest.approx(0.0, abs=1e-6)  # relations ignore scale


def test_rkd_angles_from_the_gram_matrix_match_the_difference_vectors_with_their_gradients():
    torch.manual_seed(0)
    # A common offset 100x the spread: uncentred Gram entries would lose about 4 of float32's 7 digits.
    e = torch.randn(12, 1280, dtype=torch.float64) + 100 * torch.rand(1280, dtype=torch.float64)
    slow, fast = e.clone().requires_grad_(), e.float().requires_grad_()
    angles = triplet_angles(fast)
    assert torch.allclose(angles.double(), triplet_angles_by_differences(slow), atol=2e-6)
    # Zero at i = j and k = j, as RKD's smooth L1 gives there (both angles 0): the reference's gradient
    # through a normalised zero vector is 1e12 times its weight and swamps the rest in rounding.
    eye = torch.eye(12, dtype=torch.float64)
    weights = (torch.randn(12, 12, 12, dtype=torch.float64) * (1 - eye)[:, :, None] * (1 - eye)[:, None, :]).flatten()
    (triplet_angles_by_differences(slow) * weights).sum().backward()
    (angles * weights.float()).sum().backward()
    assert torch.allclose(fast.grad.double(), slow.grad, atol=1e-4 * slow.grad.abs().max().item())


def test_rkd_angles_at_a_repeated_embedding_are_zero_with_finite_gradients():
    # A zero difference normalised is the zero vector (F.normalize), whose own gradient is 1/eps = 1e12.
    e = torch.randn(6, 40)
    e[5] = e[3]
    e.requires_grad_()
    angles = triplet_angles(e).view(6, 6, 6)  # [j, i, k]
    assert angles[3, 5].abs().max() == 0 and angles[3, :, 5].abs().max() == 0 and angles[3, 3].abs().max() == 0
    assert torch.allclose(angles.flatten(), triplet_angles_by_differences(e.detach()), atol=1e-6)
    assert torch.allclose(triplet_angles(e.detach() * 1e-15), angles.flatten(), atol=1e-6)  # tiny, not "tied"
    angles.sum().backward()
    assert torch.isfinite(e.grad).all() and e.grad.abs().max() < 100


def _stages(*maps):
    return {"stages": [torch.tensor(m, dtype=torch.float32) for m in maps]}


def test_at_hint_sp_pkt_pinned_to_hand_values():
    # AT, one stage: a(F_s) = (1, 0, 0, 1)/√2, a(F_t) = (1, 1, 1, 1)/2 → mean sq. difference (2 − √2)/4
    fs = [[[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]]]
    ft = [[[[1.0, 1.0], [1.0, 1.0]], [[1.0, 1.0], [1.0, 1.0]]]]
    assert ATLoss(stages=(0,))(_stages(fs), _stages(ft)).item() == pytest.approx((2 - math.sqrt(2)) / 4, rel=1e-5)
    # hint with the identity regressor: mean of (1-0)², 0, (3-2)², (4-6)² = 6/4
    hint = HintLoss(nn.Identity(), 0)
    assert hint(_stages([[[[1.0, 2.0], [3.0, 4.0]]]]), _stages([[[[0.0, 2.0], [2.0, 6.0]]]])).item() == 1.5
    # SP on two samples: G_s = [[1, 1], [1, 2]], G_t = I, rows L2-normalised, ‖·‖²_F / B²
    s = torch.tensor([[1.0, 0.0], [1.0, 1.0]])[:, :, None, None]
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])[:, :, None, None]
    r2, r5 = 1 / math.sqrt(2), 1 / math.sqrt(5)
    expected = ((r2 - 1) ** 2 + r2**2 + r5**2 + (2 * r5 - 1) ** 2) / 4
    assert SPLoss(stage=0)({"stages": [s]}, {"stages": [t]}).item() == pytest.approx(expected, rel=1e-5)
    # PKT: K = (cos + 1)/2, rows normalised, mean over B² of P_t log(P_t / P_s)
    c = (1 + r2) / 2  # cos 45° between the teacher's two embeddings
    p_s = [[2 / 3, 1 / 3], [1 / 3, 2 / 3]]
    p_t = [[1 / (1 + c), c / (1 + c)], [c / (1 + c), 1 / (1 + c)]]
    expected = sum(p_t[i][j] * math.log(p_t[i][j] / p_s[i][j]) for i in range(2) for j in range(2)) / 4
    pooled = PKTLoss()({"pooled": torch.eye(2)}, {"pooled": torch.tensor([[1.0, 0.0], [1.0, 1.0]])})
    assert pooled.item() == pytest.approx(expected, rel=1e-4)


# ----------------------------------------------------------------------------- the contract


class RecordingLoss(nn.Module):
    """Cross-entropy, recording what the loop hands over (indices, the epoch)."""

    def __init__(self):
        super().__init__()
        self.seen, self.epochs = [], []

    def set_epoch(self, epoch):
        self.epochs.append(epoch)

    def forward(self, logits_s, logits_t, target, index=None, **_):
        self.seen.append(index.clone())
        return {"ce": F.cross_entropy(logits_s, target)}


def test_batches_carry_named_extras_and_the_loop_tells_the_epoch(smoke_cfg):
    cfg = smoke_cfg(epochs=2)
    loaders = train_eval.make_loaders(cfg)
    student, teacher = create_model("vgg8", num_classes=10, width=0.0625), create_model("vgg8", num_classes=10)
    loss = RecordingLoss()
    with pytest.raises(ValueError, match="sample indices.*with_index=True"):
        train_eval.fit(Distiller(student, teacher, loss, needs_index=True), loaders.train, loaders.test, cfg)
    loaders.train.with_index = True
    train_eval.fit(Distiller(student, teacher, loss, needs_index=True), loaders.train, loaders.test, cfg)
    assert loss.epochs == [0, 1]
    first_epoch = torch.cat(loss.seen[: len(loaders.train)])
    order, _ = loaders.train.epoch_plan(0)
    assert torch.equal(first_epoch, order[: len(first_epoch)])


def test_registry_declares_what_each_method_needs():
    for name in ("kd", "kd_ls", "dkd"):
        m = METHODS.get(name)
        assert m.needs_teacher and not m.needs_features and "teacher_cache" in m.reads
    for name in ("fitnet", "at+kd", "rkd", "crd+kd"):
        m = METHODS.get(name)
        assert m.needs_features and "teacher_cache" not in m.reads
    assert METHODS.get("crd").needs_index and not METHODS.get("rkd").needs_index
    assert not METHODS.get("ce").needs_teacher and not METHODS.get("dml").needs_teacher
    # identity keeps only the fields a method reads
    base = make_config("cpu", method="kd", teacher="t")
    assert run_identity(base) == run_identity(make_config("cpu", method="kd", teacher="t", hint_stage=3))
    fit_ = make_config("cpu", method="fitnet", teacher="t")
    assert run_identity(fit_) != run_identity(make_config("cpu", method="fitnet", teacher="t", hint_stage=3))
    assert "teacher" not in run_identity(make_config("cpu", method="dml", teacher="t"))


def test_start_up_errors_before_any_training(smoke_cfg, smoke_teacher):
    with pytest.raises(ValueError, match="needs the teacher's features.*--teacher-cache"):
        distill(smoke_cfg(method="crd", teacher=smoke_teacher.run_dir, teacher_cache=True))
    with pytest.raises(ValueError, match="needs a teacher: pass --teacher"):
        distill(smoke_cfg(method="rkd"))
    with pytest.raises(ValueError, match="16384 negatives per sample but the training set holds 1000"):
        distill(smoke_cfg(method="crd", teacher=smoke_teacher.run_dir))


@pytest.mark.parametrize(
    "method, extra",
    [("dkd", dict(warmup=1.0)), ("crd", dict(crd_negatives=256)), ("crd+kd", dict(crd_negatives=256)), ("rkd", {})],
)
def test_new_methods_train_in_the_smoke_profile(method, extra, smoke_cfg, smoke_teacher):
    # 3 epochs: CRD's term starts to fall once its memory banks hold real embeddings (epoch 2 on)
    result = distill(smoke_cfg(method=method, teacher=smoke_teacher.run_dir, epochs=3, **extra))
    h = load_history(result.run_dir)
    assert h["train_loss"].iloc[-1] < h["train_loss"].iloc[0] and h["val_top1"].iloc[-1] > 20
    term = {"dkd": "train_nckd", "crd": "train_crd", "crd+kd": "train_kd", "rkd": "train_rkd"}[method]
    assert term in h and torch.isfinite(torch.tensor(h[term].values)).all()


class Interrupt(Exception):
    pass


def test_interrupted_crd_run_resumes_bit_identically(smoke_cfg, smoke_teacher, tmp_path, monkeypatch):
    def run(out, stop_after=None):
        cfg = smoke_cfg(method="crd", teacher=smoke_teacher.run_dir, epochs=3, crd_negatives=128, out_dir=str(out))

        def interrupt(epoch, row):
            if epoch == stop_after:
                raise Interrupt

        with monkeypatch.context() as m:
            m.setattr(train_eval, "fit", partial(train_eval.fit, callbacks=(interrupt,)))
            try:
                return distill(cfg)
            except Interrupt:
                return None

    straight = run(tmp_path / "a")
    assert run(tmp_path / "b", stop_after=0) is None
    resumed = run(tmp_path / "b")
    pd.testing.assert_frame_equal(
        straight.history.drop(columns=TIMING_COLUMNS), resumed.history.drop(columns=TIMING_COLUMNS)
    )
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    bank = read_checkpoint(resumed.run_dir)["train_state"]["task"]
    assert bank["loss.feature.memory_s"].shape == (1000, 128)


def test_with_index_yields_positions_in_the_split(synthetic_dir):
    loaders = data_utils.get_cifar10_loaders(batch_size=50, data_dir=synthetic_dir, val_size=200)
    loaders.train.with_index = True
    x, y, extras = next(iter(loaders.train))
    assert torch.equal(loaders.train.labels[extras["index"]], y)

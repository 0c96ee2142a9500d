"""Class-subset specialists (Hinton et al. 2015, section 5): the collapse onto a dustbin, the loss
against hand-computed values, the confusable groups, the inference rule against its closed form and
a direct minimisation, and the whole recipe running on the smoke profile."""

import math

import pytest
import torch

import multi_student as ms
from distiller import distill
from methods.class_specialists import SubsetLoss, collapse, collapse_labels, combine, confusable_groups


def test_collapse_sums_the_classes_outside_the_group_into_the_dustbin():
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    assert collapse(p.log(), [1, 3]).exp().tolist()[0] == pytest.approx([0.2, 0.4, 0.4])
    assert collapse_labels(torch.tensor([0, 1, 2, 3]), [1, 3], 4).tolist() == [2, 0, 2, 1]


def test_subset_loss_matches_hand_computed_values():
    z = torch.zeros(2, 4)  # uniform: collapsed onto {1, 3} it is (0.25, 0.25, 0.5)
    ce = SubsetLoss([1, 3], T=1.0, ce_weight=1.0, kd_weight=0.0)(z, z, torch.tensor([0, 3]))
    assert set(ce) == {"ce"}  # no teacher term at the paper's hard targets
    assert ce["ce"].item() == pytest.approx((-math.log(0.5) - math.log(0.25)) / 2)
    # teacher collapsed (0.5, 0.25, 0.25) against the student's (0.25, 0.25, 0.5):
    # KL = 0.5 ln 2 + 0 + 0.25 ln 0.5 = 0.25 ln 2
    t = torch.tensor([[0.125, 0.5, 0.125, 0.25]] * 2).log()
    kd = SubsetLoss([1, 3], T=1.0, ce_weight=0.0, kd_weight=2.0)(z, t, torch.tensor([0, 3]))
    assert kd["kd"].item() == pytest.approx(2 * 0.25 * math.log(2), abs=1e-6)
    # only the collapsed distribution counts: moving mass between classes 0 and 2 changes nothing
    z2 = torch.tensor([[0.4, 0.25, 0.1, 0.25]] * 2).log()  # collapsed onto {1, 3}: (0.25, 0.25, 0.5) again
    same = SubsetLoss([1, 3], T=1.0, kd_weight=1.0)(z2, t, torch.tensor([0, 3]))
    assert same["ce"].item() == pytest.approx(ce["ce"].item(), abs=1e-5)


def test_confusable_groups_pick_the_classes_that_rise_and_fall_together():
    g = torch.Generator().manual_seed(0)
    n = 2000
    a, b = torch.rand(n, generator=g), torch.rand(n, generator=g)
    probs = torch.rand(n, 6, generator=g) * 0.05
    probs[:, 0] += a  # classes 0 and 4 share a, 1, 3 and 5 share b
    probs[:, 4] += a
    probs[:, 1] += b * 0.6
    probs[:, 3] += b
    probs[:, 5] += b * 0.8
    probs = probs / probs.sum(1, keepdim=True)
    assert confusable_groups(probs, 1, 2) == [[0, 4]]  # the strongest pair first
    groups = confusable_groups(probs, 2, 2)
    assert sorted(map(tuple, groups)) == [(0, 4), (3, 5)] and len({c for gr in groups for c in gr}) == 4
    with pytest.raises(ValueError, match="do not fit"):
        confusable_groups(probs, 3, 3)


def _objective(q, p_g, p_special, groups, active):
    out = (p_g * (p_g.log() - q.log())).sum(1)
    for p_m, classes, on in zip(p_special, groups, active, strict=True):
        out = out + on * (p_m * (p_m.log() - collapse(q.log(), classes))).sum(1)
    return out


def test_combine_is_the_papers_minimiser():
    # three classes, group {0, 1}: the dustbin is class 2 alone, so the minimiser is the average
    p_g = torch.tensor([[0.5, 0.3, 0.2]])
    p_m = torch.tensor([[0.1, 0.7, 0.2]])
    assert combine(p_g, [p_m], [[0, 1]])[0].tolist() == pytest.approx([0.3, 0.5, 0.2], abs=1e-5)
    # the generalist's top class is outside the group: the specialist is not asked
    assert combine(torch.tensor([[0.2, 0.3, 0.5]]), [p_m], [[0, 1]])[0].tolist() == pytest.approx([0.2, 0.3, 0.5])
    # five classes, two groups, against a direct minimisation over softmax logits (the paper's way)
    g = torch.Generator().manual_seed(1)
    p_g = torch.softmax(torch.randn(4, 5, generator=g), 1)
    p_g[:, 0] += 1.0  # class 0 on top: group {0, 1} active, group {3, 4} active only with top_n = 5
    p_g /= p_g.sum(1, keepdim=True)
    groups = [[0, 1], [3, 4]]
    p_special = [torch.softmax(torch.randn(4, 3, generator=g), 1) for _ in groups]
    for top_n, active in [(1, [1.0, 0.0]), (5, [1.0, 1.0])]:
        q = combine(p_g, p_special, groups, top_n=top_n).double()
        z = p_g.log().double().clone().requires_grad_(True)
        opt = torch.optim.LBFGS([z], max_iter=500, tolerance_grad=1e-12, line_search_fn="strong_wolfe")

        def closure(z=z, opt=opt, active=active):
            opt.zero_grad()
            loss = _objective(z.softmax(1), p_g.double(), [p.double() for p in p_special], groups, active).sum()
            loss.backward()
            return loss

        opt.step(closure)
        assert q.sum(1).tolist() == pytest.approx([1.0] * 4)
        assert (q - z.softmax(1)).abs().max().item() < 1e-4


def test_a_class_specialist_needs_its_classes(smoke_cfg, smoke_teacher):
    with pytest.raises(ValueError, match="needs --special-classes"):
        distill(smoke_cfg(method="class_specialist", teacher=smoke_teacher.run_dir))
    with pytest.raises(ValueError, match="classes 0-9"):
        distill(smoke_cfg(method="class_specialist", teacher=smoke_teacher.run_dir, special_classes="3,12", epochs=1))
    with pytest.raises(ValueError, match="e.g. 3,5"):
        distill(smoke_cfg(method="class_specialist", teacher=smoke_teacher.run_dir, special_classes="3;5"))


def test_the_recipe_runs_and_the_specialists_start_from_the_generalist(smoke_cfg, smoke_teacher):
    cfg = smoke_cfg(method="kd", teacher=smoke_teacher.run_dir, subset=26, epochs=2, threads=1)
    group = ms.train_class_specialists(cfg, k=2, size=2, specialist_epochs=1)
    assert len(group.groups) == 2 and len({c for g in group.groups for c in g}) == 4
    for s, classes in zip(group.specialists, group.groups, strict=True):
        assert s.config.init_from == group.generalist.run_dir and s.config.epochs == 1
        assert s.config.special_classes == ",".join(map(str, classes)) and "train_ce" in s.history
    out = ms.evaluate_class_specialists(group, ms.make_loaders(cfg).val)
    assert set(out) == {"generalist_top1", "combined_top1", "active_share", "params"}
    assert 0 <= out["active_share"] <= 100 and out["params"] == 3 * ms.count_params(group.generalist.model)
    again = ms.train_class_specialists(cfg, k=2, size=2, specialist_epochs=1)  # finished runs are read back
    assert [s.run_dir for s in again.specialists] == [s.run_dir for s in group.specialists]

"""Feature losses: zero at equal features, shapes for every VGG pair, gradients, attention maps."""

import itertools

import pytest
import torch
from torch import nn

from feature_kd import ATLoss, ConvReg, FeatureKD, HintLoss, PKTLoss, SPLoss, attention_map
from model import create_model, list_models
from train_kd import Distiller, distill, list_methods


def feats(model, x):
    return model(x, features=True)[1]


@pytest.mark.parametrize("loss", [ATLoss(), SPLoss(), PKTLoss(), HintLoss(nn.Identity(), 2)])
def test_zero_when_features_are_equal(loss):
    torch.manual_seed(0)
    f = feats(create_model("vgg8", num_classes=10, width=0.125), torch.randn(6, 3, 32, 32))
    assert loss(f, f).abs().item() < 1e-6
    other = feats(create_model("vgg8", num_classes=10, width=0.125), torch.randn(6, 3, 32, 32))
    assert loss(f, other).item() > 1e-7  # PKT is small by nature: its benchmark weight is 30000


@pytest.mark.parametrize("s_name,t_name", list(itertools.product(list_models(), repeat=2)))
@pytest.mark.parametrize("stage", range(5))
def test_hint_regressor_shapes_for_vgg_pairs(s_name, t_name, stage):
    student = create_model(s_name, num_classes=10, width=0.125)
    teacher = create_model(t_name, num_classes=10, width=0.25)
    x = torch.randn(2, 3, 32, 32)
    hint = HintLoss.between(student, teacher, stage)
    out = hint.regressor(feats(student, x)["stages"][stage])
    assert out.shape == feats(teacher, x)["stages"][stage].shape
    assert torch.isfinite(hint(feats(student, x), feats(teacher, x)))


def test_regressor_kernels_follow_the_shapes():
    assert ConvReg(8, 16, 8, 4)(torch.randn(2, 8, 8, 8)).shape == (2, 16, 4, 4)
    assert ConvReg(8, 16, 4, 8)(torch.randn(2, 8, 4, 4)).shape == (2, 16, 8, 8)
    assert ConvReg(8, 16, 6, 4)(torch.randn(2, 8, 6, 6)).shape == (2, 16, 4, 4)
    with pytest.raises(ValueError, match="no regressor"):
        ConvReg(8, 16, 3, 8)


def test_attention_maps_have_unit_norm_and_ignore_channel_order():
    f = torch.randn(4, 16, 8, 8)
    a = attention_map(f)
    assert a.shape == (4, 64) and torch.allclose(a.norm(dim=1), torch.ones(4))
    assert torch.allclose(attention_map(f[:, torch.randperm(16)]), a, atol=1e-6)


@pytest.mark.parametrize("method", ["fitnet", "at", "sp", "pkt", "fitnet+kd"])
def test_gradients_reach_student_and_adapters_never_teacher(method, smoke_cfg):
    from train_kd import get_method

    cfg = smoke_cfg(method=method)
    student = create_model("vgg8", num_classes=10, width=0.125)
    teacher = create_model("vgg11", num_classes=10, width=0.25)
    loss = get_method(method)(cfg, student, teacher)
    distiller = Distiller(student, teacher, loss, needs_features=True).train()
    logits, terms = distiller(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))
    assert method.split("+")[0] in terms and ("kd" in terms) == method.endswith("+kd")
    sum(terms.values()).backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is not None for p in distiller.loss.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_feature_term_is_weighted_and_methods_are_registered():
    f = {"stages": [torch.randn(4, 8, 2, 2)] * 5, "pooled": torch.randn(4, 8)}
    g = {"stages": [torch.randn(4, 8, 2, 2)] * 5, "pooled": torch.randn(4, 8)}
    logits, y = torch.randn(4, 10), torch.randint(0, 10, (4,))
    terms = FeatureKD("sp", SPLoss(), 3000.0)(logits, logits, y, f, g)
    assert terms["sp"].item() == pytest.approx(3000 * SPLoss()(f, g).item(), rel=1e-5)
    assert {"fitnet", "at", "sp", "pkt", "at+kd", "pkt+kd"} <= set(list_methods())


def test_feature_method_trains_through_the_loop(smoke_cfg):
    from train_eval import train

    teacher = train(smoke_cfg(model="vgg11", width=0.125, epochs=1))
    result = distill(smoke_cfg(method="fitnet", teacher=teacher.run_dir, epochs=2))
    assert {"train_ce", "train_fitnet"} <= set(result.history.columns)
    assert result.history["train_fitnet"].iloc[-1] < result.history["train_fitnet"].iloc[0]


def test_two_stage_fitnets_stage1_trains_only_up_to_the_hint(smoke_cfg):
    from model import read_checkpoint
    from train_eval import train

    teacher = train(smoke_cfg(model="vgg11", width=0.125, epochs=1))
    torch.manual_seed(0)
    init = create_model("vgg8", num_classes=10, width=0.0625).state_dict()
    stage1 = distill(smoke_cfg(method="fitnet_stage1", teacher=teacher.run_dir, epochs=2, hint_stage=1))
    after = read_checkpoint(stage1.run_dir)["model"]
    params = dict(create_model("vgg8", num_classes=10, width=0.0625).named_parameters())
    for name in params:
        moved = not torch.equal(init[name], after[name])
        expected = name.startswith(("stages.0.", "stages.1."))
        assert moved == expected, name
    assert stage1.history["train_hint"].iloc[-1] < stage1.history["train_hint"].iloc[0]
    # stage 2 starts from stage 1's weights (lr 0 here, so they must come out unchanged)
    stage2 = distill(smoke_cfg(method="kd", teacher=teacher.run_dir, epochs=1, init_from=stage1.run_dir, lr=0.0))
    final = read_checkpoint(stage2.run_dir)["model"]
    assert all(torch.equal(after[name], final[name]) for name in params)


def test_linear_cka_by_construction():
    from analysis import linear_cka

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 30, generator=gen)
    q, _ = torch.linalg.qr(torch.randn(30, 30, generator=gen))
    assert linear_cka(x, 3 * x @ q) == pytest.approx(1.0, abs=1e-9)  # rotation and scale invariant
    assert linear_cka(x, torch.randn(200, 50, generator=gen)) < 0.3


def test_linear_cka_matches_the_centred_feature_formula():
    from analysis import linear_cka

    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(50, 7, generator=gen).double(), torch.randn(50, 4, generator=gen).double()
    xc, yc = x - x.mean(0), y - y.mean(0)
    hsic = lambda a, b: (a.t() @ b).pow(2).sum()  # noqa: E731  ‖XᵀY‖²_F = tr(K L)
    expected = hsic(xc, yc) / (hsic(xc, xc) * hsic(yc, yc)).sqrt()
    assert linear_cka(x, y) == pytest.approx(expected.item(), rel=1e-9)


def test_cka_bootstrap_ci_brackets_the_estimate_and_shrinks_with_images():
    from analysis import cka_bootstrap

    gen = torch.Generator().manual_seed(2)
    y = torch.randn(200, 20, generator=gen)
    xs = [y @ torch.randn(20, 20, generator=gen) + torch.randn(200, 20, generator=gen) for _ in range(3)]
    out = cka_bootstrap(xs, y, n_boot=40)
    assert len(out["per_x"]) == 3 and out["cka"] == pytest.approx(sum(out["per_x"]) / 3)
    assert out["ci_low"] < out["cka"] < out["ci_high"]
    few = cka_bootstrap([x[:40] for x in xs], y[:40], n_boot=40)
    assert few["ci_high"] - few["ci_low"] > out["ci_high"] - out["ci_low"]
    same = cka_bootstrap(y, y, n_boot=20)
    assert same["ci_low"] == pytest.approx(1.0) and same["ci_high"] == pytest.approx(1.0)


def test_debiased_cka_is_near_zero_for_independent_features_where_plain_cka_is_not():
    from analysis import debiased_cka, linear_cka

    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(100, 50, generator=gen), torch.randn(100, 50, generator=gen)
    assert linear_cka(x, y) > 0.3  # finite-sample bias: about d / n
    assert abs(debiased_cka(x, y)) < 0.05
    assert debiased_cka(x, 2 * x) == pytest.approx(1.0)


def test_term_table_shows_each_groups_weighted_terms_at_first_and_last_epoch():
    from types import SimpleNamespace

    import pandas as pd

    from analysis import term_table

    def run(ce, feat):
        history = pd.DataFrame(
            {"epoch": [1, 2, 3], "train_loss": [ce[0] + feat[0], 0, ce[1] + feat[1]], "train_ce": [ce[0], 0, ce[1]]}
            | {"train_at": [feat[0], 0, feat[1]], "train_top1": [10, 20, 30], "test_top1": [1, 2, 3]}
        )
        return SimpleNamespace(history=history)

    table = term_table({"at": [run((2.0, 1.0), (6.0, 3.0)), run((4.0, 1.0), (8.0, 5.0))]})
    assert list(table.columns) == ["ce", "at", "loss"]
    assert table.loc[("at", 1)].tolist() == [3.0, 7.0, 10.0]
    assert table.loc[("at", 3)].tolist() == [1.0, 4.0, 5.0]

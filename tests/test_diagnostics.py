"""Logit standardisation and the teacher-student diagnostics against references."""

import math
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from scipy import stats

from analysis import conflict_analysis, expected_calibration_error, per_sample_kl, spearman_rows, top1_agreement
from train_kd import KDLoss, LogitStandardKDLoss, kd_loss, standardize


def test_standardised_loss_ignores_shift_and_scale_of_either_model():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(16, 10, generator=gen), torch.randn(16, 10, generator=gen)
    y = torch.randint(0, 10, (16,), generator=gen)
    loss = LogitStandardKDLoss(T=2.0, ce_weight=0.0, kd_weight=1.0)
    base = loss(s, t, y)["kd"]
    shift = torch.randn(16, 1, generator=gen)
    scale = torch.rand(16, 1, generator=gen) * 5 + 0.1
    for s2, t2 in [(s + shift, t), (s, t - shift), (s * scale, t), (s, t * scale), (3 * s + 1, 0.2 * t - 4)]:
        assert loss(s2, t2, y)["kd"].item() == pytest.approx(base.item(), rel=1e-4)
    assert KDLoss(T=2.0, ce_weight=0.0, kd_weight=1.0)(s * 3, t, y)["kd"].item() != pytest.approx(base.item(), rel=1e-2)


def test_standardised_loss_equals_kd_on_standardised_logits():
    s, t, y = torch.randn(8, 100), torch.randn(8, 100), torch.randint(0, 100, (8,))
    zs, zt = standardize(s), standardize(t)
    assert zs.mean(1).abs().max() < 1e-5 and (zs.std(1) - 1).abs().max() < 1e-5
    ls = LogitStandardKDLoss(T=4.0, ce_weight=0.1, kd_weight=0.9)(zs, zt, y)
    kd = KDLoss(T=4.0, ce_weight=0.1, kd_weight=0.9)(zs, zt, y)
    assert ls["kd"].item() == pytest.approx(kd["kd"].item(), rel=1e-4)


def test_toy_example_of_sun_et_al_orders_the_students():
    # teacher [1, 4, 3, 1]; A is close in magnitude but ranks classes 2 > 1; B is 10x smaller, same ranking
    teacher = torch.tensor([[1.0, 4.0, 3.0, 1.0]])
    a = torch.tensor([[2.0, 2.8, 3.0, 1.0]])
    b = torch.tensor([[0.1, 0.4, 0.3, 0.1]])
    assert kd_loss(a, teacher, T=1.0) < kd_loss(b, teacher, T=1.0)  # plain KL prefers A
    assert kd_loss(standardize(b), standardize(teacher), T=1.0) < kd_loss(standardize(a), standardize(teacher), T=1.0)
    assert kd_loss(standardize(b), standardize(teacher), T=1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_spearman_matches_scipy():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, 100, generator=gen), torch.randn(50, 100, generator=gen)
    b[:10] = a[:10] * 2 + 0.1 * b[:10]
    ours = spearman_rows(a, b)
    ref = [stats.spearmanr(a[i], b[i]).statistic for i in range(50)]
    assert torch.allclose(ours.double(), torch.tensor(ref, dtype=torch.float64), atol=1e-6)
    assert spearman_rows(a, a).min().item() == pytest.approx(1.0)
    assert spearman_rows(a, -a).max().item() == pytest.approx(-1.0)


def test_spearman_averages_tied_ranks_like_scipy():
    # fp16 logits tie often; the result must not depend on the order of tied classes
    a = torch.tensor([[1.0, 2.0, 2.0, 3.0, 3.0, 3.0], [0.0, 0.0, 0.0, 0.0, 1.0, 2.0]])
    b = torch.tensor([[3.0, 1.0, 2.0, 2.0, 5.0, 4.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    ref = [stats.spearmanr(a[i], b[i]).statistic for i in range(2)]
    assert spearman_rows(a, b).tolist() == pytest.approx(ref, abs=1e-6)
    perm = torch.tensor([2, 1, 0, 5, 4, 3])  # the same class order in both: tied ranks move, the value must not
    assert spearman_rows(a[:, perm], b[:, perm]).tolist() == pytest.approx(ref, abs=1e-6)


def test_per_sample_kl_and_agreement_by_hand():
    s = torch.tensor([[0.0, 0.0, 0.0], [0.0, 5.0, 0.0]])
    t = torch.tensor([[math.log(2.0), 0.0, 0.0], [0.0, 5.0, 0.0]])
    kl = per_sample_kl(s, t)
    assert kl[0].item() == pytest.approx(0.5 * math.log(9 / 8), rel=1e-6) and kl[1].item() == pytest.approx(0, abs=1e-9)
    assert kl.mean().item() == pytest.approx(kd_loss(s, t, T=1.0).item(), rel=1e-5)
    assert top1_agreement(s, t) == pytest.approx(100.0)  # argmax of a uniform row is class 0
    assert top1_agreement(torch.eye(4), torch.eye(4).flip(1)) == 0.0


def test_expected_calibration_error_against_a_loop():
    gen = torch.Generator().manual_seed(1)
    logits, labels = torch.randn(1000, 10, generator=gen) * 3, torch.randint(0, 10, (1000,), generator=gen)
    conf, pred = logits.softmax(1).max(1)
    total = 0.0
    for b in range(15):
        lo, hi = b / 15, (b + 1) / 15
        in_bin = (conf >= lo) & (conf < hi) if b < 14 else (conf >= lo)
        if in_bin.any():
            acc = (pred[in_bin] == labels[in_bin]).float().mean()
            total += in_bin.float().mean() * (acc - conf[in_bin].mean()).abs()
    assert expected_calibration_error(logits, labels) == pytest.approx(100 * float(total), rel=1e-4)
    perfect = torch.full((4, 2), -1e4)
    perfect[torch.arange(4), torch.tensor([0, 1, 0, 1])] = 1e4
    assert expected_calibration_error(perfect, torch.tensor([0, 1, 0, 1])) == pytest.approx(0.0, abs=1e-6)


def test_conflict_analysis_counts_by_hand():

    teacher = torch.tensor([[3.0, 2.9, 0.0], [3.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    kd = torch.tensor([[2.9, 3.0, 0.0], [3.0, 0.0, 0.0], [0.0, 3.0, 0.0]])  # sample 0: close, wrong class
    independent = torch.tensor([[5.0, 0.0, 0.0], [0.0, 0.0, 4.0], [0.0, 4.0, 0.0]])  # sample 0: far, right class
    standardized = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    out = conflict_analysis(teacher, kd, independent, standardized)
    assert out["conflicts"] == 1 and out["mask"].tolist() == [True, False, False] and out["corrected"] == 1
    assert conflict_analysis(teacher, kd, independent, kd)["corrected"] == 0


def test_reliability_bins_and_output_stats_by_hand():
    from analysis import output_stats, reliability_bins

    p = torch.tensor([[0.95, 0.05], [0.95, 0.05], [0.35, 0.65], [0.45, 0.55]])
    logits, labels = p.log(), torch.tensor([0, 1, 1, 1])  # right, wrong, right, right
    table = reliability_bins(logits, labels, n_bins=10)
    assert table["bin_low"].tolist() == pytest.approx([0.5, 0.6, 0.9])
    assert table["confidence"].tolist() == pytest.approx([55, 65, 95], abs=1e-4)
    assert table["accuracy"].tolist() == [100, 100, 50] and table["count"].tolist() == [1, 1, 2]
    ece = (abs(100 - 55) + abs(100 - 65) + 2 * abs(50 - 95)) / 4  # 42.5
    assert expected_calibration_error(logits, labels, n_bins=10) == pytest.approx(ece, abs=1e-4)
    out = output_stats(logits, labels, teacher_logits=logits)
    assert out["top1"] == 75 and out["confidence"] == pytest.approx((95 + 95 + 65 + 55) / 4, abs=1e-4)
    assert out["nll"] == pytest.approx(-(math.log(0.95) + math.log(0.05) + math.log(0.65) + math.log(0.55)) / 4)
    assert out["agreement"] == 100 and out["kl_mean"] == pytest.approx(0, abs=1e-6)


def test_cell_table_means_cis_and_the_pick():
    from analysis import cell_table

    df = pd.DataFrame(
        {"T": [1, 1, 4, 4], "val_top1": [60.0, 62.0, 70.0, 71.0], "test_top1": [59.0, 61.0, 69.0, 72.0]}
    ).assign(best=lambda d: d["T"] == 4)
    table = cell_table(df, ["T"])
    assert table.loc[4, "n"] == 2 and table.loc[4, "val_top1"] == 70.5 and table.loc[1, "test_top1"] == 60
    assert table.loc[1, "val_top1_ci95"] == pytest.approx(stats.t.ppf(0.975, 1) * math.sqrt(2) / math.sqrt(2))
    assert table.loc[4, "picked"] == "← picked" and table.loc[1, "picked"] == ""


def test_kd_decomposition_adds_up_to_kd():
    from train_kd import kd_decomposition

    torch.manual_seed(0)
    zs, zt, y = torch.randn(64, 10), 3 * torch.randn(64, 10), torch.randint(0, 10, (64,))
    parts = kd_decomposition(zs, zt, y, T=4.0)
    assert parts["kd"] == pytest.approx(parts["tckd"] + parts["weighted_nckd"], rel=1e-5)
    assert 0 < parts["teacher_1-p_target"] < 1


def test_logit_conflicts_seed_definition_by_hand():
    from analysis import logit_conflicts, logit_relation

    # 3 classes, 3 samples. Sample 0: teacher says 0, label 0, independent says 0 (far from the
    # teacher), KD says 1 while being closer in KL -> a conflict. Sample 1: KD predicts the label -> none.
    teacher = torch.tensor([[3.0, 2.9, -5.0], [0.0, 3.0, 0.0], [2.0, 0.0, 0.0]])
    kd = torch.tensor([[2.9, 3.0, -5.0], [3.0, 0.0, 0.0], [2.0, 0.0, 0.0]])
    independent = torch.tensor([[9.0, -9.0, 0.0], [0.0, 3.0, 0.0], [2.0, 0.0, 0.0]])
    labels = torch.tensor([0, 0, 0])
    standardized = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    out = logit_conflicts(teacher, kd, independent, labels, standardized, T=3.0)
    assert out["mask"].tolist() == [True, False, False] and out["conflicts"] == 1
    assert out["agreement"] == 100.0  # the standardised student predicts 0, as the teacher
    zt = (teacher - teacher.mean(1, keepdim=True)) / teacher.std(1, keepdim=True)
    z = lambda x: (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True)  # noqa: E731
    flipped = per_sample_kl(z(kd)[:1], zt[:1], 3.0) > per_sample_kl(z(independent)[:1], zt[:1], 3.0)
    assert out["reversed"] == int(flipped.item())
    rel = logit_relation(teacher, teacher)
    assert rel["kl_raw"] == pytest.approx(0, abs=1e-6) and rel["spearman"] == pytest.approx(1.0)


def _result(history: dict) -> SimpleNamespace:  # what plot_curves reads of a RunResult
    return SimpleNamespace(history=pd.DataFrame({"epoch": [1, 2, 3], **history}))


def test_demo_curves_plot_a_column_read_every_epoch(tmp_path):
    """Test is read only at the last epoch: without a validation split the demo's figure draws the
    augmented training accuracy, not one test point per run."""
    import matplotlib

    matplotlib.use("Agg")
    from experiment import plot_curves

    nan = float("nan")
    no_val = {"train_top1": [30.0, 40.0, 50.0], "test_top1": [nan, nan, 45.0]}
    fig = plot_curves({"kd": [_result(no_val)]}, _result(no_val), str(tmp_path / "a.png"))
    ax = fig.axes[0]
    assert ax.get_ylabel() == "training (augmented) top-1 (%)"
    assert list(ax.lines[0].get_ydata()) == [30.0, 40.0, 50.0]
    with_val = no_val | {"val_top1": [31.0, 41.0, 51.0]}
    fig = plot_curves({"kd": [_result(with_val)]}, _result(with_val), str(tmp_path / "b.png"))
    assert fig.axes[0].get_ylabel() == "validation top-1 (%)"
    assert list(fig.axes[0].lines[0].get_ydata()) == [31.0, 41.0, 51.0]

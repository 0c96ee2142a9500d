"""Several students: partitions and budgets, the mutual-learning loss, ensembles, group runs."""

import copy

import pytest
import torch
import torch.nn.functional as F

import multi_student as ms
from analysis import group_metrics
from data_utils import unaugmented
from model import count_params, create_model, load_checkpoint
from train_eval import build_optimizer, make_config, make_loaders
from train_kd import KDLoss


@pytest.mark.parametrize("dim,k", [(128, 4), (130, 4), (64, 1), (10, 10), (100, 3)])
def test_partition_covers_the_embedding_exactly_once(dim, k):
    slices = ms.partition(dim, k)
    assert len(slices) == k
    assert torch.equal(torch.cat(slices), torch.arange(dim))  # every index once, in order
    sizes = [len(s) for s in slices]
    assert max(sizes) - min(sizes) <= 1


def test_partition_rejects_more_students_than_dimensions():
    with pytest.raises(ValueError, match="among 5 students"):
        ms.partition(4, 5)


def test_budget_check_fails_when_exceeded():
    group = ms.ensemble(10, 0.125, "vgg8", 4)
    n = count_params(group)
    assert n == 4 * count_params(create_model("vgg8", num_classes=10, width=0.125))
    assert ms.check_budget(group, n) == n  # exactly at the budget is allowed
    with pytest.raises(ValueError, match=f"{n:,} parameters, over the budget of {n - 1:,}"):
        ms.check_budget(group, n - 1)


def test_width_for_budget_is_the_widest_that_fits():
    budget = count_params(create_model("vgg8", num_classes=10, width=0.25))
    step = 1 / 256
    w = ms.width_for_budget(lambda w: ms.ensemble(10, w, "vgg8", 4), budget, step)
    assert count_params(ms.ensemble(10, w, "vgg8", 4)) <= budget
    assert count_params(ms.ensemble(10, w + step, "vgg8", 4)) > budget
    assert ms.width_for_budget(lambda w: ms.ensemble(10, w, "vgg8", 1), budget, step) == 0.25
    with pytest.raises(ValueError, match="even width"):
        ms.width_for_budget(lambda w: ms.ensemble(10, w, "vgg8", 2), 100, step)


def test_group_runs_check_their_budget(smoke_cfg):
    cfg = smoke_cfg(members=2, budget=1000, method="dml")
    with pytest.raises(ValueError, match="over the budget"):
        ms.mutual_learning(cfg)


# ----------------------------------------------------------------------------- mutual learning


def test_mutual_learning_loss_equals_ce_when_peers_agree():
    torch.manual_seed(0)
    z = torch.randn(5, 10)
    y = torch.randint(0, 10, (5,))
    terms = ms.MutualLearningLoss(T=3.0)(torch.stack([z, z, z]), y)
    for i in range(3):
        assert terms[f"peer_{i}"].abs().item() < 1e-6
        assert torch.allclose(terms[f"ce_{i}"], F.cross_entropy(z, y))
    assert torch.allclose(sum(terms.values()), 3 * F.cross_entropy(z, y), atol=1e-6)


def test_mutual_learning_peer_term_by_hand():
    z = torch.tensor([[[2.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]], [[0.0, 0.0, 0.0]]])  # (M=3, B=1, K=3)
    y = torch.tensor([0])
    T, w = 2.0, 0.5
    terms = ms.MutualLearningLoss(T=T, weight=w)(z, y)
    p = [torch.softmax(z[i, 0] / T, 0) for i in range(3)]

    def kl(a, b):  # KL(a ‖ b)
        return (a * (a / b).log()).sum()

    expected = w * T * T * (kl(p[1], p[0]) + kl(p[2], p[0])) / 2
    assert terms["peer_0"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_mutual_learning_peers_are_detached():
    """A member's gradient comes from its own loss only: another member's terms leave it untouched."""
    torch.manual_seed(0)
    z = torch.randn(3, 4, 10, requires_grad=True)  # (M, B, K)
    y = torch.randint(0, 10, (4,))
    terms = ms.MutualLearningLoss(T=2.0)(z, y)
    (terms["ce_1"] + terms["peer_1"]).backward()
    assert z.grad[1].abs().sum() > 0
    assert torch.equal(z.grad[0], torch.zeros_like(z.grad[0]))
    assert torch.equal(z.grad[2], torch.zeros_like(z.grad[2]))


def test_cohort_gradients_reach_each_member_only_from_its_own_loss():
    torch.manual_seed(0)
    group = ms.ensemble(10, 0.0625, "vgg8", 2)
    teacher = create_model("vgg8", num_classes=10, width=0.125)
    cohort = ms.Cohort(group, ms.MutualLearningLoss(T=4.0, kd=KDLoss(4.0, 0.1, 0.9)), teacher)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    _, terms = cohort(x, y)
    assert set(terms) == {"ce_0", "kd_0", "peer_0", "ce_1", "kd_1", "peer_1"}
    (terms["ce_0"] + terms["kd_0"] + terms["peer_0"]).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in group.members[0].parameters())
    assert all(p.grad is None or not p.grad.any() for p in group.members[1].parameters())
    assert all(p.grad is None for p in teacher.parameters())
    optimizer_params = {id(p) for g in build_optimizer(cohort, make_config("smoke")).param_groups for p in g["params"]}
    assert not optimizer_params & {id(p) for p in teacher.parameters()}
    assert optimizer_params == {id(p) for p in group.parameters()}


def test_mutual_learning_needs_two_students():
    with pytest.raises(ValueError, match="at least 2"):
        ms.MutualLearningLoss()(torch.randn(1, 4, 10), torch.zeros(4, dtype=torch.long))


# ----------------------------------------------------------------------------- ensembles and their evaluation


def test_ensemble_of_identical_members_equals_one_member():
    torch.manual_seed(0)
    member = create_model("vgg8", num_classes=10, width=0.125).eval()
    group = ms.Ensemble([copy.deepcopy(member) for _ in range(3)]).eval()
    x = torch.randn(6, 3, 32, 32)
    assert torch.allclose(group(x), member(x), atol=1e-6)
    metrics = group_metrics([member(x).detach()] * 3, torch.zeros(6, dtype=torch.long))
    assert metrics["disagreement"] == 0
    assert metrics["top1"] == metrics["top1_m0"] == metrics["top1_m2"]


def test_group_metrics_by_hand():
    labels = torch.tensor([0, 1, 2, 0])
    a = F.one_hot(torch.tensor([0, 1, 1, 0]), 3).float() * 1.5  # right on 3 of 4, most confident
    b = F.one_hot(torch.tensor([0, 2, 2, 1]), 3).float()  # right on 2 of 4
    c = F.one_hot(torch.tensor([0, 1, 2, 2]), 3).float()  # right on 3 of 4
    teacher = F.one_hot(torch.tensor([0, 1, 2, 1]), 3).float()
    out = group_metrics([a, b, c], labels, teacher)
    assert (out["top1_m0"], out["top1_m1"], out["top1_m2"]) == (75, 50, 75)
    # pairs: a-b differ on samples 1,2,3 (3/4); a-c on 2,3 (2/4); b-c on 1,3 (2/4)
    assert out["disagreement"] == pytest.approx(100 * (3 + 2 + 2) / 12)
    # summed logits: sample 0 -> class 0 (3.5); 1 -> 1 (2.5 vs 1); 2 -> 2 (2 vs 1.5); 3 -> 0 (1.5 vs 1 vs 1)
    assert out["top1"] == 100
    assert out["teacher_agreement"] == 75


def test_probability_and_logit_averaging_can_disagree():
    # three members, two classes: one very sure of class 0, two mildly sure of class 1
    members = [torch.tensor([[5.0, 0.0]]), torch.tensor([[0.0, 2.0]]), torch.tensor([[0.0, 2.0]])]
    out = group_metrics(members, torch.tensor([1]))
    # logits average to (5/3, 4/3): class 0; probabilities to (0.993 + 2·0.119)/3 = 0.41 for class 0: class 1
    assert out["top1"] == 0 and out["top1_prob"] == 100


def test_folded_head_reads_standardized_inputs_as_the_original_read_raw_ones():
    torch.manual_seed(0)
    head = torch.nn.Linear(6, 3)
    e = torch.randn(5, 6) * 3 + 1
    mean, std = e.mean(0), e.std(0)
    expected = head(e)
    ms.fold_standardization(head, mean, std)
    assert torch.allclose(head((e - mean) / std), expected, atol=1e-5)


def test_group_models_rebuild_from_their_checkpoints(tmp_path):
    from model import save_checkpoint

    ensemble = create_model("ensemble", num_classes=10, width=0.0625, member="vgg8", k=3)
    specialists = create_model("specialists", num_classes=10, width=0.0625, out_dims=[5, 5, 6], frozen=True)
    for model in (ensemble, specialists):
        path = str(tmp_path / "ckpt.pt")
        save_checkpoint(path, model)
        loaded, _ = load_checkpoint(path)
        x = torch.randn(2, 3, 32, 32)
        assert type(loaded) is type(model)
        assert torch.equal(loaded.eval()(x), model.eval()(x))


def test_frozen_specialists_train_only_their_head():
    group = ms.specialists(10, 0.0625, "vgg8", [4, 4], frozen=True)
    group.train()
    assert not any(m.training for m in group.members.modules())  # batch-norm statistics cannot drift
    group(torch.randn(4, 3, 32, 32)).sum().backward()
    assert all(p.grad is None for p in group.members.parameters())
    assert group.head.weight.grad is not None
    assert count_params(group, trainable_only=True) == count_params(group.head)


def test_partition_loss_by_hand():
    target = torch.arange(12.0).view(2, 6)
    slices = ms.partition(6, 2)  # [0, 1, 2], [3, 4, 5]
    outputs = [torch.zeros(2, 3), target[:, 3:] + 1]
    terms = ms.PartitionLoss(slices)(outputs, target)
    assert terms["mse_0"].item() == pytest.approx(target[:, :3].pow(2).mean().item())
    assert terms["mse_1"].item() == pytest.approx(1.0)


# ----------------------------------------------------------------------------- whole runs in the loop


def test_mutual_learning_run_learns_and_reports_every_member(smoke_cfg, smoke_teacher):
    cfg = smoke_cfg(method="dml+kd", members=2, epochs=3, teacher=smoke_teacher.run_dir, teacher_cache=True)
    result = ms.mutual_learning(cfg)
    h = result.history
    assert {"test_top1_m0", "test_top1_m1", "test_disagreement", "train_peer_0", "train_kd_1"} <= set(h.columns)
    assert h["test_top1"].iloc[-1] > 50  # 10 classes: chance is 10%
    assert "-k2-dml+kd-" in result.run_dir
    again = ms.mutual_learning(cfg)  # a finished run is reused, model included
    assert isinstance(again.model, ms.Ensemble)
    assert torch.equal(again.model.members[1].classifier.weight, result.model.members[1].classifier.weight)


def test_specialists_two_stages(smoke_cfg, smoke_teacher):
    cfg = smoke_cfg(members=3, epochs=3, teacher=smoke_teacher.run_dir)
    stage1, stage2 = ms.train_specialists(cfg, head_epochs=2)
    assert stage1.history["val_r2"].iloc[-1] > stage1.history["val_r2"].iloc[0]  # test is read at the end only
    assert {"train_mse_0", "train_mse_2", "test_r2_1"} <= set(stage1.history.columns)
    # stage 2 keeps the stage-1 members exactly and trains only the head
    for a, b in zip(stage1.model.members.parameters(), stage2.model.members.parameters(), strict=True):
        assert torch.equal(a, b)
    teacher_head = smoke_teacher.model.classifier.weight
    assert torch.equal(stage1.model.head.weight, teacher_head)  # stage 1 reads through the teacher's classifier
    assert not torch.equal(stage2.model.head.weight, teacher_head)
    assert stage2.history["test_top1"].iloc[-1] > 50


def test_specialists_with_standardized_targets_ce_and_probes(smoke_cfg, smoke_teacher):
    cfg = smoke_cfg(members=2, epochs=2, teacher=smoke_teacher.run_dir, standardize_targets=True, ce_weight=1.0)
    stage1 = ms.partition_stage(cfg)
    assert {"train_mse_0", "train_mse_1", "train_ce"} <= set(stage1.history.columns)
    loader = unaugmented(make_loaders(cfg).train)
    mean, std = ms.embedding_stats(smoke_teacher.model, loader)
    teacher_head = smoke_teacher.model.classifier
    assert torch.allclose(stage1.model.head.weight, teacher_head.weight * std, atol=1e-5)  # folded, frozen
    assert torch.allclose(stage1.model.head.bias, teacher_head.bias + teacher_head.weight @ mean, atol=1e-5)
    probes = ms.train_probes(stage1, head_epochs=1)
    slices = ms.partition(smoke_teacher.model.embed_dim, 2)
    for k, probe in enumerate(probes):
        assert len(probe.model.members) == 1 and probe.model.head.in_features == len(slices[k])
        for a, b in zip(probe.model.members[0].parameters(), stage1.model.members[k].parameters(), strict=True):
            assert torch.equal(a, b)  # the member stays as stage 1 left it
    with pytest.raises(ValueError, match="members 0-1"):
        ms.head_stage(ms.head_config(stage1.config, stage1.run_dir, 1, probe_member=2))


def test_shared_stream_members_see_one_data_stream(smoke_cfg):
    members = ms.train_ensemble(smoke_cfg(epochs=1), k=2, ensemble_seed=1, shared_stream=True)
    assert [(r.config.seed, r.config.data_seed) for r in members] == [(2, 1), (3, 1)]


def test_ensemble_members_train_separately_and_evaluate_together(smoke_cfg, smoke_teacher):
    cfg = smoke_cfg(method="kd", teacher=smoke_teacher.run_dir, teacher_cache=True)
    members = ms.train_ensemble(cfg, k=2, ensemble_seed=1)
    assert [r.config.seed for r in members] == [2, 3]
    test_loader = make_loaders(cfg).test
    out = ms.evaluate_group([r.model for r in members], test_loader)
    assert out["members"] == 2 and len(out["member_top1"]) == 2
    assert out["params"] == 2 * count_params(members[0].model)
    assert 0 <= out["disagreement"] <= 100
    assert 0 <= out["ensemble_top1_prob"] <= 100


def test_command_line_picks_the_width_from_the_budget(smoke_cfg, smoke_teacher, capsys):
    cfg = smoke_cfg()
    budget = count_params(create_model("vgg8", num_classes=10, width=0.125))
    out = ms.main(
        ["--profile", "smoke", "--data-dir", cfg.data_dir, "--out-dir", cfg.out_dir, "--group", "dml"]
        + ["--members", "2", "--budget", str(budget), "--epochs", "1"]
    )
    assert out["members"] == 2 and out["params"] <= budget
    assert "2 x vgg8" in capsys.readouterr().out


def test_folded_mlp_head_reads_standardized_inputs_as_the_original_read_raw_ones():
    torch.manual_seed(0)
    head = ms.specialists(10, 0.0625, "vgg8", [3, 3], head_hidden=8).head.eval()  # torchvision's VGG head
    e = torch.randn(5, 6) * 3 + 1
    mean, std = e.mean(0), e.std(0)
    expected = head(e)
    ms.fold_standardization(head, mean, std)
    assert torch.allclose(head((e - mean) / std), expected, atol=1e-5)

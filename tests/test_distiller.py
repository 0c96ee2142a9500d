"""The teacher is frozen structurally; methods plug into the loop through the registry."""

import pytest
import torch
from torch import nn

import train_kd
from model import create_model
from train_eval import build_optimizer, make_config
from train_kd import Distiller, FrozenTeacher, KDLoss, distill, get_method, register_method


def make_distiller():
    torch.manual_seed(0)
    student = create_model("vgg8", num_classes=10, width=0.125)
    teacher = create_model("vgg11", num_classes=10, width=0.25)
    return Distiller(student, teacher, KDLoss(T=4.0, ce_weight=0.1, kd_weight=0.9)), teacher


def test_gradients_reach_student_never_teacher():
    distiller, teacher = make_distiller()
    distiller.train()
    logits, terms = distiller(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))
    sum(terms.values()).backward()
    assert all(p.grad is not None for p in distiller.student.parameters())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def test_teacher_stays_in_eval_mode():
    distiller, teacher = make_distiller()
    distiller.train()
    assert distiller.student.training
    assert not teacher.training and not any(m.training for m in teacher.modules())
    # even a direct .train() on the network cannot make its BN statistics move
    teacher.train()
    stats = [b.clone() for b in teacher.buffers()]
    distiller(torch.randn(8, 3, 32, 32) * 3 + 1, torch.randint(0, 10, (8,)))
    assert all(torch.equal(a, b) for a, b in zip(stats, teacher.buffers(), strict=True))


def test_teacher_outside_optimizer_and_checkpoint_but_moves_with_module():
    distiller, teacher = make_distiller()
    opt = build_optimizer(distiller, make_config("smoke"))
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not in_opt & {id(p) for p in teacher.parameters()}
    assert in_opt == {id(p) for p in distiller.student.parameters()}
    assert not any(k.startswith("teacher") for k in distiller.state_dict())
    distiller.double()
    assert all(p.dtype == torch.float64 for p in teacher.parameters())


def test_frozen_teacher_returns_features_on_request():
    teacher = FrozenTeacher(create_model("vgg8", num_classes=10, width=0.125))
    logits, feats = teacher(torch.randn(2, 3, 32, 32), features=True)
    assert logits.shape == (2, 10) and len(feats["stages"]) == 5 and not logits.requires_grad


def test_unknown_method_lists_registered():
    with pytest.raises(KeyError, match="registered: .*kd"):
        get_method("no-such-method")


def test_registered_method_trains_without_touching_the_loop(smoke_cfg):
    class L2Logits(nn.Module):
        """A toy method: mean squared logit difference plus cross-entropy."""

        def forward(self, logits_s, logits_t, target, s_feats=None, t_feats=None):
            assert s_feats is not None and t_feats is not None
            return {"ce": nn.functional.cross_entropy(logits_s, target), "l2": (logits_s - logits_t).pow(2).mean()}

    register_method("test-l2", needs_features=True)(lambda cfg, student, teacher: L2Logits())
    try:
        teacher = distill(smoke_cfg(model="vgg11", width=0.125, epochs=1))
        result = distill(smoke_cfg(method="test-l2", teacher=teacher.run_dir, epochs=1))
        assert {"train_ce", "train_l2", "train_loss"} <= set(result.history.columns)
    finally:
        train_kd.METHODS.pop("test-l2")


def test_bf16_teacher_hands_on_fp32_outputs_close_to_fp32_and_student_trains_in_fp32():
    torch.manual_seed(0)
    net = create_model("vgg11", num_classes=10, width=0.25)
    x = torch.randn(8, 3, 32, 32)
    fp32, bf16 = FrozenTeacher(net), FrozenTeacher(net, bf16=True)
    z32, (z16, f16) = fp32(x), bf16(x, features=True)
    assert z16.dtype == torch.float32 and all(f.dtype == torch.float32 for f in f16["stages"])
    assert f16["pooled"].dtype == torch.float32
    assert not torch.equal(z16, z32)  # it really ran in bf16
    assert torch.allclose(z16, z32, atol=0.05 * z32.abs().max().item())
    student = create_model("vgg8", num_classes=10, width=0.125)
    distiller = Distiller(student, net, KDLoss(T=4.0, ce_weight=0.1, kd_weight=0.9), teacher_bf16=True)
    _, terms = distiller(x, torch.randint(0, 10, (8,)))
    sum(terms.values()).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in student.parameters())
    assert all(p.grad is None for p in net.parameters())


def test_bf16_teacher_and_teacher_cache_together_are_refused(smoke_cfg, smoke_teacher):
    from train_kd import check_method_inputs

    with pytest.raises(ValueError, match="drop one of the two"):
        check_method_inputs(
            smoke_cfg(method="kd", teacher=smoke_teacher.run_dir, teacher_cache=True, teacher_amp="bf16")
        )


class SecondViewOnly(nn.Module):
    """A loss on the second view alone: what reaches the student must come through it."""

    def __init__(self):
        super().__init__()
        self.seen = {}

    def forward(self, logits_s, logits_t, target, strong_s=None, strong_t=None, **_):
        self.seen = {"strong_s": strong_s, "strong_t": strong_t}
        return {"kd": ((strong_s - strong_t) ** 2).mean()}


def test_a_second_view_runs_both_networks_and_its_gradients_reach_the_student_only():
    torch.manual_seed(0)
    student, teacher = create_model("vgg8", num_classes=10, width=0.0625), create_model("vgg8", num_classes=10)
    x, x2, y = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    loss = SecondViewOnly()
    distiller = Distiller(student, teacher, loss, second_view=True)
    _, terms = distiller(x, y, strong=x2)
    terms["kd"].backward()
    assert torch.allclose(loss.seen["strong_t"], teacher(x2)) and loss.seen["strong_s"].requires_grad
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters() if p.ndim > 1)
    assert all(p.grad is None for p in teacher.parameters())
    with pytest.raises(ValueError, match="second view.*strong_view = True"):
        distiller(x, y)
    # a method without the second view never runs the networks on it: the extra is dropped
    kd = Distiller(student, teacher, KDLoss())
    assert set(kd(x, y, strong=x2)[1]) == {"ce", "kd"}

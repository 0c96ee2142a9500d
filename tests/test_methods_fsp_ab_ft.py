"""FSP, AB and FT: their losses pinned to values computed by hand from the papers' equations, their
init stage as the first epochs of the one run, and runs that train and resume to the bit (cohorts:
test_methods_all.py)."""

import math

import pytest
import torch
from torch import nn

from checkpoints import read_checkpoint
from conftest import assert_same_run, interrupted_then_resumed
from distiller import Distiller, distill, get_method
from methods._init_stage import init_epochs
from methods.ab import ABLoss
from methods.fsp import FSPLoss, fsp_matrix
from methods.ft import FTLoss, Paraphraser, Translator
from model import create_model, list_models
from optimizers import build_optimizer
from run_folders import run_dir_for
from train_eval import load_history, make_config, optimizer_step, resolve_recipe

# ----------------------------------------------------------------------------- the losses, by hand


def pool_by_hand(f: torch.Tensor, size: int) -> torch.Tensor:
    """Average over k x k blocks, k = H / size."""
    b, c, h, _ = f.shape
    k = h // size
    return f.reshape(b, c, size, k, size, k).mean((3, 5))


def test_fsp_by_hand_closed_form():
    bottom = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    top = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]]).view(1, 2, 2, 2)
    # G[0, j] = (1/4) Σ_hw bottom · top_j: (1 + 4) / 4 and (2 + 3) / 4
    assert torch.allclose(fsp_matrix(bottom, top), torch.tensor([[[1.25, 1.25]]]))
    ones = torch.ones(1, 1, 2, 2)  # the teacher's G = (1/2, 1/2)
    loss = FSPLoss(stages=(0, 1))({"stages": [bottom, top]}, {"stages": [ones, top]})
    assert loss.item() == pytest.approx(0.75**2)


def test_fsp_by_hand_with_a_pooled_pair():
    torch.manual_seed(0)
    shapes = [(2, 3, 8, 8), (2, 2, 4, 4), (2, 4, 4, 4)]
    s = [torch.randn(shape) for shape in shapes]
    t = [torch.randn(shape) for shape in shapes]

    def gram(a, b):
        size = min(a.shape[-1], b.shape[-1])
        a, b = pool_by_hand(a, size), pool_by_hand(b, size)
        g = torch.zeros(a.shape[0], a.shape[1], b.shape[1])
        for n in range(a.shape[0]):
            for i in range(a.shape[1]):
                for j in range(b.shape[1]):
                    g[n, i, j] = sum(a[n, i, h, w] * b[n, j, h, w] for h in range(size) for w in range(size))
        return g / size**2

    expected = 0.0
    for k in range(2):
        diff = gram(s[k], s[k + 1]) - gram(t[k], t[k + 1])  # (2, C_k, C_k+1)
        expected += (diff**2).sum() / diff.numel()
    loss = FSPLoss(stages=(0, 1, 2))({"stages": s}, {"stages": t})
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_fsp_refuses_unequal_channels_saying_what_would_fix_them():
    from methods.fsp import build_fsp

    teacher = create_model("vgg13", num_classes=10, width=0.25)
    with pytest.raises(ValueError, match=r"teacher's widths \(--width\)"):
        build_fsp(None, create_model("vgg8", num_classes=10, width=0.125), teacher)
    with pytest.raises(ValueError, match="student of the teacher's family"):  # no width of it would do
        build_fsp(None, create_model("mobilenetv2", num_classes=10, width=0.25), teacher)


def test_ab_by_hand_closed_form():
    r = torch.tensor([2.0, 0.5, -0.5, 0.3]).view(1, 1, 2, 2)  # student pre-activations
    t = torch.tensor([1.0, 1.0, -1.0, 0.0]).view(1, 1, 2, 2)  # teacher: fires, fires, not, not (0 is not)
    # margin 1: max(0, 1-2)² + max(0, 1-0.5)² + max(0, 1-0.5)² + max(0, 1+0.3)² = 0 + 0.25 + 0.25 + 1.69
    loss = ABLoss(nn.ModuleList([nn.Identity()]), stages=(0,))({"preact": [r]}, {"preact": [t]})
    assert loss.item() == pytest.approx(3 / 1000 * 2.19, rel=1e-6)


def test_ab_by_hand_over_four_stages_with_their_weights():
    torch.manual_seed(0)
    m = 0.5
    s = [None] + [torch.randn(2, 3, 2, 2) for _ in range(4)]
    t = [None] + [torch.randn(2, 3, 2, 2) for _ in range(4)]
    t[1][0, 0, 0, 0] = 0.0  # a teacher neuron exactly at 0 does not fire
    expected = 0.0
    for k, weight in zip(range(1, 5), (1 / 8, 1 / 4, 1 / 2, 1), strict=True):
        total = 0.0
        for r_, t_ in zip(s[k].flatten().tolist(), t[k].flatten().tolist(), strict=True):
            if t_ > 0:
                total += (r_ - m) ** 2 if r_ < m else 0.0
            else:
                total += (r_ + m) ** 2 if r_ > -m else 0.0
        expected += weight * total / 2
    links = nn.ModuleList([nn.Identity() for _ in range(4)])
    loss = ABLoss(links, margin=m)({"preact": s}, {"preact": t})
    assert loss.item() == pytest.approx(3 / 1000 * expected, rel=1e-5)


def test_ab_connectors_are_identity_or_conv_bn_without_relu():
    same = ABLoss.between(create_model("vgg8", 10, 0.125), create_model("vgg13", 10, 0.125))
    assert all(isinstance(c, nn.Identity) for c in same.connectors)
    other = ABLoss.between(create_model("vgg8", 10, 0.0625), create_model("vgg13_tv", 10, 0.125))
    kinds = [[type(m) for m in c] for c in other.connectors]
    assert kinds[:3] == [[nn.Conv2d, nn.BatchNorm2d]] * 3  # 1x1 convs onto the teacher's channels
    assert other.connectors[3][0].stride == (2, 2)  # stage 4: 4x4 onto the torchvision layout's 2x2


def identity_ft(p: int) -> FTLoss:
    paraphraser = nn.Module()
    paraphraser.encoder = nn.Identity()
    return FTLoss(paraphraser, nn.Identity(), p=p, stage=0)


def test_ft_by_hand_closed_form():
    s = torch.tensor([[[3.0, 0.0]], [[4.0, 0.0]]]).view(1, 2, 1, 2)  # mean_c F² = (12.5, 0): φ = (1, 0)
    t = torch.ones(1, 2, 1, 2)  # φ = (1/√2, 1/√2)
    l1 = identity_ft(1)({"stages": [s]}, {"stages": [t]})
    assert l1.item() == pytest.approx(0.5, rel=1e-6)  # (1 − 1/√2 + 1/√2) / 2
    l2 = identity_ft(2)({"stages": [s]}, {"stages": [t]})
    assert l2.item() == pytest.approx(1 - 1 / math.sqrt(2), rel=1e-6)  # ((1 − 1/√2)² + 1/2) / 2


def test_ft_by_hand_with_a_pooled_factor():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 2, 2)

    def phi(f):
        e = torch.zeros(2, 4)
        for n in range(2):
            for h in range(2):
                for w in range(2):
                    e[n, 2 * h + w] = sum(f[n, c, h, w] ** 2 for c in range(3)) / 3
        return e / e.pow(2).sum(1, keepdim=True).sqrt()

    expected = (phi(pool_by_hand(s, 2)) - phi(t)).abs().mean()
    assert identity_ft(1)({"stages": [s]}, {"stages": [t]}).item() == pytest.approx(expected.item(), rel=1e-5)


def test_ft_init_loss_is_the_paraphrasers_reconstruction_error():
    torch.manual_seed(0)
    paraphraser = Paraphraser(8, rate=0.5)
    assert paraphraser.encoder(torch.randn(2, 8, 4, 4)).shape == (2, 4, 4, 4)
    assert Translator(4, 8, 0.5)(torch.randn(2, 4, 4, 4)).shape == (2, 4, 4, 4)
    for p in paraphraser.parameters():
        nn.init.zeros_(p)  # P(T) = LeakyReLU(0) = 0: the error is mean T²
    t = torch.randn(2, 8, 4, 4).relu()
    loss = FTLoss(paraphraser, Translator(4, 8), stage=0).init_loss({}, {"stages": [t]})
    assert loss.item() == pytest.approx((t**2).mean().item(), rel=1e-6)


# ----------------------------------------------------------------------------- the init stage, in the loop's terms


def test_init_epochs_are_a_share_of_the_run_and_leave_it_a_main_stage():
    share = 30 / 270  # the release: 30 init epochs before 240
    assert [init_epochs(n, share) for n in (270, 240, 30, 4, 1)] == [30, 27, 3, 1, 1]
    assert init_epochs(30, 0.0) == 0
    with pytest.raises(ValueError, match="takes 1 of the run's 1 epochs.*--epochs 2 or more.*--init-fraction 0"):
        resolve_recipe(make_config("smoke", method="ab", teacher="t", epochs=1))
    assert resolve_recipe(make_config("smoke", method="ab", teacher="t", epochs=1, init_fraction=0.0))
    with pytest.raises(ValueError, match="init_fraction must be in"):
        make_config("smoke", method="ft", teacher="t", init_fraction=1.0)
    with pytest.raises(ValueError, match="ft_p is the norm"):
        make_config("smoke", method="ft", teacher="t", ft_p=3)


def test_several_processes_are_refused_up_front(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # DDP would refuse the parameters one stage leaves without a gradient
    with pytest.raises(ValueError, match="run it in one process"):
        resolve_recipe(make_config("smoke", method="fsp", teacher="t"))


def task_for(method: str, width: float = 0.0625, **overrides):
    """A Distiller of vgg11 x1/8 into vgg8 at ``width`` with the method's loss, and the loop's optimiser."""
    torch.manual_seed(0)
    student, teacher = create_model("vgg8", 10, width), create_model("vgg11", 10, 0.125)
    cfg = make_config("smoke", method=method, teacher="t", epochs=9, momentum=0.9, weight_decay=5e-4, **overrides)
    task = Distiller(student, teacher, get_method(method)(cfg, student, teacher), needs_features=True)
    return task, build_optimizer(task, cfg)


def steps(task, optimizer, epoch: int, n: int = 2):
    """``n`` steps of the loop's update in ``epoch``: the terms, and the parameters that moved."""
    task.set_epoch(epoch)
    task.train()
    before = {k: v.detach().clone() for k, v in task.named_parameters()}
    for _ in range(n):
        _, terms, _ = optimizer_step(task, optimizer, torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))
    return terms, {k for k, v in task.named_parameters() if not torch.equal(v, before[k])}


@pytest.mark.parametrize(
    "method, width, init_moves, main_terms, main_moves",
    [
        ("fsp", 0.125, ("student.stages.",), {"ce"}, ("student.",)),
        ("ab", 0.0625, ("student.stages.", "loss.feature.connectors."), {"ce"}, ("student.",)),
        ("ab+kd", 0.125, ("student.stages.",), {"ce", "kd"}, ("student.",)),
        ("ft", 0.0625, ("loss.feature.paraphraser.",), {"ce", "ft"}, ("student.", "loss.feature.translator.")),
        ("ft+kd", 0.0625, ("loss.feature.paraphraser.",), {"ce", "kd", "ft"}, ("student.", "loss.feature.translator.")),
    ],
)
def test_the_init_stage_trains_only_its_term_then_the_main_terms_take_over(
    method, width, init_moves, main_terms, main_moves
):
    task, optimizer = task_for(method, width)  # 9 epochs: 1 init epoch (30/270)
    terms, moved = steps(task, optimizer, epoch=0)
    name = method.split("+")[0]
    assert set(terms) == {f"{name}_init"} and terms[f"{name}_init"].item() > 0
    assert moved and all(k.startswith(init_moves) for k in moved)
    for prefix in init_moves:
        assert any(k.startswith(prefix) for k in moved), prefix
    assert task.student.classifier.weight.grad is None  # weight decay and momentum skip it: unchanged
    terms, moved = steps(task, optimizer, epoch=1)
    assert set(terms) == main_terms and all(torch.isfinite(v) for v in terms.values())
    assert "student.classifier.weight" in moved and all(k.startswith(main_moves) for k in moved)
    # what only the init stage trains (AB's connectors, FT's paraphraser) stays, momentum buffers and all
    if name == "ft":
        assert any(k.startswith("loss.feature.translator.") for k in moved)


@pytest.mark.parametrize("method", ["fsp", "ab", "ft"])
def test_every_registered_pair_of_networks_works(method):
    """Every registered network as the student under vgg13 and as the teacher of vgg8, both stages."""
    names = list_models()
    pairs = [(s, "vgg13") for s in names] + [("vgg8", t) for t in names] + [("vgg11_tv", "vgg19_tv")]
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    cfg = make_config("smoke", method=method, teacher="t", epochs=9)
    for s_name, t_name in pairs:
        student = create_model(s_name, 10, 0.0625)
        teacher = create_model(t_name, 10, 0.0625 if method == "fsp" else 0.125)
        if method == "fsp" and student.stage_channels != teacher.stage_channels:  # MobileNetV2 beside a VGG
            with pytest.raises(ValueError, match="same channels"):
                get_method(method)(cfg, student, teacher)
            continue
        task = Distiller(student, teacher, get_method(method)(cfg, student, teacher), needs_features=True)
        for epoch in (0, 1):
            task.set_epoch(epoch)
            _, terms = task(x, y)
            loss = sum(terms.values())
            loss.backward()
            assert torch.isfinite(loss), (s_name, t_name, epoch)


def test_unusable_shapes_are_refused_saying_what_to_do():
    with pytest.raises(ValueError, match="FSP .* same channels.*--width.*ab, ft, fitnet"):
        task_for("fsp", width=0.0625)
    with pytest.raises(ValueError, match="no factor channel.*--ft-rate"):
        task_for("ft", ft_rate=0.01)


# ----------------------------------------------------------------------------- runs: train, resume

METHODS = ("fsp", "ab", "ft")
RUN = dict(epochs=4, init_fraction=0.5, threads=1)  # 2 init epochs, then 2 main ones


def run_config(synthetic_dir, teacher, out_dir, method):
    width = {"width": 0.125} if method == "fsp" else {}  # FSP: the smoke teacher's channels (vgg11 x1/8)
    return make_config(
        "smoke", data_dir=synthetic_dir, out_dir=str(out_dir), method=method, teacher=teacher, **RUN, **width
    )


@pytest.fixture(scope="module")
def straight(synthetic_dir, smoke_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("solo")
    return {m: distill(run_config(synthetic_dir, smoke_teacher.run_dir, out, m)) for m in METHODS}


def finite(column) -> bool:
    return bool(torch.isfinite(torch.tensor(column.values)).all())


@pytest.mark.parametrize("method", METHODS)
def test_a_run_trains_its_init_stage_then_its_main_stage(method, straight):
    h = load_history(straight[method].run_dir)
    init, main = h.iloc[:2], h.iloc[2:]
    assert finite(init[f"train_{method}_init"]) and init["train_ce"].isna().all()  # a term absent: empty cells
    assert finite(main["train_ce"]) and main[f"train_{method}_init"].isna().all()
    if method == "ft":
        assert finite(main["train_ft"]) and init["train_ft"].isna().all()
    assert main["train_loss"].iloc[-1] < main["train_loss"].iloc[0] and h["val_top1"].iloc[-1] > 20


@pytest.mark.parametrize("method", METHODS)
def test_a_run_interrupted_in_its_init_stage_resumes_bit_identically(
    method, straight, synthetic_dir, smoke_teacher, tmp_path, monkeypatch
):
    cfg = run_config(synthetic_dir, smoke_teacher.run_dir, tmp_path, method)
    resumed = interrupted_then_resumed(cfg, monkeypatch, after_epoch=0)  # the first of the two init epochs
    first = read_checkpoint(run_dir_for(cfg))["metrics"][0]
    assert f"train_{method}_init" in first and "train_ce" not in first
    assert_same_run(straight[method], resumed)

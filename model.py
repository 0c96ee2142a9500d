"""Model registry, group models, parameter/FLOP counts and budgets.

model = create_model("vgg8", num_classes=10, width=0.25)
count_params(model), count_flops(model)

Checkpoints (save, read, rebuild) live in ``checkpoints.py``; their functions are importable from
here too (``from model import load_checkpoint``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import nn

import mobilenetv2
import vgg
from exports import moved
from registry import Registry, UnknownNameError, definition  # noqa: F401  (importable from here, as before)

MODELS = Registry("model")
register_model = MODELS.register  # decorator: @register_model("name") on fn(num_classes=..., width=...)
for _name in vgg.STAGES:
    register_model(_name)(getattr(vgg, _name))
for _name in ("vgg11", "vgg13", "vgg16", "vgg19"):  # torchvision's layout: pytorch-cifar-models' teachers
    register_model(f"{_name}_tv")(functools.partial(vgg.tv_vgg, _name))
register_model("mobilenetv2")(mobilenetv2.mobilenetv2)  # the cross-family student; width 0.5 is ``mobile_half``


# Models made of several registered networks (an ensemble, specialists and their head); their
# checkpoints rebuild like any model's. They stay out of ``list_models``, which lists single networks.
GROUPS = Registry("model group")
register_group = GROUPS.register


def list_models() -> list[str]:
    return MODELS.names()


def _builder(name: str):
    if name in GROUPS:
        return GROUPS[name]
    return MODELS.get(name)  # raises, listing the registered networks


def create_model(name: str, num_classes: int = 100, width: float = 1.0, **kwargs) -> nn.Module:
    """Build a registered model; it remembers how (``model.arch``) so checkpoints can rebuild it."""
    model = _builder(name)(num_classes=num_classes, width=width, **kwargs)
    model.arch = {"name": name, "num_classes": num_classes, "width": width, **kwargs}
    return model


# ----------------------------------------------------------------------------- group models (trained by multi_student)


class Ensemble(nn.Module):
    """Members whose logits are averaged: ``forward(x) = mean_m z_m(x)``."""

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.num_classes = members[0].num_classes

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members])  # (M, B, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.member_logits(x).mean(0)  # (B, K)


@register_group("ensemble")
def ensemble(num_classes: int, width: float, member: str = "vgg8", k: int = 2) -> Ensemble:
    """``k`` networks ``member`` at ``width``; each draws its own initial weights."""
    return Ensemble([create_model(member, num_classes=num_classes, width=width) for _ in range(k)])


class Specialists(nn.Module):
    """Students that each output a slice of an embedding, and a head on their concatenation.

    Member k is a network whose ``num_classes`` is its slice's size (its last linear layer is the
    regressor). The head is linear, or with ``head_hidden`` > 0 torchvision's VGG classifier
    (``vgg.mlp_head``), so that it can be a ``_tv`` teacher's own head. With ``frozen`` the members
    never train: no gradients, eval mode that ``train()`` cannot switch off; only the head learns.
    """

    def __init__(self, members: Sequence[nn.Module], num_classes: int, frozen: bool = False, head_hidden: int = 0):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.out_dims = [m.num_classes for m in members]
        dim = sum(self.out_dims)
        self.head = vgg.mlp_head(dim, head_hidden, num_classes) if head_hidden else nn.Linear(dim, num_classes)
        self.num_classes = num_classes
        self.frozen = frozen
        if frozen:
            self.members.requires_grad_(False).eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.members.eval()
        return self

    def member_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            return [m(x) for m in self.members]  # each (B, d_k)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.member_outputs(x), dim=1)  # (B, Σ d_k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))  # (B, num_classes)


@register_group("specialists")
def specialists(
    num_classes: int,
    width: float,
    member: str = "vgg8",
    out_dims: Sequence[int] = (),
    frozen: bool = False,
    head_hidden: int = 0,
) -> Specialists:
    members = [create_model(member, num_classes=d, width=width) for d in out_dims]
    return Specialists(members, num_classes, frozen, head_hidden)


# ----------------------------------------------------------------------------- size and cost


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@torch.no_grad()
def count_flops(model: nn.Module, input_size=(1, 3, 32, 32)) -> int:
    """Forward FLOPs per image (a multiply-add counts 2), from torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    x = torch.zeros(input_size, device=next(model.parameters()).device)
    counter = FlopCounterMode(display=False)
    with counter:
        model(x)
    model.train(was_training)
    return counter.get_total_flops() // input_size[0]


def summary(model: nn.Module, input_size=(1, 3, 32, 32), depth: int = 3):
    """torchinfo's layer table (output shapes, parameters, mult-adds)."""
    import torchinfo

    return torchinfo.summary(model, input_size=input_size, depth=depth, verbose=0)


def check_budget(model: nn.Module, budget: int, what: str = "the group") -> int:
    """The parameter count of ``model``; raises if it exceeds ``budget`` (0: no budget)."""
    n = count_params(model)
    if budget and n > budget:
        raise ValueError(
            f"{what} has {n:,} parameters, over the budget of {budget:,}; "
            "lower the width or the number of students (width_for_budget finds the widest that fits)"
        )
    return n


def width_for_budget(build: Callable[[float], nn.Module], budget: int, step: float = 1 / 256) -> float:
    """The largest width on a grid of ``step`` whose model ``build(width)`` fits in ``budget`` parameters.

    Parameter counts grow monotonically with the width (channels are rounded widths), so a
    binary search over the grid finds it.
    """

    def fits(n: int) -> bool:
        return count_params(build(n * step)) <= budget

    if not fits(1):
        raise ValueError(f"even width {step:g} needs more than {budget:,} parameters")
    lo, hi = 1, 2
    while fits(hi):  # grow until the budget is exceeded
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo * step


__getattr__ = moved(
    __name__,
    {
        "checkpoints": "save_checkpoint read_checkpoint load_checkpoint resolve_checkpoint state_digest "
        "foreign_checkpoint infer_arch export_repdistiller hub_checkpoint HUB_URLS",
        "atomic_files": "atomic_save remove_stale_temporaries",
    },
)

"""Teacher-student pairs, named in one place: the benchmark and the notebooks read them from here.

    cfg = pair_config("cpu", "vgg13-mv2", method="kd")   # the profile, with this pair's networks
    PAIRS["cpu"]["vgg16-vgg11"].student                   # ("vgg11", 0.125)

A pair fixes the four fields that name the networks (``teacher_model``, ``teacher_width``, ``model``,
``width``), and the students' learning rate where the release trains that student at another one
(MobileNetV2: 0.01; its teacher keeps the profile's 0.05 through ``teacher_lr``); everything else is
the profile's. The first pair of a profile is the profile itself
(the `cpu` profile's demo pair), so its runs keep their folders.

`cpu` widths (FLOPs per 32x32 image from ``model.count_flops``; a CE step's time against the demo
student's, ``cost.measure_cost``, 1 thread, batch 128, on an AVX512 machine beside a 2-worker sweep):

| pair | teacher | student | student MFLOPs | step vs demo student |
|---|---|---|---|---|
| vgg13-vgg8 | VGG13 x1/4 (36.3 MFLOPs) | VGG8 x1/8 | 3.39 | 1 |
| vgg16-vgg11 | VGG16 x1/4 (50.4 MFLOPs) | VGG11 x1/8 | 6.93 | 1.4-1.75x |
| vgg13-mv2 | VGG13 x1/4, the demo's teacher | MobileNetV2 x1/4 | 4.06 | 3.7x |

The deeper pair keeps the demo student's channel widths and adds depth (VGG11 is VGG8 with three more
convolutions at 8x8 and below), so only depth changes. MobileNetV2 x1/4 is the FLOP match of the demo
student; its depthwise convolutions are slow per FLOP on a CPU, hence its step time. x1/8 would
cost 2.2-2.7x a demo step but leaves 2-channel layers. `paper` pairs are the reference codebases'
CIFAR-100 networks at full width (``mobile_half`` is MobileNetV2 x1/2); the deeper pair has no
published row there.
"""

from __future__ import annotations

from dataclasses import dataclass

from config import PROFILES, make_config
from registry import UnknownNameError


@dataclass(frozen=True)
class Pair:
    teacher: tuple[str, float]  # (registered network, width)
    student: tuple[str, float]
    about: str
    # the students' learning rate where the release gives this student another than the profile's (0: the
    # profile's); the teacher keeps the profile's, so the pair's teacher is the demo's where the networks agree
    student_lr: float = 0.0

    def fields(self) -> dict:
        """The config fields that name this pair's networks."""
        (tm, tw), (sm, sw) = self.teacher, self.student
        return {"teacher_model": tm, "teacher_width": tw, "model": sm, "width": sw}


# RepDistiller and mdistiller train MobileNetV2 (and ShuffleNet) students at lr 0.01, the others at 0.05
# (mdistiller's configs/cifar100/*/vgg13_mv2.yaml). At 0.05 the cpu pair's KD, DKD, LS-KD and MLKD students
# sat at chance for their first epochs (MLKD diverged), so the recipe's rate is part of the pair.
MOBILENET_LR = 0.01

PAIRS: dict[str, dict[str, Pair]] = {
    "cpu": {
        "vgg13-vgg8": Pair(("vgg13", 0.25), ("vgg8", 0.125), "the demo's pair, every notebook's"),
        "vgg16-vgg11": Pair(("vgg16", 0.25), ("vgg11", 0.125), "deeper, same family, same student widths"),
        "vgg13-mv2": Pair(
            ("vgg13", 0.25), ("mobilenetv2", 0.25), "cross-family, the demo's teacher", student_lr=MOBILENET_LR
        ),
    },
    "paper": {
        "vgg13-vgg8": Pair(("vgg13", 1.0), ("vgg8", 1.0), "RepDistiller's and mdistiller's VGG row"),
        "vgg16-vgg11": Pair(("vgg16", 1.0), ("vgg11", 1.0), "deeper, same family (no published row)"),
        "vgg13-mv2": Pair(
            ("vgg13", 1.0),
            ("mobilenetv2", 0.5),
            "their VGG13 -> MobileNetV2 (mobile_half) row",
            student_lr=MOBILENET_LR,
        ),
    },
}


def pairs(profile: str) -> dict[str, Pair]:
    if profile not in PAIRS:
        raise UnknownNameError(
            f"no pairs for profile {profile!r}; profiles with pairs: {', '.join(PAIRS)} "
            f"(every profile: {', '.join(sorted(PROFILES))})"
        )
    return PAIRS[profile]


def get_pair(profile: str, name: str) -> Pair:
    table = pairs(profile)
    if name not in table:
        raise UnknownNameError(f"unknown pair {name!r} for profile {profile!r}; known: {', '.join(table)}")
    return table[name]


def default_pair(profile: str) -> str:
    """The pair the profile itself describes (the first of its table)."""
    return next(iter(pairs(profile)))


def pair_fields(profile: str, name: str) -> dict:
    """The config fields the pair sets: its networks, and its students' learning rate where it has its own
    (the teacher then keeps the profile's, through ``teacher_lr``)."""
    pair = get_pair(profile, name)
    lr = {"lr": pair.student_lr, "teacher_lr": PROFILES[profile]["lr"]} if pair.student_lr else {}
    return pair.fields() | lr


def pair_config(profile: str, name: str, **overrides):
    """``make_config(profile)`` with the pair's fields; ``overrides`` as in ``make_config``."""
    return make_config(profile, **{**pair_fields(profile, name), **overrides})

"""Teacher-student pairs, named in one place: the benchmark and the notebooks read them from here.

    cfg = pair_config("cpu", "vgg13-mv2", method="kd")   # the profile, with this pair's networks
    PAIRS["cpu"]["vgg16-vgg11"].student                   # ("vgg11", 0.125)

A pair fixes the four fields that name the networks (``teacher_model``, ``teacher_width``, ``model``,
``width``); everything else is the profile's. The first pair of a profile is the profile itself
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

    def fields(self) -> dict:
        """The config fields this pair sets."""
        (tm, tw), (sm, sw) = self.teacher, self.student
        return {"teacher_model": tm, "teacher_width": tw, "model": sm, "width": sw}


PAIRS: dict[str, dict[str, Pair]] = {
    "cpu": {
        "vgg13-vgg8": Pair(("vgg13", 0.25), ("vgg8", 0.125), "the demo's pair, every notebook's"),
        "vgg16-vgg11": Pair(("vgg16", 0.25), ("vgg11", 0.125), "deeper, same family, same student widths"),
        "vgg13-mv2": Pair(("vgg13", 0.25), ("mobilenetv2", 0.25), "cross-family, the demo's teacher"),
    },
    "paper": {
        "vgg13-vgg8": Pair(("vgg13", 1.0), ("vgg8", 1.0), "RepDistiller's and mdistiller's VGG row"),
        "vgg16-vgg11": Pair(("vgg16", 1.0), ("vgg11", 1.0), "deeper, same family (no published row)"),
        "vgg13-mv2": Pair(("vgg13", 1.0), ("mobilenetv2", 0.5), "their VGG13 -> MobileNetV2 (mobile_half) row"),
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


def pair_config(profile: str, name: str, **overrides):
    """``make_config(profile)`` with the pair's networks; ``overrides`` as in ``make_config``."""
    return make_config(profile, **{**get_pair(profile, name).fields(), **overrides})

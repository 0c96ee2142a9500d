"""Model registry, checkpoints that rebuild their own model, parameter/FLOP counts.

model = create_model("vgg8", num_classes=10, width=0.25)
save_checkpoint("runs/x/checkpoint.pt", model, config=cfg, metrics=history)
model, ckpt = load_checkpoint("runs/x")      # the name and sizes come from the file
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, is_dataclass

import torch
from torch import nn

import vgg


class UnknownNameError(KeyError):
    """A KeyError whose message prints as written (KeyError would quote it)."""

    def __str__(self) -> str:
        return str(self.args[0])


class Registry(dict):
    """Name -> builder, filled by a decorator; a lookup miss lists what is registered."""

    def __init__(self, kind: str, on_miss: Callable[[], None] | None = None):
        super().__init__()
        self.kind = kind
        self.on_miss = on_miss  # e.g. import modules that register more entries

    def register(self, name: str):
        def add(fn):
            if name in self:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self[name] = fn
            return fn

        return add

    def names(self) -> list[str]:
        if self.on_miss:
            self.on_miss()
        return list(self)

    def get(self, name: str):
        if name not in self and self.on_miss:
            self.on_miss()
        if name not in self:
            raise UnknownNameError(f"unknown {self.kind} {name!r}; registered: {', '.join(self.names())}")
        return self[name]


MODELS = Registry("model")
register_model = MODELS.register  # decorator: @register_model("name") on fn(num_classes=..., width=...)
for _name in vgg.STAGES:
    register_model(_name)(getattr(vgg, _name))


def _load_group_modules() -> None:
    import importlib

    importlib.import_module("multi_student")


# Models made of several registered networks (an ensemble, specialists and their head). They
# are defined where they are used and imported on first lookup, so their checkpoints rebuild
# anywhere; they stay out of ``list_models``, which lists single networks.
GROUPS = Registry("model group", on_miss=_load_group_modules)
register_group = GROUPS.register


def list_models() -> list[str]:
    return MODELS.names()


def _builder(name: str):
    if name in MODELS:
        return MODELS[name]
    try:
        return GROUPS.get(name)
    except UnknownNameError:
        return MODELS.get(name)  # raises, listing the registered networks


def create_model(name: str, num_classes: int = 100, width: float = 1.0, **kwargs) -> nn.Module:
    """Build a registered model; it remembers how (``model.arch``) so checkpoints can rebuild it."""
    model = _builder(name)(num_classes=num_classes, width=width, **kwargs)
    model.arch = {"name": name, "num_classes": num_classes, "width": width, **kwargs}
    return model


# ----------------------------------------------------------------------------- checkpoints


def atomic_save(obj, path: str) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename: never a torn file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _plain(value):
    if is_dataclass(value):
        return asdict(value)
    if hasattr(value, "to_dict"):  # a pandas DataFrame of per-epoch metrics
        return value.to_dict(orient="records")
    return value


def save_checkpoint(path: str, model: nn.Module, *, config=None, metrics=None, **extra) -> None:
    """Weights + architecture + config + metrics (+ anything in ``extra``), written atomically."""
    if not hasattr(model, "arch"):
        raise ValueError("model has no .arch; build it with model.create_model so it can be rebuilt")
    state = {
        "arch": dict(model.arch),
        "model": model.state_dict(),
        "config": _plain(config),
        "metrics": _plain(metrics),
        **extra,
    }
    atomic_save(state, path)


def resolve_checkpoint(path: str) -> str:
    """Accept a checkpoint file or a run folder holding ``checkpoint.pt``."""
    candidate = os.path.join(path, "checkpoint.pt") if os.path.isdir(path) else path
    if not os.path.isfile(candidate):
        raise FileNotFoundError(
            f"no checkpoint at {os.path.abspath(candidate)}; pass a run folder (runs/<name>) "
            "or a .pt file written by save_checkpoint"
        )
    return candidate


def read_checkpoint(path: str, map_location="cpu") -> dict:
    return torch.load(resolve_checkpoint(path), map_location=map_location, weights_only=False)


def load_checkpoint(path: str, map_location="cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model stored at ``path`` (file or run folder); returns ``(model, checkpoint)``."""
    ckpt = read_checkpoint(path, map_location)
    arch = dict(ckpt["arch"])
    model = create_model(arch.pop("name"), **arch)
    model.load_state_dict(ckpt["model"])
    return model.to(map_location) if map_location else model, ckpt


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

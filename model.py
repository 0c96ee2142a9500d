"""Model registry, checkpoints that rebuild their own model, parameter/FLOP counts.

model = create_model("vgg8", num_classes=10, width=0.25)
save_checkpoint("runs/x/checkpoint.pt", model, config=cfg, metrics=history)
model, ckpt = load_checkpoint("runs/x")      # the name and sizes come from the file
"""

from __future__ import annotations

import collections
import functools
import hashlib
import os
import pickle
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, is_dataclass

import torch
from torch import nn

import vgg


class UnknownNameError(KeyError):
    """A KeyError whose message prints as written (KeyError would quote it)."""

    def __str__(self) -> str:
        return str(self.args[0])


def definition(entry) -> tuple:
    """Where an entry was written (file, name, line): the same code imported under two module
    names (a script run as ``__main__``, or re-imported by a spawned worker as ``__mp_main__``)
    gives the same key, so registering it again is not a clash."""
    if isinstance(entry, functools.partial):
        return (*definition(entry.func), entry.args, tuple(sorted(entry.keywords.items())))
    if is_dataclass(entry):
        return tuple(definition(v) if callable(v) else v for v in vars(entry).values() if not isinstance(v, dict)) + (
            tuple(sorted((k, repr(v)) for d in vars(entry).values() if isinstance(d, dict) for k, v in d.items())),
        )
    code = getattr(entry, "__code__", None)
    if code is None:
        return (repr(entry),)
    return (code.co_filename, entry.__qualname__, code.co_firstlineno)


class Registry(dict):
    """Name -> builder, filled by a decorator; a lookup miss lists what is registered."""

    def __init__(self, kind: str, on_miss: Callable[[], None] | None = None):
        super().__init__()
        self.kind = kind
        self.on_miss = on_miss  # e.g. import modules that register more entries

    def register(self, name: str):
        def add(fn):
            if name in self and definition(self[name]) != definition(fn):
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self[name] = fn  # the same definition again (its file imported twice) just replaces it
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
    """Students that each output a slice of an embedding, and a linear head on their concatenation.

    Member k is a network whose ``num_classes`` is its slice's size (its last linear layer is the
    regressor). With ``frozen`` the members never train: no gradients, eval mode that ``train()``
    cannot switch off; only the head learns.
    """

    def __init__(self, members: Sequence[nn.Module], num_classes: int, frozen: bool = False):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.out_dims = [m.num_classes for m in members]
        self.head = nn.Linear(sum(self.out_dims), num_classes)
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
    num_classes: int, width: float, member: str = "vgg8", out_dims: Sequence[int] = (), frozen: bool = False
) -> Specialists:
    members = [create_model(member, num_classes=d, width=width) for d in out_dims]
    return Specialists(members, num_classes, frozen)


# ----------------------------------------------------------------------------- checkpoints


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_stale_temporaries(folder: str) -> None:
    """Delete ``.tmp-*`` files a killed writer left in a run folder (call before writing to it)."""
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
        if name.startswith(".tmp-") or ".tmp-" in name:
            os.remove(os.path.join(folder, name))


def atomic_save(obj, path: str) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename: never a torn file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; a shared teacher must stay readable
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


def state_digest(state: dict) -> str:
    """Content hash of a state dict (names and tensor bytes): what identifies a teacher's weights."""
    digest = hashlib.sha1()
    for name, tensor in sorted(state.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def read_checkpoint(path: str, map_location="cpu") -> dict:
    """The checkpoint's contents, unpickled with ``weights_only=True``: tensors and plain values
    only, so no code in the file ever runs."""
    path = resolve_checkpoint(path)
    try:
        with torch.serialization.safe_globals([collections.Counter]):  # MultiStepLR keeps its milestones in one
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"refusing to load {path}: it holds Python objects beyond tensors and plain values, and unpickling "
            f"them could run code ({str(err).splitlines()[0]}). Load only checkpoints from a source you trust; "
            "this project writes its own with save_checkpoint."
        ) from err
    except (RuntimeError, EOFError) as err:
        raise ValueError(f"cannot read checkpoint {path} ({err}); it may be truncated: delete it and rerun") from err


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

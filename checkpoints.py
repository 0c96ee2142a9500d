"""Checkpoints: write them, read them safely, rebuild their model; other codebases' files and the hub.

    save_checkpoint("runs/x/checkpoint.pt", model, config=cfg, metrics=history)
    model, ckpt = load_checkpoint("runs/x")      # the name and sizes come from the file
    model, ckpt = load_checkpoint("hub:cifar100_vgg16_bn")   # a released teacher

Files are unpickled with ``weights_only=True``: tensors and plain values only, so no code in a
checkpoint ever runs.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import os
import pickle
import zipfile
from dataclasses import asdict, is_dataclass

import torch
from torch import nn

import mobilenetv2
import vgg
from atomic_files import atomic_save
from registry import UnknownNameError


def _plain(value):
    if hasattr(value, "to_dict") and is_dataclass(value):  # a Config: flat, method parameters beside the fields
        return value.to_dict()
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
    """Accept a checkpoint file, a run folder holding ``checkpoint.pt``, or ``hub:<name>`` (``HUB_URLS``)."""
    if path.startswith("hub:"):
        return hub_checkpoint(path[len("hub:") :])
    candidate = os.path.join(path, "checkpoint.pt") if os.path.isdir(path) else path
    if not os.path.isfile(candidate):
        raise FileNotFoundError(
            f"no checkpoint at {os.path.abspath(candidate)}; pass a run folder (runs/<name>), a .pt file "
            "(this project's, RepDistiller/mdistiller's, or a VGG state_dict), or hub:<name>"
        )
    return candidate


def state_digest(state: dict) -> str:
    """Content hash of a state dict (names and tensor bytes): what identifies a teacher's weights."""
    digest = hashlib.sha1()
    for name, tensor in sorted(state.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def file_digest(path: str) -> str:
    """Content hash of the weights in a checkpoint file (any format, in this project's key names),
    or ``path`` itself where no file is there yet: what identifies a teacher in a run's identity."""
    try:
        file = resolve_checkpoint(path)
    except FileNotFoundError:
        return path
    st = os.stat(file)
    return _file_digest(os.path.abspath(file), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _file_digest(file: str, size: int, mtime_ns: int) -> str:
    return state_digest(read_checkpoint(file)["model"])[:16]


ZIP_MAGIC = b"PK\x03\x04"  # how every file torch.save writes (its zip format) begins


def _cut_short(path: str) -> bool:
    """Whether ``path`` holds the start of a zip archive (torch's format) without its end."""
    with open(path, "rb") as f:
        head = f.read(4)
    return ZIP_MAGIC.startswith(head) and not zipfile.is_zipfile(path)


def _unreadable(path: str, err: Exception) -> ValueError:
    """Why ``path`` could not be read, and what to do (torch raises a RuntimeError, EOFError,
    ``OSError: [Errno 22]``, KeyError or UnpicklingError for a cut-short or foreign file, none naming it)."""
    if isinstance(err, PermissionError):
        return ValueError(f"cannot read checkpoint {path}: permission denied; make it readable or copy it")
    with open(path, "rb") as f:
        head = f.read(8)
    if _cut_short(path):
        size = os.path.getsize(path)
        detail = f"{size} bytes, the end of the archive is missing" if size else "an empty file"
    elif head.startswith(ZIP_MAGIC) or head[:1] == b"\x80":  # a whole archive, or torch's older pickle format
        detail = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no message'}"
    else:
        return ValueError(
            f"cannot read checkpoint {path}: not a PyTorch file (it starts with {head!r}); pass a .pt file "
            "written by torch.save (this project's, RepDistiller/mdistiller's, a VGG state_dict), a run folder "
            "or hub:<name>"
        )
    return ValueError(f"cannot read checkpoint {path} ({detail}); it may be truncated: delete it and rerun")


def read_checkpoint(path: str, map_location="cpu", mmap: bool = False) -> dict:
    """The checkpoint's contents, unpickled with ``weights_only=True``: tensors and plain values
    only, so no code in the file ever runs. Another codebase's file comes back as this project's
    (``foreign_checkpoint``): ``arch`` and ``model`` in this project's key names, and ``format``.
    A truncated, damaged or foreign file is a ``ValueError`` naming it and what to do. ``mmap``:
    map the tensors instead of reading them (to read a run's config and metrics cheaply)."""
    path = resolve_checkpoint(path)
    mmap = mmap and zipfile.is_zipfile(path)  # torch maps only its zip format
    try:
        with torch.serialization.safe_globals([collections.Counter]):  # MultiStepLR keeps its milestones in one
            ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as err:
        if _cut_short(path):  # the first bytes of an archive are no pickle: cut short, not crafted
            raise _unreadable(path, err) from err
        raise ValueError(
            f"refusing to load {path}: it holds Python objects beyond tensors and plain values, and unpickling "
            f"them could run code ({str(err).splitlines()[0]}). Load only checkpoints from a source you trust; "
            "this project writes its own with save_checkpoint."
        ) from err
    except (RuntimeError, EOFError, OSError, KeyError, ValueError, IndexError, TypeError) as err:
        raise _unreadable(path, err) from err
    return ckpt if isinstance(ckpt, dict) and "arch" in ckpt else foreign_checkpoint(ckpt, path)


def _listed(keys: list[str]) -> str:
    return ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")


def _describe(arch: dict | None) -> str:
    """``{'name': 'vgg8', 'num_classes': 10, 'width': 0.25}`` -> ``"a vgg8 (num_classes 10, width 0.25)"``."""
    if not arch:
        return ""
    rest = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in arch.items() if k != "name")
    return f"a {arch.get('name')} ({rest})"


def load_weights(model: nn.Module, state, path: str) -> nn.Module:
    """``model.load_state_dict(state)``, or a ``ValueError`` naming ``path`` and every key that does
    not fit (missing, unexpected, of another shape) instead of torch's RuntimeError without the file."""
    own = model.state_dict()
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds no state_dict of tensors under 'model'; it is not a checkpoint of a network")
    problems = []
    shapes = [
        f"{k} {tuple(state[k].shape)} (the network's: {tuple(v.shape)})"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    for what, keys in (
        ("missing", [k for k in own if k not in state]),
        ("unexpected", [k for k in state if k not in own]),
        ("of another shape", shapes),
    ):
        if keys:
            problems.append(f"{what}: {_listed(keys)}")
    desc = _describe(getattr(model, "arch", None)) or type(model).__name__
    if problems:
        raise ValueError(f"{path} does not hold the weights of {desc}: " + "; ".join(problems))
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{path} does not hold the weights of {desc}: {' '.join(str(err).split())}") from err
    return model


def load_checkpoint(path: str, map_location="cpu", arch: str | None = None) -> tuple[nn.Module, dict]:
    """Rebuild the model stored at ``path``; returns ``(model, checkpoint)``.

    ``path`` is a run folder, a file this project wrote, a RepDistiller/mdistiller file
    (``{'model': state_dict, ...}`` with ``blockN.`` keys), a bare VGG state_dict in any of the three
    layouts (e.g. pytorch-cifar-models' ``cifar100_vgg16_bn-7d8c4031.pt``), or ``hub:<name>``. A foreign
    file's network, width and class count are read from its keys and shapes; ``arch`` (a registered
    name) only confirms them. The returned checkpoint always holds ``arch`` and ``model`` in this
    project's layout, and ``format``: where the file came from."""
    path = resolve_checkpoint(path)  # errors name the file, not its folder
    ckpt = read_checkpoint(path, map_location)
    spec = dict(ckpt["arch"])
    if arch is not None and arch != spec["name"]:
        raise ValueError(f"{path} holds a {spec['name']} (width {spec['width']:g}), not the {arch} it was named as")
    from model import create_model  # model.py re-exports this module: imported here, not at the top

    try:
        model = create_model(spec.pop("name"), **spec)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: its architecture {dict(ckpt['arch'])} cannot be built ({err})") from err
    load_weights(model, ckpt["model"], path)
    return model.to(map_location) if map_location else model, ckpt


# ----------------------------------------------------------------------------- checkpoints of other codebases

# chenyaofo/pytorch-cifar-models' released VGGs (torchvision layout); the file names end in their own tags
HUB_URLS = {
    f"cifar{k}_{name}_bn": f"https://github.com/chenyaofo/pytorch-cifar-models/releases/download/vgg/cifar{k}_{name}_bn-{tag}.pt"
    for k, tags in {
        10: {"vgg11": "eaeebf42", "vgg13": "c01e4a43", "vgg16": "6ee7ea24", "vgg19": "57191229"},
        100: {"vgg11": "57d0759e", "vgg13": "5ebe5778", "vgg16": "7d8c4031", "vgg19": "b98f7bd7"},
    }.items()
    for name, tag in tags.items()
}


def hub_checkpoint(name: str) -> str:
    """The local file of a released teacher, downloaded once into torch.hub's cache (where
    ``torch.hub.load_state_dict_from_url`` keeps it too). It is read like any file: weights only."""
    if name not in HUB_URLS:
        raise UnknownNameError(f"unknown hub teacher {name!r}; known: {', '.join(HUB_URLS)}")
    url = HUB_URLS[name]
    file = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    if not os.path.isfile(file):
        os.makedirs(os.path.dirname(file), exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, file, progress=False)  # to a temporary name, then renamed
        except OSError as err:  # urllib's URLError and HTTPError are OSErrors
            raise FileNotFoundError(
                f"cannot download hub:{name} from {url} ({err}). Offline: fetch that file on a machine with "
                f"network access and pass its path (--teacher path/to/{os.path.basename(url)}), or copy it to "
                f"{file}; or train a teacher here (python train_eval.py --model vgg13)"
            ) from err
    return file


def _tensors(ckpt) -> dict:
    """The state dict inside a foreign checkpoint, without DataParallel's ``module.`` prefix."""
    if not isinstance(ckpt, dict):
        raise ValueError(f"it holds a {type(ckpt).__name__}, not a dict of weights")
    for key in ("model", "state_dict", "net"):
        if isinstance(ckpt.get(key), dict):
            ckpt = ckpt[key]
            break
    if not ckpt or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise ValueError("no state_dict found (looked for the keys 'model', 'state_dict', 'net' and a bare one)")
    return {k.removeprefix("module."): v for k, v in ckpt.items()}


def _renamed(state: dict, old: str, new: str) -> dict:
    return {(new + k[len(old) :] if k.startswith(old) else k): v for k, v in state.items()}


def _torchvision_to_stages(state: dict) -> dict:
    """``features.<k>`` (flat conv, BN, ReLU, [pool] list) -> ``stages.<s>.<i>``: a pool shows as a
    gap of four indices between convs, the same stage as a gap of three."""
    convs = sorted(int(k.split(".")[1]) for k, v in state.items() if k.startswith("features.") and v.dim() == 4)
    if not convs:
        return state
    rename, stage, j = {}, 0, -1
    for prev, k in zip([convs[0] - 3, *convs], convs, strict=False):
        stage, j = (stage + 1, 0) if k - prev == 4 else (stage, j + 1)
        rename[f"features.{k}."] = f"stages.{stage}.{3 * j}."
        rename[f"features.{k + 1}."] = f"stages.{stage}.{3 * j + 1}."
    out = {}
    for key, value in state.items():
        prefix = ".".join(key.split(".")[:2]) + "."
        out[rename.get(prefix, prefix) + key[len(prefix) :] if key.startswith("features.") else key] = value
    return out


def infer_arch(state: dict) -> dict:
    """The registered network a state dict in this project's layout belongs to: a MobileNetV2 by its
    ``last`` conv; for a VGG its conv count per stage names it, the first conv its width, the last
    linear its class count."""
    if "last.0.weight" in state:
        return mobilenetv2.infer_arch(state)
    convs = [k for k, v in state.items() if k.startswith("stages.") and v.dim() == 4]
    counts = collections.Counter(int(k.split(".")[1]) for k in convs)
    shape = [counts[s] for s in range(len(counts))]
    names = [n for n, stages in vgg.STAGES.items() if [len(s) for s in stages] == shape]
    if not names or not any(k.startswith("stages.0.1.running_mean") for k in state):
        raise ValueError(
            f"not a VGG with batch norm this project knows (convs per stage {shape}); "
            f"known: {', '.join(f'{n} {[len(s) for s in st]}' for n, st in vgg.STAGES.items())}"
        )
    mlp = "classifier.6.weight" in state
    head_key = "classifier.6.weight" if mlp else "classifier.weight"
    if head_key not in state or "stages.0.0.weight" not in state:
        missing = [k for k in ("stages.0.0.weight", head_key) if k not in state]
        raise ValueError(
            f"no {' and no '.join(missing)}: a VGG's width and class count are read from its first convolution "
            "and its classifier, so the file is incomplete or not a whole network"
        )
    width = state["stages.0.0.weight"].shape[0] / 64
    head = state[head_key]
    return {"name": names[0] + ("_tv" if mlp else ""), "num_classes": head.shape[0], "width": width}


def foreign_checkpoint(ckpt: dict, path: str) -> dict:
    """A checkpoint another codebase wrote, as this project's: ``arch``, ``model`` in this layout,
    ``format``, and the epoch/accuracy it recorded (RepDistiller's ``epoch``, ``accuracy``)."""
    try:
        state = _tensors(ckpt)
    except ValueError as err:
        raise ValueError(f"{path} is not a checkpoint this project can read: {err}") from err
    if mobilenetv2.is_reference_layout(state):
        fmt, state = "repdistiller", mobilenetv2.from_reference_layout(state)
    elif any(k.startswith("block0.") for k in state):
        fmt, state = "repdistiller", _renamed(state, "block", "stages.")
    elif any(k.startswith("features.") for k in state):
        fmt, state = "torchvision", _torchvision_to_stages(state)
    elif any(k.startswith("stages.") for k in state):
        fmt = "state_dict"
    else:
        raise ValueError(f"{path}: unknown key layout (first keys: {', '.join(list(state)[:4])})")
    try:
        arch = infer_arch(state)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
    extra = {k: ckpt[k] for k in ("epoch", "accuracy", "best_acc") if isinstance(ckpt.get(k), (int, float))}
    return {"arch": arch, "model": state, "format": fmt, "config": None, "metrics": None, **extra}


def export_repdistiller(model: nn.Module, path: str, epoch: int | None = None, accuracy: float | None = None) -> None:
    """Write a network in RepDistiller/mdistiller's layout, ``{'model': state_dict, 'epoch', 'accuracy'}``,
    which their constructor loads with ``load_state_dict``: a full-width VGG as their
    ``vgg<depth>_bn(num_classes=K)`` (``blockN.`` keys; their VGG has a 512-wide linear head only, so
    other widths and heads are refused), a MobileNetV2 as their ``mobilenetv2_T_w(6, width, K)``."""
    if isinstance(model, mobilenetv2.MobileNetV2):
        state = mobilenetv2.to_reference_layout(model.state_dict())
    elif isinstance(model, vgg.VGG) and model.pool_after == vgg.POOL_AFTER and model.embed_dim == 512:
        state = _renamed(model.state_dict(), "stages.", "block")
    else:
        raise ValueError(
            "RepDistiller's networks here are vgg8..vgg19 at width 1 (a linear head on 512 features) and mobilenetv2"
        )
    atomic_save({"model": state, "epoch": epoch, "accuracy": accuracy}, path)

"""The config of a run: its fields, the named profiles, the checks, and the command-line parser.

    cfg = make_config("cpu", method="dkd", teacher="runs/<teacher>", nckd_weight=2)
    replace(cfg, T=2.0)        # a copy with one value changed
    cfg.to_dict()              # what config.json holds

``Config`` has the fields every run has (data, model, optimisation, ...). A method's own
hyperparameters (``T``, ``nckd_weight``, ``hint_stage``, ...) are declared by the method in
``methods/`` (``registry.Param``), not here; the config accepts them like fields, keeps them in
``cfg.params`` and reads back the method's default for one that is unset.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import typing
from dataclasses import MISSING, dataclass, field, fields

import data_utils
from registry import METHODS, Param, method_params, readers

GROUPS = {
    "run": "run: what is trained where, and which seeds",
    "data": "data",
    "model": "model: the network being trained (teacher, baseline or student)",
    "method": "method: how it is trained, and its teacher",
    "optimisation": "optimisation",
    "speed": "speed (results depend on threads)",
    "teacher": "the demo's teacher (train_kd.py --demo) and the notebooks' seeds",
}


def opt(default, group: str, help: str):
    """A Config field with its command-line group and help."""
    kind = {"default_factory": default} if callable(default) else {"default": default}
    return field(**kind, metadata={"group": group, "help": help})


@dataclass(init=False)
class Config:
    """Everything that defines a run. Saved with every result and checkpoint (``to_dict``)."""

    profile: str = opt("cpu", "run", "the named profile these values started from")
    out_dir: str = opt("runs", "run", "run folders go here")
    name: str = opt("", "run", "run folder name; empty: derived from the config, so equal configs share it")
    seed: int = opt(0, "run", "model initialisation")
    data_seed: int = opt(0, "run", "data stream (order, crops, flips), kept apart from the model seed")
    device: str = opt("auto", "run", "auto: cuda if available, else cpu")
    eval_test: str = opt("end", "run", "end: test read at the last epoch and the epoch validation picks | every epoch")
    stop_after: int = opt(
        0, "run", "stop after this many epochs of the schedule (0: all); rerun without it to resume to the end"
    )
    dataset: str = opt("cifar10", "data", "cifar10 | cifar100")
    data_dir: str = opt("./data", "data", "holds cifar-10-batches-py/ or cifar-100-python/")
    download: bool = opt(False, "data", "fetch the official archive if the data is missing")
    synthetic: bool = opt(False, "data", "generate a small learnable dataset in data_dir (tests, demos)")
    subset: int = opt(0, "data", "training images per class (class-balanced, after the hold-out); 0: all")
    val_size: int = opt(0, "data", "images held out of the training split for validation (class-balanced)")
    split_seed: int = opt(0, "data", "which images are held out and which form the subset")
    batch_size: int = opt(128, "data", "images per step")
    crop_pad: int = opt(4, "data", "random crop after zero padding by this many pixels; 0: off")
    flip: bool = opt(True, "data", "random horizontal flip")
    model: str = opt("vgg8", "model", "registered network (model.list_models())")
    width: float = opt(1.0, "model", "channel multiplier")
    members: int = opt(1, "model", "students trained as one run (multi_student.py); model and width describe each")
    budget: int = opt(0, "model", "parameter budget a group of students must fit in; 0: unchecked")
    init_from: str = opt("", "model", "run folder or checkpoint whose weights initialise the model")
    method: str = opt("ce", "method", "training method (registry.METHODS); ce: plain cross-entropy")
    teacher: str = opt("", "method", "run folder or checkpoint of the trained teacher")
    trust_teacher: bool = opt(False, "method", "distil even from a teacher that is unfinished or near chance")
    teacher_cache: bool = opt(False, "method", "store the teacher's logits once per epoch stream (logit methods)")
    cache_dtype: str = opt("float16", "method", "float16 | float32 storage of the cached logits")
    teacher_amp: str = opt("off", "method", "bf16: the frozen teacher's forward under bf16 autocast")
    epochs: int = opt(240, "optimisation", "epochs of the run")
    optimizer: str = opt("sgd", "optimisation", "sgd | adam")
    lr: float = opt(0.05, "optimisation", "learning rate")
    momentum: float = opt(0.9, "optimisation", "SGD momentum")
    nesterov: bool = opt(False, "optimisation", "Nesterov momentum")
    weight_decay: float = opt(5e-4, "optimisation", "L2 weight decay")
    schedule: str = opt("multistep", "optimisation", "multistep | cosine | constant")
    milestones: list[int] = opt(lambda: [150, 180, 210], "optimisation", "multistep: epochs where lr decays")
    gamma: float = opt(0.1, "optimisation", "multistep decay factor")
    channels_last: bool = opt(True, "speed", "faster convolutions on CPU (oneDNN) and on CUDA")
    amp: str = opt("auto", "speed", "bf16 autocast: auto (on for CUDA only) | bf16 | off")
    compile: bool = opt(False, "speed", "torch.compile the training module")
    threads: int = opt(0, "speed", "CPU threads of the run (results depend on it); 0: torch's default")
    teacher_model: str = opt("vgg13", "teacher", "the demo's teacher network")
    teacher_width: float = opt(1.0, "teacher", "its channel multiplier")
    teacher_epochs: int = opt(240, "teacher", "its epochs")
    teacher_lr: float = opt(0.0, "teacher", "its learning rate; 0: lr (a pair whose student takes another sets it)")
    teacher_threads: int = opt(0, "teacher", "its CPU threads; 0: torch's default")
    n_seeds: int = opt(1, "teacher", "seeds that experiments repeat")
    params: dict = field(default_factory=dict, metadata={"group": None})  # the method parameters that are set

    def __init__(self, **values):
        params = dict(values.pop("params", None) or {})
        for key in [k for k in values if k not in FIELDS]:
            params[key] = values.pop(key)
        unknown = sorted(set(params) - set(method_params())) if params else []
        if unknown:
            valid = sorted(FIELDS) + sorted(method_params())
            raise TypeError(f"unknown config field(s) {unknown}; valid fields: {', '.join(valid)}")
        for f in fields(self):
            if f.name != "params":
                value = values[f.name] if f.name in values else _default(f)
                object.__setattr__(self, f.name, value)
        object.__setattr__(self, "params", {k: v for k, v in params.items() if v is not None})

    def __getattr__(self, name: str):
        # called only for names that are not fields: a method parameter reads its default when unset
        if name.startswith("_"):
            raise AttributeError(name)
        spec = method_params().get(name)
        if spec is None:
            raise AttributeError(f"Config has no field or method parameter {name!r}")
        return self.__dict__.get("params", {}).get(name, spec.default)

    def __setattr__(self, name: str, value) -> None:
        if name in FIELDS:
            object.__setattr__(self, name, value)
        elif name in method_params():
            params = {k: v for k, v in self.params.items() if k != name}
            self.params = params if value is None else {**params, name: value}
        else:
            raise AttributeError(f"Config has no field or method parameter {name!r}")

    def fields_dict(self) -> dict:
        """The fields every run has, without the method parameters."""
        return {name: getattr(self, name) for name in FIELDS}

    def to_dict(self) -> dict:
        """Flat: every field and every method parameter that is set (what config.json holds)."""
        return {**self.fields_dict(), **self.params}


def _default(f):
    return f.default_factory() if f.default_factory is not MISSING else f.default


FIELDS = tuple(f.name for f in fields(Config) if f.name != "params")


def config_keys() -> dict[str, type]:
    """Every name a config accepts, with its type: the fields and every method's parameters."""
    hints = typing.get_type_hints(Config)
    return {**{name: hints[name] for name in FIELDS}, **{p.name: p.type for p in method_params().values()}}


PROFILES: dict[str, dict] = {
    # seconds: generated data, tiny widths; used by the tests and notebook smoke runs
    "smoke": dict(
        synthetic=True,
        data_dir="./data/synthetic",
        model="vgg8",
        width=0.0625,
        teacher_model="vgg11",
        teacher_width=0.125,
        teacher_epochs=3,
        epochs=2,
        val_size=200,
        batch_size=64,
        nesterov=True,
        schedule="cosine",
        milestones=[],
        n_seeds=1,
    ),
    # this machine: real CIFAR-10, reduced widths, students on a 1000/class subset
    "cpu": dict(
        dataset="cifar10",
        model="vgg8",
        width=0.125,
        teacher_model="vgg13",
        teacher_width=0.25,
        teacher_epochs=30,
        epochs=30,
        subset=1000,
        val_size=5000,  # 500 per class held out: the teacher trains on the other 45,000
        batch_size=128,
        lr=0.05,
        nesterov=True,
        schedule="cosine",
        milestones=[],
        n_seeds=3,
        threads=1,  # students: 1 thread each, 2 at a time on 2 cores (sweeps, the demo)
        teacher_threads=2,
    ),
    # the standard CIFAR-100 KD recipe (Tian et al. 2020): VGG13 -> VGG8, 240 epochs. No validation
    # split: the published numbers it is compared with trained on all 50,000 images.
    "paper": dict(
        dataset="cifar100",
        download=True,
        model="vgg8",
        width=1.0,
        teacher_model="vgg13",
        teacher_width=1.0,
        teacher_epochs=240,
        epochs=240,
        batch_size=64,
        lr=0.05,
        momentum=0.9,
        weight_decay=5e-4,
        schedule="multistep",
        milestones=[150, 180, 210],
        n_seeds=3,
    ),
    # the study this project re-implements (original_study.py): CIFAR-100, the released VGG16-BN teacher,
    # VGG11-BN students in the torchvision layout, Adam 1e-4 for 20 epochs, KD alpha 0.6 and T 3
    "original": dict(
        dataset="cifar100",
        download=True,
        model="vgg11_tv",
        width=1.0,
        teacher="hub:cifar100_vgg16_bn",
        teacher_model="vgg16_tv",
        teacher_width=1.0,
        epochs=20,
        val_size=5000,  # 50 per class; the study had none (see original_study.py)
        batch_size=128,
        optimizer="adam",
        lr=1e-4,
        weight_decay=0.0,
        schedule="constant",
        milestones=[],
        n_seeds=3,
        T=3.0,
        ce_weight=0.4,  # 1 - alpha
        kd_weight=0.6,  # alpha
    ),
}

CHOICES = {
    "dataset": sorted(data_utils.DATASETS),
    "optimizer": ["sgd", "adam"],
    "schedule": ["multistep", "cosine", "constant"],
    "amp": ["auto", "bf16", "off"],
    "cache_dtype": ["float16", "float32"],
    "teacher_amp": ["off", "bf16"],
    "eval_test": ["end", "every"],
}


def make_config(profile: str = "cpu", **overrides) -> Config:
    """``Config`` from a named profile plus overrides; unknown names are errors.

    Method parameters left unset stay unset here and take the method's published recipe when the
    run starts (``registry.resolve_recipe``), so ``replace(cfg, method=...)`` never carries one
    method's recipe into another.
    """
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose from {sorted(PROFILES)}")
    cfg = Config(profile=profile, **{**PROFILES[profile], **overrides})
    check_config(cfg)
    return cfg


def check_config(cfg: Config) -> None:
    """Clear errors for values no run can use, before any data is read."""
    for key, valid in CHOICES.items():
        if getattr(cfg, key) not in valid:
            raise ValueError(f"{key}={getattr(cfg, key)!r} is not valid; choose from {valid}")
    for key, value in cfg.fields_dict().items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{key}={value} is not a finite number")
    for key in ("epochs", "batch_size", "members", "teacher_epochs", "n_seeds"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"{key} must be >= 1, got {getattr(cfg, key)}")
    non_negative = ("subset", "val_size", "threads", "teacher_threads", "seed", "data_seed", "split_seed", "budget")
    for key in (*non_negative, "stop_after"):
        if getattr(cfg, key) < 0:
            raise ValueError(f"{key} must be >= 0, got {getattr(cfg, key)}")
    for key in ("width", "teacher_width"):
        if getattr(cfg, key) <= 0:
            raise ValueError(f"{key} must be > 0, got {getattr(cfg, key)}")
    for key in ("lr", "weight_decay", "crop_pad"):
        if getattr(cfg, key) < 0:
            raise ValueError(f"{key} must be >= 0, got {getattr(cfg, key)}")
    if cfg.stop_after > cfg.epochs:
        raise ValueError(
            f"stop_after={cfg.stop_after} is past the schedule's end (epochs={cfg.epochs}); 0 trains all of it"
        )
    if not 0 <= cfg.momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {cfg.momentum}")
    if cfg.name and (os.path.basename(cfg.name) != cfg.name or cfg.name in (".", "..") or cfg.name.startswith(".")):
        raise ValueError(f"name={cfg.name!r} must be a plain folder name inside out_dir (no '/', no leading '.')")
    if len(os.fsencode(cfg.name)) > NAME_MAX:
        size = len(os.fsencode(cfg.name))
        raise ValueError(f"name={cfg.name!r} is {size} bytes long; a folder name holds at most {NAME_MAX}")
    for key in ("out_dir", "data_dir"):
        _check_folder(key, getattr(cfg, key))
    specs = method_params() if cfg.params else {}
    for key, value in cfg.params.items():
        specs[key].validate(value)
    _check_split(cfg)


NAME_MAX = 255  # bytes in one file name, on every common file system


def _check_folder(key: str, path: str) -> None:
    """A folder a run writes to must be one, or be creatable: no file where it or a parent should be."""
    if not path:
        raise ValueError(f"{key} is empty: give a folder (e.g. {key}=.)")
    existing = os.path.abspath(path)
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        where = "is a file" if existing == os.path.abspath(path) else f"is under {existing}, a file"
        raise ValueError(f"{key}={path!r} {where}, not a folder: give a folder")


def _check_split(cfg: Config) -> None:
    """The hold-out and the subset must fit in every class of the official training split."""
    spec = data_utils.DATASETS[cfg.dataset]
    if cfg.val_size % spec.num_classes:
        raise ValueError(
            f"val_size={cfg.val_size} must be a multiple of the {spec.num_classes} classes of {cfg.dataset} "
            "(the hold-out is class-balanced)"
        )
    per_class = cfg.val_size // spec.num_classes
    if not cfg.synthetic and per_class + cfg.subset > spec.train_per_class:
        raise ValueError(
            f"val_size={cfg.val_size} holds out {per_class} images per class and subset={cfg.subset} asks for "
            f"{cfg.subset} more, but {cfg.dataset} has {spec.train_per_class} per class: "
            f"keep val_size/{spec.num_classes} + subset <= {spec.train_per_class}"
        )


# ----------------------------------------------------------------------------- command line

# The library's own errors: on the command line they are usage errors (a message, exit 2), not tracebacks.
USAGE_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError, FloatingPointError)


def _arg_type(tp) -> dict:
    if type(None) in typing.get_args(tp):  # ``float | None``
        tp = next(t for t in typing.get_args(tp) if t is not type(None))
    if tp in (int, float, str):
        return dict(type=tp)
    if tp is bool:
        return dict(action=argparse.BooleanOptionalAction)
    if typing.get_origin(tp) is list:
        return dict(type=typing.get_args(tp)[0], nargs="*")
    raise TypeError(f"no command-line form for {tp}")


def _flags(name: str) -> list[str]:
    return ([f"--{name.replace('_', '-')}"] if "_" in name else []) + [f"--{name}"]


def _peek(argv) -> tuple[str, str | None]:
    """The profile and method that ``argv`` asks for (to show their values in ``--help``)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--profile", default="cpu")
    pre.add_argument("--method", default=None)
    known, _ = pre.parse_known_args(argv)
    return (known.profile if known.profile in PROFILES else "cpu"), known.method


def build_parser(description: str = "", argv=None, method: str = "ce") -> argparse.ArgumentParser:
    """One option per config field and method parameter (``--data-dir`` or ``--data_dir``), grouped.

    Unset options keep the profile's value (a method parameter: the method's recipe). ``--help``
    shows the values of the profile that ``argv`` names (default: cpu); with ``--method`` given, only
    that method's parameters are listed, with its recipe (the others are still accepted), else every
    method's, each with the methods that read it. ``method``: the command's default method.
    """
    profile, chosen = _peek(argv)
    shown = make_config(profile)
    usage = "%(prog)s [--profile {" + ",".join(PROFILES) + "}] [--method METHOD] [options]  (--help lists them)"
    parser = argparse.ArgumentParser(description=description, usage=usage, argument_default=argparse.SUPPRESS)
    groups = {key: parser.add_argument_group(title) for key, title in GROUPS.items()}
    hints = typing.get_type_hints(Config)
    for f in fields(Config):
        if f.name == "params":
            continue
        kwargs = _arg_type(hints[f.name])
        kwargs["choices"] = {"profile": sorted(PROFILES), "method": METHODS.names()}.get(f.name, CHOICES.get(f.name))
        value = (chosen or method) if f.name == "method" else getattr(shown, f.name)
        extra = ["--student"] if f.name == "model" else []
        groups[f.metadata["group"]].add_argument(
            *_flags(f.name), *extra, dest=f.name, help=f"{f.metadata['help']} ({profile}: {value!r})", **kwargs
        )
    _add_method_params(parser, chosen)
    return parser


def _add_method_params(parser: argparse.ArgumentParser, chosen: str | None) -> None:
    method = METHODS.get(chosen) if chosen in METHODS.names() else None
    title = f"parameters of method {chosen} (unset: its recipe)" if method else "method parameters (unset: the recipe)"
    group = parser.add_argument_group(title)
    own = {p.name for p in method.params} if method else None
    for p in method_params().values():
        if own is None:
            help_text = f"{p.help} (read by {', '.join(readers(p.name))})"
        elif p.name in own:
            help_text = f"{p.help} ({chosen}: {_recipe_value(method, p)})"
        else:
            help_text = argparse.SUPPRESS
        group.add_argument(*_flags(p.name), dest=p.name, help=help_text, **_arg_type(p.type))


def _recipe_value(method, p: Param) -> str:
    if p.name in method.recipe:
        return f"recipe {method.recipe[p.name]!r}"
    return f"default {p.default!r}"


def config_from_args(args: argparse.Namespace) -> Config:
    """The config an argparse namespace from ``build_parser`` describes (other options ignored); an
    error about a value given on the command line names its option (``argument --lr: ...``)."""
    values = {k: v for k, v in vars(args).items() if k in config_keys()}
    profile = values.pop("profile", "cpu")
    try:
        return make_config(profile, **values)
    except ValueError as err:
        key = re.match(r"\w+", str(err))
        if key is None or key[0] not in values:
            raise
        raise ValueError(f"argument {_flags(key[0])[0]}: {err}") from None


def run_cli(parser: argparse.ArgumentParser, body, argv=None):
    """Parse ``argv`` and call ``body(args)``; the library's errors become usage errors (exit 2)."""
    args = parser.parse_args(argv)
    try:
        return body(args)
    except USAGE_ERRORS as err:
        parser.error(str(err))

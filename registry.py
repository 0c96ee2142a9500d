"""The method registry: every training method, what it needs, its parameters and published recipe.

A method is one file in ``methods/`` that calls ``register_method``: its loss builder (or the
function that runs it), the parameters it reads (each a ``Param``: name, type, default, check,
help), the values of its published recipe and where they come from, and what it needs of the
teacher. Everything else reads the registry, never a method's name: the config accepts the
parameters as fields (``cfg.T``, ``replace(cfg, nckd_weight=2)``, ``--nckd-weight 2``), a run's
identity keeps the ones its method reads, the loop gets sample indices where the method needs them.

    @register_method("kd", source="Hinton et al. 2015", params=(T, CE_WEIGHT, KD_WEIGHT), T=4.0, ...)
    def build(cfg, student, teacher, **context) -> nn.Module: ...
"""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass, is_dataclass, replace


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
        return tuple(_key(v) for v in vars(entry).values())
    code = getattr(entry, "__code__", None)
    if code is None:
        return (repr(entry),)
    return (code.co_filename, entry.__qualname__, code.co_firstlineno)


def _key(value):
    if isinstance(value, (tuple, list)):
        return tuple(_key(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _key(v)) for k, v in value.items()))
    return definition(value) if callable(value) or is_dataclass(value) else repr(value)


class Registry(dict):
    """Name -> entry, filled by a decorator; a lookup miss lists what is registered."""

    def __init__(self, kind: str, on_miss: Callable[[], None] | None = None):
        super().__init__()
        self.kind = kind
        self.on_miss = on_miss  # e.g. import the modules that register more entries

    def register(self, name: str):
        def add(entry):
            if name in self and definition(self[name]) != definition(entry):
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self[name] = entry  # the same definition again (its file imported twice) just replaces it
            return entry

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


# ----------------------------------------------------------------------------- parameters


def positive(name: str, value) -> None:
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def non_negative(name: str, value) -> None:
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def fraction(name: str, value) -> None:
    if not 0 <= value < 1:
        raise ValueError(f"{name} must be in [0, 1), got {value}")


def alpha_range(name: str, value) -> None:
    if not 0 <= value <= 1:
        raise ValueError(
            f"{name} is the shorthand ce_weight = 1 - alpha, kd_weight = alpha; need 0 <= alpha <= 1, got {value}"
        )


@dataclass(frozen=True)
class Param:
    """A method's hyperparameter, as the config, the command line and run identities see it.

    ``default`` is what the method uses when neither the user nor its recipe sets it, and a run
    whose value equals it leaves it out of its identity (so adding a parameter keeps old runs).
    """

    name: str
    type: type
    help: str
    default: object = None
    check: Callable[[str, object], None] | None = None
    loss_weight: bool = False  # a weight of a loss term: a run whose weights are all zero trains on nothing

    def validate(self, value) -> None:
        if value is None:
            return
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{self.name}={value} is not a finite number")
        if self.check:
            self.check(self.name, value)


# Parameters that several methods read, declared once so they agree everywhere.
T = Param("T", float, "softmax temperature of the distillation term", check=positive)
CE_WEIGHT = Param("ce_weight", float, "weight of cross-entropy on the labels", check=non_negative, loss_weight=True)
KD_WEIGHT = Param("kd_weight", float, "weight of the T²-scaled KD term", check=non_negative, loss_weight=True)
FEAT_WEIGHT = Param(
    "feat_weight", float, "β, the weight of a feature method's term", check=non_negative, loss_weight=True
)
ALPHA = Param("alpha", float, "shorthand for ce_weight = 1 - alpha, kd_weight = alpha", check=alpha_range)
KD_PARAMS = (T, CE_WEIGHT, KD_WEIGHT, ALPHA)
WARMUP = Param(
    "warmup", float, "epochs over which the distillation terms ramp up linearly (DKD, ReviewKD)", check=non_negative
)


def warmup_check(method: str, released: float = 20, of: float = 240):
    """``check(cfg)`` refusing a warm-up longer than the run, saying how to scale the release's."""

    def check(cfg) -> None:
        if cfg.warmup > cfg.epochs:
            raise ValueError(
                f"{method}'s warm-up ({cfg.warmup:g} epochs) is longer than the run ({cfg.epochs} epochs): its "
                f"distillation terms would never reach full weight. The release uses {released:g} of {of:g} epochs; "
                f"scale it, e.g. --warmup {cfg.epochs * released / of:g}"
            )

    return check


# ----------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class Method:
    """A training method as the registry knows it: the single authority on what it needs.

    Exactly one of ``build`` and ``run``: ``build(cfg, student, teacher, **context)`` returns the
    loss module that ``distiller.Distiller`` trains with (``context`` offers ``train_size`` and
    ``num_classes`` to builders that name them); ``run(cfg)`` trains one run of the method itself
    (plain cross-entropy, a cohort, the specialists' stages). ``group(cfg, **options)`` (group
    methods only) trains what ``multi_student.py --group`` evaluates and returns its models;
    ``group_model(cfg, k, width)`` builds the group's network for ``k`` members at ``width``.
    ``recipe`` holds the values of its published recipe and ``source`` says where they come from.
    """

    name: str
    source: str
    recipe: dict
    params: tuple[Param, ...]
    needs_teacher: bool
    needs_features: bool  # the teacher's intermediate features: the teacher runs online, no cached logits
    needs_index: bool  # each batch's sample indices (batch extra ``index``)
    build: Callable | None = None
    run: Callable | None = None
    check: Callable | None = None  # check(cfg) on the resolved config: errors before any data is read
    group: Callable | None = None
    group_model: Callable | None = None  # group_model(cfg, k, width): the group's network, to fit a budget
    standalone: bool = True  # False: one part of a group recipe (a class specialist), no student on its own
    # a ``run`` method that the one loop trains: ``make_student(cfg)`` builds what it trains and
    # ``make_task(cfg, student, train_loader)`` wraps it, so its runs can join cohorts
    make_student: Callable | None = None
    make_task: Callable | None = None
    # second_view(cfg): whether the run also trains on a second, strongly augmented view of each batch
    # (batch extra ``strong``, see data_utils.CifarLoader); a parameter of the method may decide it
    second_view: Callable | None = None

    @property
    def reads(self) -> frozenset:
        """Every config field that is this method's: its parameters and the teacher fields it uses."""
        names = {p.name for p in self.params}
        if self.needs_teacher:
            names |= {"teacher", "teacher_amp"}
            if not self.needs_features:
                names |= {"teacher_cache", "cache_dtype"}  # logits alone can come from the cache
        return frozenset(names)


# The package whose modules register methods; imported when a name is not (yet) registered.
METHOD_PACKAGE = "methods"


def _load_methods() -> None:
    importlib.import_module(METHOD_PACKAGE)


METHODS = Registry("method", on_miss=_load_methods)


def register_method(
    name: str,
    *,
    source: str = "",
    params: tuple[Param, ...] = (),
    needs_teacher: bool = True,
    needs_features: bool = False,
    needs_index: bool = False,
    run: Callable | None = None,
    check: Callable | None = None,
    group: Callable | None = None,
    group_model: Callable | None = None,
    standalone: bool = True,
    make_student: Callable | None = None,
    make_task: Callable | None = None,
    second_view: Callable | None = None,
    **recipe,
):
    """Decorator registering ``build(cfg, student, teacher, **context) -> loss`` as method ``name``
    (or, decorating None, a method trained by ``run``), with the parameters it reads and the values
    of its published recipe, e.g.
    ``@register_method("kd", source="Hinton et al. 2015", params=KD_PARAMS, T=4.0, ce_weight=0.1, kd_weight=0.9)``."""
    declared = {p.name for p in params}
    unknown = sorted(set(recipe) - declared)
    if unknown:
        raise TypeError(f"recipe value(s) {unknown} of method {name!r} are not among its params {sorted(declared)}")

    def add(build):
        if (build is None) == (run is None):
            raise TypeError(f"method {name!r} needs exactly one of a loss builder or run=: it would train nothing")
        if (make_student is None) != (make_task is None) or (make_task is not None and run is None):
            raise TypeError(f"method {name!r}: give make_student and make_task together, beside its run=")
        if build is not None and not needs_teacher:
            raise TypeError(f"method {name!r} has a distillation loss, which needs a teacher: drop needs_teacher=False")
        entry = Method(name, source, dict(recipe), tuple(params), needs_teacher, needs_features, needs_index)
        entry = replace(entry, build=build, run=run, check=check, group=group, group_model=group_model)
        entry = replace(entry, standalone=standalone, make_student=make_student, make_task=make_task)
        entry = replace(entry, second_view=second_view)
        METHODS.register(name)(entry)
        _check_params_agree()
        return build

    return add


def _check_params_agree() -> None:
    """Two methods may read a parameter of the same name only if they declare it alike."""
    seen: dict[str, Param] = {}
    for method in METHODS.values():
        for p in method.params:
            other = seen.setdefault(p.name, p)
            if (other.type, other.default) != (p.type, p.default):
                raise TypeError(f"parameter {p.name!r} is declared differently by two methods: {other} and {p}")


def method_params() -> dict[str, Param]:
    """Every registered method's parameters by name (what the config accepts besides its fields)."""
    out: dict[str, Param] = {}
    for name in METHODS.names():
        for p in METHODS[name].params:
            out.setdefault(p.name, p)
    return out


def readers(param: str) -> list[str]:
    """The methods that read ``param``."""
    return [name for name in METHODS.names() if any(p.name == param for p in METHODS[name].params)]


def wants_second_view(cfg) -> bool:
    """Whether a run of ``cfg`` trains on the second, strongly augmented view too."""
    method = METHODS.get(cfg.method)
    return bool(method.second_view and method.second_view(resolve_recipe(cfg)))


def loss_methods() -> list[str]:
    """The distillation methods: those trained by a loss in ``distiller.Distiller``."""
    return [name for name in METHODS.names() if METHODS[name].build is not None]


def group_methods() -> list[str]:
    """The methods that train a group of students (``multi_student.py --group``)."""
    return [name for name in METHODS.names() if METHODS[name].group is not None]


def resolve_recipe(cfg):
    """``cfg`` with every parameter of its method it leaves unset taken from the method's published
    recipe; explicit values stay. ``alpha`` is rewritten as ``ce_weight = 1 - alpha, kd_weight =
    alpha``. Checks that the weights the run uses are not all zero, then the method's own check."""
    method = METHODS.get(cfg.method)
    values: dict = {}
    if cfg.alpha is not None:
        if cfg.ce_weight is not None or cfg.kd_weight is not None:
            raise ValueError(
                f"give alpha (={cfg.alpha}) or ce_weight/kd_weight, not both: alpha means "
                "ce_weight = 1 - alpha, kd_weight = alpha"
            )
        values = {"ce_weight": 1 - cfg.alpha, "kd_weight": cfg.alpha, "alpha": None}
    for key, default in method.recipe.items():
        if key not in cfg.params and key not in values:
            values[key] = default
    out = replace(cfg, **values)
    if method.check:
        method.check(out)
    weights = [p.name for p in method.params if p.loss_weight and p.name in method.recipe]
    if weights and not any(getattr(out, k) for k in weights):
        raise ValueError(
            f"every loss weight of method {cfg.method!r} is zero "
            f"({', '.join(f'{k}={getattr(out, k)}' for k in weights)}): nothing to train on"
        )
    return out

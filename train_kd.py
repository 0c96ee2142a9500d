"""Logit distillation: the KD loss, the frozen-teacher Distiller, the method registry, the CLI.

    python train_kd.py --teacher runs/<teacher-run> --student vgg8 --method kd --T 4 --alpha 0.9
    python train_kd.py --demo --profile cpu --data-dir ./data     # teacher vs independent vs KD

A method is a loss module called as ``loss(logits_s, logits_t, target, s_feats=..., t_feats=...)``
that returns named terms; ``register_method`` adds one without touching the training loop.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

import data_utils
from model import Registry, count_flops, count_params, load_checkpoint
from train_eval import (
    Config,
    RunResult,
    build_parser,
    config_from_args,
    print_result,
    summarize,
    train,
)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits (autocast) to fp32: softmax at high T needs the mantissa; fp64 stays."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def kd_loss(logits_s: torch.Tensor, logits_t: torch.Tensor, T: float) -> torch.Tensor:
    """T² · (1/B) Σ_b KL(softmax(z_t/T) ‖ softmax(z_s/T)): Hinton et al. 2015's soft-target term.

    The T² keeps the gradient scale independent of T (soft-target gradients shrink as 1/T²).
    """
    log_p_s = F.log_softmax(_upcast(logits_s) / T, dim=1)  # (B, K)
    log_p_t = F.log_softmax(_upcast(logits_t) / T, dim=1)  # (B, K)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * T * T


class KDLoss(nn.Module):
    """Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network".

    L = (1 - α) · CE(z_s, y) + α · T² · KL(softmax(z_t/T) ‖ softmax(z_s/T)), batch mean.
    Returns the weighted terms ``{"ce": (1-α)·CE, "kd": α·T²·KL}``; their sum is L.
    The CIFAR-100 benchmark recipe is T = 4, α = 0.9.
    """

    needs_features = False

    def __init__(self, T: float = 4.0, alpha: float = 0.9):
        super().__init__()
        if T <= 0 or not 0 <= alpha <= 1:
            raise ValueError(f"need T > 0 and 0 <= alpha <= 1, got T={T}, alpha={alpha}")
        self.T, self.alpha = T, alpha

    def forward(self, logits_s, logits_t, target, **_) -> dict[str, torch.Tensor]:
        return {
            "ce": (1 - self.alpha) * F.cross_entropy(logits_s, target),
            "kd": self.alpha * kd_loss(logits_s, logits_t, self.T),
        }


class FrozenTeacher(nn.Module):
    """A teacher that cannot train: always in eval mode, no gradients, invisible to optimizers.

    The network is held outside the module tree, so it is absent from ``parameters()``,
    ``state_dict()``, any optimizer and DistributedDataParallel, while ``.to()`` and
    ``.cuda()`` still move it. Every forward re-asserts eval mode, so even a ``.train()``
    called on the network itself cannot make its batch-norm statistics drift.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        net.requires_grad_(False)
        self._hidden = (net.eval(),)  # a tuple is not registered as a submodule

    @property
    def net(self) -> nn.Module:
        return self._hidden[0]

    def _apply(self, fn, recurse=True):
        self.net._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True):
        return super().train(False)

    def forward(self, x: torch.Tensor, features: bool = False):
        self.net.train(False)
        with torch.no_grad():
            return self.net(x, features=True) if features else self.net(x)


class Distiller(nn.Module):
    """Student + frozen teacher + loss, in the loop's form: ``forward(x, y) -> (logits, terms)``.

    Trainable modules of the loss (adapters, regressors) are submodules here, so they reach
    the optimizer and checkpoints with the student; the teacher reaches neither.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, loss: nn.Module):
        super().__init__()
        self.student = student
        self.teacher = FrozenTeacher(teacher)
        self.loss = loss

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        if getattr(self.loss, "needs_features", False):
            logits_s, feats_s = self.student(x, features=True)
            logits_t, feats_t = self.teacher(x, features=True)
        else:
            logits_s, feats_s = self.student(x), None
            logits_t, feats_t = self.teacher(x), None
        terms = self.loss(logits_s, logits_t, y, s_feats=feats_s, t_feats=feats_t)
        return logits_s, terms


# ----------------------------------------------------------------------------- method registry

PLUGIN_MODULES = ("feature_kd",)  # modules that register further methods when imported


def _load_plugins() -> None:
    import importlib

    for module in PLUGIN_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise


# name -> builder(cfg, student, teacher) returning a loss module
METHODS = Registry("distillation method", on_miss=_load_plugins)
register_method = METHODS.register
get_method = METHODS.get
list_methods = METHODS.names


@register_method("kd")
def _build_kd(cfg: Config, student: nn.Module, teacher: nn.Module) -> nn.Module:
    return KDLoss(T=cfg.T, alpha=cfg.alpha)


def load_teacher(path: str, cfg: Config) -> nn.Module:
    """The teacher network from a run folder or checkpoint, checked against the run's dataset."""
    if not path:
        raise ValueError("distillation needs a teacher: pass --teacher runs/<teacher-run> (or a checkpoint)")
    teacher, ckpt = load_checkpoint(path)
    num_classes = data_utils.DATASETS[cfg.dataset].num_classes
    if teacher.num_classes != num_classes:
        raise ValueError(f"teacher at {path} has {teacher.num_classes} classes but {cfg.dataset} has {num_classes}")
    return teacher


def build_distiller(cfg: Config, student: nn.Module) -> Distiller:
    teacher = load_teacher(cfg.teacher, cfg)
    loss = get_method(cfg.method)(cfg, student, teacher)
    return Distiller(student, teacher, loss)


def distill(cfg: Config) -> RunResult:
    """Train (or reuse) the student that ``cfg`` describes, distilled with ``cfg.method``."""
    if cfg.method == "ce":
        return train(cfg)
    get_method(cfg.method)  # fail on a bad name before any data is read
    return train(cfg, make_task=build_distiller)


# ----------------------------------------------------------------------------- the demo


def teacher_config(cfg: Config) -> Config:
    """The demo's teacher: ``teacher_*`` fields, cross-entropy, the whole training split."""
    return replace(
        cfg,
        model=cfg.teacher_model,
        width=cfg.teacher_width,
        epochs=cfg.teacher_epochs,
        subset=0,
        method="ce",
        teacher="",
        seed=0,
        data_seed=0,
        name="",
    )


def _row(role: str, results: list[RunResult]) -> dict:
    stats = pd.DataFrame([summarize(r.history) for r in results])
    model = results[0].model
    cfg = results[0].config
    return {
        "run": role,
        "model": f"{cfg.model} x{cfg.width:g}",
        "params": count_params(model),
        "MFLOPs": count_flops(model) / 1e6,
        "seeds": len(results),
        "top1": stats["last_top1"].mean(),
        "top1_std": stats["last_top1"].std() if len(results) > 1 else float("nan"),
        "top5": stats["last_top5"].mean(),
        "best_top1": stats["best_top1"].mean(),
        "minutes": stats["train_seconds"].mean() / 60,
    }


def plot_curves(groups: dict[str, list[RunResult]], teacher: RunResult, path: str):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, results in groups.items():
        acc = pd.concat([r.history.set_index("epoch")["test_top1"] for r in results], axis=1)
        mean, std = acc.mean(axis=1), acc.std(axis=1).fillna(0)
        ax.plot(mean.index, mean, label=f"{label} (n={len(results)})")
        ax.fill_between(mean.index, mean - std, mean + std, alpha=0.25)
    ax.axhline(teacher.history["test_top1"].iloc[-1], color="k", ls="--", lw=1, label="teacher (final)")
    ax.set(xlabel="epoch", ylabel="test top-1 (%)", title="Independent vs distilled student")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig


def run_demo(cfg: Config) -> pd.DataFrame:
    """Teacher, independent students and KD students with the same budget; table + plot."""
    teacher = train(teacher_config(cfg))
    seeds = range(cfg.seed, cfg.seed + cfg.n_seeds)
    independent = [train(replace(cfg, method="ce", teacher="", seed=s, data_seed=s)) for s in seeds]
    kd = [distill(replace(cfg, method="kd", teacher=teacher.run_dir, seed=s, data_seed=s)) for s in seeds]
    table = pd.DataFrame([_row("teacher", [teacher]), _row("independent", independent), _row("kd", kd)])
    out = os.path.join(cfg.out_dir, f"demo-{cfg.profile}")
    os.makedirs(out, exist_ok=True)
    table.to_csv(os.path.join(out, "results.csv"), index=False)
    plot_curves(
        {"independent": independent, f"KD (T={cfg.T:g}, α={cfg.alpha:g})": kd}, teacher, os.path.join(out, "curves.png")
    )
    return table


def main(argv=None):
    parser = build_parser("Distill a student from a trained teacher (or run the demo with --demo).")
    parser.add_argument(
        "--demo",
        action="store_true",
        default=False,
        help="train teacher, independent and KD students; print a comparison table",
    )
    args = parser.parse_args(argv)
    demo = args.demo
    del args.demo
    if not hasattr(args, "method"):
        args.method = "kd"  # this is the distillation command line
    cfg = config_from_args(args)
    if demo:
        table = run_demo(cfg)
        out = os.path.join(cfg.out_dir, f"demo-{cfg.profile}")
        print(f"\nresults: {out}/results.csv, plot: {out}/curves.png")
        print(table.round(2).to_string(index=False))
        return table
    if cfg.method != "ce" and not cfg.teacher:
        parser.error("--teacher RUN_OR_CHECKPOINT is required for distillation")
    result = distill(cfg)
    print_result(result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])

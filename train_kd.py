"""Logit distillation: the KD loss, the frozen-teacher Distiller, the method registry, the CLI.

    python train_kd.py --teacher runs/<teacher-run> --student vgg8 --method kd --T 4 --alpha 0.9
    python train_kd.py --demo --profile cpu --data-dir ./data     # teacher vs independent vs KD

A method is a loss module called as ``loss(logits_s, logits_t, target, s_feats=..., t_feats=...)``
that returns named terms; ``register_method`` adds one without touching the training loop.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import replace

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

import data_utils
from model import Registry, atomic_save, count_flops, count_params, create_model, load_checkpoint
from train_eval import (
    Config,
    RunResult,
    Vanilla,
    amp_enabled,
    build_optimizer,
    build_parser,
    config_from_args,
    is_main_process,
    make_loaders,
    optimizer_step,
    per_sample_kl,
    plot_seeds,
    print_result,
    resolve_device,
    summarize_seeds,
    train,
)


def upcast(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits (autocast) to fp32: softmax at high T needs the mantissa; fp64 stays."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def kd_loss(logits_s: torch.Tensor, logits_t: torch.Tensor, T: float) -> torch.Tensor:
    """T² · (1/B) Σ_b KL(softmax(z_t/T) ‖ softmax(z_s/T)): Hinton et al. 2015's soft-target term.

    The T² keeps the gradient scale independent of T (soft-target gradients shrink as 1/T²).
    """
    log_p_s = F.log_softmax(upcast(logits_s) / T, dim=1)  # (B, K)
    log_p_t = F.log_softmax(upcast(logits_t) / T, dim=1)  # (B, K)
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


def standardize(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Per-sample z-score over classes: (z - mean_k z) / (std_k z + eps), unbiased std as Sun et al."""
    z = upcast(logits)
    return (z - z.mean(dim=1, keepdim=True)) / (z.std(dim=1, keepdim=True) + eps)  # (B, K)


class LogitStandardKDLoss(KDLoss):
    """Sun et al., CVPR 2024, "Logit Standardization in Knowledge Distillation".

    L = (1 - α) · CE(z_s, y) + α · τ² · KL(softmax(z̃_t/τ) ‖ softmax(z̃_s/τ)),
    z̃ = (z - mean_k z) / (std_k z + ε) per sample. The student need only match the teacher's
    logit *relations*, not their scale or shift: in effect a per-sample temperature τ·σ(z).
    Cross-entropy stays on the raw logits. Sun et al. use τ = 2 (base temperature).
    """

    def forward(self, logits_s, logits_t, target, **_) -> dict[str, torch.Tensor]:
        return {
            "ce": (1 - self.alpha) * F.cross_entropy(logits_s, target),
            "kd": self.alpha * kd_loss(standardize(logits_s), standardize(logits_t), self.T),
        }


def conflict_analysis(teacher: torch.Tensor, kd: torch.Tensor, independent: torch.Tensor, standardized) -> dict:
    """Where matching the teacher's logits misleads (all arguments: test-set logits, (N, K)).

    A conflict is a sample on which the KD student is *closer* to the teacher in KL than the
    independent student, yet predicts a different class than the teacher while the
    independent student agrees with it: a small divergence that still loses the ranking.
    ``corrected`` counts the conflicts on which the logit-standardised student agrees.
    """
    t_pred = teacher.argmax(1)
    closer = per_sample_kl(kd, teacher) < per_sample_kl(independent, teacher)
    mask = closer & (kd.argmax(1) != t_pred) & (independent.argmax(1) == t_pred)  # (N,)
    corrected = mask & (standardized.argmax(1) == t_pred)
    return {"samples": len(t_pred), "conflicts": int(mask.sum()), "corrected": int(corrected.sum()), "mask": mask}


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

    @property
    def needs_features(self) -> bool:
        return getattr(self.loss, "needs_features", False)

    def forward(self, x: torch.Tensor, y: torch.Tensor, teacher_logits: torch.Tensor | None = None):
        """``teacher_logits``: the teacher's outputs for exactly these views, if cached."""
        if self.needs_features:
            logits_s, feats_s = self.student(x, features=True)
            logits_t, feats_t = self.teacher(x, features=True)
        else:
            logits_s, feats_s = self.student(x), None
            logits_t = teacher_logits if teacher_logits is not None else self.teacher(x)
            feats_t = None
        terms = self.loss(logits_s, logits_t, y, s_feats=feats_s, t_feats=feats_t)
        return logits_s, terms


# ----------------------------------------------------------------------------- teacher-output reuse


def weights_digest(model: nn.Module) -> str:
    """Content hash of a model's weights and buffers: the teacher part of a cache key."""
    digest = hashlib.sha1()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class CachedTeacherLoader:
    """The training stream plus the teacher's logits for exactly its views: ``(x, y, logits)``.

    The idea of FKD (Shen & Xing, ECCV 2022) on CIFAR: an epoch's stream (order, crops,
    flips) is a pure function of the loader's seed and the epoch, so the teacher's outputs
    on it can be computed once, stored (``cache_dir/<key>/epoch_NNNN.pt``, an ``(n, K)``
    tensor in plan order) and read by every later student on the same stream. The key
    hashes the teacher's weights, the data's content, normalisation, augmentation, stream
    seed, shard, precision and storage dtype: change any of them and the logits are
    recomputed, never reused.
    """

    def __init__(self, loader, teacher: FrozenTeacher, cache_dir: str, amp: bool = False, dtype=torch.float16):
        self.loader, self.teacher, self.amp, self.dtype = loader, teacher, amp, dtype
        key = {
            "teacher": weights_digest(teacher.net),
            "stream": loader.fingerprint(),
            "amp": amp,
            "dtype": str(dtype),
        }
        self.key = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        self.dir = os.path.join(cache_dir, self.key)
        self.computed = 0  # epochs whose logits this object had to compute (for tests, reports)

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    @torch.no_grad()
    def _compute(self, epoch: int) -> torch.Tensor:
        device = self.loader.device
        self.teacher.to(device)
        outputs = []
        for x, _ in self.loader.batches(epoch, drop_last=False):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.amp):
                outputs.append(self.teacher(x).float().to(self.dtype).cpu())  # (B, K)
        self.computed += 1
        return torch.cat(outputs)  # (n, K) in plan order

    def epoch_logits(self, epoch: int) -> torch.Tensor:
        path = os.path.join(self.dir, f"epoch_{epoch:04d}.pt")
        if os.path.isfile(path):
            return torch.load(path, map_location="cpu")
        logits = self._compute(epoch)
        atomic_save(logits, path)
        return logits

    def __iter__(self):
        logits = self.epoch_logits(self.loader.epoch).to(self.loader.device)
        bs = self.loader.batch_size
        for i, (x, y) in enumerate(self.loader):
            yield x, y, logits[i * bs : i * bs + len(y)].float()  # (B, K)


def use_teacher_cache(task: nn.Module, loader, cfg: Config):
    """``wrap_loader`` for ``train``: the stream with the teacher's cached logits added to every
    batch, if the task's loss needs nothing else from the teacher (else the stream unchanged)."""
    if task.needs_features:
        return loader  # feature methods need the teacher's activations: it runs online
    dtype = getattr(torch, cfg.cache_dtype)
    amp = amp_enabled(cfg, resolve_device(cfg.device))
    return CachedTeacherLoader(loader, task.teacher, os.path.join(cfg.out_dir, "teacher_cache"), amp, dtype)


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


@register_method("kd_ls")
def _build_kd_ls(cfg: Config, student: nn.Module, teacher: nn.Module) -> nn.Module:
    return LogitStandardKDLoss(T=cfg.T, alpha=cfg.alpha)


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
    wrap = use_teacher_cache if cfg.teacher_cache else None
    return train(cfg, make_task=build_distiller, wrap_loader=wrap)


# ----------------------------------------------------------------------------- cost of a method


def _cost_worker(cfg: Config, steps: int, queue) -> None:
    import resource

    train_loader, _ = make_loaders(cfg)
    num_classes = data_utils.DATASETS[cfg.dataset].num_classes
    student = create_model(cfg.model, num_classes=num_classes, width=cfg.width)
    task = build_distiller(cfg, student) if cfg.method != "ce" else Vanilla(student)
    device = resolve_device(cfg.device)
    task.to(device).train()
    if cfg.channels_last:
        task.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(task, cfg)
    batches = iter(train_loader)

    amp = amp_enabled(cfg, device)

    def step():
        optimizer_step(task, optimizer, *next(batches), amp=amp)

    for _ in range(2):  # warm-up: allocator, oneDNN kernels
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB -> MB (Linux)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    queue.put(
        {
            "seconds_per_step": seconds / steps,
            "images_per_s": steps * cfg.batch_size / seconds,
            "peak_memory_mb": peak,
            "extra_params": count_params(task.loss) if cfg.method != "ce" else 0,
        }
    )


def measure_cost(cfg: Config, steps: int = 20) -> dict:
    """Seconds per training step, images/s and peak memory of the run ``cfg`` describes.

    Measured in a fresh process (so memory is this method's alone): ``steps`` steps after 2
    warm-up steps; peak memory is the process's peak resident set on the CPU (torch, data and
    all) or the CUDA allocator's peak on a GPU; ``extra_params`` counts trained adapters.
    """
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_cost_worker, args=(cfg, steps, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


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
    stats = summarize_seeds(results)
    cfg = results[0].config
    return {
        "run": role,
        "model": f"{cfg.model} x{cfg.width:g}",
        "params": count_params(results[0].model),
        "MFLOPs": count_flops(results[0].model) / 1e6,
        "seeds": len(results),
        "top1": stats["last_top1"],
        "top1_std": stats["last_top1_std"],
        "top5": stats["last_top5"],
        "best_top1": stats["best_top1"],
        "minutes": stats["minutes"],
    }


def plot_curves(groups: dict[str, list[RunResult]], teacher: RunResult, path: str):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, results in groups.items():
        plot_seeds(ax, results, "test_top1", f"{label} (n={len(results)})")
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
    if not is_main_process():
        return table
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
        if not is_main_process():
            return table
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
    # run main from the importable module: plugins (feature_kd) register their methods into
    # `train_kd.METHODS`, which as a script would be a second copy of this file's registry
    import train_kd

    train_kd.main(sys.argv[1:])

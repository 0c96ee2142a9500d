"""Experiments as the notebooks and the demo start them: the profile's teacher, seeds and figures.

exp = setup_experiment("Logit_Matching", profile="cpu")   # config, seeds, trained teacher, figure folder
exp = setup_experiment("Logit_Matching", "cpu", pair="vgg13-mv2")   # another pair of pairs.py
by = under_teachers({"kd": kd_cfg}, teacher_seeds(exp.cfg, [0, 1]), range(5))   # {"kd": {"teacher 0": runs, ...}}
start_teachers(exp.cfg, [1])   # teacher 1 trains in the background; teacher_seeds(exp.cfg, [0, 1]) later waits for it
table = run_demo(make_config("cpu"))                      # teacher vs independent vs KD students
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import pandas as pd

from analysis import compare, plot_seeds, summarize_seeds
from config import Config, make_config
from distributed import distributed, is_main_process
from model import count_flops, count_params
from pairs import default_pair, pair_fields
from registry import resolve_recipe
from run_folders import run_dir_for
from runs import RunResult, finished_run, train
from sweeps import run_all


def teacher_config(cfg: Config) -> Config:
    """The demo's teacher: ``teacher_*`` fields, cross-entropy, the whole training split but
    the validation hold-out (the same images the students hold out)."""
    return replace(
        cfg,
        model=cfg.teacher_model,
        width=cfg.teacher_width,
        epochs=cfg.teacher_epochs,
        lr=cfg.teacher_lr or cfg.lr,
        teacher_lr=0.0,
        threads=cfg.teacher_threads,
        subset=0,
        method="ce",
        teacher="",
        seed=0,
        data_seed=0,
        name="",
    )


def train_teachers(configs: list[Config], jobs: int | str = "auto") -> list[RunResult]:
    """Several teachers (capacity sizes, seeds), the unfinished ones in parallel at 1 thread each.

    Two 1-thread runs on 2 cores finish sooner than two 2-thread runs one after the other (a
    2-thread run's threads wait on each other). A config that is already trained (the demo's
    2-thread teacher, say) keeps its own thread count and is read back; the others are trained at
    1 thread, so their folders are those 1-thread runs."""
    out = [finished_run(run_dir_for(resolve_recipe(c)), resolve_recipe(c), repair=False) for c in configs]
    todo = [replace(c, threads=1) for c, done in zip(configs, out, strict=True) if done is None]
    new = iter(run_all(todo, jobs=jobs, desc="teachers") if todo else [])
    return [done if done is not None else next(new) for done in out]


def teacher_seeds(cfg: Config, seeds) -> list[RunResult]:
    """The demo's teacher (``teacher_config``) once per seed, for verdicts that must hold across
    teachers: seed 0 is the demo's own; the others train in parallel (``train_teachers``)."""
    base = teacher_config(cfg)
    return train_teachers([base if s == 0 else replace(base, seed=s, data_seed=s) for s in seeds])


def start_teachers(cfg: Config, seeds):
    """Start training the teachers of ``seeds`` (``teacher_seeds``' configs, 1 thread each) in a
    background process and return it (None if all are trained): the caller goes on with work that
    needs only teacher 0, on the core a lone 1-thread teacher would leave idle, and a later
    ``teacher_seeds`` with these seeds waits for them (a run folder is trained by one process at a
    time) and reads them back. The process dies with its parent; a run it leaves unfinished resumes."""
    import multiprocessing as mp

    base = teacher_config(cfg)
    configs = [resolve_recipe(base if s == 0 else replace(base, seed=s, data_seed=s)) for s in seeds]
    missing = [c for c in configs if not any(_finished(v) for v in (c, replace(c, threads=1)))]
    if not missing:
        return None
    proc = mp.get_context("spawn").Process(
        target=_train_teachers_here, args=(missing, os.getpid()), name="teachers", daemon=True
    )
    proc.start()
    return proc


def _finished(cfg: Config) -> bool:
    cfg = resolve_recipe(cfg)
    return finished_run(run_dir_for(cfg), cfg, repair=False) is not None


def _train_teachers_here(configs: list[Config], parent: int) -> None:
    from sweeps import _worker_init

    _worker_init(parent)
    train_teachers(configs, jobs=1)


def under_teachers(
    configs: Mapping[str, Config], teachers: Sequence[RunResult], seeds, jobs: int | str = "auto"
) -> dict[str, dict[str, list[RunResult]]]:
    """Each named config at ``seeds`` under each of ``teachers``, in one parallel call (one pool, so
    cohorts and workers span all of them): ``{name: {"teacher <seed>": runs}}``, the students nested
    in their teachers as ``analysis.compare_nested`` and ``nested_table`` take them."""
    keys = [f"teacher {t.config.seed}" for t in teachers]
    if len(set(keys)) != len(keys):
        raise ValueError(f"the teachers need distinct seeds to be told apart; got {keys}")
    seeds = list(seeds)
    flat = [
        replace(c, teacher=t.run_dir, seed=s, data_seed=s) for c in configs.values() for t in teachers for s in seeds
    ]
    done = iter(run_all(flat, jobs=jobs, desc=f"{len(configs)} configs x {len(keys)} teachers x {len(seeds)} seeds"))
    return {name: {key: [next(done) for _ in seeds] for key in keys} for name in configs}


@dataclass
class Experiment:
    """What a notebook starts from: its config, seeds, trained teacher and figure folder."""

    cfg: Config
    seeds: range  # sweeps and exploratory groups: 3 (1 in smoke)
    teacher: RunResult
    figures: str
    confirm_seeds: range = range(5)  # picked configurations and differences under 2 points: 5 (2 in smoke)


def setup_experiment(
    name: str, profile: str = "cpu", data_dir: str = "./data", out_dir: str = "runs", pair: str | None = None
) -> Experiment:
    """The shared first cell of the notebooks: the profile's config (generated data in ``smoke``),
    its seeds, the teacher (trained once, then reused) and ``<out_dir>/figures/<name>``.

    ``pair`` names a teacher-student pair of ``pairs.PAIRS[profile]``; None keeps the profile's own
    networks (its first pair, the demo's). Another pair's figures go to ``<name>-<pair>``."""
    overrides = {"out_dir": out_dir} | ({} if profile == "smoke" else {"data_dir": data_dir})
    if pair is not None:
        overrides |= pair_fields(profile, pair)
    cfg = make_config(profile, **overrides)
    own = pair is None or pair == default_pair(profile)
    figures = os.path.join(out_dir, "figures", name if own else f"{name}-{pair}")
    os.makedirs(figures, exist_ok=True)
    teacher = train(teacher_config(cfg))
    print(
        f"profile {profile}: {cfg.dataset}, {cfg.val_size} validation images, seeds 0-{cfg.n_seeds - 1}; teacher "
        f"{cfg.teacher_model} x{cfg.teacher_width:g} ({teacher.history['test_top1'].iloc[-1]:.2f}% test top-1); "
        f"students {cfg.model} x{cfg.width:g}, {cfg.epochs} epochs, {cfg.subset or 'all'} images per class"
    )
    return Experiment(cfg, range(cfg.n_seeds), teacher, figures, range(max(5, cfg.n_seeds) if cfg.n_seeds > 1 else 2))


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
        "top1_ci95": stats["last_top1_ci95"],
        "top5": stats["last_top5"],
        "val_top1": pd.Series([r.history["val_top1"].iloc[-1] for r in results if "val_top1" in r.history]).mean(),
        "minutes": stats["minutes"],
    }


def plot_curves(groups: dict[str, list[RunResult]], teacher: RunResult, path: str):
    import matplotlib.pyplot as plt

    # the test set is read only where it is used (the last and the picked epoch): a curve needs a column
    # read every epoch, validation where there is a split, else the augmented training batches
    runs = [teacher, *(r for results in groups.values() for r in results)]

    def every_epoch(column: str) -> bool:
        return all(column in r.history and r.history[column].notna().all() for r in runs)

    column = next(c for c in ("val_top1", "test_top1", "train_top1") if every_epoch(c))
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, results in groups.items():
        plot_seeds(ax, results, column, f"{label} (n={len(results)})")
    ax.axhline(teacher.history[column].iloc[-1], color="k", ls="--", lw=1, label="teacher (final)")
    where = {"val": "validation", "test": "test", "train": "training (augmented)"}[column.split("_")[0]]
    ax.set(xlabel="epoch", ylabel=f"{where} top-1 (%)", title="Independent vs distilled student")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig


def run_demo(cfg: Config) -> pd.DataFrame:
    """Teacher, then independent and KD students (same seeds, paired) in parallel; table + plot.

    The table's ``attrs["kd_vs_independent"]`` is the paired comparison of the two students.
    """
    teacher = train(teacher_config(cfg))
    seeds = range(cfg.seed, cfg.seed + cfg.n_seeds)
    configs = [replace(cfg, method="ce", teacher="", seed=s, data_seed=s) for s in seeds]
    configs += [replace(cfg, method="kd", teacher=teacher.run_dir, seed=s, data_seed=s) for s in seeds]
    jobs = "auto" if distributed()[1] == 1 else 1  # under torchrun every rank trains each run together
    results = run_all(configs, jobs=jobs, desc="students")
    independent, kd = results[: len(seeds)], results[len(seeds) :]
    table = pd.DataFrame([_row("teacher", [teacher]), _row("independent", independent), _row("kd", kd)])
    table.attrs["kd_vs_independent"] = compare(kd, independent) if len(seeds) > 1 else None
    out = os.path.join(cfg.out_dir, f"demo-{cfg.profile}")
    if not is_main_process():
        return table
    os.makedirs(out, exist_ok=True)
    table.to_csv(os.path.join(out, "results.csv"), index=False)
    k = kd[0].config
    label = f"KD (T={k.T:g}, CE {k.ce_weight:g}, KD {k.kd_weight:g})"
    plot_curves({"independent": independent, label: kd}, teacher, os.path.join(out, "curves.png"))
    return table

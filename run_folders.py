"""Run folders: a run's identity, its folder name, and reading back what it wrote.

    runs/<name>/config.json     the run's config (``Config.to_dict``: fields and method parameters)
    runs/<name>/metrics.csv     one row per epoch
    runs/<name>/checkpoint.pt   the last epoch: weights, architecture, config, metrics, optimizer state
    runs/<name>/FAILED          only in a run that failed: why (at chance, or a diverged loss)

A run's name hashes its identity, the values that decide what it computes, so equal configs
share a folder and a finished run is found again instead of being retrained.

The checkpoint is the record of what was trained: ``config.json``, ``metrics.csv`` and
``FAILED`` are views of it for people and other tools (``checkpoint_views``). A run folder that
is reused gets them rewritten where they disagree with it (``repair_run_folder``), and
``load_history``, ``load_config`` and ``run_record`` read the checkpoint, never the views, where
there is one. Only a folder without a checkpoint (written by hand, or by other code) is read
from its files, and a truncated or garbled one is refused with its name.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import warnings
from dataclasses import replace

import pandas as pd

import data_utils
from atomic_files import atomic_write_text
from checkpoints import file_digest, read_checkpoint
from config import Config
from registry import METHODS, resolve_recipe

# Fields that do not change what a run computes, so they stay out of its identity.
NOT_IN_IDENTITY = {
    "profile",
    "out_dir",
    "name",
    "device",
    "data_dir",
    "download",
    "n_seeds",
    "teacher_model",
    "teacher_width",
    "teacher_epochs",
    "teacher_lr",
    "teacher_threads",
    "budget",
    "trust_teacher",  # the teacher's weights are in the identity
    "eval_test",  # when the test set is read; training is the same
    "stop_after",  # where the run pauses; the schedule (epochs) and every step before it are the same
}
# Fields about the teacher: in a run's identity only where its method reads them (``Method.reads``).
TEACHER_FIELDS = frozenset({"teacher", "teacher_amp", "teacher_cache", "cache_dtype"})


def run_identity(cfg: Config) -> dict:
    """The values that decide what a run computes.

    Fields at their class default are left out, so adding a field (whose default keeps the old
    behaviour) leaves earlier runs reusable; so are the teacher fields its method does not read,
    and every method parameter at its declared default. The teacher enters as the digest of its
    weights, the data as the digest of its files.
    """
    cfg = resolve_recipe(cfg)
    method = METHODS.get(cfg.method)
    defaults = Config().fields_dict()
    ident = {k: v for k, v in cfg.fields_dict().items() if k not in NOT_IN_IDENTITY and v != defaults[k]}
    unused = TEACHER_FIELDS - method.reads
    if cfg.schedule != "multistep":
        unused |= {"milestones", "gamma"}
    for key in unused:
        ident.pop(key, None)
    for p in method.params:
        value = cfg.params.get(p.name)
        if value is not None and value != p.default:
            ident[p.name] = value
    if ident.get("teacher"):  # the teacher's weights, not where they lie: a retrained teacher is a new run
        ident["teacher"] = file_digest(cfg.teacher)
    try:
        ident["data"] = data_utils.data_digest(cfg.dataset, cfg.data_dir)
    except FileNotFoundError:
        pass  # no data yet: nothing is trained on this config until it exists (train prepares it first)
    return ident


def run_name(cfg: Config) -> str:
    """``cfg.name``, or ``<model>-w<width>[-k<members>]-<method>-s<seed>-<identity digest>``."""
    if cfg.name:
        return cfg.name
    digest = hashlib.sha1(json.dumps(run_identity(cfg), sort_keys=True).encode()).hexdigest()[:8]
    group = f"-k{cfg.members}" if cfg.members > 1 else ""
    return f"{cfg.model}-w{cfg.width:g}{group}-{cfg.method}-s{cfg.seed}-{digest}"


def run_dir_for(cfg: Config) -> str:
    return os.path.join(cfg.out_dir, run_name(cfg))


def saved_config(saved: dict) -> Config:
    """The config a run folder saved. It was resolved with its method's recipe of the time, so a method
    parameter it leaves out was at its declared default then: pinned there, so that a recipe that gained
    the parameter later (MLKD's second view) does not rewrite what the run trained."""
    cfg = Config(**saved)
    method = METHODS.get(cfg.method)
    missing = {p.name: p.default for p in method.params if p.name not in cfg.params and p.default is not None}
    return replace(cfg, **missing) if missing else cfg


def same_run(saved: dict | None, cfg: Config) -> bool:
    """Whether a checkpoint's saved config describes the run ``cfg`` does."""
    return saved is not None and run_identity(saved_config(saved)) == run_identity(cfg)


# The metrics column that marks a failed run (its reason on every row; absent in a run that trained)
FAILED_COLUMN = "failed"
FAILED_FILE = "FAILED"


def history_frame(metrics, failed: str | None = None) -> pd.DataFrame:
    """A run's per-epoch metrics as a table; a failed run's carry its reason in column ``failed``."""
    frame = pd.DataFrame(metrics)
    if failed:
        frame[FAILED_COLUMN] = failed
    return frame


def checkpoint_views(ckpt: dict) -> dict[str, str | None]:
    """The text each view file of a run folder must hold, from its checkpoint (None: no such file)."""
    failed = ckpt.get("failed")
    return {
        "config.json": json.dumps(ckpt["config"], indent=2),
        "metrics.csv": history_frame(ckpt["metrics"], failed).to_csv(index=False),
        FAILED_FILE: f"{failed}\n" if failed else None,
    }


def _text(path: str) -> str | None:
    """A view file's text (undecodable bytes replaced, so garbage compares unequal), None if absent."""
    try:
        with open(path, encoding="utf-8", errors="replace", newline="") as f:
            return f.read()
    except (FileNotFoundError, IsADirectoryError):
        return None


def repair_run_folder(run_dir: str, ckpt: dict) -> list[str]:
    """Rewrite (or remove) every view file of ``run_dir`` that disagrees with its checkpoint ``ckpt``:
    a ``metrics.csv`` truncated or garbled, a ``config.json`` edited by hand, a stale ``FAILED``.
    Returns the names rewritten, and warns naming them; a healthy folder is left untouched."""
    repaired = []
    for name, text in checkpoint_views(ckpt).items():
        path = os.path.join(run_dir, name)
        if text is None:
            if os.path.lexists(path):
                os.remove(path)
                repaired.append(name)
        elif _text(path) != text:
            atomic_write_text(path, text)
            repaired.append(name)
    if repaired:
        warnings.warn(
            f"{run_dir}: {', '.join(repaired)} disagreed with checkpoint.pt (the record of what was trained); "
            "rewritten from it",
            stacklevel=2,
        )
    return repaired


def set_failure_mark(run_dir: str, reason: str | None) -> None:
    """Write ``FAILED`` (the reason a run failed) in ``run_dir``, or remove it when ``reason`` is None."""
    path = os.path.join(run_dir, FAILED_FILE)
    if reason:
        atomic_write_text(path, f"{reason}\n")
    elif os.path.lexists(path):
        os.remove(path)


def failure_mark(run_dir: str) -> str | None:
    """Why the run in ``run_dir`` failed (its ``FAILED`` file), or None."""
    text = _text(os.path.join(run_dir, FAILED_FILE))
    return None if text is None else (text.strip() or "failed")


def _checkpoint_of(run_dir: str) -> dict | None:
    """The run folder's checkpoint (tensors mapped, not read), None without one; it must be a run's."""
    path = os.path.join(run_dir, "checkpoint.pt")
    if not os.path.isfile(path):
        return None
    ckpt = read_checkpoint(path, mmap=True)
    if not isinstance(ckpt.get("config"), dict) or not isinstance(ckpt.get("metrics"), list):
        raise ValueError(
            f"{path} holds no run's config and metrics (a {ckpt.get('format', 'bare')} checkpoint?); "
            "a run folder's checkpoint is written by its run"
        )
    return ckpt


def _read_json(path: str) -> dict:
    text = _text(path)
    if text is None:
        raise FileNotFoundError(f"no {os.path.basename(path)} in {os.path.dirname(path)} (and no checkpoint.pt)")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}): truncated or edited; no checkpoint to rebuild it") from err
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a {type(value).__name__}, not a config")
    return value


def _read_metrics(path: str) -> pd.DataFrame:
    """``metrics.csv`` of a folder without a checkpoint, refused where it is truncated or garbled."""
    text = _text(path)
    if text is None:
        raise FileNotFoundError(f"no {os.path.basename(path)} in {os.path.dirname(path)} (and no checkpoint.pt)")
    try:
        rows = list(csv.reader(io.StringIO(text)))
    except csv.Error:
        rows = []
    if not text.endswith("\n") or len(rows) < 2 or len({len(r) for r in rows}) != 1 or "epoch" not in rows[0]:
        raise ValueError(
            f"{path} is truncated or not this project's metrics (a header with 'epoch', then one full row per "
            "epoch); with no checkpoint.pt beside it there is nothing to rebuild it from: rerun the run"
        )
    try:
        return pd.read_csv(io.StringIO(text))
    except (pd.errors.ParserError, ValueError) as err:
        raise ValueError(f"{path} cannot be read as metrics ({err})") from err


def load_history(run_dir: str) -> pd.DataFrame:
    """Per-epoch metrics of a run folder, as its checkpoint holds them (with a failed run's
    ``failed`` column); from ``metrics.csv`` only in a folder without a checkpoint."""
    ckpt = _checkpoint_of(run_dir)
    if ckpt is not None:
        return history_frame(ckpt["metrics"], ckpt.get("failed"))
    return _read_metrics(os.path.join(run_dir, "metrics.csv"))


def _config(values: dict, source: str) -> Config:
    try:
        return saved_config(values)
    except TypeError as err:
        raise ValueError(f"{source} is not a config this project can read ({err})") from err


def load_config(run_dir: str) -> Config:
    """The config a run folder was trained with, as its checkpoint holds it (a ``config.json``
    edited by hand is not believed); from ``config.json`` only in a folder without a checkpoint
    (written before or after the method parameters moved out of the fields: both are flat)."""
    ckpt = _checkpoint_of(run_dir)
    if ckpt is not None:
        return _config(ckpt["config"], os.path.join(run_dir, "checkpoint.pt"))
    path = os.path.join(run_dir, "config.json")
    return _config(_read_json(path), path)


def run_record(run_dir: str) -> tuple[dict, pd.DataFrame]:
    """``(config as a flat dict, per-epoch metrics)`` of a run folder, read as ``load_config`` and
    ``load_history`` read them: from the checkpoint where there is one."""
    ckpt = _checkpoint_of(run_dir)
    if ckpt is not None:
        return dict(ckpt["config"]), history_frame(ckpt["metrics"], ckpt.get("failed"))
    return _read_json(os.path.join(run_dir, "config.json")), _read_metrics(os.path.join(run_dir, "metrics.csv"))

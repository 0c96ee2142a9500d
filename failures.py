"""Runs that failed to train: the rule that says a run is still at chance, and its warning.

A run at chance is marked (``run_folders.set_failure_mark``, a ``failed`` column, a key of its
checkpoint) and left out of every table and pick (``analysis``, ``sweeps.mark_best``); a run whose
loss turns NaN stops (``train_eval._check_finite``) and is marked too.
"""

from __future__ import annotations

import math

from torch import nn


class RunFailedWarning(UserWarning):
    """A run that is not learning: still at chance (``chance_failure``)."""


class RunRecoveredWarning(UserWarning):
    """A run marked failed that left chance later: its mark is removed (a run's status is its latest epoch's)."""


# "At chance": top-1 no better than chance + CHANCE_MARGIN x chance (CIFAR-10: <= 15%, CIFAR-100: <= 1.5%).
CHANCE_MARGIN = 0.5


def chance_patience(epochs: int) -> int:
    """Epochs a run has before it may be judged at chance: max(3, 10% of its epochs, rounded up)."""
    return max(3, math.ceil(0.1 * epochs))


def chance_failure(history: list[dict], num_classes: int, epochs: int, grace: int = 0) -> str | None:
    """Why a run counts as failed for not learning, or None.

    The rule: once the run has trained ``chance_patience(epochs)`` epochs (3, or 10% of a long
    run: 24 of 240), its latest epoch's training top-1 *and* held-out top-1 (``val_top1``, or
    ``test_top1`` without a validation split) are both no better than chance, 100/num_classes,
    by more than ``CHANCE_MARGIN`` of it. A slow first epoch or two is never judged; a run that
    learns later is no longer failed (the status is the latest epoch's); a run that learned and
    fell back to chance is. Only metrics are read, so training is the same with or without it.
    Without a validation split, an epoch whose test set was not read (``eval_test="end"``) is not
    judged: such a run is judged at its last epoch. ``grace``: epochs of a pre-training stage that
    does not train the classifier (``pretraining_epochs``), added to the patience.
    """
    if len(history) < grace + chance_patience(epochs):
        return None
    last = history[-1]
    chance = 100 / num_classes
    held_out = "val_top1" if "val_top1" in last else "test_top1"
    if held_out not in last or not math.isfinite(last[held_out]):
        return None
    if last["train_top1"] <= chance * (1 + CHANCE_MARGIN) and last[held_out] <= chance * (1 + CHANCE_MARGIN):
        return (
            f"at chance after {last['epoch']} epochs: train top-1 {last['train_top1']:.1f}%, "
            f"{held_out} {last[held_out]:.1f}% (chance {chance:g}%)"
        )
    return None


def judged_at_chance(task: nn.Module) -> bool:
    """Whether the chance rule applies: the student's output layer (its last parameter) trains. A run
    that freezes it (FitNets' stage 1, the specialists' first stage) is at chance by design."""
    params = list(task.student.parameters())
    return bool(params) and params[-1].requires_grad


def pretraining_epochs(task: nn.Module) -> int:
    """Epochs at the start of a run in which its loss trains something other than the classifier (the
    init stage of AB, FSP, FT: a loss's ``init_epochs``); the chance rule waits them out."""
    return int(getattr(getattr(task, "loss", None), "init_epochs", 0) or 0)

"""Evaluation: a model's loss and accuracy over a loader, and every output of a pass.

evaluate(model, test_loader)                 # {"loss", "top1", "top5"}
logits, labels = predict(model, test_loader)  # (N, K) float32 and (N,), on the CPU

A run reads the test set at its last epoch and at the epoch validation picks (``keep_if_picked``,
``read_test_at_picked``), not every epoch, unless its config asks for it (``eval_test="every"``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def evaluate(model: nn.Module, loader, amp: bool = False) -> dict:
    """Mean cross-entropy, top-1 and top-5 accuracy (%) of a logits-returning model."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss = torch.zeros((), device=device)
    correct = torch.zeros(2, device=device)
    n = 0
    for x, y, *_ in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
        logits = logits.float()
        loss += F.cross_entropy(logits, y, reduction="sum")
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (B, 5)
        hits = top == y[:, None]
        correct += torch.stack([hits[:, 0].sum(), hits.any(1).sum()])
        n += len(y)
    model.train(was_training)
    top1, top5 = (100 * correct / n).tolist()
    return {"loss": loss.item() / n, "top1": top1, "top5": top5}


@torch.no_grad()
def predict(model: nn.Module, loader, amp: bool = False, output=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every logit of a pass over ``loader``: ``(logits (N, K) float32, labels (N,))`` on the CPU.

    ``output(x)``, if given, is collected instead of ``model(x)`` (an embedding, say), with the
    model in eval mode and on its device.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    output = output or model
    logits, labels = [], []
    for x, y, *_ in loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits.append(output(x.to(device)).float().cpu())
        labels.append(y.cpu())
    model.train(was_training)
    return torch.cat(logits), torch.cat(labels)


def test_metrics(task: nn.Module, loader, amp: bool = False) -> dict:
    """What a run reports each epoch: the task's own ``test_metrics`` if it has one (a cohort
    adds each member's accuracy, say), else ``evaluate`` of its student."""
    if hasattr(task, "test_metrics"):
        return task.test_metrics(loader, amp)
    return evaluate(task.student, loader, amp)


# ----------------------------------------------------------------------------- the test set, read where it is used


def keep_if_picked(m, row: dict) -> None:
    """Keep this epoch's weights if validation ranks it first so far (ties: the earlier epoch, as
    ``analysis.summarize`` picks); the last epoch's test is read anyway."""
    if m.picked is None or row["val_top1"] > m.picked["val_top1"]:
        state = {k: v.detach().cpu().clone() for k, v in m.task.student.state_dict().items()}
        m.picked = {"epoch": row["epoch"], "val_top1": row["val_top1"], "student": state}


def read_test_at_picked(m, test_loader, amp: bool) -> None:
    """Read the test set with the weights of the epoch validation picked, into that epoch's row; the
    final weights are put back (what the checkpoint holds and training would continue from)."""
    if m.picked["epoch"] < len(m.history) + 1:  # an earlier epoch than this last one
        final = {k: v.detach().clone() for k, v in m.task.student.state_dict().items()}
        m.task.student.load_state_dict(m.picked["student"])
        metrics = test_metrics(m.task, test_loader, amp)
        m.task.student.load_state_dict(final)
        m.history[m.picked["epoch"] - 1].update({f"test_{k}": v for k, v in metrics.items()})
    m.picked = None  # read: nothing left to keep

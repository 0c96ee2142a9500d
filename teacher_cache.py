"""Teacher-output reuse: the teacher's logits for an epoch's exact views, computed once, read by every student.

The idea of FKD (Shen & Xing, ECCV 2022) on CIFAR: an epoch's stream (order, crops, flips) is a
pure function of the loader's seed and the epoch, so the teacher's outputs on it can be stored
(``<out_dir>/teacher_cache/<key>/epoch_NNNN.pt``, an ``(n, K)`` tensor in plan order) and handed
to every later student on the same stream as the batch extra ``teacher_logits``.

    loader = use_teacher_cache(distiller, train_loader, cfg)   # the loop's ``wrap_loader``
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import warnings

import torch
from torch import nn

from atomic_files import atomic_save
from checkpoints import state_digest
from train_eval import amp_enabled, resolve_device


def weights_digest(model: nn.Module) -> str:
    """Content hash of a model's weights and buffers: the teacher part of a cache key."""
    return state_digest(model.state_dict())


class CachedTeacherLoader:
    """The training stream plus the teacher's logits for exactly its views: ``(x, y, extras)``
    with ``extras["teacher_logits"]`` (B, K) beside whatever extras the stream already carries.

    The key hashes the teacher's weights, the data's content, normalisation, augmentation,
    stream seed, shard, precision and storage dtype: change any of them and the logits are
    recomputed, never reused.
    """

    def __init__(self, loader, teacher: nn.Module, cache_dir: str, amp: bool = False, dtype=torch.float16):
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
        for x, *_ in self.loader.batches(epoch, drop_last=False, extras=False):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.amp):
                outputs.append(self.teacher(x).float().to(self.dtype).cpu())  # (B, K)
        self.computed += 1
        return torch.cat(outputs)  # (n, K) in plan order

    def epoch_logits(self, epoch: int) -> torch.Tensor:
        path = os.path.join(self.dir, f"epoch_{epoch:04d}.pt")
        logits = self._stored(path, epoch)
        if logits is None:
            logits = self._compute(epoch)
            atomic_save(logits, path)
        return logits

    def _stored(self, path: str, epoch: int) -> torch.Tensor | None:
        """The logits stored at ``path``, or None: none stored yet, or a file that is truncated (a
        killed writer before atomic saves, a full disk), damaged or not this stream's ``(n, K)``
        tensor, which is then computed again and rewritten (with a warning naming it), so it never
        blocks the later students on this stream."""
        if not os.path.isfile(path):
            return None
        try:
            logits = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            return None
        except (RuntimeError, EOFError, OSError, KeyError, ValueError, IndexError, pickle.UnpicklingError) as err:
            problem = f"truncated or damaged ({type(err).__name__}: {' '.join(str(err).split()[:8])})"
        else:
            rows = len(self.loader.epoch_plan(epoch)[0])
            classes = getattr(self.teacher.net, "num_classes", None)
            if (
                isinstance(logits, torch.Tensor)
                and logits.dim() == 2
                and len(logits) == rows
                and classes in (None, logits.shape[1])
                and logits.dtype == self.dtype
            ):
                return logits
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            problem = f"not this stream's ({rows}, {classes or 'K'}) {self.dtype} logits (it holds {shape})"
        warnings.warn(f"teacher cache file {path} is {problem}: computing it again and rewriting it", stacklevel=2)
        return None

    def __iter__(self):
        logits = self.epoch_logits(self.loader.epoch).to(self.loader.device)
        bs = self.loader.batch_size
        for i, (x, y, *rest) in enumerate(self.loader):
            extras = dict(rest[0]) if rest else {}
            extras["teacher_logits"] = logits[i * bs : i * bs + len(y)].float()  # (B, K)
            yield x, y, extras


def use_teacher_cache(task: nn.Module, loader, cfg):
    """``wrap_loader`` for ``train_eval.train``: the stream with the teacher's cached logits added
    to every batch. Only for methods that need nothing else of the teacher (``distill`` refuses
    the others before training)."""
    dtype = getattr(torch, cfg.cache_dtype)
    amp = amp_enabled(cfg, resolve_device(cfg.device))
    return CachedTeacherLoader(loader, task.teacher, os.path.join(cfg.out_dir, "teacher_cache"), amp, dtype)

"""Atomic file writes: a reader sees the old file or the new one, never a torn one.

Every file the project writes (checkpoints, metrics, configs, cached teacher logits, sweep
tables) goes through ``atomic_write``: a temporary file in the same folder, then a rename.
"""

from __future__ import annotations

import os
import tempfile

TMP_PREFIX = ".tmp-"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str, write, binary: bool = True) -> None:
    """``write(f)`` into a temporary file beside ``path``, then rename it over ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=TMP_PREFIX, suffix=os.path.splitext(path)[1])
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; a shared teacher must stay readable
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), binary=False)


def atomic_save(obj, path: str) -> None:
    """``torch.save`` of ``obj`` to ``path``, atomically."""
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))


def remove_stale_temporaries(folder: str) -> None:
    """Delete the temporary files a killed writer left in ``folder`` (call before writing to it):
    only names with this module's prefix, never a user's file that merely contains it."""
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
        if name.startswith(TMP_PREFIX):
            os.remove(os.path.join(folder, name))

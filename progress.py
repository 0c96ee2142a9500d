"""Progress bars: one per run in epochs, one per sweep in runs; shown or hidden as the caller asks.

``KD_PROGRESS=0`` in the environment hides them for the process; ``progress_bars(False)`` for a
block of code (a sweep's runs, under its own bar), restoring the setting before it afterwards.
"""

from __future__ import annotations

import contextlib
import contextvars
import os

from distributed import is_main_process

# Whether runs show a progress bar: KD_PROGRESS=0 in the environment turns them off for the process,
# ``progress_bars(False)`` for a block of code (a sweep's runs, under its own bar over runs).
_PROGRESS: contextvars.ContextVar[bool | None] = contextvars.ContextVar("progress", default=None)


def progress_enabled() -> bool:
    chosen = _PROGRESS.get()
    return os.environ.get("KD_PROGRESS", "1") != "0" if chosen is None else chosen


@contextlib.contextmanager
def progress_bars(enabled: bool):
    """Show (or hide) the runs' progress bars inside the block; the setting before is restored."""
    token = _PROGRESS.set(enabled)
    try:
        yield
    finally:
        _PROGRESS.reset(token)


def epoch_bar(total: int, desc: str, initial: int):
    """One bar per run, in epochs; off where ``progress_enabled`` says so and on non-zero ranks."""
    if not progress_enabled() or not is_main_process():
        from tqdm import tqdm  # the plain class: tqdm.auto would warn about notebook widgets

        return tqdm(total=total, disable=True)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, initial=initial, unit="epoch", leave=True)

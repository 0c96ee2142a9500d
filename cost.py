"""What a method costs per training step: seconds, images/s and tensor memory, measured in a fresh process.

measure_cost(make_config("cpu", method="crd", teacher="runs/<teacher>"))
# {"seconds_per_step", "images_per_s", "state_mb", "step_peak_mb", "peak_memory_mb", "extra_params"}
processor()  # "AMD EPYC (avx2)": the machine a measurement (or a run's bits) belongs to
"""

from __future__ import annotations

import statistics
import time
import weakref

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import data_utils
from config import Config
from distiller import FrozenTeacher, build_distiller
from model import count_params, create_model
from registry import METHODS, resolve_recipe
from runs import make_loaders
from teacher_cache import use_teacher_cache
from train_eval import Vanilla, amp_enabled, build_optimizer, optimizer_step, resolve_device, thread_count


class TensorMemory(TorchDispatchMode):
    """Bytes of the tensors that the ops run under it allocate: ``current`` and ``peak``.

    Every op's outputs are counted once per storage (views share their base's) and released when
    the storage is freed, so ``peak`` is the most memory that activations, saved tensors,
    gradients and temporaries held at once. Storages that existed before (parameters, optimizer
    state, the batch) are seen but not counted. Unlike the process's resident set, this separates
    methods whose differences are a few MB beside the data and the framework, and it works on any
    device.
    """

    def __init__(self):
        super().__init__()
        self._live: dict[int, int] = {}  # storage address -> bytes counted for it
        self.current = self.peak = 0

    def _see(self, t: torch.Tensor, count: bool) -> None:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self._live or key == 0:
            return
        size = storage.nbytes() if count else 0
        self._live[key] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor):
                self._see(t, count=False)
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._see(t, count=True)
        return out


def state_bytes(task: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of everything a run keeps between steps: parameters and buffers of the task (student,
    adapters, memory banks), of a frozen teacher (held outside the module tree) and the optimizer
    state; shared storages counted once."""
    tensors = list(task.parameters()) + list(task.buffers())
    for module in task.modules():
        if isinstance(module, FrozenTeacher):
            tensors += list(module.net.parameters()) + list(module.net.buffers())
    tensors += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def _cost_worker(cfg: Config, steps: int, queue) -> None:
    try:
        with thread_count(cfg.threads):  # the run's own thread count: a cost is per run, as the runs go
            queue.put(_cost(cfg, steps))
    except Exception as err:  # the parent waits on the queue: it must hear of a failure, not hang
        queue.put(err)


def _cost(cfg: Config, steps: int) -> dict:
    cfg = resolve_recipe(cfg)
    train_loader = make_loaders(cfg).train
    train_loader.with_index = METHODS.get(cfg.method).needs_index
    num_classes = data_utils.DATASETS[cfg.dataset].num_classes
    student = create_model(cfg.model, num_classes=num_classes, width=cfg.width)
    distills = METHODS.get(cfg.method).build is not None
    task = build_distiller(cfg, student, train_loader) if distills else Vanilla(student)
    if distills and cfg.teacher_cache:  # the stored logits replace the teacher's forward, as in ``distill``
        train_loader = use_teacher_cache(task, train_loader, cfg)
    device = resolve_device(cfg.device)
    task.to(device).train()
    if cfg.channels_last:
        task.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(task, cfg)
    if hasattr(task, "set_epoch"):  # a step of the main stage: past warm-ups and init stages (FSP, AB, FT)
        task.set_epoch(cfg.epochs - 1)
    batches = iter(train_loader)
    amp = amp_enabled(cfg, device)

    def step():
        optimizer_step(task, optimizer, *next(batches), amp=amp)  # (x, y) or (x, y, extras)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(2):  # warm-up: allocator, oneDNN kernels, optimizer state, the epoch's cached logits
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)  # robust to a step that another process delayed
    with TensorMemory() as memory:  # one more step, not timed: the accounting slows each op
        step()
    state = state_bytes(task, optimizer)
    return {
        "seconds_per_step": seconds,
        "images_per_s": cfg.batch_size / seconds,
        "state_mb": state / 2**20,
        "step_peak_mb": memory.peak / 2**20,
        "peak_memory_mb": (state + memory.peak) / 2**20,
        "extra_params": count_params(task.loss) if distills else 0,
    }


def measure_cost(cfg: Config, steps: int = 20) -> dict:
    """Seconds per training step, images/s and the memory of the run ``cfg`` describes.

    Measured in a fresh process at the run's ``cfg.threads``, reading the teacher's stored logits
    where ``cfg.teacher_cache`` says the run would: the median of ``steps`` timed steps after 2
    warm-up steps, then one step under ``TensorMemory``. ``state_mb``: what the run keeps between
    steps (``state_bytes``: student, adapters, teacher, memory banks, optimizer state);
    ``step_peak_mb``: the most that one step's activations, gradients and temporaries hold at
    once; ``peak_memory_mb`` their sum. Tensor bytes, not the process's resident set (which the
    data and the framework dominate); ``extra_params`` counts trained adapters.
    """
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_cost_worker, args=(cfg, steps, queue))
    proc.start()
    result = queue.get()
    proc.join()
    if isinstance(result, Exception):
        raise result
    return result


def processor() -> str:
    """The CPU's model name and its widest vector instructions (what decides oneDNN's kernels)."""
    info = _cpuinfo()
    if not info:  # not Linux
        import platform

        return platform.processor() or "unknown"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    isa = "avx512" if "avx512f" in info else "avx2" if "avx2" in info else "other"
    return f"{name} ({isa})"


def native_bf16(device: str = "auto") -> bool:
    """Whether bf16 matrix math runs natively on ``device`` (a config's ``device``): a CUDA GPU that
    supports it, or a CPU with AVX512-BF16 or AMX-BF16. Other CPUs emulate it in oneDNN, where a bf16
    teacher costs more than an fp32 one (docs/protocol.md: online rows 12.9-18.6x a CE step on an
    AVX2 machine against 2.1-8.3x with native bf16)."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        return torch.cuda.is_bf16_supported()
    flags = _cpuinfo()  # "" where unreadable (not Linux): emulation is the safe assumption
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _cpuinfo() -> str:
    """/proc/cpuinfo's text, or "" where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def fast_teacher_amp(device: str = "auto") -> str:
    """The ``teacher_amp`` that makes an online teacher faster here: ``"bf16"`` where bf16 runs natively,
    ``"off"`` elsewhere. The value is written into the run's config, so a result says which it used;
    the two give students within noise of each other (docs/performance.md)."""
    return "bf16" if native_bf16(device) else "off"

"""Speed of this project's training pipeline, as ratios measured side by side in one process.

    python benchmarks/bench.py                 # full run (about 10 minutes on 2 cores), writes benchmarks/results.json
    python benchmarks/bench.py --quick         # tiny sizes, seconds: checks the script itself

Every figure is the median of ``--repeats`` interleaved repeats (case A, B, C, A, B, C, ...),
so slow drifts of the machine hit all cases alike; ratios, not absolute times, are the result.
Sections: matmul peak; data pipeline (torchvision DataLoader + PIL vs ``CifarLoader``); end to
end for the smallest ``cpu``-profile student; achieved FLOP/s of training steps; KD step cost
(online teacher, cached teacher logits); loss cost (RKD's angle term from the Gram matrix vs every
difference vector, forward and backward, on the ``cpu`` batch); bf16 autocast speed, with an optional accuracy-parity
check (``--parity``: short real-data runs, 3 seeds each, fp32 vs bf16); student runs per hour of a
small sweep, worker processes x 1 thread vs one run at a time with every thread.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data_utils  # noqa: E402
from analysis import summarize, top1_agreement  # noqa: E402
from methods.rkd import triplet_angles, triplet_angles_by_differences  # noqa: E402
from model import create_model  # noqa: E402
from train_eval import build_optimizer, make_config, optimizer_step, train  # noqa: E402
from train_kd import Distiller, KDLoss, run_many  # noqa: E402

MEAN, STD = data_utils.CIFAR10_MEAN, data_utils.CIFAR10_STD


def interleaved(cases: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each case over ``repeats`` rounds, cases alternating within a round."""
    for fn in cases.values():  # warm-up: allocator, oneDNN primitive caches, worker start
        fn()
    times = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


# ----------------------------------------------------------------------------- data


def load_images(data_dir: str, n: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    try:
        x, y = data_utils.load_cifar("cifar10", data_dir, train=True)
        return x[:n], y[:n], "real CIFAR-10"
    except FileNotFoundError:
        gen = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen)
        return x, torch.randint(0, 10, (n,), generator=gen), "random uint8 images"


class PILCifar(torch.utils.data.Dataset):
    """The usual pipeline: one PIL image per sample through torchvision transforms."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        from torchvision import transforms as T

        self.images = images.permute(0, 2, 3, 1).numpy()  # (N, H, W, C) as torchvision's CIFAR10 keeps it
        self.labels = labels.tolist()
        self.transform = T.Compose(
            [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)]
        )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def pil_loader(images, labels, batch_size: int, workers: int):
    return torch.utils.data.DataLoader(
        PILCifar(images, labels),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        persistent_workers=workers > 0,
    )


def cycle(loader):
    """Batches forever: a fresh pass whenever one ends."""
    while True:
        yield from loader


def draw(loader, batches: int):
    """A function that pulls ``batches`` batches from a fresh pass over ``loader``."""

    def run():
        it = cycle(loader)
        for _ in range(batches):
            next(it)

    return run


def bench_data(images, labels, args) -> dict:
    bs = args.batch
    ours = data_utils.CifarLoader(images, labels, bs, mean=MEAN, std=STD, train=True, aug={"crop_pad": 4, "flip": True})
    pil_batches, our_batches = args.pil_batches, args.pil_batches * 8
    cases = {
        "pil_workers0": draw(pil_loader(images, labels, bs, 0), pil_batches),
        "pil_workers2": draw(pil_loader(images, labels, bs, 2), pil_batches),
        "cifar_loader": draw(ours, our_batches),
    }
    sec = interleaved(cases, args.repeats)
    ips = {
        "pil_workers0": pil_batches * bs / sec["pil_workers0"],
        "pil_workers2": pil_batches * bs / sec["pil_workers2"],
        "cifar_loader": our_batches * bs / sec["cifar_loader"],
    }
    return {"images_per_s": ips, "ratio_vs_pil_workers0": ips["cifar_loader"] / ips["pil_workers0"]}


# ----------------------------------------------------------------------------- compute


def matmul_peak(dtype, n: int, repeats: int) -> float:
    """FLOP/s of a square matmul (torch's BLAS: MKL on x86)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    reps = 10
    sec = interleaved({"mm": lambda: [a @ b for _ in range(reps)]}, repeats)["mm"]
    return 2 * n**3 * reps / sec


@torch.no_grad()
def conv_peak(channels: int, batch: int, repeats: int) -> float:
    """FLOP/s of one large 3x3 convolution (oneDNN), channels_last fp32, 16x16 maps.

    On some CPUs (seen: an AMD EPYC whose MKL sgemm takes a slower code path) oneDNN's
    convolution runs far above the matmul rate, so the reference peak is the faster of the two.
    """
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(memory_format=torch.channels_last)
    x = torch.randn(batch, channels, 16, 16).contiguous(memory_format=torch.channels_last)
    reps = 3
    sec = interleaved({"conv": lambda: [conv(x) for _ in range(reps)]}, repeats)["conv"]
    return 2 * batch * channels * channels * 9 * 16 * 16 * reps / sec


def make_stepper(task, bf16: bool = False):
    """``step(x, y, extras)``: one optimizer step of ``task`` (the loop's own), its optimizer built once."""
    optimizer = build_optimizer(task, make_config("cpu"))
    return lambda x, y, extras=None: optimizer_step(task, optimizer, x, y, extras, amp=bf16)


def repeat_steps(stepper, batch, steps: int):
    return lambda: [stepper(*batch) for _ in range(steps)]


def ce_task(name: str, width: float, num_classes: int):
    from train_eval import Vanilla

    torch.manual_seed(0)
    task = Vanilla(create_model(name, num_classes=num_classes, width=width)).train()
    return task.to(memory_format=torch.channels_last)


def fake_batch(bs: int, num_classes: int):
    x = torch.randn(bs, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, num_classes, (bs,))


def train_flops(task, batch) -> int:
    """FLOPs of one training step's forward + backward (multiply-add = 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        _, terms = task(*batch)
        sum(terms.values()).backward()
    task.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def bench_compute(args, peak: float) -> dict:
    out = {}
    for name, width in args.compute_models:
        task, batch = ce_task(name, width, 100), fake_batch(args.batch, 100)
        flops = train_flops(task, batch)
        steps = args.steps
        sec = interleaved({"step": repeat_steps(make_stepper(task), batch, steps)}, args.repeats)
        achieved = flops * steps / sec["step"]
        out[f"{name}_x{width:g}"] = {
            "images_per_s": args.batch * steps / sec["step"],
            "gflop_per_s": achieved / 1e9,
            "fraction_of_fp32_peak": achieved / peak,
        }
    return out


def bench_end_to_end(images, labels, args) -> dict:
    """The ``cpu`` profile's student: compute-only vs fed by CifarLoader vs fed by DataLoader + PIL."""
    cfg = make_config("cpu")
    bs, steps = cfg.batch_size, args.e2e_steps
    task = ce_task(cfg.model, cfg.width, 10)
    ours = data_utils.CifarLoader(
        images, labels, bs, mean=MEAN, std=STD, train=True, aug={"crop_pad": 4, "flip": True}, channels_last=True
    )
    pil = pil_loader(images, labels, bs, 0)

    stepper = make_stepper(task)

    def fed_by(loader):
        def run():
            it = cycle(loader)
            for _ in range(steps):
                x, y = next(it)
                stepper(x.contiguous(memory_format=torch.channels_last), y)

        return run

    cases = {
        "compute_only": repeat_steps(stepper, fake_batch(bs, 10), steps),
        "cifar_loader": fed_by(ours),
        "pil_workers0": fed_by(pil),
    }
    sec = interleaved(cases, args.repeats)
    ips = {k: bs * steps / v for k, v in sec.items()}
    return {
        "model": f"{cfg.model} x{cfg.width:g}",
        "images_per_s": ips,
        "cifar_loader_fraction_of_compute": ips["cifar_loader"] / ips["compute_only"],
        "pil_fraction_of_compute": ips["pil_workers0"] / ips["compute_only"],
    }


def bench_kd(args) -> dict:
    """VGG13 -> VGG8 (CIFAR-100 heads): CE step vs KD step with the teacher online vs cached logits."""
    (s_name, s_w), (t_name, t_w) = args.kd_pair
    torch.manual_seed(0)
    student = create_model(s_name, num_classes=100, width=s_w).to(memory_format=torch.channels_last)
    teacher = create_model(t_name, num_classes=100, width=t_w).to(memory_format=torch.channels_last)
    loss = KDLoss(T=4.0, ce_weight=0.1, kd_weight=0.9)
    distiller = Distiller(student, teacher, loss).train()
    bf16_teacher = Distiller(student, teacher, loss, teacher_bf16=True).train()  # same networks
    x, y = fake_batch(args.batch, 100)
    cached = distiller.teacher(x)  # (B, 100), what CachedTeacherLoader would hand over
    ce = ce_task(s_name, s_w, 100)
    steps = args.steps
    kd_step = make_stepper(distiller)
    cases = {
        "ce": repeat_steps(make_stepper(ce), (x, y), steps),
        "kd_online": repeat_steps(kd_step, (x, y), steps),
        "kd_online_bf16_teacher": repeat_steps(make_stepper(bf16_teacher), (x, y), steps),
        "kd_cached": repeat_steps(kd_step, (x, y, {"teacher_logits": cached}), steps),
    }
    sec = interleaved(cases, args.repeats)
    with torch.no_grad():
        z32, z16 = distiller.teacher(x), bf16_teacher.teacher(x)
    return {
        "pair": f"{t_name} x{t_w:g} -> {s_name} x{s_w:g}",
        "ms_per_step": {k: 1000 * v / steps for k, v in sec.items()},
        "online_vs_ce": sec["kd_online"] / sec["ce"],
        "online_bf16_teacher_vs_ce": sec["kd_online_bf16_teacher"] / sec["ce"],
        "cached_vs_ce": sec["kd_cached"] / sec["ce"],
        "bf16_teacher_top1_agreement": top1_agreement(z16, z32),  # untrained weights: a check, not the parity
    }


def rkd_angle_steps(angles, s: torch.Tensor, t: torch.Tensor, steps: int):
    """``steps`` forward and backward passes of RKD's angle term between embeddings ``s`` and ``t``."""
    return lambda: [F.smooth_l1_loss(angles(s), angles(t)).backward() for _ in range(steps)]


def bench_losses(args) -> dict:
    """RKD's angle term (its smooth L1 between student and teacher angles, forward and backward) as
    ``triplet_angles`` computes it and as the paper writes it, for a VGG8 x1/8 embedding (64 wide) and
    MobileNetV2's (1280 wide); the teacher's is VGG13 x1/4's (128 wide)."""
    torch.manual_seed(0)
    out = {}
    for width in args.rkd_widths:
        s, t = torch.randn(args.rkd_batch, width, requires_grad=True), torch.randn(args.rkd_batch, 128)
        cases = {
            "gram": rkd_angle_steps(triplet_angles, s, t, args.steps),
            "differences": rkd_angle_steps(triplet_angles_by_differences, s, t, args.steps),
        }
        sec = interleaved(cases, args.repeats)
        out[f"rkd_angles_d{width}"] = {
            "ms_per_step": {k: 1000 * v / args.steps for k, v in sec.items()},
            "speedup": sec["differences"] / sec["gram"],
        }
    return out


def bench_bf16(args) -> dict:
    out = {}
    for name, width in args.bf16_models:
        task, batch = ce_task(name, width, 100), fake_batch(args.batch, 100)
        steps = args.steps
        cases = {
            "fp32": repeat_steps(make_stepper(task), batch, steps),
            "bf16": repeat_steps(make_stepper(task, bf16=True), batch, steps),
        }
        sec = interleaved(cases, args.repeats)
        out[f"{name}_x{width:g}"] = {"speedup": sec["fp32"] / sec["bf16"]}
    return out


def bench_parity(args) -> dict:
    """Short real-data runs of the cpu-profile student, fp32 vs bf16 autocast, 3 seeds each."""
    base = make_config("cpu", data_dir=args.data_dir, epochs=args.parity_epochs, out_dir=args.runs)
    rows = {}
    for amp in ("off", "bf16"):
        accs = [summarize(train(replace(base, amp=amp, seed=s, data_seed=s)).history)["last_top1"] for s in range(3)]
        rows[amp] = {"top1": accs, "mean": float(np.mean(accs)), "std": float(np.std(accs, ddof=1))}
    rows["difference"] = rows["bf16"]["mean"] - rows["off"]["mean"]
    rows["config"] = f"cpu profile student, {args.parity_epochs} epochs, seeds 0-2"
    return rows


def bench_sweep(args) -> dict:
    """Student runs per hour of a small sweep: ``jobs`` workers x 1 thread vs one run at a time
    with all threads (how runs went before sweeps). Fresh run folders each time (nothing reused);
    the two ways alternate ``repeats`` times and the median wall time of each is kept."""
    import tempfile

    profile = "smoke" if args.quick else "cpu"
    base = make_config(profile, data_dir=args.data_dir, epochs=args.sweep_epochs)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    seeds = range(args.sweep_runs)
    ways = {
        "one_at_a_time": dict(threads=cores, jobs=1),
        "parallel": dict(threads=1, jobs=cores),
    }
    times: dict[str, list[float]] = {k: [] for k in ways}
    os.environ["KD_PROGRESS"] = "0"
    for _ in range(args.repeats):
        for name, way in ways.items():
            with tempfile.TemporaryDirectory() as out:
                configs = [replace(base, out_dir=out, threads=way["threads"], seed=s, data_seed=s) for s in seeds]
                t0 = time.perf_counter()
                done = run_many(configs, jobs=way["jobs"])
                times[name].append(time.perf_counter() - t0)
            failed = [d["error"] for d in done if "error" in d]
            if failed:
                raise RuntimeError(f"sweep benchmark run failed: {failed[0]}")
    seconds = {k: statistics.median(v) for k, v in times.items()}
    per_hour = {k: len(seeds) * 3600 / v for k, v in seconds.items()}
    return {
        "config": f"{profile} profile student {base.model} x{base.width:g}, {args.sweep_epochs} epochs, "
        f"{len(seeds)} runs; parallel = {cores} workers x 1 thread, one at a time = {cores} threads",
        "seconds": seconds,
        "runs_per_hour": per_hour,
        "parallel_vs_one_at_a_time": per_hour["parallel"] / per_hour["one_at_a_time"],
    }


# ----------------------------------------------------------------------------- main


def update_sections(args) -> dict:
    """Measure ``args.only`` and write them into the existing report (other sections kept)."""
    r = {}
    if os.path.isfile(args.out):
        with open(args.out) as f:
            r = json.load(f)
    images = labels = None
    if {"data", "end_to_end"} & set(args.only):
        images, labels, r["data_source"] = load_images(args.data_dir, args.n_images)
    peak = r.get("peak_gflops", {}).get("fp32", 1.0) * 1e9
    measure = {
        "data": lambda: bench_data(images, labels, args),
        "end_to_end": lambda: bench_end_to_end(images, labels, args),
        "compute": lambda: bench_compute(args, peak),
        "kd": lambda: bench_kd(args),
        "losses": lambda: bench_losses(args),
        "bf16": lambda: bench_bf16(args),
        "sweep": lambda: bench_sweep(args),
    }
    for section in args.only:
        r[section] = measure[section]()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(r, f, indent=2)
    for section in args.only:
        print(section, json.dumps(r[section], indent=2))
    print(f"\nwritten: {args.out}")
    return r


TARGETS = [
    ("data: CifarLoader vs DataLoader+PIL (0 workers)", lambda r: r["data"]["ratio_vs_pil_workers0"], ">=", 10),
    (
        "end to end: CifarLoader, fraction of compute-only",
        lambda r: r["end_to_end"]["cifar_loader_fraction_of_compute"],
        ">=",
        0.9,
    ),
    ("KD online / CE step", lambda r: r["kd"]["online_vs_ce"], "<=", 1.85),
    ("KD online, bf16 teacher / CE step", lambda r: r["kd"]["online_bf16_teacher_vs_ce"], "<=", 1.5),
    ("KD cached logits / CE step", lambda r: r["kd"]["cached_vs_ce"], "<=", 1.05),
    ("sweep: runs/hour, parallel / one at a time", lambda r: r["sweep"]["parallel_vs_one_at_a_time"], ">=", 1.4),
]


def print_report(r: dict) -> None:
    print(f"\nmachine: {r['machine']}; torch {r['torch']}, {r['threads']} threads; data: {r['data_source']}")
    p = r["peak_gflops"]
    print(
        f"fp32 peak {p['fp32']:.0f} GFLOP/s (matmul {p['fp32_matmul']:.0f}, 3x3 conv {p['fp32_conv3x3']:.0f}); "
        f"bf16 matmul {p['bf16_matmul']:.0f} GFLOP/s"
    )
    print("\ndata pipeline, images/s:", {k: round(v) for k, v in r["data"]["images_per_s"].items()})
    e2e = r["end_to_end"]
    print(f"end to end ({e2e['model']}), images/s:", {k: round(v) for k, v in e2e["images_per_s"].items()})
    print("\ntraining step, fp32 channels_last:")
    for name, c in r["compute"].items():
        speed = f"{c['images_per_s']:8.0f} img/s {c['gflop_per_s']:7.1f} GFLOP/s"
        print(f"  {name:12s} {speed} {c['fraction_of_fp32_peak']:6.1%} of peak")
    kd = r["kd"]
    print(f"\nKD {kd['pair']}, ms/step:", {k: round(v, 1) for k, v in kd["ms_per_step"].items()})
    if "losses" in r:  # reports written before the section existed lack it
        print("loss, speed-up over the paper's form:", {k: round(v["speedup"], 1) for k, v in r["losses"].items()})
    print("bf16 autocast speed-up over fp32:", {k: round(v["speedup"], 2) for k, v in r["bf16"].items()})
    sw = r["sweep"]
    print(f"sweep ({sw['config']}), runs/hour:", {k: round(v, 1) for k, v in sw["runs_per_hour"].items()})
    if "parity" in r:
        p = r["parity"]
        print(
            f"bf16 parity ({p['config']}): fp32 {p['off']['mean']:.2f} ± {p['off']['std']:.2f}, "
            f"bf16 {p['bf16']['mean']:.2f} ± {p['bf16']['std']:.2f}"
        )
    print("\ntargets:")
    rows = [(n, f(r), op, t) for n, f, op, t in TARGETS]
    rows += [
        (f"compute {k}", v["fraction_of_fp32_peak"], ">=", 0.85 if "x1" == k.split("_")[-1] else 0.60)
        for k, v in r["compute"].items()
    ]
    rows += [(f"bf16 speed-up {k}", v["speedup"], ">=", 1.7) for k, v in r["bf16"].items() if k.startswith("vgg13")]
    for name, value, op, target in rows:
        ok = value >= target if op == ">=" else value <= target
        print(f"  {'met ' if ok else 'MISS'} {name}: {value:.3f} (target {op} {target})")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the script, measures nothing useful")
    p.add_argument("--parity", action="store_true", help="also train fp32 vs bf16 (3 seeds each) on real data")
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--runs", default="runs", help="where the parity runs go (finished runs are reused)")
    p.add_argument("--out", default="benchmarks/results.json")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--only",
        nargs="+",
        choices=SECTIONS,
        default=None,
        help="measure these sections only; their entries replace those of an existing --out file",
    )
    args = p.parse_args(argv)
    full = [("vgg8", 1.0), ("vgg13", 1.0), ("vgg8", 0.25), ("vgg13", 0.25)]
    if args.quick:
        args.repeats, args.batch, args.steps, args.e2e_steps, args.pil_batches = 1, 32, 1, 3, 3
        args.compute_models, args.bf16_models = [("vgg8", 0.125)], [("vgg13", 0.125)]
        args.kd_pair, args.n_images, args.peak_n, args.parity_epochs = [("vgg8", 0.125), ("vgg13", 0.125)], 2000, 256, 1
        args.peak_channels = 32
        args.sweep_runs, args.sweep_epochs = 2, 1
        args.rkd_batch, args.rkd_widths = 8, [16]
    else:
        args.batch, args.steps, args.e2e_steps, args.pil_batches = 128, 3, 40, 40
        args.compute_models, args.bf16_models = full, [("vgg13", 1.0), ("vgg8", 1.0), ("vgg8", 0.125)]
        args.kd_pair, args.n_images, args.peak_n, args.parity_epochs = [("vgg8", 1.0), ("vgg13", 1.0)], 50000, 2048, 15
        args.peak_channels = 256
        args.sweep_runs, args.sweep_epochs = 4, 6
        args.rkd_batch, args.rkd_widths = 64, [64, 1280]
    return args


SECTIONS = ("data", "end_to_end", "compute", "kd", "losses", "bf16", "sweep")


def main(argv=None) -> dict:
    args = parse(argv)
    if args.only:
        return update_sections(args)
    images, labels, source = load_images(args.data_dir, args.n_images)
    peaks = {
        "matmul": matmul_peak(torch.float32, args.peak_n, args.repeats),
        "conv3x3": conv_peak(args.peak_channels, args.batch, args.repeats),
    }
    peak = max(peaks.values())
    r = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "data_source": source,
        "quick": args.quick,
        "repeats": args.repeats,
        "peak_gflops": {
            "fp32": peak / 1e9,
            "fp32_matmul": peaks["matmul"] / 1e9,
            "fp32_conv3x3": peaks["conv3x3"] / 1e9,
            "bf16_matmul": matmul_peak(torch.bfloat16, args.peak_n, args.repeats) / 1e9,
        },
    }
    r["data"] = bench_data(images, labels, args)
    r["end_to_end"] = bench_end_to_end(images, labels, args)
    r["compute"] = bench_compute(args, peak)
    r["kd"] = bench_kd(args)
    r["losses"] = bench_losses(args)
    r["bf16"] = bench_bf16(args)
    r["sweep"] = bench_sweep(args)
    if args.parity:
        r["parity"] = bench_parity(args)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(r, f, indent=2)
    print_report(r)
    print(f"\nwritten: {args.out}")
    return r


if __name__ == "__main__":
    main()

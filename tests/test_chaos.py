"""A sweep killed with SIGKILL at random moments (its parent, its workers) ends, once rerun, exactly as an
uninterrupted one, and leaves no process behind.

The moments are drawn at random; the seed is in every failure message (``KD_CHAOS_SEED=<seed>``
replays the same draw).
"""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

import train_kd
from checkpoints import read_checkpoint, state_digest
from conftest import HANG_SECONDS, ROOT
from sweeps import run_many

TIMING = ["seconds", "cpu_seconds", "train_images_per_s"]  # wall and CPU time: the only columns allowed to differ
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process table in /proc")


def _session(sid: int) -> list[tuple[int, int, str]]:
    """The live processes of session ``sid``: (pid, parent pid, command line)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # it ended meanwhile
        state, ppid, _, session = stat[stat.rindex(")") + 2 :].split()[:4]
        if int(session) == sid and state != "Z":  # a zombie holds no memory: its parent is gone
            found.append((int(entry), int(ppid), cmd))
    return found


class Sweep:
    """``train_kd.py --sweep`` in a session of its own, so every process it starts can be found."""

    def __init__(self, args: list[str], log: Path):
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "train_kd.py", *args],
            cwd=ROOT,
            env={**os.environ, "KD_PROGRESS": "0", "PYTHONUNBUFFERED": "1"},
            stdout=open(log.with_suffix(".out"), "w"),  # noqa: SIM115  (closed with the process)
            stderr=open(log.with_suffix(".err"), "w"),  # noqa: SIM115
            start_new_session=True,
        )
        self.started = time.monotonic()

    def workers(self) -> list[int]:
        return [pid for pid, ppid, cmd in _session(self.proc.pid) if ppid == self.proc.pid and "spawn_main" in cmd]

    def wait_for_workers(self, exclude=(), timeout: float = 120) -> list[int]:
        """The parent's worker processes (other than ``exclude``), once there are some; [] if it ended first."""
        end = time.monotonic() + timeout
        while time.monotonic() < end and self.proc.poll() is None:
            pids = [p for p in self.workers() if p not in exclude]
            if pids:
                return pids
            time.sleep(0.05)
        return []

    def left_behind(self, within: float = 10.0) -> list[tuple[int, int, str]]:
        """The session's processes still alive ``within`` seconds after the parent ended."""
        end = time.monotonic() + within
        while (alive := _session(self.proc.pid)) and time.monotonic() < end:
            time.sleep(0.1)
        return alive

    def output(self) -> tuple[str, str]:
        return self.log.with_suffix(".out").read_text(), self.log.with_suffix(".err").read_text()

    def kill_all(self) -> None:
        """Clean-up: every process this sweep started, by its id."""
        for pid, _, _ in _session(self.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()


def _run_folders(out_dir: Path) -> dict[str, Path]:
    return {p.parent.name: p.parent for p in out_dir.glob("*/checkpoint.pt")}


def test_a_sweep_killed_at_random_moments_ends_as_an_uninterrupted_one(synthetic_dir, smoke_teacher, tmp_path, capfd):
    seed = int(os.environ.get("KD_CHAOS_SEED", random.SystemRandom().randrange(2**31)))
    rng, why = random.Random(seed), f"(KD_CHAOS_SEED={seed})"
    common = ["--profile", "smoke", "--data-dir", synthetic_dir, "--teacher", smoke_teacher.run_dir]
    common += ["--sweep", "T=2,4", "--seeds", "0,1"]

    # the uninterrupted sweep, in this process (the results do not depend on the workers)
    quiet = tmp_path / "quiet"
    assert len(train_kd.main([*common, "--out-dir", str(quiet), "--jobs", "1"])) == 4

    chaos, sweeps = tmp_path / "chaos", []
    args = [*common, "--out-dir", str(chaos), "--jobs", "2"]
    try:
        # the parent killed twice: once while its workers start or train, once at any moment
        for attempt in range(2):
            sweep = Sweep(args, tmp_path / f"parent-{attempt}")
            sweeps.append(sweep)
            if attempt == 0:
                assert sweep.wait_for_workers(), f"no worker started {why}: {sweep.output()}"
                # the teacher was checked once, by the parent, before any worker started
                checks = list((chaos / "teacher_checks").glob("*.json"))
                printed = sweep.output()[0].count(f"teacher {smoke_teacher.run_dir}:")
                assert len(checks) == 1 and printed == 1, f"teacher checks {checks}, printed {printed} times"
                time.sleep(rng.uniform(0, 2))
            else:
                time.sleep(rng.uniform(0.5, 8))
            sweep.proc.send_signal(signal.SIGKILL)
            sweep.proc.wait()
            # a worker still importing when its parent died ends as soon as it can run a line (its
            # first checks that the parent is there); one that was training ends at once
            alive = sweep.left_behind(within=30)
            assert not alive, f"processes outlived their killed parent {why}: {alive}"

        # a worker killed: the sweep itself still finishes every run (the others are not failures)
        sweep = Sweep(args, tmp_path / "worker")
        sweeps.append(sweep)
        killed = False
        while not killed and (workers := sweep.wait_for_workers()):
            time.sleep(rng.uniform(0, 3))
            try:
                os.kill(rng.choice(workers), signal.SIGKILL)
                killed = True
            except ProcessLookupError:
                pass  # it ended meanwhile: draw again
        assert killed, f"no worker was killed {why}"
        assert sweep.proc.wait(timeout=HANG_SECONDS) == 0, f"{why} {sweep.output()}"
        out, err = sweep.output()
        assert "sweep: 4 runs" in out and "runs failed" not in err, f"{why} {out}\n{err}"
        assert not sweep.left_behind(), f"processes left behind {why}"
    finally:
        for sweep in sweeps:
            sweep.kill_all()

    # every run as the uninterrupted sweep left it: metrics (but time) and weights
    expected, got = _run_folders(quiet), _run_folders(chaos)
    assert len(expected) == 4 and sorted(got) == sorted(expected), why
    for name, folder in expected.items():
        a = pd.read_csv(folder / "metrics.csv").drop(columns=TIMING)
        b = pd.read_csv(got[name] / "metrics.csv").drop(columns=TIMING)
        pd.testing.assert_frame_equal(a, b, check_exact=True, obj=f"{name}/metrics.csv {why}")
        weights = [state_digest(read_checkpoint(str(f / "checkpoint.pt"))["model"]) for f in (folder, got[name])]
        assert weights[0] == weights[1], f"{name}: the weights differ {why}"


def die_on_seed_1(cfg):
    """A run whose process dies on seed 1 (kill -9 of itself: no handler sees it); the others
    return at once. Module level: the workers import it."""
    if cfg.seed == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return SimpleNamespace(run_dir=f"run-{cfg.seed}", history=pd.DataFrame({"epoch": [1]}))


def test_only_the_run_whose_process_dies_is_reported_failed(smoke_cfg, capfd):
    # its death breaks the pool each time; the runs it takes down go again (fresh pool), and in the
    # end each in a process of its own, where a death is that run's own
    done = run_many([smoke_cfg(seed=s) for s in range(3)], jobs=2, run=die_on_seed_1)
    assert [d.get("run_dir") for d in done] == ["run-0", None, "run-2"], done
    assert "its process died (killed by SIGKILL)" in done[1]["error"]
    assert "go again in a process of its own each" in capfd.readouterr().err

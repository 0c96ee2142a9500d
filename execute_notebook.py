"""Execute a task notebook top to bottom in a profile: by hand, in the background, or from the tests.

    python execute_notebook.py LogitMatching_Limitations.ipynb                 # cpu profile, in place
    python execute_notebook.py Multiple_Students.ipynb --out /tmp/ms.ipynb     # keep the file as it is
    python execute_notebook.py Feature_Distillation.ipynb --profile smoke --out-dir /tmp/runs
    nohup python execute_notebook.py Feature_Distillation.ipynb > logs/fd.log 2>&1 &

Each cell's start and seconds go to stderr, so a background execution's log shows where it is, and
after every cell the notebook so far is written beside the output as ``NAME.partial.ipynb`` (read
the outputs of a long execution while it runs; removed at the end). The executed notebook is written
atomically when the last cell ends, and also when a cell fails (the error is in that cell's output):
finished runs are in ``runs/`` either way and a second execution reuses them.

``--outputs-from EXECUTED`` executes nothing: it writes the notebook (say, a copy whose discussion
was written while another copy ran) with the outputs of EXECUTED. Their code cells must be
identical, or the outputs would not be those of the code shown:

    python execute_notebook.py drafts/X.ipynb --outputs-from /tmp/x_executed.ipynb --out X.ipynb
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from atomic_files import atomic_write_text

ROOT = Path(__file__).resolve().parent
PROFILES = ("smoke", "cpu", "paper")


def notebook_env(profile: str, out_dir: str | None = None, data_dir: str | None = None) -> dict[str, str]:
    """The environment the notebooks' first cell reads (``KD_PROFILE``, ``KD_OUT_DIR``, ``KD_DATA_DIR``)."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; valid: {', '.join(PROFILES)}")
    env = {"KD_PROFILE": profile, "MPLBACKEND": "Agg"}
    if out_dir:
        env["KD_OUT_DIR"] = os.path.abspath(out_dir)
    if data_dir:
        env["KD_DATA_DIR"] = os.path.abspath(data_dir)
    return env


def execute(nb, env: dict[str, str], timeout: int | None = None, log=None, snapshot: str | None = None) -> None:
    """Run ``nb``'s cells in a fresh kernel started in the repository root, with ``env`` added to
    this process's environment (the kernel inherits it); after each cell, ``nb`` so far is written to
    ``snapshot`` if given. Raises ``CellExecutionError`` on a failing cell, whose outputs then hold
    the traceback."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    started: dict[int, float] = {}

    def on_start(cell, cell_index, **_):
        started[cell_index] = time.time()
        if log:
            print(f"[{time.strftime('%H:%M:%S')}] cell {cell_index} started", file=log, flush=True)

    def on_executed(cell, cell_index, **_):  # nbclient's on_cell_complete fires when the request is sent
        if log:
            print(f"  cell {cell_index}: {time.time() - started[cell_index]:.0f} s", file=log, flush=True)
        if snapshot:
            write_notebook(snapshot, nb)

    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(ROOT)}},
        on_cell_start=on_start,
        on_cell_executed=on_executed,
    )
    try:
        client.execute()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def write_notebook(path, nb) -> None:
    text = nbformat.writes(nb)
    atomic_write_text(path, text if text.endswith("\n") else text + "\n")


def with_prose(executed, edited):
    """``executed`` with ``edited``'s markdown cells: the code cells (source) must be identical."""
    ran = [c.source for c in executed.cells if c.cell_type == "code"]
    shown = [c.source for c in edited.cells if c.cell_type == "code"]
    if ran != shown or len(executed.cells) != len(edited.cells):
        changed = [i for i, (a, b) in enumerate(zip(ran, shown, strict=False)) if a != b]
        raise ValueError(
            "the edited notebook's code differs from the executed one "
            f"(code cells {changed or 'count'}): execute the edited copy instead"
        )
    out = nbformat.from_dict(executed)
    for cell, prose in zip(out.cells, edited.cells, strict=True):
        if cell.cell_type == "markdown":
            cell.source = prose.source
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebook")
    parser.add_argument("--profile", default="cpu", choices=PROFILES)
    parser.add_argument("--out", help="where the executed notebook goes (default: in place)")
    parser.add_argument("--out-dir", help="the runs folder (default: the notebook's own, runs/)")
    parser.add_argument("--data-dir", help="the data folder (default: the notebook's own, ./data)")
    parser.add_argument("--outputs-from", help="execute nothing: the outputs of this executed copy (same code)")
    parser.add_argument("--timeout", type=int, default=None, help="seconds per cell (default: none)")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.notebook):
        names = ", ".join(sorted(p.name for p in ROOT.glob("*.ipynb")))
        raise SystemExit(f"no notebook {args.notebook!r}; the task notebooks: {names}")
    nb = nbformat.read(args.notebook, as_version=4)
    start, failed = time.time(), None
    out = args.out or args.notebook
    partial = str(Path(out).with_suffix(".partial.ipynb"))
    if args.outputs_from:
        nb = with_prose(nbformat.read(args.outputs_from, as_version=4), nb)
    else:
        env = notebook_env(args.profile, args.out_dir, args.data_dir)
        try:
            execute(nb, env, args.timeout, log=sys.stderr, snapshot=partial)
        except Exception as err:  # the outputs so far are still written: the error is in its cell
            failed = err
    write_notebook(out, nb)
    if os.path.exists(partial):
        os.remove(partial)
    done = (
        f"outputs of {args.outputs_from}" if args.outputs_from else f"executed in {(time.time() - start) / 60:.1f} min"
    )
    print(f"{out}: {done}", file=sys.stderr)
    if failed is not None:
        print(f"a cell failed: {type(failed).__name__}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

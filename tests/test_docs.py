"""Every command in README.md and docs/*.md still runs, in the smoke profile (generated data, tiny
models, one epoch): the README's "In your own code" example, and every line of every ```bash block.

A shell line is run by calling its script's ``main(argv)`` in this process (a fresh interpreter per
line would cost seconds of imports each), with the argv rewritten for the smoke profile by
``smoke_argv``. Lines that cannot run here are listed in ``NOT_RUN`` (with the reason and the test
that covers them instead) or ``HELP_ONLY`` (their options are checked against ``--help``). A new
kind of command in the docs fails ``test_every_shell_command_is_handled`` until it is handled here.
Also: relative links resolve, the README stays one page, its findings keep the docs' numbers.
"""

import contextlib
import importlib
import importlib.util
import io
import math
import re
import shlex
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import ROOT

README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]

# the README's example says where it reads its profile, data and runs; the test points it at the smoke ones
EXAMPLE_CONFIG = 'make_config("cpu", data_dir="./data", out_dir="runs")'

# lines that are not run here: why, and what covers them instead
NOT_RUN = {
    "bash run.sh demo": "the main job: about 25 minutes on real CIFAR-10 (test_train.py runs the demo in smoke)",
    "bash run.sh test": "the test suite itself",
}
# lines whose options are only checked against --help: why
HELP_ONLY = {
    "torchrun": "several processes under torchrun (test_distributed.py runs DDP on gloo); "
    "the same options run without torchrun in docs/commands.md",
    "benchmarks/bench.py": "minutes of measurements, --parity on real CIFAR-10 (test_benchmark.py runs --quick)",
    "hub:": "downloads a released teacher (test_foreign_checkpoints.py runs hub: offline)",
    "benchmarks/sweep_speed.py": "minutes of measurements on real CIFAR-10 (test_cohorts.py checks that what it "
    "compares gives equal results; --quick runs it on generated data)",
    "original_study.py": "CIFAR-100 and the released VGG16-BN teacher, downloaded (test_original_study.py runs "
    "every arm on generated CIFAR-100 with the download mocked)",
    "--profile original": "the released VGG16-BN teacher, downloaded (test_original_study.py runs it offline)",
    "execute_notebook.py": "a notebook in the cpu profile takes hours (test_notebooks.py runs every notebook "
    "through it in smoke; test_execute_notebook.py runs it on small notebooks)",
    "prose_numbers.py": "reads the committed notebooks (test_prose_numbers.py runs it on them and on made-up ones)",
    "benchmarks/kd_table.py": "hours of training on real CIFAR-10 (every method's smoke run is in its test file; "
    "--quick runs the script on generated data)",
}


def fenced_blocks(path: Path, lang: str) -> list[tuple[int, str]]:
    """``(line number, text)`` of every ```lang block of a Markdown file."""
    blocks, current, start = [], None, 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fence = line.strip()
        if current is None and fence == f"```{lang}":
            current, start = [], number + 1
        elif current is not None and fence.startswith("```"):
            blocks.append((start, "\n".join(current)))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def shell_commands() -> list[tuple[str, str]]:
    """``(where, command)`` for every command of every ```bash block, continuation lines joined."""
    commands = []
    for page in PAGES:
        for start, block in fenced_blocks(page, "bash"):
            pending, first = "", start
            for number, line in enumerate(block.splitlines(), start):
                if not pending:
                    first = number
                pending += line
                if pending.rstrip().endswith("\\"):
                    pending = pending.rstrip()[:-1] + " "
                    continue
                words = shlex.split(pending, comments=True)
                if words:
                    commands.append((f"{page.relative_to(ROOT)}:{first}", shlex.join(words)))
                pending = ""
    return commands


COMMANDS = shell_commands()


def kind(command: str) -> str:
    """How a command is checked: ``skip`` (NOT_RUN), ``help`` (HELP_ONLY), ``run``, or ``unknown``."""
    if command in NOT_RUN:
        return "skip"
    if any(key in command for key in HELP_ONLY):
        return "help"
    words = shlex.split(command)
    if words[0] == "python" and len(words) > 1 and words[1].endswith(".py"):
        return "run"
    return "unknown"


def entry_point(script: str):
    """The ``main(argv)`` of a script named as on the command line (top-level modules by import)."""
    path = ROOT / script
    assert path.is_file(), f"{script} does not exist"
    if path.parent == ROOT:
        return importlib.import_module(path.stem).main
    spec = importlib.util.spec_from_file_location(f"docs_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def smoke_argv(args: list[str], teacher: str, data_dir: str, out_dir: str) -> list[str]:
    """A documented command line made small: the smoke profile on the generated data, runs under
    ``out_dir``, placeholder teachers (``runs/...``) replaced by a trained smoke teacher, one epoch
    (or as many as a DKD warm-up needs), one seed, runs in this process, sweeps cut to two cells, and
    one thread (on a busy machine, runs at the default thread count slow down many times over)."""
    out, epochs, i = ["--profile", "smoke"], 1, 0
    while i < len(args):
        option, value = args[i], args[i + 1] if i + 1 < len(args) else None
        if option in ("--profile", "--epochs", "--jobs", "--seeds"):
            i += 2  # replaced: smoke, 1 epoch, one seed, in this process
            continue
        if option == "--teacher" and value.startswith("runs/"):
            out += ["--teacher", teacher]
        elif option == "--warmup":
            out += [option, value]
            epochs = max(epochs, math.ceil(float(value)))  # a warm-up longer than the run is refused
        elif option == "--sweep":
            cells = []
            while i + 1 < len(args) and not args[i + 1].startswith("--"):
                i += 1
                field, values = args[i].split("=")
                cells.append(f"{field}={','.join(values.split(',')[: 2 if not cells else 1])}")
            out += ["--sweep", *cells]
            i += 1
            continue
        elif value is not None and not value.startswith("--"):
            out += [option, value]
        else:
            out += [option]
            i += 1
            continue
        i += 2
    if "--sweep" in args or "--seeds" in args:
        out += ["--seeds", "0", "--jobs", "1"]
    return [*out, "--epochs", str(epochs), "--threads", "1", "--data-dir", data_dir, "--out-dir", out_dir]


def test_smoke_argv_makes_a_command_small():
    args = "--profile cpu --teacher runs/<teacher-run> --sweep T=1,2,3 kd_weight=1,3,9 --seeds 0-2 --jobs 2"
    assert " ".join(smoke_argv(args.split(), "T", "D", "O")) == (
        "--profile smoke --teacher T --sweep T=1,2 kd_weight=1 --seeds 0 --jobs 1"
        " --epochs 1 --threads 1 --data-dir D --out-dir O"
    )
    args = "--profile cpu --method dkd --warmup 2.5 --teacher-cache --epochs 30 --teacher hub:x"
    assert " ".join(smoke_argv(args.split(), "T", "D", "O")) == (
        "--profile smoke --method dkd --warmup 2.5 --teacher-cache --teacher hub:x"
        " --epochs 3 --threads 1 --data-dir D --out-dir O"
    )


def test_every_shell_command_is_handled():
    assert len(COMMANDS) >= 20, "the docs' commands were not found"
    unknown = [f"{where}: {command}" for where, command in COMMANDS if kind(command) == "unknown"]
    assert not unknown, "run them in tests/test_docs.py, or list them in NOT_RUN/HELP_ONLY with the reason"
    documented = {command for _, command in COMMANDS}
    assert set(NOT_RUN) <= documented, f"stale NOT_RUN entries: {set(NOT_RUN) - documented}"


@pytest.fixture(scope="module")
def docs_runs(tmp_path_factory) -> str:
    """One runs folder for all the documented commands, as a user's would be."""
    return str(tmp_path_factory.mktemp("docs_runs"))


RUN = [c for c in COMMANDS if kind(c[1]) == "run"]
HELP = [c for c in COMMANDS if kind(c[1]) == "help"]


@pytest.mark.parametrize("where, command", RUN, ids=[where for where, _ in RUN])
def test_documented_command_runs_in_smoke(where, command, smoke_teacher, synthetic_dir, docs_runs, capsys):
    script, *args = shlex.split(command)[1:]
    argv = smoke_argv(args, smoke_teacher.run_dir, synthetic_dir, docs_runs)
    if script == "multi_student.py":
        argv += ["--head-epochs", "1"]  # the specialists' second stage
    try:
        result = entry_point(script)(argv)
    except SystemExit as stop:
        ran = f"{script} {' '.join(argv)}"
        pytest.fail(f"{where}: `{command}` ran as `{ran}` and exited {stop.code}:\n{capsys.readouterr().err}")
    assert result is not None
    if hasattr(result, "history"):  # one run: its epochs were trained and saved
        assert len(result.history) >= 1 and Path(result.run_dir, "metrics.csv").is_file()
    if isinstance(result, pd.DataFrame):  # several runs (--seeds, --sweep): the pick is printed
        assert len(result) >= 1 and "picked on validation" in capsys.readouterr().out


@pytest.mark.parametrize("where, command", HELP, ids=[where for where, _ in HELP])
def test_documented_command_options_exist(where, command):
    words = shlex.split(command)
    script = next(w for w in words if w.endswith(".py"))
    args = words[words.index(script) + 1 :]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as stop:
        entry_point(script)([*args, "--help"])
    assert stop.value.code == 0, f"{where}: {script} --help failed"
    options = {a.split("=")[0] for a in args if a.startswith("--")}
    missing = sorted(o for o in options if o not in out.getvalue())
    assert not missing, f"{where}: `{command}` uses options {script} --help does not list: {missing}"


def test_readme_example_trains_in_the_smoke_profile(synthetic_dir, tmp_path, monkeypatch, capsys):
    section = README.read_text().split("## In your own code", 1)
    assert len(section) == 2, 'README.md has no "## In your own code" section'
    code = fenced_blocks(README, "python")[0][1]
    assert code in section[1], 'the first ```python block is not under "In your own code"'
    assert EXAMPLE_CONFIG in code, f"the example must set its profile and folders as {EXAMPLE_CONFIG}"
    smoke = f'make_config("smoke", data_dir={synthetic_dir!r}, out_dir={str(tmp_path / "runs")!r})'
    monkeypatch.chdir(tmp_path)  # it needs nothing from the current folder
    namespace, threads = {"__name__": "readme_example"}, torch.get_num_threads()
    torch.set_num_threads(1)  # as smoke_argv's --threads 1
    try:
        exec(compile(code.replace(EXAMPLE_CONFIG, smoke), str(README), "exec"), namespace)
    finally:
        torch.set_num_threads(threads)
    cfg, history = namespace["cfg"], namespace["history"]
    assert cfg.profile == "smoke" and len(history) == cfg.epochs
    assert history["train_kd"].notna().all() and history["val_top1"].notna().all()
    assert namespace["kd"].config.method == "kd" and Path(namespace["kd"].run_dir, "checkpoint.pt").is_file()
    assert namespace["logits"].shape == (len(namespace["y"]), 10) and "stages" in namespace["feats"]
    assert "test_top1" in capsys.readouterr().out


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_relative_links_and_anchors_resolve():
    broken = []
    for page in PAGES:
        text = page.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # http(s):, mailto:
            file, _, anchor = target.partition("#")
            path = (page.parent / file).resolve() if file else page
            if not path.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
            elif anchor and path.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", path.read_text(), flags=re.M)
                if anchor not in {slug(h) for h in headings}:
                    broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, broken


def test_readme_is_one_page_and_its_findings_keep_the_docs_numbers():
    text = README.read_text()
    assert len(text.encode()) < 15_000, "README.md is for a newcomer: move the details to docs/"
    assert "bash run.sh demo" in text and "bash run.sh test" in text
    findings = text.split("## What the notebooks found", 1)[1].split("\n## ", 1)[0]
    full = (ROOT / "docs" / "findings.md").read_text()
    numbers = {n.rstrip(".,") for n in re.findall(r"[−+]?\d[\d,.]*", findings)}
    assert numbers and not sorted(n for n in numbers if n not in full), "README's findings differ from docs/findings.md"

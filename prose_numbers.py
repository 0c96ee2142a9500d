"""The decimal numbers a notebook's prose quotes, checked against what its output cells show.

Prose may quote only numbers an output of the same notebook shows (docs/protocol.md). A decimal
number in a markdown cell (``72.39``, ``−0.63``) counts as shown when some number in an output
(text, a table's text or HTML) rounds to it at the prose's decimals: 72.4 is shown by 72.39, 29.3
is not by 29.24. Signs are ignored (prose writes "0.47 points lower" for −0.47), and so is text in
backticks (code: option values, file names).

    python prose_numbers.py *.ipynb     # each notebook's unmatched numbers, in context; exit 1 if any
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass

PROSE_NUMBER = re.compile(r"(?<![\w.])[-−+]?(\d+\.\d+)(?![\w.]*\d)")  # a decimal, not part of a version or name
OUTPUT_NUMBER = re.compile(r"\d+\.\d+")
CODE_SPAN = re.compile(r"`[^`]*`")


@dataclass(frozen=True)
class Unmatched:
    number: str  # as the prose writes it, without its sign
    context: str  # the prose around it


def cell_texts(notebook: dict) -> tuple[list[str], list[str]]:
    """(markdown sources, output texts) of a notebook in nbformat 4."""
    prose, shown = [], []
    for cell in notebook["cells"]:
        if cell["cell_type"] == "markdown":
            prose.append("".join(cell["source"]))
        for out in cell.get("outputs", []):
            if "text" in out:
                shown.append("".join(out["text"]))
            shown += ["".join(v) for k, v in out.get("data", {}).items() if k.startswith("text/")]
    return prose, shown


def unmatched_numbers(notebook: dict) -> list[Unmatched]:
    """Every decimal number of the prose that no output shows at the prose's precision."""
    prose, shown = cell_texts(notebook)
    values = [float(v) for text in shown for v in OUTPUT_NUMBER.findall(text)]
    out = []
    for text in prose:
        text = CODE_SPAN.sub("", text)
        for m in PROSE_NUMBER.finditer(text):
            number = m.group(1)
            decimals, x = len(number.split(".")[1]), float(number)
            if not any(abs(round(v, decimals) - x) < 1e-9 for v in values):
                context = text[max(0, m.start() - 50) : m.end() + 30].replace("\n", " ")
                out.append(Unmatched(number, context))
    return out


def check_files(paths: list[str]) -> dict[str, list[Unmatched]]:
    result = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            result[path] = unmatched_numbers(json.load(f))
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="Decimal numbers of the notebooks' prose that no output shows.")
    parser.add_argument("notebooks", nargs="+", help="the .ipynb files to check")
    found = check_files(parser.parse_args(argv).notebooks)
    for path, missing in found.items():
        print(f"{path}: {len(missing)} number(s) in the prose that no output shows")
        for u in missing:
            print(f"  {u.number:>10}  …{u.context}…")
    return 1 if any(found.values()) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

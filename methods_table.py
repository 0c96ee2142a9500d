"""The methods benchmark's tables, built from its CSVs in seconds: per pair, across pairs, tuned, beside the
published numbers; each as markdown with one figure.

    df = read_rows("docs/methods_untuned.csv")
    by_pair = tables(df)                            # pair -> one row per method: validation top-1, vs CE, vs KD
    across_pairs(by_pair, "vs ce verdict")          # each method's verdict on every pair, and whether it holds
    write(df, "docs/methods_untuned")               # .csv, .md and .png
    write_tuned(read_rows("docs/methods_tuned.csv"), "docs/methods_tuned")

``benchmarks/kd_table.py`` trains the runs and calls these; a table needs only its CSV (committed), so it
rebuilds on a machine without the runs. Differences are paired by seed (with several teachers, students
nested in teachers); a CI that spans 0 is within noise.
"""

from __future__ import annotations

import os

import pandas as pd

from analysis import FAILED, ci95, compare_columns, compare_nested
from pairs import default_pair, get_pair, pairs
from published import published_frame
from tuning import FACTORS, MAX_EXTENSIONS

DEFAULT_PAIR = default_pair("cpu")


def table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per method: validation top-1 (mean, 95% CI), paired differences to CE and KD, failures."""
    ok = df[df.get(FAILED, pd.Series(index=df.index, dtype=object)).isna() & df["val_top1"].notna()]
    rows = []
    for method, runs in _ran(df).groupby("method", sort=False):
        good = ok[ok["method"] == method]
        rows.append(
            {
                "method": method,
                "runs": len(runs),
                "failed": len(runs) - len(good),
                "val_top1": good["val_top1"].mean(),
                "ci95": ci95(good["val_top1"]) if len(good) > 1 else float("nan"),
                "minutes": runs["minutes_alone"].mean(),
            }
        )
    out = pd.DataFrame(rows).set_index("method")
    for base in ("ce", "kd"):
        if base not in set(ok["method"]) or ok["method"].nunique() < 2:  # nothing to compare with yet
            continue
        diffs = _differences(ok, base)
        out[f"vs {base}"] = diffs["diff"]
        ci = diffs["ci_low"].map("{:+.2f}".format) + " to " + diffs["ci_high"].map("{:+.2f}".format)
        out[f"vs {base} 95% CI"] = ci
        out[f"vs {base} verdict"] = diffs["verdict"]
        if "same_verdict" in diffs:
            out[f"vs {base}: every teacher agrees"] = diffs["same_verdict"]
    return out.sort_values("val_top1", ascending=False)


def _differences(ok: pd.DataFrame, base: str) -> pd.DataFrame:
    """Each method's paired validation difference to ``base``: by seed under one teacher; with several,
    students nested in teachers (``analysis.compare_nested``: the pooled row, and whether every
    teacher's own verdict agrees)."""
    if ok["teacher"].nunique() < 2:
        return compare_columns(ok, by="method", baseline=base, columns=["val_top1"]).xs("val_top1", level=1)

    def by_teacher(method):
        rows = ok[ok["method"] == method]
        return {t: dict(zip(g["seed"], g["val_top1"], strict=True)) for t, g in rows.groupby("teacher")}

    rows = {}
    for method in dict.fromkeys(ok["method"]):
        if method == base:
            continue
        a, b = by_teacher(method), by_teacher(base)
        shared = sorted(set(a) & set(b))
        nested = compare_nested({t: a[t] for t in shared}, {t: b[t] for t in shared})
        rows[method] = nested.loc["pooled"].to_dict() | {"same_verdict": bool(nested["same_verdict"].iloc[0])}
    return pd.DataFrame.from_dict(rows, orient="index")


VERDICTS = ("vs ce verdict", "vs kd verdict")


def _teachers_said(df: pd.DataFrame) -> str:
    """ "teacher seed 0" where each pair has one teacher, else how many each has (a CSV holds run folders' names)."""
    counts = df.groupby("pair")["teacher"].nunique()
    if counts.max() <= 1:
        return "teacher seed 0"
    return "teachers per pair: " + ", ".join(f"{p} {n}" for p, n in counts.items())


def _online_precision(df: pd.DataFrame) -> str:
    """How each pair's online teacher ran: rows from before the column existed ran it under bf16 autocast."""
    amp = df["teacher_amp"] if "teacher_amp" in df else pd.Series("bf16", index=df.index)
    online = df.assign(teacher_amp=amp.fillna("bf16"))
    online = online[online["teacher_amp"] != "cached logits"]
    said = {"bf16": "bf16 autocast", "off": "fp32"}
    per_pair = online.groupby("pair", sort=False)["teacher_amp"].agg(lambda a: " and ".join(sorted(set(a))))
    return "; ".join(f"{p}: {said.get(a, a)}" for p, a in per_pair.items()) or "none ran"


def cost_line(df: pd.DataFrame, cores: int = 2) -> str:
    """The pair's training time: its runs' minutes had each run alone (a cohort member counts its own
    steps and its share of the teacher), and that over ``cores`` runs at a time; the teacher apart."""
    minutes = df["minutes_alone"].sum()
    return (
        f"{len(df)} runs, {minutes:.0f} min had each run alone: about {minutes / cores / 60:.1f} h on {cores} cores "
        "from scratch (the teacher not counted)."
    )


def across_pairs(by_pair: dict[str, pd.DataFrame], column: str) -> pd.DataFrame:
    """One row per method, one column per pair: its verdict (``column``: against CE or KD), with the
    runs that failed; ``holds`` says whether every pair that ran it gives the same verdict ("one pair"
    where only one did; ``_holds``)."""
    cells = {}
    for name, t in by_pair.items():
        if column not in t:
            continue
        failed = t["failed"].map(lambda n: f" ({n} failed)" if n else "") if "failed" in t else ""
        cells[name] = t[column].fillna("–") + failed
    out = pd.DataFrame(cells)
    bare = out.apply(lambda col: col.str.replace(r" \(\d+ failed\)", "", regex=True))
    out["holds"] = bare.apply(_holds, axis=1)
    return out


def _holds(verdicts: pd.Series) -> str:
    """A verdict "holds" only where at least two pairs ran the method; one pair cannot show that. One that
    does not hold "reverses" (higher on one pair, lower on another) or "flips" (a direction on some pairs,
    within noise on others: a difference one pair resolves and another does not)."""
    ran = verdicts.dropna()
    if (ran == "–").all():  # the reference itself (ce against ce)
        return "–"
    if len(ran) < 2:
        return "one pair"
    if ran.nunique() == 1:
        return "yes"
    return "reverses" if {"higher", "lower"} <= set(ran) else "flips"


def _ran(df: pd.DataFrame) -> pd.DataFrame:
    """The runs that started; a method whose every run was refused (an error before training) is listed apart."""
    refused = df.groupby("method")["error"].apply(lambda e: e.notna().all()) if "error" in df else pd.Series()
    return df[~df["method"].map(lambda m: bool(refused.get(m, False)))]


# A method whose rows may run only part of its release: which rows (by their ``views``, the number of views of
# each image a run trained on; rows from before that column trained on one), and what to say under the table
PARTIAL = {
    "mlkd": (
        lambda rows: rows["views"].fillna(1) < 2 if "views" in rows else pd.Series(True, index=rows.index),
        "ran the release's first view only (trained before its second, RandAugment view was implemented: "
        "`--no-mlkd-strong-view` now), so they are not the published method's; `python benchmarks/mlkd_views.py` "
        "measures what the second view changes",
    ),
}


def partial_notes(rows: pd.DataFrame) -> list[str]:
    """A line for each method among ``rows`` (columns ``method``, ``pair``, maybe ``views``) whose rows run
    only part of its release (``PARTIAL``), naming the pairs."""
    notes = []
    for method, (partial, text) in sorted(PARTIAL.items()):
        mine = rows[rows["method"] == method]
        hit = mine[partial(mine)] if len(mine) else mine
        if len(hit):
            pairs_ = ", ".join(sorted(set(hit["pair"]))) if "pair" in hit else "every pair"
            notes.append(f"`{method}` ({pairs_}): these rows {text}.")
    return notes


def refused(df: pd.DataFrame) -> dict[str, str]:
    """Methods that could not run on this pair at all, and why (their first error)."""
    if "error" not in df:
        return {}
    gone = set(df["method"]) - set(_ran(df)["method"])
    return {m: df[df["method"] == m]["error"].iloc[0] for m in sorted(gone)}


def read_rows(path: str) -> pd.DataFrame:
    """A table's CSV, its commits as text: a commit such as 33e2181 would otherwise be read as a float (inf)."""
    return with_pair(pd.read_csv(path, dtype={"commit": str}))


def with_pair(df: pd.DataFrame) -> pd.DataFrame:
    """Rows written before the table had pairs belong to the demo pair."""
    if "pair" not in df:
        df = df.assign(pair=DEFAULT_PAIR)
    return df.assign(pair=df["pair"].fillna(DEFAULT_PAIR))


def tables(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """``table`` of each pair that has runs, in ``pairs.py``'s order."""
    present = set(df["pair"])
    return {p: table(df[df["pair"] == p]) for p in pairs("cpu") if p in present}


def pair_title(name: str, quick: bool = False) -> str:
    """A pair's heading: its networks at the `cpu` widths, or (``--quick``) at the smoke profile's."""
    pair = get_pair("cpu", name)
    (tm, tw), (sm, sw) = pair.teacher, pair.student
    if quick:
        return f"{name}: {tm} teacher, {sm} student at the smoke profile's widths"
    return f"{name}: {tm} x{tw:g} teacher, {sm} x{sw:g} student"


def write(df: pd.DataFrame, prefix: str, quick: bool = False) -> None:
    df = with_pair(df)
    df.to_csv(f"{prefix}.csv", index=False)
    by_pair = tables(df)
    commits = ", ".join(sorted(set(df["commit"])))
    where = ", ".join(sorted(set(df["processor"]))) if "processor" in df else "an unrecorded processor"
    lines = [
        "Untuned: every method at its released recipe, validation top-1 of the last epoch "
        f"({'smoke profile on generated data' if quick else 'cpu profile'}, "
        f"3 seeds, {_teachers_said(df)}), from `python benchmarks/kd_table.py [--pair NAME]` at {commits}. "
        "Differences are paired by seed (with several teachers, students nested in teachers: the mean of the "
        "teachers' paired differences, its CI over teachers); a CI that spans 0 is within noise. Logit methods "
        f"read the teacher's cached logits, the others run it online ({_online_precision(df)}). "
        f"`minutes`: one run, had it run alone (CPU time). Processor: {where}.",
    ]
    for name, t in by_pair.items():
        shown = t.drop(columns=[c for c in VERDICTS if c in t]).round(2)
        lines += ["", f"### {pair_title(name, quick)}", "", markdown(shown)]
        lines += ["", cost_line(df[df["pair"] == name])]
        for method, why in refused(df[df["pair"] == name]).items():
            lines += ["", f"`{method}` could not run on this pair: {why}"]
        print(f"{name}\n{shown.to_string()}")
    lines += [line for note in partial_notes(_ran(df)) for line in ("", note)]
    lines += verdicts_across_pairs(by_pair, "validation top-1")
    lines += ["", f"![validation top-1 by method and pair]({os.path.basename(prefix)}.png)"]
    plot(by_pair, f"{prefix}.png")
    with open(f"{prefix}.md", "w") as f:
        f.write("\n".join(lines) + "\n")


def verdicts_across_pairs(by_pair: dict[str, pd.DataFrame], measure: str) -> list[str]:
    """The markdown lines of the across-pairs section (none for a single pair): each method's verdict
    against CE and against KD on every pair, and whether it holds."""
    if len(by_pair) < 2:
        return []
    lines = [
        "",
        "### Verdicts across pairs",
        "",
        f"Paired 95% CI of {measure} against CE and KD "
        "(higher, lower, or within noise where it spans 0); `holds`: `yes` where every pair that ran the "
        "method gives the same verdict (`one pair` where only one has), `reverses` where it is higher on one "
        "pair and lower on another, `flips` where it is higher or lower on some and within noise on others.",
    ]
    for column in VERDICTS:
        lines += ["", f"**{column.removesuffix(' verdict')}**", "", markdown(across_pairs(by_pair, column))]
    return lines


def plot(by_pair: dict[str, pd.DataFrame], path: str, column: str = "val_top1", label: str = "validation") -> None:
    """Each method's mean ``column`` (top-1) with its 95% CI over seeds (``ci95``), one panel per pair
    (methods in the first pair's order); CE and KD as reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = list(next(iter(by_pair.values())).sort_values(column).index)
    order += sorted({m for t in by_pair.values() for m in t.index} - set(order))
    fig, axes = plt.subplots(1, len(by_pair), figsize=(4.5 * len(by_pair), 0.28 * len(order) + 1.2), sharey=True)
    for ax, (name, t) in zip(list(getattr(axes, "flat", [axes])), by_pair.items(), strict=True):
        t = t.reindex(order)
        ax.errorbar(t[column], range(len(t)), xerr=t["ci95"].fillna(0), fmt="o", color="k", capsize=2)
        for base, style in (("ce", ":"), ("kd", "--")):
            if base in t.index and pd.notna(t.loc[base, column]):
                ax.axvline(t.loc[base, column], ls=style, color="grey", label=base)
        ax.set_title(name)
        ax.set_xlabel(f"{label} top-1 (%), mean and 95% CI")
        if ax.get_legend_handles_labels()[0]:  # a pair whose CE or KD runs are not in yet has no lines
            ax.legend(loc="lower right")
    axes_list = list(getattr(axes, "flat", [axes]))
    axes_list[0].set_yticks(range(len(order)), order)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def versus_published(by_pair: dict[str, pd.DataFrame], column: str = "val_top1") -> dict[str, pd.DataFrame]:
    """Per pair with published numbers: each method's published CIFAR-100 top-1 and its difference to
    KD beside this project's ``column`` (the untuned table's validation top-1, the tuned picks' test
    top-1) and paired difference to KD, and whether the two differences point the same way (``within
    noise`` where this project's CI spans 0). ``by_pair``: ``tables`` or the tuned tables."""
    out = {}
    for name, t in by_pair.items():
        pub = published_frame(name)
        if pub.empty or "vs kd" not in t:
            continue
        both = pub.join(t[[column, "vs kd", "vs kd 95% CI"]], how="inner")
        low_high = both["vs kd 95% CI"].str.split(" to ", expand=True).astype(float)
        spans_zero = (low_high[0] <= 0) & (low_high[1] >= 0)
        same = (both["vs kd"] > 0) == (both["published vs kd"] > 0)
        both["direction"] = [
            "within noise" if z else ("same" if s else "opposite") for z, s in zip(spans_zero, same, strict=True)
        ]
        both.loc["kd", "direction"] = "reference"
        out[name] = both.sort_values("published", ascending=False)
    return out


def write_versus_published(
    by_pair: dict[str, pd.DataFrame], prefix: str, tuned: bool = False, rows: pd.DataFrame | None = None
) -> None:
    """``<prefix>_vs_published.md``: ``versus_published`` of the untuned tables, or of the tuned ones;
    ``rows``, the runs they were built from, for the notes on methods run only in part."""
    from scipy.stats import spearmanr

    column = "test_top1" if tuned else "val_top1"
    ours = (
        "tuned `cpu` table (CIFAR-10, 1/4- and 1/8-width networks, 30 epochs; each method's pick on validation, "
        "its last-epoch test top-1 at 5 seeds"
        if tuned
        else "untuned `cpu` table (CIFAR-10, 1/4- and 1/8-width networks, 30 epochs, validation top-1 of the last epoch"
    )
    lines = [
        "Published CIFAR-100 top-1 (full-width networks, 240 epochs; `published.py` gives each source) beside "
        f"this project's {ours}; `{os.path.basename(prefix)}.md`). The datasets and scales differ, so only the "
        "direction of each method's difference to KD is compared; `within noise`: our paired 95% CI spans 0. "
        f"From `python benchmarks/kd_table.py{' --tune' if tuned else ''} --compare-published`.",
    ]
    for name, both in versus_published(by_pair, column).items():
        rho = spearmanr(both["published"], both[column]).statistic
        lines += ["", f"### {name} ({len(both)} methods; Spearman rank correlation of the two columns of "
                  f"top-1: {rho:+.2f})", "", markdown(both.round(2))]  # fmt: skip
    shown = {m for both in versus_published(by_pair, column).values() for m in both.index}
    if rows is not None:
        lines += [line for note in partial_notes(rows[rows["method"].isin(shown)]) for line in ("", note)]
    with open(f"{prefix}_vs_published.md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def tuned_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per method: the pick and its budget, validation at the pick (grid seeds), test of the pick at
    the confirmation seeds with its 95% CI, and paired test differences to CE and to KD (KD at its pick)."""
    conf = df[(df["stage"] == "confirm") & df["test_top1"].notna()]
    conf = conf[conf[FAILED].isna()] if FAILED in conf else conf
    rows = []
    for method, runs in df.groupby("method", sort=False):
        grid = runs[runs["stage"] == "grid"]
        picked = conf[conf["method"] == method]
        pick_grid = grid[grid["picked"].astype(bool)]
        param = runs["param"].iloc[0]
        tuned = isinstance(param, str) and param != ""  # CE has none: "" when built, NaN when read from the CSV
        rows.append(
            {
                "method": method,
                "param": param if tuned else "–",
                "pick": picked["value"].iloc[0] if len(picked) and tuned else float("nan"),
                "cells": grid["value"].nunique(),
                "runs": len(runs.drop_duplicates(["value", "seed"])),
                "edge": bool(runs["pick_on_edge"].iloc[0]) if tuned else False,
                "val_top1": pick_grid["val_top1"].mean(),
                "test_top1": picked["test_top1"].mean(),
                "ci95": ci95(picked["test_top1"]) if len(picked) > 1 else float("nan"),
                "minutes": runs.drop_duplicates(["value", "seed"])["minutes_alone"].sum(),
            }
        )
    out = pd.DataFrame(rows).set_index("method")
    for base in ("ce", "kd"):
        if base in set(conf["method"]) and conf["method"].nunique() > 1:  # a group of one has nothing to compare
            d = compare_columns(conf, by="method", baseline=base, columns=["test_top1"]).xs("test_top1", level=1)
            out[f"vs {base}"] = d["diff"]
            out[f"vs {base} 95% CI"] = d["ci_low"].map("{:+.2f}".format) + " to " + d["ci_high"].map("{:+.2f}".format)
            out[f"vs {base} verdict"] = d["verdict"]
    return out.sort_values("test_top1", ascending=False)


def tuned_tables(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """``tuned_table`` of each pair that has runs, in ``pairs.py``'s order."""
    return {p: tuned_table(df[df["pair"] == p]) for p in pairs("cpu") if p in set(df["pair"])}


def write_tuned(df: pd.DataFrame, prefix: str, quick: bool = False) -> None:
    df = with_pair(df)
    df.to_csv(f"{prefix}.csv", index=False)
    commits = ", ".join(sorted(set(df["commit"])))
    per_cell = df[df["stage"] == "grid"].groupby(["pair", "method", "value"])["seed"].nunique().max()
    per_pick = df[df["stage"] == "confirm"].groupby(["pair", "method"])["seed"].nunique().max()
    factors = ", ".join(f"{f:.3g}" for f in FACTORS)
    header = (
        f"Tuned on validation: each method's strength (`param`) at its recipe x {factors}, {per_cell} seeds a "
        "cell, its other parameters at the recipe (LS-KD's and MLKD's CE weight of 0.1 included); a pick on "
        f"the edge extended by x3 or x1/3 (at most {MAX_EXTENSIONS} times; `edge`: still on it); the "
        f"pick, CE and KD's pick then at {per_pick} seeds, whose last-epoch test top-1 is reported with paired "
        "differences (95% CI; a CI that spans 0 is within noise). `runs`: the method's tuning budget; "
        "`minutes`: their training time had each run alone. "
        + (
            "Grid cells far behind their method's best on validation stopped early (`pruning.Prune`: at 1/4 and "
            "1/2 of the schedule, behind on every seed by more than noise and 2 points; the best never stops), "
            f"{int(df['pruned_at'].notna().sum())} runs in all. "
            if "pruned_at" in df and df["pruned_at"].notna().any()
            else ""
        )
        + "From "
        f"`python benchmarks/kd_table.py --tune [--pair NAME]` at {commits}."
    )
    lines = [header]
    by_pair = tuned_tables(df)
    for name, t in by_pair.items():
        lines += ["", f"### {pair_title(name, quick)}", ""]
        lines.append(markdown(t.drop(columns=[c for c in VERDICTS if c in t]).round(2)))
        runs = df[df["pair"] == name].drop_duplicates(["method", "value", "seed"])  # a pick's grid runs count once
        lines += ["", cost_line(runs) + " The recipe's cells are the untuned table's runs, counted here too."]
    lines += [line for note in partial_notes(df) for line in ("", note)]
    lines += verdicts_across_pairs(by_pair, "the picks' test top-1")
    lines += ["", f"![test top-1 of each pick by method and pair]({os.path.basename(prefix)}.png)"]
    plot(by_pair, f"{prefix}.png", column="test_top1", label="test (the pick's)")
    with open(f"{prefix}.md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def markdown(t: pd.DataFrame) -> str:
    """A table as GitHub markdown (pandas' ``to_markdown`` needs a package this project does not install)."""
    frame = t.reset_index().astype(object).where(t.reset_index().notna(), "–")
    rows = [list(frame.columns), ["---"] * len(frame.columns), *frame.astype(str).values.tolist()]
    return "\n".join("| " + " | ".join(map(str, r)) + " |" for r in rows)

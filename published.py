"""Published CIFAR-100 top-1 (%) of the reference codebases, per pair of ``pairs.py`` and method.

    PUBLISHED["vgg13-vgg8"]["crd"]   # 73.94
    published_frame("vgg13-mv2")     # method, published, vs_kd, source

Full-width networks, 240 epochs of the standard recipe (``paper`` profile) unless ``CAVEATS`` says
otherwise. The protocols differ: RepDistiller reports the last epoch of one run; mdistiller and
LS-KD the best epoch, averaged over 5 runs. Read from the READMEs at the commits in
``../shared/notes/kd_anchors.md``: RepDistiller ``b84f547`` (CE, KD and its 13 feature methods),
mdistiller ``a08d46f`` (DKD), logit-standardization-KD ``f6e5aa5`` (CTKD, MLKD, KD+LS). Methods the
READMEs do not report for a pair are absent.
"""

from __future__ import annotations

import pandas as pd

REPDISTILLER = "RepDistiller README"
MDISTILLER = "mdistiller README"
LSKD = "logit-standardization-KD README"

# method -> (vgg13-vgg8, vgg13-mv2, source); None where the source has no number
_ROWS = {
    "ce": (70.36, 64.60, REPDISTILLER),
    "kd": (72.98, 67.37, REPDISTILLER),
    "fitnet": (71.02, 64.14, REPDISTILLER),
    "at": (71.43, 59.40, REPDISTILLER),
    "sp": (72.68, 66.30, REPDISTILLER),
    "cc": (70.71, 64.86, REPDISTILLER),
    "vid": (71.23, 65.56, REPDISTILLER),
    "rkd": (71.48, 64.52, REPDISTILLER),
    "pkt": (72.88, 67.13, REPDISTILLER),
    "ab": (70.94, 66.06, REPDISTILLER),
    "ft": (70.58, 61.78, REPDISTILLER),
    "fsp": (70.23, None, REPDISTILLER),
    "nst": (71.53, 58.16, REPDISTILLER),
    "crd": (73.94, 69.73, REPDISTILLER),
    "dkd": (74.68, 69.71, MDISTILLER),
    "ctkd": (73.52, 68.50, LSKD),
    "mlkd": (75.18, 70.57, LSKD),
    "kd_ls": (74.36, 68.61, LSKD),
}
PAIR_COLUMNS = ("vgg13-vgg8", "vgg13-mv2")
PUBLISHED: dict[str, dict[str, float]] = {
    pair: {m: row[i] for m, row in _ROWS.items() if row[i] is not None} for i, pair in enumerate(PAIR_COLUMNS)
}
SOURCES = {m: row[2] for m, row in _ROWS.items()}
TEACHERS = {"vgg13-vgg8": 74.64, "vgg13-mv2": 74.64}  # RepDistiller's VGG13 teacher
CAVEATS = {
    "mlkd": "480 epochs with a strongly augmented second view",
    "kd_ls": "KD + logit standardisation at the release's temperature and weights",
}


def published_frame(pair: str) -> pd.DataFrame:
    """The pair's published numbers, one row per method: top-1, its difference to KD, the source."""
    if pair not in PUBLISHED:
        return pd.DataFrame(columns=["published", "published vs kd", "source"])
    numbers = PUBLISHED[pair]
    out = pd.DataFrame({"published": pd.Series(numbers)})
    out["published vs kd"] = out["published"] - numbers["kd"]
    out["source"] = [SOURCES[m] + (f" ({CAVEATS[m]})" if m in CAVEATS else "") for m in out.index]
    out.index.name = "method"
    return out

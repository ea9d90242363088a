"""The user's own data from a file: ``.npz`` (arrays ``x``, ``y``) or ``.csv`` (header row).

``dataset = "file"`` with ``data_path`` runs through specs and the CLI (``flatprior train / run /
report``) exactly like the built-in data sets: the pool read here is split into S, A (labels
flipped) and E by :func:`flatprior.data.tasks.task_from_arrays`.

Formats:

- ``.npz``: ``x`` float/int ``[N, ...]`` (``N >= 2``; images may keep their shape, e.g.
  ``[N, 1, 28, 28]``), ``y`` ``[N]`` (or ``[N, 1]``). Read with ``allow_pickle=False``.
- ``.csv``: a header row; the label column is ``label`` unless ``label_column`` says otherwise;
  every other column is a numeric feature (``x [N, n_columns - 1]``).

Labels: exactly two distinct numeric values; the smaller becomes 0, the larger 1 (``{0, 1}``
labels are kept as they are). Every problem (missing file or array, wrong shapes, NaN/inf,
one class, more than two classes, non-numeric values) is one :class:`FlatpriorError` line.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from flatprior.errors import FlatpriorError

SUFFIXES = (".npz", ".csv")


def load_file_pool(path: str | Path, label_column: str = "label") -> tuple[np.ndarray, np.ndarray]:
    """Read ``path`` into ``(x float32 [N, ...], y float32 [N] in {0, 1})`` (see module doc)."""
    if path is None or str(path) == "":
        raise FlatpriorError("dataset 'file' needs data_path (a .npz or .csv file)")
    p = Path(path).expanduser()
    if p.suffix.lower() not in SUFFIXES:
        raise FlatpriorError(f"data file {p.name}: use a .npz (arrays x, y) or a .csv file")
    if not p.is_file():
        raise FlatpriorError(f"data file {p} does not exist")
    x, y = _read_npz(p) if p.suffix.lower() == ".npz" else _read_csv(p, label_column)
    return _check_pool(p.name, x, y)


def _read_npz(p: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(p, allow_pickle=False) as z:
            missing = [k for k in ("x", "y") if k not in z.files]
            if missing:
                raise FlatpriorError(
                    f"data file {p.name} has no array {' or '.join(map(repr, missing))} "
                    f"(found {', '.join(map(repr, z.files)) or 'none'}); save it with "
                    "np.savez(path, x=inputs, y=labels)")
            return z["x"], z["y"]
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        if isinstance(exc, FlatpriorError):
            raise
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:120]
        raise FlatpriorError(
            f"data file {p.name} is not a readable .npz of numeric arrays ({first})") from None


def _read_csv(p: Path, label_column: str) -> tuple[np.ndarray, np.ndarray]:
    import pandas as pd

    try:
        df = pd.read_csv(p)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:120]
        raise FlatpriorError(f"data file {p.name} is not a readable CSV ({first})") from None
    if label_column not in df.columns:
        raise FlatpriorError(
            f"data file {p.name} has no label column {label_column!r} (columns: "
            f"{', '.join(map(str, df.columns[:8]))}{', …' if len(df.columns) > 8 else ''}); "
            "pass --label-column / label_column")
    features = df.drop(columns=[label_column])
    if features.shape[1] == 0:
        raise FlatpriorError(f"data file {p.name} has a label column but no feature column")
    for col in (label_column, *features.columns):
        s = df[col]
        num = pd.to_numeric(s, errors="coerce")
        bad = s.notna() & num.isna()
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise FlatpriorError(
                f"data file {p.name}: column {col!r} is not numeric (row {row + 2} holds "
                f"{str(s.iloc[row])[:30]!r}); encode it as numbers")
    return (features.apply(pd.to_numeric).to_numpy(np.float64),
            pd.to_numeric(df[label_column]).to_numpy(np.float64))


def _check_pool(name: str, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    for what, a in (("x", x), ("y", y)):
        if not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
            raise FlatpriorError(f"data file {name}: {what} must be numeric, got dtype {a.dtype}")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if x.ndim < 2 or y.ndim != 1 or len(x) != len(y):
        raise FlatpriorError(
            f"data file {name}: need x [N, features...] and y [N], got shapes {list(x.shape)} "
            f"and {list(y.shape)}")
    if len(y) < 2:
        raise FlatpriorError(f"data file {name} holds {len(y)} example(s); need at least 2")
    for what, a in (("x", x), ("y", y)):
        bad = ~np.isfinite(a.astype(np.float64))
        if bad.any():
            first = int(np.argwhere(bad)[0][0])
            raise FlatpriorError(
                f"data file {name}: {what} has {int(bad.sum())} NaN/inf value(s) (first in "
                f"example {first}); clean or drop them")
    classes = np.unique(y)
    if len(classes) < 2:
        raise FlatpriorError(
            f"data file {name}: every label is {classes[0]:g} (one class); a binary task needs "
            "both classes")
    if len(classes) > 2:
        shown = ", ".join(f"{c:g}" for c in classes[:5]) + (", …" if len(classes) > 5 else "")
        raise FlatpriorError(f"data file {name}: {len(classes)} label values ({shown}); "
                             "binarise the labels (two classes)")
    return x.astype(np.float32), (y == classes[1]).astype(np.float32)

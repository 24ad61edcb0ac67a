"""The entropy record: every head's attention entropy over a run, as one CSV file.

This module owns the record end to end: its name and columns, the writer the training
callback appends with, and the reader (plus slicing) that ``mha-plot`` and analysis use.

``RUN_DIR/attention_entropy.csv`` (:func:`record_path`) is long-format CSV, one row per
step x split x kind x layer x head, under a header written once when the file is created::

    step,split,kind,layer,head,entropy,entropy_norm
    0,train,enc_self,0,0,2.301928,0.926384
    10,val,cross,1,3,0.000000,

- ``step``: the trainer's global step the values were measured at (int).
- ``split``: ``train`` (the monitored training batch) or ``val`` (the fixed probe set).
- ``kind``: ``enc_self``, ``dec_self`` or ``cross`` (:data:`KINDS`).
- ``layer``, ``head``: 0-based indices.
- ``entropy``: mean attention entropy over valid queries, in nats, 6 decimals.
- ``entropy_norm``: mean over queries with more than one valid key of entropy / log(valid
  keys), in [0, 1], 6 decimals; empty where no query had more than one key, read back as NaN.

Rows are only ever appended (training writes one block per logging interval), so a
resumed run may repeat a (step, split, kind, layer, head); readers take the later row.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mha_lightning.atomic import atomic_file
from mha_lightning.errors import ConfigError, DataError
from mha_lightning.kinds import ATTENTION_KINDS

__all__ = [
    "CSV_NAME",
    "COLUMNS",
    "KINDS",
    "SPLITS",
    "VALUES",
    "record_path",
    "append_rows",
    "importance_path",
    "load_importance",
    "append_csv",
    "EntropyTable",
    "load_entropy_csv",
    "as_table",
    "check_value",
    "check_split_kind",
    "check_steps",
    "entropy_matrix",
    "entropy_cube",
]

CSV_NAME = "attention_entropy.csv"
COLUMNS = ("step", "split", "kind", "layer", "head", "entropy", "entropy_norm")
KINDS = ATTENTION_KINDS  # the model's attention types, in its order
SPLITS = ("train", "val")
VALUES = ("entropy", "entropy_norm")

# Every head's importance on the validation probe set (``monitor.importance``), beside the entropy record.
IMPORTANCE_CSV = "head_importance.csv"
IMPORTANCE_COLUMNS = ("step", "split", "kind", "layer", "head", "importance")

# Sanity cap on layer/head indices: a corrupt value like 1e9 must not allocate a huge matrix.
_MAX_INDEX = 100_000


# --------------------------------------------------------------------------- writing


def record_path(run_dir: str | Path) -> Path:
    """Where a run keeps its entropy record: ``run_dir / CSV_NAME``."""
    return Path(run_dir) / CSV_NAME


def importance_path(run_dir: str | Path) -> Path:
    """Where a run keeps its importance record: ``run_dir / IMPORTANCE_CSV``."""
    return Path(run_dir) / IMPORTANCE_CSV


def append_rows(path: str | Path, split: str, step: int, values: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Append one measurement to the record at ``path`` (created, with its header, if absent).

    ``values`` maps kind -> (entropy, normalised entropy), both (layers, heads) arrays;
    a NaN normalised entropy is written as an empty cell.
    """
    rows = (
        [
            step,
            split,
            kind,
            layer,
            head,
            f"{h:.6f}",
            "" if math.isnan(norm[layer, head]) else f"{norm[layer, head]:.6f}",
        ]
        for kind, (ent, norm) in values.items()
        for (layer, head), h in np.ndenumerate(ent)
    )
    append_csv(path, COLUMNS, rows)


def append_csv(path: str | Path, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Append ``rows`` to the CSV at ``path``, created with its ``columns`` header if absent (the run's records)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(columns)
        writer.writerows(rows)


def drop_replayed_rows(path: str | Path, step: int) -> int:
    """Before a run resumed at ``step`` logs again, remove the rows it will log again -> how many.

    A checkpoint at step S is written after that step's validation (whose probe rows carry S) and
    before the training measurement at S: so training rows from S on and validation rows after S
    were logged by the interrupted run after its checkpoint. The file is rewritten atomically."""
    path = Path(path)
    if not path.is_file():
        return 0
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return 0
    header, body = rows[0], rows[1:]
    i_step, i_split = header.index("step"), header.index("split")

    def replayed(row: list[str]) -> bool:
        s = int(row[i_step])
        return s >= step if row[i_split] == "train" else s > step

    kept = [r for r in body if len(r) == len(header) and not replayed(r)]
    dropped = len(body) - len(kept)
    if dropped:
        with atomic_file(path, "w", newline="") as f:
            csv.writer(f).writerows([header, *kept])
    return dropped


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class EntropyTable:
    """Columnar view of an entropy CSV: one numpy array per column, all the same length.

    ``source`` names where the rows came from (the CSV path) for error messages.
    Duplicate (step, split, kind, layer, head) rows are allowed (e.g. a resumed run
    that re-logged a step); the later row wins when slicing.
    """

    step: np.ndarray  # int64
    split: np.ndarray  # str
    kind: np.ndarray  # str
    layer: np.ndarray  # int64
    head: np.ndarray  # int64
    entropy: np.ndarray  # float64
    entropy_norm: np.ndarray  # float64, NaN where undefined
    source: str = "<records>"

    def __len__(self) -> int:
        return int(self.step.shape[0])

    @classmethod
    def from_records(cls, records: Iterable[Mapping[str, Any]], source: str = "<records>") -> EntropyTable:
        """Build a table from dicts with the CSV's column names (values may be str or numbers)."""
        cols: dict[str, list[Any]] = {c: [] for c in COLUMNS}
        for i, rec in enumerate(records):
            missing = [c for c in COLUMNS if c not in rec and c != "entropy_norm"]
            if missing:
                raise DataError(
                    f"{source}: record {i} lacks {', '.join(missing)}; each record needs the keys {', '.join(COLUMNS)}"
                )
            for c in COLUMNS:
                v = rec.get(c, "")
                if isinstance(v, (float, np.floating)) and c in ("step", "layer", "head") and float(v).is_integer():
                    v = int(v)
                cols[c].append("" if v is None else str(v).strip())
        return _build_table(cols, list(range(len(cols["step"]))), source, where="record")

    def splits(self) -> list[str]:
        """The splits present: train, val, then any others alphabetically."""
        return _ordered(np.unique(self.split).tolist(), SPLITS)

    def kinds(self, split: str | None = None) -> list[str]:
        """The attention kinds present (in ``split``), in canonical order."""
        sel = self.kind if split is None else self.kind[self.split == split]
        return _ordered(np.unique(sel).tolist(), KINDS)

    def steps(self, split: str | None = None) -> list[int]:
        """The distinct steps (of ``split``), ascending."""
        sel = self.step if split is None else self.step[self.split == split]
        return [int(s) for s in np.unique(sel)]

    def shape(self, kind: str) -> tuple[int, int]:
        """(layers, heads) for ``kind``: 1 + the largest index seen in any step or split."""
        m = self.kind == kind
        if not m.any():
            return (0, 0)
        return int(self.layer[m].max()) + 1, int(self.head[m].max()) + 1

    def values(self, value: str) -> np.ndarray:
        """The ``entropy`` (nats) or ``entropy_norm`` ([0, 1]) column."""
        check_value(value)
        return self.entropy if value == "entropy" else self.entropy_norm


def _ordered(items: Sequence[str], canonical: Sequence[str]) -> list[str]:
    """Items in canonical order first, then any others alphabetically."""
    known = [c for c in canonical if c in items]
    return known + sorted(i for i in items if i not in canonical)


def one_line(text: str, limit: int = 40) -> str:
    """``text`` on one line, cut to ``limit`` characters (for error messages)."""
    text = " ".join(str(text).split())  # one line, whatever the value held
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _list_preview(items: Sequence[Any], limit: int = 10) -> str:
    shown = ", ".join(str(i) for i in items[:limit])
    if len(items) > limit:
        shown += f", ... ({len(items)} in total, last {items[-1]})"
    return shown


def load_entropy_csv(path: str | Path) -> EntropyTable:
    """Read ``attention_entropy.csv`` into an :class:`EntropyTable`.

    Raises :class:`DataError` (one line, naming the file and line) when the file is
    missing or unreadable, lacks a column, or holds a non-numeric value. Blank lines and
    extra columns are ignored; an empty ``entropy_norm`` reads as NaN. A final line
    without a trailing newline that is cut short (the run is still writing) is skipped.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a directory, not a CSV; pass the CSV file or use mha-plot RUN_DIR")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(
            f"entropy CSV {path} not found; pass the {CSV_NAME} written by a training run "
            "(it appears in the run directory once entropy has been logged)"
        ) from None
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path} is not a UTF-8 text CSV ({one_line(str(e), 80)}); pass the {CSV_NAME} of a run"
        ) from None
    except OSError as e:
        raise DataError(f"cannot read entropy CSV {path}: {one_line(e.strerror or str(e), 80)}") from None

    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        while header is not None and not any(h.strip() for h in header):
            header = next(reader, None)
        if header is None:
            raise DataError(
                f"{path} is empty; expected a header '{','.join(COLUMNS)}' and data rows "
                "(has the run logged any entropy yet?)"
            )
        header = [h.strip() for h in header]
        missing = [c for c in COLUMNS if c not in header]
        if missing:
            raise DataError(
                f"{path} line {reader.line_num}: header lacks column(s) {', '.join(missing)}; "
                f"expected '{','.join(COLUMNS)}' (got '{one_line(','.join(header), 80)}')"
            )
        idx = [header.index(c) for c in COLUMNS]
        need = max(idx) + 1
        cols: dict[str, list[str]] = {c: [] for c in COLUMNS}
        lines: list[int] = []
        short_row: tuple[int, int] | None = None
        data_after_short = False
        for row in reader:
            if not any(f.strip() for f in row):
                continue
            if short_row is not None:  # a short row followed by more data: corrupt, not in-progress
                data_after_short = True
                break
            if len(row) < need:
                short_row = (reader.line_num, len(row))
                continue
            for c, j in zip(COLUMNS, idx, strict=True):
                cols[c].append(row[j].strip())
            lines.append(reader.line_num)
    except csv.Error as e:
        raise DataError(
            f"{path} line {reader.line_num}: malformed CSV ({one_line(str(e), 80)}); fix or regenerate the file"
        ) from None

    if short_row is not None and (data_after_short or text.endswith(("\n", "\r"))):
        line, n = short_row
        raise DataError(
            f"{path} line {line}: {n} field(s) but the header has {len(header)}; "
            "fix or remove that line (was the file truncated or edited?)"
        )
    if not lines:
        raise DataError(f"{path} has a header but no data rows; train until entropy is logged, then rerun")
    return _build_table(cols, lines, str(path), where="line")


def _build_table(cols: dict[str, list[str]], lines: list[int], source: str, where: str) -> EntropyTable:
    if not lines:
        raise DataError(f"{source}: no entropy rows; nothing to plot")
    ints = {c: _to_numeric(cols[c], c, np.int64, lines, source, where) for c in ("step", "layer", "head")}
    floats = {
        c: _to_numeric(cols[c], c, np.float64, lines, source, where, allow_empty=(c == "entropy_norm"))
        for c in ("entropy", "entropy_norm")
    }
    for c in ("split", "kind"):
        empty = [i for i, v in enumerate(cols[c]) if not v]
        if empty:
            raise DataError(f"{source} {where} {lines[empty[0]]}: empty '{c}'; fill it in or remove the row")
    for c in ("layer", "head"):
        a = ints[c]
        bad = np.flatnonzero((a < 0) | (a > _MAX_INDEX))
        if bad.size:
            i = int(bad[0])
            raise DataError(
                f"{source} {where} {lines[i]}: {c} {int(a[i])} is out of range (expected a 0-based "
                f"index below {_MAX_INDEX}); fix or remove the row"
            )
    return EntropyTable(
        step=ints["step"],
        split=np.asarray(cols["split"], dtype=str),
        kind=np.asarray(cols["kind"], dtype=str),
        layer=ints["layer"],
        head=ints["head"],
        entropy=floats["entropy"],
        entropy_norm=floats["entropy_norm"],
        source=source,
    )


def _to_numeric(
    raw: list[str],
    name: str,
    dtype: type,
    lines: list[int],
    source: str,
    where: str,
    allow_empty: bool = False,
) -> np.ndarray:
    """Vectorised conversion; on failure find the first bad cell so the message can name it."""
    is_int = dtype is np.int64
    vals = ["nan" if (allow_empty and v == "") else v for v in raw]
    try:
        if is_int:
            return np.array([int(v) for v in vals], dtype=np.int64)
        return np.asarray(vals, dtype=str).astype(np.float64)
    except (ValueError, OverflowError):
        pass
    conv = int if is_int else float
    for i, v in enumerate(vals):
        try:
            conv(v)
        except (ValueError, OverflowError):
            kind = "an integer" if is_int else "a number"
            shown = repr(one_line(v)) if v else "empty"
            raise DataError(
                f"{source} {where} {lines[i]}: {name} is {shown}, expected {kind}; "
                "fix or remove the row (or regenerate the CSV)"
            ) from None
    raise DataError(f"{source}: column {name} holds values that are not {'integers' if is_int else 'numbers'}")


def as_table(rows: Any) -> EntropyTable:
    """An :class:`EntropyTable` from a table, a CSV path, or records with the CSV's column names."""
    if isinstance(rows, EntropyTable):
        return rows
    if isinstance(rows, (str, Path)):
        return load_entropy_csv(rows)
    return EntropyTable.from_records(rows)


def check_value(value: str) -> None:
    """Raise :class:`ConfigError` unless ``value`` is one of :data:`VALUES`."""
    if value not in VALUES:
        raise ConfigError(f"value {value!r} is not one of {', '.join(VALUES)}; pick one of those")


def check_split_kind(t: EntropyTable, split: str, kind: str | None) -> None:
    """Raise :class:`DataError`, listing what is there, unless ``t`` has rows for ``split`` (and ``kind``)."""
    splits = t.splits()
    if split not in splits:
        raise DataError(f"{t.source} has no rows for split {split!r}; available splits: {', '.join(splits)}")
    if kind is not None:
        kinds = t.kinds(split)
        if kind not in kinds:
            raise DataError(f"{t.source} has no {split} rows for kind {kind!r}; available kinds: {', '.join(kinds)}")


def check_steps(t: EntropyTable, split: str, steps: Iterable[int]) -> list[int]:
    """``steps`` as ints; raise :class:`DataError`, listing the logged steps, if any is not logged for ``split``."""
    avail = t.steps(split)
    aset = set(avail)
    steps = [int(s) for s in steps]
    missing = [s for s in steps if s not in aset]
    if missing:
        raise DataError(
            f"{t.source}: step(s) {', '.join(map(str, missing))} not logged for split {split!r}; "
            f"available steps: {_list_preview(avail)}"
        )
    return steps


# --------------------------------------------------------------------------- slicing


def entropy_matrix(
    rows: EntropyTable | Iterable[Mapping[str, Any]] | str | Path,
    step: int,
    split: str,
    kind: str,
    value: str = "entropy",
) -> np.ndarray:
    """``value`` at (``step``, ``split``, ``kind``) as a float (layers, heads) array.

    The shape is the kind's full size over the whole table, so matrices of different steps
    line up; cells with no row are NaN. Raises :class:`DataError` if the split, kind or
    step is not in the table at all.
    """
    t = as_table(rows)
    check_value(value)
    check_split_kind(t, split, kind)
    check_steps(t, split, [step])
    n_layers, n_heads = t.shape(kind)
    out = np.full((n_layers, n_heads), np.nan, dtype=np.float64)
    m = (t.step == int(step)) & (t.split == split) & (t.kind == kind)
    out[t.layer[m], t.head[m]] = t.values(value)[m]  # later duplicates win
    return out


def entropy_cube(t: EntropyTable, split: str, kind: str, value: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, array[n_steps, layers, heads]) of ``value`` for one split and kind; gaps are NaN."""
    m = (t.split == split) & (t.kind == kind)
    steps = np.unique(t.step[m])
    n_layers, n_heads = t.shape(kind)
    cube = np.full((steps.size, n_layers, n_heads), np.nan, dtype=np.float64)
    cube[np.searchsorted(steps, t.step[m]), t.layer[m], t.head[m]] = t.values(value)[m]
    return steps, cube


def load_importance(path: str | Path) -> dict[tuple[str, str], dict[int, np.ndarray]]:
    """(split, kind) -> step -> (layers, heads) from a record (a resumed run's later rows win)."""
    with Path(path).open(newline="") as f:
        rows = list(csv.DictReader(f))
    shapes: dict[tuple[str, str], tuple[int, int]] = {}
    for r in rows:
        key = (r["split"], r["kind"])
        layers, heads = shapes.get(key, (0, 0))
        shapes[key] = (max(layers, int(r["layer"]) + 1), max(heads, int(r["head"]) + 1))
    out: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    for r in rows:
        key = (r["split"], r["kind"])
        per_step = out.setdefault(key, {})
        step = int(r["step"])
        if step not in per_step:
            per_step[step] = np.full(shapes[key], np.nan)
        per_step[step][int(r["layer"]), int(r["head"])] = float(r["importance"])
    return out

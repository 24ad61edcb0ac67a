"""Plots of per-head attention entropy from a run's ``attention_entropy.csv``.

The training run writes a long-format CSV (one row per step x split x kind x layer x
head)::

    step,split,kind,layer,head,entropy,entropy_norm

This module reads it (:func:`load_entropy_csv`), slices it into layer x head matrices
(:func:`entropy_matrix`) or per-step curves, and draws them with matplotlib's
object-oriented API (``Figure`` + ``FigureCanvasAgg``): no pyplot, no global backend
switch, so it is safe to call from a training process (e.g. a W&B callback that logs
:func:`figure_to_array` output as an image) and on headless machines.

``mha-plot RUN_DIR_OR_CSV`` (:func:`main`) renders every plot into ``RUN_DIR/plots``.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mha_lightning.errors import ConfigError, DataError, UserError

__all__ = [
    "CSV_NAME",
    "COLUMNS",
    "KINDS",
    "SPLITS",
    "VALUES",
    "EntropyTable",
    "load_entropy_csv",
    "entropy_matrix",
    "heatmap_figure",
    "figure_to_png",
    "figure_to_array",
    "plot_entropy_over_steps",
    "render_all",
    "main",
]

CSV_NAME = "attention_entropy.csv"
COLUMNS = ("step", "split", "kind", "layer", "head", "entropy", "entropy_norm")
KINDS = ("enc_self", "dec_self", "cross")
SPLITS = ("train", "val")
VALUES = ("entropy", "entropy_norm")

_VALUE_LABELS = {"entropy": "entropy (nats)", "entropy_norm": "normalised entropy"}
_KIND_LABELS = {
    "enc_self": "encoder self-attention",
    "dec_self": "decoder self-attention",
    "cross": "cross-attention",
}
# Sanity cap on layer/head indices: a corrupt value like 1e9 must not allocate a huge matrix.
_MAX_INDEX = 100_000
_ANNOTATE_MAX = 16  # annotate heatmap cells when both dimensions are <= this
_PNG_DPI = 150


# --------------------------------------------------------------------------- loading


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
    def from_records(
        cls, records: Iterable[Mapping[str, Any]], source: str = "<records>"
    ) -> "EntropyTable":
        """Build a table from dicts with the CSV's column names (values may be str or numbers)."""
        cols: dict[str, list[Any]] = {c: [] for c in COLUMNS}
        for i, rec in enumerate(records):
            missing = [c for c in COLUMNS if c not in rec and c != "entropy_norm"]
            if missing:
                raise DataError(
                    f"{source}: record {i} lacks {', '.join(missing)}; "
                    f"each record needs the keys {', '.join(COLUMNS)}"
                )
            for c in COLUMNS:
                v = rec.get(c, "")
                if isinstance(v, (float, np.floating)) and c in ("step", "layer", "head") and float(v).is_integer():
                    v = int(v)
                cols[c].append("" if v is None else str(v).strip())
        return _build_table(cols, list(range(len(cols["step"]))), source, where="record")

    def splits(self) -> list[str]:
        return _ordered(np.unique(self.split).tolist(), SPLITS)

    def kinds(self, split: str | None = None) -> list[str]:
        sel = self.kind if split is None else self.kind[self.split == split]
        return _ordered(np.unique(sel).tolist(), KINDS)

    def steps(self, split: str | None = None) -> list[int]:
        sel = self.step if split is None else self.step[self.split == split]
        return [int(s) for s in np.unique(sel)]

    def shape(self, kind: str) -> tuple[int, int]:
        """(layers, heads) for ``kind``: 1 + the largest index seen in any step or split."""
        m = self.kind == kind
        if not m.any():
            return (0, 0)
        return int(self.layer[m].max()) + 1, int(self.head[m].max()) + 1

    def values(self, value: str) -> np.ndarray:
        _check_value(value)
        return self.entropy if value == "entropy" else self.entropy_norm


def _ordered(items: Sequence[str], canonical: Sequence[str]) -> list[str]:
    """Items in canonical order first, then any others alphabetically."""
    known = [c for c in canonical if c in items]
    return known + sorted(i for i in items if i not in canonical)


def _short(text: str, limit: int = 40) -> str:
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
        raise DataError(f"{path} is not a UTF-8 text CSV ({_short(str(e), 80)}); pass the {CSV_NAME} of a run") from None
    except OSError as e:
        raise DataError(f"cannot read entropy CSV {path}: {_short(e.strerror or str(e), 80)}") from None

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
                f"expected '{','.join(COLUMNS)}' (got '{_short(','.join(header), 80)}')"
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
            for c, j in zip(COLUMNS, idx):
                cols[c].append(row[j].strip())
            lines.append(reader.line_num)
    except csv.Error as e:
        raise DataError(f"{path} line {reader.line_num}: malformed CSV ({_short(str(e), 80)}); fix or regenerate the file") from None

    if short_row is not None and (data_after_short or text.endswith(("\n", "\r"))):
        line, n = short_row
        raise DataError(
            f"{path} line {line}: {n} field(s) but the header has {len(header)}; "
            "fix or remove that line (was the file truncated or edited?)"
        )
    if not lines:
        raise DataError(
            f"{path} has a header but no data rows; train until entropy is logged, then rerun"
        )
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
            shown = repr(_short(v)) if v else "empty"
            raise DataError(
                f"{source} {where} {lines[i]}: {name} is {shown}, expected {kind}; "
                "fix or remove the row (or regenerate the CSV)"
            ) from None
    raise DataError(f"{source}: column {name} holds values that are not {'integers' if is_int else 'numbers'}")


def _as_table(rows: Any) -> EntropyTable:
    if isinstance(rows, EntropyTable):
        return rows
    if isinstance(rows, (str, Path)):
        return load_entropy_csv(rows)
    return EntropyTable.from_records(rows)


def _check_value(value: str) -> None:
    if value not in VALUES:
        raise ConfigError(f"value {value!r} is not one of {', '.join(VALUES)}; pick one of those")


def _check_split_kind(t: EntropyTable, split: str, kind: str | None) -> None:
    splits = t.splits()
    if split not in splits:
        raise DataError(
            f"{t.source} has no rows for split {split!r}; available splits: {', '.join(splits)}"
        )
    if kind is not None:
        kinds = t.kinds(split)
        if kind not in kinds:
            raise DataError(
                f"{t.source} has no {split} rows for kind {kind!r}; available kinds: {', '.join(kinds)}"
            )


def _check_steps(t: EntropyTable, split: str, steps: Iterable[int]) -> list[int]:
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
    t = _as_table(rows)
    _check_value(value)
    _check_split_kind(t, split, kind)
    _check_steps(t, split, [step])
    n_layers, n_heads = t.shape(kind)
    out = np.full((n_layers, n_heads), np.nan, dtype=np.float64)
    m = (t.step == int(step)) & (t.split == split) & (t.kind == kind)
    out[t.layer[m], t.head[m]] = t.values(value)[m]  # later duplicates win
    return out


def _cube(t: EntropyTable, split: str, kind: str, value: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, array[n_steps, layers, heads]) of ``value`` for one split and kind."""
    m = (t.split == split) & (t.kind == kind)
    steps = np.unique(t.step[m])
    n_layers, n_heads = t.shape(kind)
    cube = np.full((steps.size, n_layers, n_heads), np.nan, dtype=np.float64)
    cube[np.searchsorted(steps, t.step[m]), t.layer[m], t.head[m]] = t.values(value)[m]
    return steps, cube


# --------------------------------------------------------------------------- figures


def _new_figure(figsize: tuple[float, float]) -> Figure:
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)  # attach a headless canvas; no pyplot, no global state
    return fig


def _fmt_cell(v: float) -> str:
    if not math.isfinite(v):
        return "–"
    return f"{v:.2f}" if abs(v) < 100 else f"{v:.0f}"


def _tick_step(n: int, max_labels: int = 32) -> int:
    return max(1, math.ceil(n / max_labels))


def heatmap_figure(
    matrix: np.ndarray,
    title: str,
    value_label: str,
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str = "viridis",
) -> Figure:
    """Layer x head heatmap: rows L0.., columns H0.., a colorbar labelled ``value_label``.

    Cells hold their value when the grid is at most 16 x 16; NaN cells are grey.
    """
    a = np.asarray(matrix, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"heatmap_figure needs a non-empty 2-D (layers, heads) matrix, got shape {a.shape}")
    n_layers, n_heads = a.shape
    annotate = n_layers <= _ANNOTATE_MAX and n_heads <= _ANNOTATE_MAX

    if annotate:
        cell_w = 0.75 if n_heads <= 8 else 0.6
        cell_h = 0.5 if n_layers <= 8 else 0.4
    else:
        cell_w = min(0.5, max(0.12, 10.0 / n_heads))
        cell_h = min(0.4, max(0.1, 8.0 / n_layers))
    width = min(18.0, max(5.0, 2.2 + n_heads * cell_w))
    height = min(14.0, max(3.0, 1.5 + n_layers * cell_h))
    fig = _new_figure((width, height))
    ax = fig.add_subplot()

    finite = a[np.isfinite(a)]
    if finite.size == 0:  # nothing to scale by: pick a harmless range
        vmin = 0.0 if vmin is None else vmin
        vmax = 1.0 if vmax is None else vmax
    import matplotlib as mpl

    cm = mpl.colormaps[cmap].with_extremes(bad="#d9d9d9")
    im = ax.imshow(np.ma.masked_invalid(a), cmap=cm, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    cbar = fig.colorbar(im, ax=ax, fraction=0.08 if n_heads > 4 else 0.12, pad=0.03)
    cbar.set_label(value_label)

    tick_fs = 9 if max(n_layers, n_heads) <= 16 else 7
    xs = range(0, n_heads, _tick_step(n_heads))
    ys = range(0, n_layers, _tick_step(n_layers))
    ax.set_xticks(list(xs), [f"H{i}" for i in xs], fontsize=tick_fs)
    ax.set_yticks(list(ys), [f"L{i}" for i in ys], fontsize=tick_fs)
    ax.tick_params(length=0)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=11)
    # thin white grid between cells
    ax.set_xticks(np.arange(-0.5, n_heads, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, n_layers, 1), minor=True)
    ax.grid(which="minor", color="white", linewidth=1.0 if annotate else 0.3)
    ax.tick_params(which="minor", length=0)
    for s in ax.spines.values():
        s.set_visible(False)

    if annotate:
        fs = 9 if n_heads <= 8 else 7
        for i in range(n_layers):
            for j in range(n_heads):
                v = a[i, j]
                if math.isfinite(v):
                    r, g, b, _ = cm(im.norm(v))
                    color = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
                else:
                    color = "#555555"
                ax.text(j, i, _fmt_cell(v), ha="center", va="center", fontsize=fs, color=color)
    return fig


def figure_to_png(fig: Figure, path: str | Path, dpi: int = _PNG_DPI) -> Path:
    """Save ``fig`` as a PNG at ``path`` (parent folders are created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=dpi, facecolor="white")
    return path


def figure_to_array(fig: Figure, dpi: int | None = None) -> np.ndarray:
    """Render ``fig`` to an (H, W, 3) uint8 RGB array (e.g. for ``wandb.Image``)."""
    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    old_dpi = fig.dpi
    if dpi is not None:
        fig.set_dpi(dpi)
    try:
        fig.canvas.draw()
        rgba = np.asarray(fig.canvas.buffer_rgba())
        return np.ascontiguousarray(rgba[..., :3], dtype=np.uint8)
    finally:
        if dpi is not None:
            fig.set_dpi(old_dpi)


def _head_colors(n_heads: int) -> list[Any]:
    import matplotlib as mpl

    if n_heads <= 10:
        return [mpl.colormaps["tab10"](i) for i in range(n_heads)]
    if n_heads <= 20:
        return [mpl.colormaps["tab20"](i) for i in range(n_heads)]
    cm = mpl.colormaps["viridis"]
    return [cm(i / max(1, n_heads - 1)) for i in range(n_heads)]


def plot_entropy_over_steps(
    rows: EntropyTable | Iterable[Mapping[str, Any]] | str | Path,
    kind: str,
    split: str = "train",
    value: str = "entropy",
) -> Figure:
    """One subplot per layer, one line per head: ``value`` against training step.

    Subplots share the y axis; heads are told apart by colour (a legend up to 20 heads,
    a colorbar of head index beyond that).
    """
    t = _as_table(rows)
    _check_value(value)
    _check_split_kind(t, split, kind)
    steps, cube = _cube(t, split, kind, value)
    _, n_layers, n_heads = cube.shape

    ncols = min(3, n_layers)
    nrows = math.ceil(n_layers / ncols)
    legend_w = 0 if n_heads > 20 else (1.0 if n_heads <= 10 else 1.7)
    fig = _new_figure((min(18.0, ncols * 4.0 + legend_w + 0.6), min(20.0, nrows * 2.7 + 0.8)))
    axes = fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False)
    colors = _head_colors(n_heads)
    marker = "o" if steps.size <= 25 else None

    for layer in range(nrows * ncols):
        ax = axes[layer // ncols][layer % ncols]
        if layer >= n_layers:
            ax.set_visible(False)
            continue
        for h in range(n_heads):
            y = cube[:, layer, h]
            ok = np.isfinite(y)
            ax.plot(steps[ok], y[ok], color=colors[h], lw=1.4, marker=marker, ms=3, label=f"H{h}")
        if not np.isfinite(cube[:, layer, :]).any():
            ax.text(0.5, 0.5, "no finite values", transform=ax.transAxes, ha="center", va="center", color="grey")
        ax.set_title(f"L{layer}", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
        ax.tick_params(labelsize=8)
        # the last subplot in each column gets the x label (hidden subplots below don't)
        if layer + ncols >= n_layers:
            ax.set_xlabel("step")
            ax.xaxis.set_tick_params(labelbottom=True)
        if layer % ncols == 0:
            ax.set_ylabel(_VALUE_LABELS[value], fontsize=9)

    ax0 = axes[0][0]
    if value == "entropy_norm":
        ax0.set_ylim(-0.02, 1.02)
    elif not np.isfinite(cube).any():
        ax0.set_ylim(0.0, 1.0)
    else:
        lo = float(np.nanmin(cube))
        ax0.set_ylim(bottom=min(0.0, lo))  # entropy is >= 0: anchor the axis at 0
    if steps.size == 1:
        ax0.set_xlim(steps[0] - 1, steps[0] + 1)

    if n_heads <= 20:
        handles, labels = ax0.get_legend_handles_labels()
        fig.legend(
            handles,
            labels,
            loc="outside right upper",
            ncols=1 if n_heads <= 10 else 2,
            fontsize=8,
            title="head",
            title_fontsize=9,
            frameon=False,
            handlelength=1.5,
            columnspacing=0.8,
        )
    else:
        import matplotlib as mpl

        sm = mpl.cm.ScalarMappable(cmap="viridis", norm=mpl.colors.Normalize(0, n_heads - 1))
        fig.colorbar(sm, ax=axes.ravel().tolist(), label="head", fraction=0.03)
    fig.suptitle(f"{_KIND_LABELS.get(kind, kind)} — {_VALUE_LABELS[value]} per head ({split})", fontsize=12)
    return fig


# --------------------------------------------------------------------------- render / CLI


def render_all(
    csv_path: str | Path,
    out_dir: str | Path,
    steps: Sequence[int] | None = None,
    split: str = "train",
    value: str = "entropy",
) -> list[Path]:
    """Write every plot for ``split``/``value`` into ``out_dir`` (created); returns the paths.

    Per kind: ``curves_{kind}_{split}_{value}.png`` and one
    ``heatmap_{kind}_{split}_{value}_step{N}.png`` per step in ``steps`` (default: the
    first and last step logged). Heatmaps of one kind share a colour scale so the steps
    compare directly. Everything is validated before anything is written.
    """
    t = load_entropy_csv(csv_path)
    _check_value(value)
    _check_split_kind(t, split, None)
    avail = t.steps(split)
    if steps is None or len(steps) == 0:
        chosen = sorted({avail[0], avail[-1]})
    else:
        chosen = list(dict.fromkeys(_check_steps(t, split, steps)))  # dedupe, keep order

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create output directory {out}: {_short(e.strerror or str(e), 80)}; pass a writable --out") from None

    written: list[Path] = []
    for kind in t.kinds(split):
        mats = {s: entropy_matrix(t, s, split, kind, value) for s in chosen}
        if value == "entropy_norm":
            vmin, vmax = 0.0, 1.0
        else:
            stacked = np.stack(list(mats.values()))
            fin = stacked[np.isfinite(stacked)]
            vmin, vmax = (float(fin.min()), float(fin.max())) if fin.size else (None, None)
        jobs: list[tuple[Figure, Path]] = [
            (plot_entropy_over_steps(t, kind, split, value), out / f"curves_{kind}_{split}_{value}.png")
        ]
        for s, m in mats.items():
            title = f"{_KIND_LABELS.get(kind, kind)} — {split}, step {s}"
            jobs.append(
                (heatmap_figure(m, title, _VALUE_LABELS[value], vmin=vmin, vmax=vmax),
                 out / f"heatmap_{kind}_{split}_{value}_step{s}.png")
            )
        for fig, p in jobs:
            try:
                written.append(figure_to_png(fig, p))
            except OSError as e:
                raise ConfigError(f"cannot write {p}: {_short(e.strerror or str(e), 80)}; pass a writable --out") from None
    return written


def _resolve_csv(target: Path) -> Path:
    if target.is_dir():
        csv_path = target / CSV_NAME
        if not csv_path.is_file():
            raise DataError(
                f"run directory {target} has no {CSV_NAME}; pass the directory of a run that has "
                "logged attention entropy, or the CSV path itself"
            )
        return csv_path
    if not target.exists():
        raise DataError(f"{target} does not exist; pass a run directory or its {CSV_NAME}")
    return target


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mha-plot",
        description="Plot per-head attention entropy (curves over steps and layer x head heatmaps) "
        f"from a run's {CSV_NAME}.",
    )
    p.add_argument("run", metavar="RUN_DIR_OR_CSV", help=f"run directory containing {CSV_NAME}, or the CSV itself")
    p.add_argument("--out", metavar="DIR", help="output directory (default: <run_dir>/plots)")
    p.add_argument(
        "--steps", nargs="+", type=int, metavar="N",
        help="steps to draw heatmaps for (default: first and last logged step)",
    )
    p.add_argument("--split", choices=SPLITS, default="train", help="which split's entropy to plot (default: train)")
    p.add_argument("--value", choices=VALUES, default="entropy",
                   help="raw entropy in nats, or entropy normalised to [0, 1] (default: entropy)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``mha-plot`` entry point; returns the process exit status (2 on a user error)."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help or a usage error (argparse already printed it)
        return e.code if isinstance(e.code, int) else 2
    try:
        target = Path(args.run)
        csv_path = _resolve_csv(target)
        out = Path(args.out) if args.out else (target if target.is_dir() else csv_path.parent) / "plots"
        paths = render_all(csv_path, out, steps=args.steps, split=args.split, value=args.value)
    except UserError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

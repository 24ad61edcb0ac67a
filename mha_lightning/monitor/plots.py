"""Plots of per-head attention entropy: the record's numbers drawn as pictures.

The numbers come from a run's entropy record (``attention_entropy.csv``), which
:mod:`mha_lightning.monitor.record` writes and reads; this module only draws. Figures use
matplotlib's object-oriented API (``Figure`` + ``FigureCanvasAgg``): no pyplot, no global
backend switch, so it is safe to call from a training process and on headless machines.
:func:`heatmap_array` is the exception that needs no figure at all: a numpy-only image
cheap enough for the training callback to send to W&B at every logging interval.

``mha-plot RUN_DIR_OR_CSV`` (:func:`main`) renders every plot into ``RUN_DIR/plots``.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mha_lightning.errors import ConfigError, DataError, exit_on_user_error
from mha_lightning.kinds import KIND_LABELS
from mha_lightning.monitor.record import (
    CSV_NAME,
    IMPORTANCE_CSV,
    SPLITS,
    VALUES,
    EntropyTable,
    as_table,
    check_split_kind,
    check_steps,
    check_value,
    entropy_cube,
    entropy_matrix,
    load_entropy_csv,
    load_importance,
    one_line,
    record_path,
)

__all__ = [
    "heatmap_array",
    "heatmap_figure",
    "heatmap_panel",
    "figure_to_png",
    "figure_to_array",
    "plot_entropy_over_steps",
    "render_all",
    "main",
]
_VALUE_LABELS = {"entropy": "entropy (nats)", "entropy_norm": "normalised entropy"}
_ANNOTATE_MAX = 16  # annotate heatmap cells when both dimensions are <= this
_PNG_DPI = 150


# --------------------------------------------------------------------------- figures


def new_figure(figsize: tuple[float, float]) -> Figure:
    """A constrained-layout figure on a headless Agg canvas (what every PNG of the package is drawn on)."""
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)  # attach a headless canvas; no pyplot, no global state
    return fig


def _fmt_cell(v: float) -> str:
    if not math.isfinite(v):
        return "–"
    return f"{v:.2f}" if abs(v) < 100 else f"{v:.0f}"


def _tick_step(n: int, max_labels: int = 32) -> int:
    return max(1, math.ceil(n / max_labels))


_VIRIDIS: np.ndarray | None = None  # viridis as a (256, 3) uint8 lookup table, built on first use


def heatmap_array(values: np.ndarray, cell: int = 24) -> np.ndarray:
    """(layers, heads) in [0, 1] -> (layers*cell, heads*cell, 3) uint8 viridis image, NaN grey.

    Built with numpy alone: cheap enough to send at every logging interval (matplotlib
    figures with labels are drawn by `mha-plot` and at the end of training)."""
    global _VIRIDIS
    if _VIRIDIS is None:
        from matplotlib import colormaps

        _VIRIDIS = (colormaps["viridis"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)
    idx = (np.clip(np.nan_to_num(values, nan=0.0), 0, 1) * 255).astype(int)
    rgb = _VIRIDIS[idx]
    rgb[np.isnan(values)] = 128
    return np.kron(rgb, np.ones((cell, cell, 1), dtype=np.uint8))


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
    a = _layer_head_matrix(matrix)
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
    fig = new_figure((width, height))
    ax = fig.add_subplot()
    im = heatmap_panel(ax, a, vmin, vmax, cmap)
    cbar = fig.colorbar(im, ax=ax, fraction=0.08 if n_heads > 4 else 0.12, pad=0.03)
    cbar.set_label(value_label)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=11)
    return fig


def _layer_head_matrix(matrix: np.ndarray) -> np.ndarray:
    a = np.asarray(matrix, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"a heatmap needs a non-empty 2-D (layers, heads) matrix, got shape {a.shape}")
    return a


def heatmap_panel(ax: Any, matrix: np.ndarray, vmin: float | None, vmax: float | None, cmap: str = "viridis") -> Any:
    """Draw a layer x head heatmap into ``ax`` (ticks L0.., H0..; values in the cells of grids up to
    16 x 16; NaN grey) -> the image, for a colorbar. Several panels can share one figure."""
    a = _layer_head_matrix(matrix)
    n_layers, n_heads = a.shape
    annotate = n_layers <= _ANNOTATE_MAX and n_heads <= _ANNOTATE_MAX
    if not np.isfinite(a).any():  # nothing to scale by: pick a harmless range
        vmin = 0.0 if vmin is None else vmin
        vmax = 1.0 if vmax is None else vmax
    import matplotlib as mpl

    cm = mpl.colormaps[cmap].with_extremes(bad="#d9d9d9")
    im = ax.imshow(np.ma.masked_invalid(a), cmap=cm, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    tick_fs = 9 if max(n_layers, n_heads) <= 16 else 7
    xs = range(0, n_heads, _tick_step(n_heads))
    ys = range(0, n_layers, _tick_step(n_layers))
    ax.set_xticks(list(xs), [f"H{i}" for i in xs], fontsize=tick_fs)
    ax.set_yticks(list(ys), [f"L{i}" for i in ys], fontsize=tick_fs)
    ax.tick_params(length=0)
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
                ax.text(j, i, _fmt_cell(v), ha="center", va="center", fontsize=fs, color=color, in_layout=False)
    return im


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
    t = as_table(rows)
    check_value(value)
    check_split_kind(t, split, kind)
    steps, cube = entropy_cube(t, split, kind, value)
    _, n_layers, n_heads = cube.shape

    ncols = min(3, n_layers)
    nrows = math.ceil(n_layers / ncols)
    legend_w = 0 if n_heads > 20 else (1.0 if n_heads <= 10 else 1.7)
    fig = new_figure((min(18.0, ncols * 4.0 + legend_w + 0.6), min(20.0, nrows * 2.7 + 0.8)))
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
    fig.suptitle(f"{KIND_LABELS.get(kind, kind)} — {_VALUE_LABELS[value]} per head ({split})", fontsize=12)
    return fig


def plot_heads_over_training(
    rows: EntropyTable | str | Path,
    importance: Mapping[tuple[str, str], Mapping[int, np.ndarray]] | None = None,
    split: str = "val",
) -> Figure:
    """Per attention kind (a row each): every layer's normalised entropy over steps, the mean across its
    heads as a line and their range shaded, and beside it the heads' importance the same way (where the
    run measured it: ``monitor.importance.load_importance``). Does an attention sharpen, do heads collapse,
    when do they become important."""
    t = as_table(rows)
    check_split_kind(t, split, None)
    kinds = t.kinds(split)
    columns = [("entropy_norm", "normalised entropy")]
    if importance and any((split, kind) in importance for kind in kinds):
        columns.append(("importance", "importance (mean |dL/d gate|)"))
    fig = new_figure((0.8 + 5.0 * len(columns), 0.6 + 2.8 * len(kinds)))
    axes = fig.subplots(len(kinds), len(columns), sharex=True, squeeze=False)
    for row, kind in enumerate(kinds):
        steps, cube = entropy_cube(t, split, kind, "entropy_norm")
        per_value = {"entropy_norm": (steps, cube)}
        if len(columns) > 1 and (split, kind) in importance:
            by_step = importance[(split, kind)]
            order = sorted(by_step)
            per_value["importance"] = (np.asarray(order), np.stack([by_step[s] for s in order]))
        for col, (value, label) in enumerate(columns):
            ax = axes[row][col]
            if value not in per_value:
                ax.set_visible(False)
                continue
            x, values = per_value[value]  # (steps, layers, heads)
            colors = _head_colors(values.shape[1])
            for layer in range(values.shape[1]):
                with np.errstate(all="ignore"):
                    mean = np.nanmean(values[:, layer], axis=1)
                    lo, hi = np.nanmin(values[:, layer], axis=1), np.nanmax(values[:, layer], axis=1)
                ax.plot(x, mean, color=colors[layer], lw=1.5, label=f"L{layer}")
                ax.fill_between(x, lo, hi, color=colors[layer], alpha=0.15, lw=0)
            ax.grid(True, alpha=0.3)
            ax.tick_params(labelsize=8)
            if value == "entropy_norm":
                ax.set_ylim(-0.02, 1.02)
            else:
                ax.set_ylim(bottom=0.0)
            if row == 0:
                ax.set_title(label, fontsize=10)
            if col == 0:
                ax.set_ylabel(KIND_LABELS.get(kind, kind), fontsize=9)
                ax.legend(fontsize=7, title="layer (range: its heads)", title_fontsize=7, frameon=False)
            if row == len(kinds) - 1:
                ax.set_xlabel("step")
    fig.suptitle(f"Heads over training ({split} probe set): mean across each layer's heads, range shaded", fontsize=11)
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
    check_value(value)
    check_split_kind(t, split, None)
    avail = t.steps(split)
    if steps is None or len(steps) == 0:
        chosen = sorted({avail[0], avail[-1]})
    else:
        chosen = list(dict.fromkeys(check_steps(t, split, steps)))  # dedupe, keep order

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"cannot create output directory {out}: {one_line(e.strerror or str(e), 80)}; pass a writable --out"
        ) from None

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
            title = f"{KIND_LABELS.get(kind, kind)} — {split}, step {s}"
            jobs.append(
                (
                    heatmap_figure(m, title, _VALUE_LABELS[value], vmin=vmin, vmax=vmax),
                    out / f"heatmap_{kind}_{split}_{value}_step{s}.png",
                )
            )
        written += _write_all(jobs)
    importance = Path(csv_path).with_name(IMPORTANCE_CSV)
    if split == "val" and importance.is_file():  # the run measured every head's importance on the probe set too
        jobs = [(plot_heads_over_training(t, load_importance(importance), split), out / f"over_training_{split}.png")]
        written += _write_all(jobs)
    return written


def _write_all(jobs: Iterable[tuple[Figure, Path]]) -> list[Path]:
    written = []
    for fig, p in jobs:
        try:
            written.append(figure_to_png(fig, p))
        except OSError as e:
            raise ConfigError(
                f"cannot write {p}: {one_line(e.strerror or str(e), 80)}; pass a writable --out"
            ) from None
    return written


def _resolve_csv(target: Path) -> Path:
    if target.is_dir():
        csv_path = record_path(target)
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
        "--steps",
        nargs="+",
        type=int,
        metavar="N",
        help="steps to draw heatmaps for (default: first and last logged step)",
    )
    p.add_argument("--split", choices=SPLITS, default="train", help="which split's entropy to plot (default: train)")
    p.add_argument(
        "--value",
        choices=VALUES,
        default="entropy",
        help="raw entropy in nats, or entropy normalised to [0, 1] (default: entropy)",
    )
    return p


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> int:
    """``mha-plot`` entry point; returns the process exit status (2 on a user error)."""
    args = _build_parser().parse_args(argv)
    target = Path(args.run)
    csv_path = _resolve_csv(target)
    out = Path(args.out) if args.out else (target if target.is_dir() else csv_path.parent) / "plots"
    paths = render_all(csv_path, out, steps=args.steps, split=args.split, value=args.value)
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

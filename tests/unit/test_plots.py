"""Tests for the entropy record (mha_lightning.monitor.record: writing, loading, slicing) and its
plots (mha_lightning.monitor.plots: figures, the W&B heatmap image, mha-plot CLI)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from mha_lightning.errors import DataError
from mha_lightning.monitor import plots, record
from mha_lightning.monitor.plots import (
    figure_to_array,
    figure_to_png,
    heatmap_array,
    heatmap_figure,
    main,
    plot_entropy_over_steps,
    render_all,
)
from mha_lightning.monitor.record import CSV_NAME, append_rows, entropy_matrix, load_entropy_csv, record_path

KINDS = ("enc_self", "dec_self", "cross")
SPLITS = ("train", "val")
STEPS = (100, 300, 500)
LAYERS, HEADS = 2, 4
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _value(step: int, split: str, kind: str, layer: int, head: int) -> tuple[float, float]:
    """Deterministic, distinct entropy per cell (exactly representable in the CSV via repr)."""
    k = KINDS.index(kind)
    s = SPLITS.index(split)
    ent = 0.5 + 0.37 * head + 0.11 * layer + 0.05 * k + 0.013 * s + step / 1000.0
    norm = ent / 4.0
    return ent, norm


def _write_csv(path: Path, *, norm_empty_for: tuple | None = None) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "split", "kind", "layer", "head", "entropy", "entropy_norm"])
        for step in STEPS:
            for split in SPLITS:
                for kind in KINDS:
                    for layer in range(LAYERS):
                        for head in range(HEADS):
                            ent, norm = _value(step, split, kind, layer, head)
                            norm_s = "" if norm_empty_for == (step, split, kind, layer, head) else repr(norm)
                            w.writerow([step, split, kind, layer, head, repr(ent), norm_s])
    return path


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    d = tmp_path / "run"
    d.mkdir()
    _write_csv(d / CSV_NAME, norm_empty_for=(500, "val", "cross", 1, 3))
    return d


def _check_png(path: Path, min_w: int = 300, min_h: int = 200) -> np.ndarray:
    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG"
        w, h = im.size
        arr = np.asarray(im.convert("RGB"))
    assert w >= min_w and h >= min_h, (path.name, w, h)
    assert w <= 4000 and h <= 4000, (path.name, w, h)
    assert arr.reshape(-1, 3).std(axis=0).max() > 5, f"{path.name} is a uniform colour"
    assert len(np.unique(arr.reshape(-1, 3), axis=0)) > 20, f"{path.name} has almost no colours"
    return arr


def _one_line_error(capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# --------------------------------------------------------------------------- loading / slicing


def test_load_and_entropy_matrix_exact(run_dir: Path) -> None:
    t = load_entropy_csv(run_dir / CSV_NAME)
    assert len(t) == len(STEPS) * len(SPLITS) * len(KINDS) * LAYERS * HEADS
    assert t.splits() == ["train", "val"]
    assert t.kinds() == list(KINDS)
    assert t.steps("train") == list(STEPS)
    assert t.shape("cross") == (LAYERS, HEADS)
    for step in (100, 500):
        for split in SPLITS:
            for kind in KINDS:
                m = entropy_matrix(t, step, split, kind)
                n = entropy_matrix(t, step, split, kind, value="entropy_norm")
                assert m.shape == (LAYERS, HEADS) and m.dtype == np.float64
                for layer in range(LAYERS):
                    for head in range(HEADS):
                        ent, norm = _value(step, split, kind, layer, head)
                        assert m[layer, head] == ent  # exact: repr round-trips floats
                        if (step, split, kind, layer, head) == (500, "val", "cross", 1, 3):
                            assert math.isnan(n[layer, head])  # empty entropy_norm -> NaN
                        else:
                            assert n[layer, head] == norm


def test_entropy_matrix_missing_cells_are_nan_and_records_accepted() -> None:
    recs = [
        {"step": 10, "split": "train", "kind": "enc_self", "layer": 0, "head": 0, "entropy": 1.5, "entropy_norm": 0.5},
        {"step": 10, "split": "train", "kind": "enc_self", "layer": 1, "head": 2, "entropy": 2.5, "entropy_norm": None},
        {"step": 20, "split": "train", "kind": "enc_self", "layer": 0, "head": 1, "entropy": 0.25, "entropy_norm": 0.1},
    ]
    m = entropy_matrix(recs, 10, "train", "enc_self")
    assert m.shape == (2, 3)
    assert m[0, 0] == 1.5 and m[1, 2] == 2.5
    assert np.isnan(m[0, 1]) and np.isnan(m[1, 0]) and np.isnan(m[0, 2])
    assert np.isnan(entropy_matrix(recs, 10, "train", "enc_self", "entropy_norm")[1, 2])
    with pytest.raises(DataError, match="available steps: 10, 20"):
        entropy_matrix(recs, 15, "train", "enc_self")
    with pytest.raises(DataError, match="available kinds: enc_self"):
        entropy_matrix(recs, 10, "train", "cross")
    with pytest.raises(DataError, match="available splits: train"):
        entropy_matrix(recs, 10, "val", "enc_self")


@pytest.mark.parametrize(
    ("content", "needles"),
    [
        ("step,split,kind,layer,head,entropy\n1,train,cross,0,0,1.0,\n", ["entropy_norm", "line 1"]),
        (
            "step,split,kind,layer,head,entropy,entropy_norm\n1,train,cross,0,0,abc,0.5\n",
            ["line 2", "'abc'", "entropy"],
        ),
        (
            "step,split,kind,layer,head,entropy,entropy_norm\n1,train,cross,x,0,1.0,0.5\n",
            ["line 2", "layer", "integer"],
        ),
        ("step,split,kind,layer,head,entropy,entropy_norm\n1,train,cross,0,-1,1.0,0.5\n", ["line 2", "head -1"]),
        ("step,split,kind,layer,head,entropy,entropy_norm\n", ["no data rows"]),
        ("", ["is empty"]),
        (
            "step,split,kind,layer,head,entropy,entropy_norm\n1,train,cross,0,0\n2,train,cross,0,0,1.0,0.5\n",
            ["line 2", "field"],
        ),
    ],
)
def test_load_errors_name_file_and_line(tmp_path: Path, content: str, needles: list[str]) -> None:
    p = tmp_path / "bad.csv"
    p.write_text(content)
    with pytest.raises(DataError) as ei:
        load_entropy_csv(p)
    msg = str(ei.value)
    assert "\n" not in msg
    assert str(p) in msg
    for n in needles:
        assert n in msg, (n, msg)


def test_load_skips_truncated_last_line_of_a_run_still_writing(tmp_path: Path) -> None:
    p = tmp_path / CSV_NAME
    p.write_text(
        "step,split,kind,layer,head,entropy,entropy_norm\n"
        "1,train,cross,0,0,1.0,0.5\n"
        "1,train,cross,0,1,2.0,0.7\n"
        "2,train,cro"
    )
    t = load_entropy_csv(p)
    assert len(t) == 2
    with pytest.raises(DataError, match="line 4"):
        p.write_text(p.read_text() + "\n")  # newline-terminated: really corrupt
        load_entropy_csv(p)


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_entropy_csv(tmp_path / "nope.csv")


def test_writer_round_trips_through_the_reader(tmp_path: Path) -> None:
    """What the training callback appends reads back exactly: values, NaN norms, steps, splits."""
    rng = np.random.default_rng(1)
    layers = {"enc_self": 2, "dec_self": 3, "cross": 3}  # kinds may differ in depth
    written = {}  # (step, split) -> {kind: (entropy, normalised)}
    for step, split in [(0, "train"), (5, "train"), (5, "val"), (10, "train")]:
        values = {}
        for kind, n_layers in layers.items():
            # whole millionths (the 6 decimals the record stores): n / 1e6 is the double nearest
            # the decimal, as the reader parses it, so equality below is exact
            ent = rng.integers(0, 3_000_000, size=(n_layers, HEADS)) / 1e6
            norm = rng.integers(0, 1_000_001, size=(n_layers, HEADS)) / 1e6
            norm[0, HEADS - 1] = np.nan  # a head whose queries each see a single key
            values[kind] = (ent, norm)
        written[(step, split)] = values
    path = record_path(tmp_path / "new" / "run")  # the writer creates missing folders
    assert path == tmp_path / "new" / "run" / CSV_NAME
    for (step, split), values in written.items():
        append_rows(path, split, step, values)

    assert path.read_text().count("step,split,kind") == 1  # header written once, on creation
    t = load_entropy_csv(path)
    assert len(t) == sum(n * HEADS for n in layers.values()) * len(written)
    assert t.splits() == ["train", "val"]
    assert t.steps("train") == [0, 5, 10] and t.steps("val") == [5]
    assert t.kinds() == list(KINDS)
    for (step, split), values in written.items():
        for kind, (ent, norm) in values.items():
            assert t.shape(kind) == ent.shape
            np.testing.assert_array_equal(entropy_matrix(t, step, split, kind, "entropy"), ent)
            got = entropy_matrix(t, step, split, kind, "entropy_norm")
            np.testing.assert_array_equal(got, norm)  # NaN where NaN, equal elsewhere
            assert np.isnan(got[0, HEADS - 1])


# --------------------------------------------------------------------------- figures


def test_heatmap_array_is_a_numpy_image_with_grey_nan() -> None:
    norm = np.array([[0.0, 0.5, 1.0], [np.nan, 2.0, -1.0]])  # out-of-range values clip to the ends
    img = heatmap_array(norm, cell=4)
    assert img.dtype == np.uint8 and img.shape == (2 * 4, 3 * 4, 3)
    cells = img[::4, ::4]
    assert (img == np.kron(cells, np.ones((4, 4, 1), dtype=np.uint8))).all()  # solid cells
    assert (cells[1, 0] == 128).all()  # NaN -> grey
    assert (cells[1, 1] == cells[0, 2]).all() and (cells[1, 2] == cells[0, 0]).all()
    assert not (cells[0, 0] == cells[0, 1]).all() and not (cells[0, 1] == cells[0, 2]).all()


def test_heatmap_and_figure_to_array(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    m = rng.uniform(0, 3, size=(6, 8))
    m[2, 5] = np.nan
    fig = heatmap_figure(m, "enc_self step 100", "entropy (nats)")
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == [f"H{i}" for i in range(8)]
    assert [t.get_text() for t in ax.get_yticklabels()] == [f"L{i}" for i in range(6)]
    assert len(ax.texts) == 48  # every cell annotated (NaN shows a dash)
    assert len(fig.axes) == 2  # heatmap + colorbar
    arr = figure_to_array(fig)
    assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3
    w, h = fig.get_size_inches() * fig.dpi
    assert arr.shape[:2] == (round(h), round(w))
    assert arr.reshape(-1, 3).std(axis=0).max() > 5
    arr2 = figure_to_array(fig, dpi=50)
    assert arr2.shape[0] < arr.shape[0] and fig.dpi == 100  # dpi restored
    _check_png(figure_to_png(fig, tmp_path / "sub" / "h.png"))

    big = heatmap_figure(rng.uniform(size=(24, 32)), "big", "entropy")
    assert len(big.axes[0].texts) == 0  # too big to annotate
    assert figure_to_array(big).shape[2] == 3
    with pytest.raises(ValueError):
        heatmap_figure(np.zeros(5), "x", "y")
    # The NaN cell reads as a dash, not a number.
    assert ax.texts[2 * 8 + 5].get_text() == "–"
    assert all(t.get_text() != "–" for k, t in enumerate(ax.texts) if k != 2 * 8 + 5)
    # An all-NaN matrix still renders: every cell a dash, drawn in the grey reserved for NaN (#d9d9d9).
    nan_fig = heatmap_figure(np.full((2, 2), np.nan), "nan", "entropy")
    assert [t.get_text() for t in nan_fig.axes[0].texts] == ["–"] * 4
    nan_arr = figure_to_array(nan_fig)
    assert nan_arr.ndim == 3
    assert (nan_arr == [217, 217, 217]).all(-1).mean() > 0.3  # a large grey block, not a blank figure


def test_plot_entropy_over_steps(run_dir: Path) -> None:
    t = load_entropy_csv(run_dir / CSV_NAME)
    fig = plot_entropy_over_steps(t, "dec_self", "val", "entropy")
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == LAYERS
    for layer, ax in enumerate(visible):
        assert ax.get_title() == f"L{layer}"
        assert len(ax.lines) == HEADS
        for head, line in enumerate(ax.lines):
            assert list(line.get_xdata()) == list(STEPS)
            assert list(line.get_ydata()) == [_value(s, "val", "dec_self", layer, head)[0] for s in STEPS]
    assert visible[0].get_shared_y_axes().joined(visible[0], visible[1])
    assert len(fig.legends) == 1
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [f"H{h}" for h in range(HEADS)]
    fig_n = plot_entropy_over_steps(t, "cross", "train", "entropy_norm")
    assert fig_n.axes[0].get_ylim() == pytest.approx((-0.02, 1.02))
    assert figure_to_array(fig_n).dtype == np.uint8


# --------------------------------------------------------------------------- render_all / CLI


def test_render_all_default_steps(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "deep" / "plots"
    paths = render_all(run_dir / CSV_NAME, out)
    expected = set()
    for kind in KINDS:
        expected.add(out / f"curves_{kind}_train_entropy.png")
        for s in (100, 500):  # first and last
            expected.add(out / f"heatmap_{kind}_train_entropy_step{s}.png")
    assert set(paths) == expected and len(paths) == len(expected)
    for p in paths:
        _check_png(p)


def test_main_with_run_dir_and_options(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main([str(run_dir), "--steps", "300", "--split", "val", "--value", "entropy_norm"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    printed = [Path(line) for line in out.splitlines()]
    plots_dir = run_dir / "plots"
    assert set(printed) == {
        *(plots_dir / f"curves_{k}_val_entropy_norm.png" for k in KINDS),
        *(plots_dir / f"heatmap_{k}_val_entropy_norm_step300.png" for k in KINDS),
    }
    for p in printed:
        _check_png(p)


def test_main_with_csv_path_and_out(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "elsewhere"
    rc = main([str(run_dir / CSV_NAME), "--out", str(out_dir), "--steps", "100", "500"])
    out, _ = capsys.readouterr()
    assert rc == 0
    assert len(out.splitlines()) == 3 * 3
    assert all(Path(line).parent == out_dir and Path(line).is_file() for line in out.splitlines())


def test_main_unknown_step(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(run_dir), "--steps", "100", "123"]) == 2
    _one_line_error(capsys, "123", "available steps: 100, 300, 500")
    assert not (run_dir / "plots").exists()  # nothing written on error


def test_main_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "missing.csv")]) == 2
    _one_line_error(capsys, "missing.csv")
    empty_run = tmp_path / "run_without_csv"
    empty_run.mkdir()
    assert main([str(empty_run)]) == 2
    _one_line_error(capsys, str(empty_run), CSV_NAME)


def test_main_bad_column(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / CSV_NAME
    p.write_text("step,split,kind,layer,head,entropie,entropy_norm\n1,train,cross,0,0,1.0,0.5\n")
    assert main([str(tmp_path)]) == 2
    _one_line_error(capsys, str(p), "entropy")


def test_main_non_numeric_value(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = _write_csv(tmp_path / CSV_NAME)
    lines = p.read_text().splitlines()
    lines[7] = lines[7].rsplit(",", 2)[0] + ",oops,0.1"
    p.write_text("\n".join(lines) + "\n")
    assert main([str(p)]) == 2
    _one_line_error(capsys, str(p), "line 8", "'oops'")


def test_main_unknown_split_and_argparse_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / CSV_NAME
    p.write_text("step,split,kind,layer,head,entropy,entropy_norm\n1,train,cross,0,0,1.0,0.5\n")
    assert main([str(p), "--split", "val"]) == 2
    _one_line_error(capsys, "'val'", "available splits: train")
    assert main([str(p), "--value", "bogus"]) == 2  # argparse usage error, not a traceback
    capsys.readouterr()
    assert main(["--help"]) == 0
    assert "mha-plot" in capsys.readouterr().out


@pytest.mark.parametrize("module", [plots, record], ids=["plots", "record"])
def test_module_does_not_import_pyplot(module) -> None:
    """No pyplot: its global figure registry and backend selection must stay untouched."""
    import ast

    tree = ast.parse(Path(module.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
            imported.update(f"{node.module}.{a.name}" for a in node.names)
    assert not any("pyplot" in name for name in imported), imported
    if module is record:  # the record is data only: rendering lives in plots
        assert not any("matplotlib" in name for name in imported), imported


def test_a_run_with_importance_gets_its_heads_over_training_figure(run_dir: Path, tmp_path: Path) -> None:
    """With head_importance.csv beside the record, the val plots add one figure of entropy and importance
    over training; the importance written is the importance read back."""
    from mha_lightning.monitor.importance import append_importance

    steps = load_entropy_csv(run_dir / CSV_NAME).steps("val")
    tables = {
        s: {k: np.arange(LAYERS * HEADS, dtype=float).reshape(LAYERS, HEADS) / (1 + s) for k in KINDS} for s in steps
    }
    for s, values in tables.items():
        append_importance(record.importance_path(run_dir), "val", s, values)
    read = record.load_importance(record.importance_path(run_dir))
    assert set(read) == {("val", k) for k in KINDS}
    for s, values in tables.items():
        np.testing.assert_allclose(read[("val", "cross")][s], values["cross"], rtol=1e-5)
    out = tmp_path / "plots"
    paths = render_all(run_dir / CSV_NAME, out, split="val", value="entropy_norm")
    assert out / "over_training_val.png" in paths
    _check_png(out / "over_training_val.png", min_w=600, min_h=500)
    assert not any("over_training" in p.name for p in render_all(run_dir / CSV_NAME, tmp_path / "train"))

"""Read back a real offline wandb run with the test helper helpers.wandb_offline (no mocks)."""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest

wandb = pytest.importorskip("wandb")

from helpers.wandb_offline import (  # noqa: E402
    find_run_files,
    read_history,
    read_records,
    read_run_info,
    read_summary,
)
from mha_lightning.errors import DataError  # noqa: E402

BLOCK = 32768
SMALL_STEPS = (0, 10, 20)
BIG_ROWS, BIG_KEYS, BIG_FIRST_STEP = 300, 20, 100
IMAGE_STEP = 500
NESTED_STEP = 501


def _big_row(i: int) -> dict[str, float]:
    return {f"big/k{j:02d}": i * 100 + j + 0.5 for j in range(BIG_KEYS)}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Write one offline run into a fresh directory and return that directory."""
    root = tmp_path_factory.mktemp("wandb_offline")
    with pytest.MonkeyPatch.context() as mp:
        for name, sub in [
            ("WANDB_DIR", ""),
            ("WANDB_CONFIG_DIR", "config"),
            ("WANDB_CACHE_DIR", "cache"),
            ("WANDB_DATA_DIR", "data"),
            ("WANDB_ARTIFACT_DIR", "artifacts"),
        ]:
            (root / sub).mkdir(exist_ok=True)
            mp.setenv(name, str(root / sub))
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        mp.setenv("WANDB_CONSOLE", "off")
        mp.delenv("WANDB_SERVICE", raising=False)  # restored after; wandb sets it for children
        for name in ("PROJECT", "ENTITY", "RUN_GROUP", "TAGS", "NAME", "RUN_ID", "RESUME"):
            mp.delenv(f"WANDB_{name}", raising=False)
        try:
            run = wandb.init(
                mode="offline",
                dir=str(root),
                project="p",
                name="n",
                group="g",
                tags=["a"],
                config={"lr": 0.1, "model": {"d": 4}},
            )
            try:
                for step in SMALL_STEPS:
                    run.log({"train/loss": 1.0 / (step + 1), "train/acc": step / 40}, step=step)
                for i in range(BIG_ROWS):  # ~290 KiB: many records cross 32 KiB blocks
                    run.log(_big_row(i), step=BIG_FIRST_STEP + i)
                image = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
                run.log({"val/sample": wandb.Image(image)}, step=IMAGE_STEP)
                last = {"note": "done", "cfg": {"a": 1, "b": [1, 2]}, "bad": float("nan")}
                run.log(last, step=NESTED_STEP)
            finally:
                wandb.finish()
        finally:
            wandb.teardown()
    return root


@pytest.fixture(scope="module")
def run_file(run_dir: Path) -> Path:
    files = find_run_files(run_dir)
    assert len(files) == 1, files  # the wandb/latest-run symlink is not counted twice
    return files[0]


def test_find_run_files(run_dir: Path, run_file: Path) -> None:
    assert run_file.parent.name.startswith("offline-run-")
    assert re.fullmatch(r"run-\w+\.wandb", run_file.name)
    assert run_file.parent.parent == run_dir / "wandb"
    assert find_run_files(run_dir / "config") == []


def test_file_spans_several_blocks(run_file: Path) -> None:
    assert run_file.stat().st_size > 3 * BLOCK
    kinds = [r.WhichOneof("record_type") for r in read_records(run_file)]
    assert kinds[0] == "header"
    assert kinds[-1] == "exit"
    assert kinds.count("history") == len(SMALL_STEPS) + BIG_ROWS + 2


def test_history_values_and_steps(run_file: Path) -> None:
    rows = read_history(run_file)
    big_steps = range(BIG_FIRST_STEP, BIG_FIRST_STEP + BIG_ROWS)
    assert [row["_step"] for row in rows] == [*SMALL_STEPS, *big_steps, IMAGE_STEP, NESTED_STEP]
    for row in rows:
        assert isinstance(row["_timestamp"], float)
        assert isinstance(row["_runtime"], (int, float))

    def user(row: dict) -> dict:
        return {k: v for k, v in row.items() if not k.startswith("_")}

    for row, step in zip(rows, SMALL_STEPS, strict=False):
        assert user(row) == {"train/loss": 1.0 / (step + 1), "train/acc": step / 40}
    big = rows[len(SMALL_STEPS) : len(SMALL_STEPS) + BIG_ROWS]
    for i, row in enumerate(big):
        assert user(row) == _big_row(i)

    image = rows[-2]["val/sample"]
    assert user(rows[-2]) == {"val/sample": image}
    assert image["_type"] == "image-file"
    assert (image["width"], image["height"], image["format"]) == (4, 4, "png")
    assert image["path"].startswith("media/images/") and image["path"].endswith(".png")
    assert (run_file.parent / "files" / image["path"]).is_file()

    last = user(rows[-1])
    assert math.isnan(last.pop("bad"))
    assert last == {"note": "done", "cfg": {"a": 1, "b": [1, 2]}}


def test_run_info(run_file: Path) -> None:
    info = read_run_info(run_file)
    assert (info["project"], info["name"], info["group"], info["tags"]) == ("p", "n", "g", ["a"])
    assert info["config"] == {"lr": 0.1, "model": {"d": 4}}
    assert run_file.name == f"run-{info['id']}.wandb"


def test_summary(run_file: Path) -> None:
    summary = read_summary(run_file)
    assert summary["_step"] == NESTED_STEP
    assert summary["train/loss"] == 1.0 / (SMALL_STEPS[-1] + 1)
    assert summary["big/k19"] == _big_row(BIG_ROWS - 1)["big/k19"]
    assert summary["val/sample"]["_type"] == "image-file"
    assert summary["cfg"] == {"a": 1, "b": [1, 2]}
    assert "_wandb" not in summary


def test_truncated_file_reads_a_prefix(run_file: Path, tmp_path: Path) -> None:
    """A run still being written ends mid-record: reading stops quietly at the last whole one."""
    full = read_history(run_file)
    data = run_file.read_bytes()
    cut_file = tmp_path / run_file.name
    for cut in (7, 100, BLOCK - 3, BLOCK + 5, 2 * BLOCK + 1000, len(data) // 2, len(data) - 1):
        cut_file.write_bytes(data[:cut])
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            rows = read_history(cut_file)
        assert rows == full[: len(rows)], cut
    assert 0 < len(rows) <= len(full)


def test_corrupt_record_warns_and_stops(run_file: Path, tmp_path: Path) -> None:
    data = bytearray(run_file.read_bytes())
    data[BLOCK + 100] ^= 0xFF
    bad = tmp_path / run_file.name
    bad.write_bytes(bytes(data))
    with pytest.warns(RuntimeWarning, match=re.escape(str(bad))):
        rows = read_history(bad)
    full = read_history(run_file)
    assert 0 < len(rows) < len(full)
    assert rows == full[: len(rows)]


@pytest.mark.parametrize("content", [b"", b":W&", b"hello, this is not a wandb file\n" * 10])
def test_not_a_run_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "run-fake.wandb"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(str(path))) as excinfo:
        read_records(path)  # raised at call time, before iterating
    assert isinstance(excinfo.value, DataError)
    assert "\n" not in str(excinfo.value)
    for reader in (read_history, read_run_info, read_summary):
        with pytest.raises(ValueError, match=re.escape(str(path))):
            reader(path)

"""resume=auto after a kill -9: the newest complete checkpoint, the same W&B run, no duplicate entropy rows,
and the same losses as a run that was never interrupted."""

from __future__ import annotations

import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

from helpers.runs import csv_train_rows, start_mha_train
from helpers.wandb_offline import find_run_files, read_run_info
from mha_lightning.checkpoints import newest_complete
from mha_lightning.errors import DataError
from mha_lightning.monitor.record import load_entropy_csv, record_path

COMMON = [
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "logger=[csv,wandb]",
    "trainer.log_every_n_steps=1",
    "monitor.every_n_steps=5",
    "monitor.render_plots=false",
    "data.num_val=16",
    "data.num_test=16",
    "trainer.val_check_interval=20",
    "test=false",
    "model.dropout=0.1",
]


def mha_train(run_dir: Path, *overrides: str) -> subprocess.Popen:
    return start_mha_train(run_dir, *COMMON, *overrides)


def finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]


def _logged_after_a_checkpoint(run: Path) -> bool:
    """Whether the run has a complete checkpoint and entropy rows of a step after it."""
    info, _ = newest_complete(run / "checkpoints")
    if info is None or not record_path(run).exists():
        return False
    try:
        table = load_entropy_csv(record_path(run))
    except DataError:  # not written yet
        return False
    steps = table.step[table.split == "train"]
    return len(steps) > 0 and int(steps.max()) > info.global_step


def test_resume_auto_after_kill_9_continues_exactly_in_the_same_wandb_run(tmp_path):
    run = tmp_path / "run"
    # Nothing to resume yet: resume=auto starts fresh. Killed once the first checkpoint (step 20) exists
    # and entropy rows of a later step were logged after it: the next checkpoint is 15 steps away.
    proc = mha_train(run, "resume=auto", "trainer.max_steps=100000")
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not _logged_after_a_checkpoint(run):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    # What resume=auto picks: the newest complete checkpoint.
    info, _ = newest_complete(run / "checkpoints")
    resumed_at = info.global_step
    assert resumed_at >= 20 and resumed_at % 20 == 0
    before = load_entropy_csv(record_path(run))
    assert int(before.step[before.split == "train"].max()) >= resumed_at  # rows the resume must not repeat

    end = resumed_at + 10
    finish(mha_train(run, "resume=auto", f"trainer.max_steps={end}"))
    finish(mha_train(tmp_path / "reference", f"trainer.max_steps={end}"))

    full, after = csv_train_rows(tmp_path / "reference"), csv_train_rows(run, version=1)
    assert sorted(after) == list(range(resumed_at, end))
    for s in range(resumed_at, end):
        assert after[s] == full[s], f"step {s}: resumed {after[s]} != uninterrupted {full[s]}"

    table = load_entropy_csv(record_path(run))
    keys = Counter(zip(table.step, table.split, table.kind, table.layer, table.head, strict=True))
    assert max(keys.values()) == 1, "an entropy row was logged twice"
    assert sorted({int(s) for s in table.step[table.split == "train"]}) == list(range(0, end, 5))

    ids = {read_run_info(f)["id"] for f in find_run_files(run / "wandb")}
    assert len(find_run_files(run / "wandb")) == 2 and len(ids) == 1, ids  # one W&B run, continued

"""A hung (not dead) rank: the other one gives up after parallel.timeout_minutes, names it, and the job ends."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from helpers.config import QUIET
from helpers.runs import start_mha_train
from mha_lightning.heartbeat import HEARTBEAT_DIR, beat_path


def wait_for_step(beat: Path, step: int, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            record = json.loads(beat.read_text())
            if record["step"] >= step:
                return record
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"{beat} never reached step {step}")


def process_state(pid: int) -> str | None:
    """'T (stopped)', 'Z (zombie)', ... or None once the process is gone."""
    try:
        return Path(f"/proc/{pid}/status").read_text().splitlines()[2].split(":", 1)[1].strip()
    except (FileNotFoundError, IndexError):
        return None


def ended(pid: int) -> bool:
    state = process_state(pid)
    return state is None or state.startswith("Z")


def test_hung_rank_ends_the_job_within_the_timeout_naming_it(tmp_path):
    run = tmp_path / "run"
    proc = start_mha_train(
        run,
        *QUIET,
        "trainer.devices=2",
        "parallel.tensor_parallel_size=2",
        "parallel.timeout_minutes=0.5",
        "trainer.max_steps=100000",
        "logger=none",
        "data.num_val=16",
        "test=false",
    )
    worker = wait_for_step(beat_path(run / HEARTBEAT_DIR, 1), 3)["pid"]
    os.kill(worker, signal.SIGSTOP)  # rank 1 stops answering without dying
    try:
        _, err = proc.communicate(timeout=150)  # torch's default would wait 30 minutes
    finally:
        if process_state(worker) is not None:
            os.kill(worker, signal.SIGKILL)
    assert proc.returncode == 4, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert line.startswith("error: rank 0 waited in a collective that failed at step"), line
    assert f"rank 1 (pid {worker} on " in line and "parallel.timeout_minutes=0.5" in line, line
    # Rank 0 ended its worker: no process is left stopped (or waiting) after the job.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not ended(worker):
        time.sleep(0.1)
    assert ended(worker), process_state(worker)

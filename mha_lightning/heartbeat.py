"""Which rank stopped answering: every rank notes its progress in a small file of the run directory.

A collective that times out (``parallel.timeout_minutes``) tells the waiting rank only that it
waited; the error names no peer. Each rank therefore writes ``<run dir>/.ranks/rank-<N>.json``
(step, stage, time, host, pid) at the start of every training and validation batch, and the
rank whose collective failed reads them all to name the rank that fell silent first
(docs/design.md, "Faults"). A write is one small file, at most once a second per rank unless the
stage changes (a shared filesystem serving many ranks is not flooded); readers tolerate a torn one.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import lightning as L
from typing_extensions import override

HEARTBEAT_DIR = ".ranks"


def beat_path(folder: Path, rank: int) -> Path:
    """The file rank ``rank`` writes its progress to."""
    return folder / f"rank-{rank}.json"


class Heartbeat(L.Callback):
    """Write this rank's progress (step, stage, time) at every training and validation batch."""

    def __init__(self, output_dir: str | Path, every_seconds: float = 1.0) -> None:
        self.folder = Path(output_dir) / HEARTBEAT_DIR
        self.every_seconds = every_seconds
        self._last: tuple[str, float] = ("", 0.0)
        self._process = {"host": socket.gethostname(), "pid": os.getpid()}

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.beat(trainer, "setup")

    @override
    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self.beat(trainer, "train")

    @override
    def on_validation_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self.beat(trainer, "validation")

    def beat(self, trainer: L.Trainer, stage: str) -> None:
        """Record that this rank reached ``stage`` at the current step, now (throttled)."""
        now = time.time()
        if stage == self._last[0] and now - self._last[1] < self.every_seconds:
            return
        self._last = (stage, now)
        record = {
            "step": trainer.global_step,
            "stage": stage,
            "time": now,
            **self._process,
        }
        try:
            beat_path(self.folder, trainer.global_rank).write_text(json.dumps(record))
        except OSError:
            pass  # a full disk must not stop training over a progress note


def read_beats(folder: Path, world_size: int) -> dict[int, dict[str, Any]]:
    """rank -> its last progress record, for the ranks whose file reads whole."""
    beats = {}
    for rank in range(world_size):
        try:
            beats[rank] = json.loads(beat_path(folder, rank).read_text())
        except (OSError, ValueError):
            continue
    return beats


def silent_ranks(folder: Path, world_size: int, me: int) -> str:
    """One phrase naming the rank(s) that fell silent first, e.g. "rank 1 (pid 7 on node3) last
    reported 41 s ago, at step 12 (train)"; a fallback when no progress files can be read."""
    beats = read_beats(folder, world_size)
    others = {r: b for r, b in beats.items() if r != me}
    missing = sorted(set(range(world_size)) - set(beats) - {me})
    if missing:
        return f"rank {', '.join(map(str, missing))} never reported progress (in {folder})"
    if not others:
        return f"no other rank's progress could be read (in {folder})"
    oldest = min(b["time"] for b in others.values())
    now = time.time()
    stalled = [r for r, b in sorted(others.items()) if b["time"] - oldest < 1.0]
    parts = [
        f"rank {r} (pid {others[r]['pid']} on {others[r]['host']}) last reported {now - others[r]['time']:.0f} s ago, "
        f"at step {others[r]['step']} ({others[r]['stage']})"
        for r in stalled
    ]
    return "; ".join(parts)

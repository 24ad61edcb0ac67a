"""Real kill -9 at random moments of back-to-back sharded saves: a resumable checkpoint is always left.

A process of its own (killed for real), so it lives with the suite's other subprocess tests."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from mha_lightning.checkpoints import newest_complete

KILL_LOOP = """
import sys
from pathlib import Path
sys.path.insert(0, {helpers!r})
from sharded import write_sharded
from mha_lightning.checkpoints import newest_complete

folder = Path(sys.argv[1])
info, _ = newest_complete(folder)
step = info.global_step if info else 0
while True:
    step += 1
    write_sharded(folder / "last.ckpt", step, numel=1 << 22)  # 16 MiB per save: most time is spent writing
    print(step, flush=True)
"""


def test_kill_9_at_any_moment_of_a_sharded_save_leaves_a_resumable_checkpoint(tmp_path):
    """Real kills at random moments of back-to-back saves ($TMPDIR elsewhere: the saves never use it)."""
    script = tmp_path / "saver.py"
    script.write_text(KILL_LOOP.format(helpers=str(Path(__file__).resolve().parents[1] / "helpers")))
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    env = {**os.environ, "TMPDIR": "/dev/shm" if Path("/dev/shm").is_dir() else str(tmp_path)}
    rng = random.Random(0)
    published = 0
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, str(script), str(folder)], stdout=subprocess.PIPE, text=True, env=env)
        published = int(proc.stdout.readline())  # at least one save of this process is complete
        time.sleep(rng.uniform(0.0, 0.5))
        proc.kill()
        proc.wait(timeout=30)
        info, skipped = newest_complete(folder)
        assert info is not None and info.global_step >= published, (published, skipped)
        loaded = {"state_dict": {"model.w": torch.zeros(1 << 22), "model.b": torch.zeros(8)}}
        dcp.load(loaded, checkpoint_id=info.path, no_dist=True)
        assert bool((loaded["state_dict"]["model.w"] == info.global_step).all()), "shards of different saves"

"""Resuming at another layout: a checkpoint written at (dp, tp) continues at another one, keeping the
optimizer state, step, schedule and data position, through the real CLI (resume=auto).

Every path starts from one run stopped at step STOP (its last checkpoint) and resumes it at the new
layout to STEPS; the losses and learning rates of the resumed steps must equal an uninterrupted run at
the new layout from step 0. The global batch is the same at every layout (data.batch_size x dp), so
all runs see the same batches; dropout is 0, so no random stream enters the numbers."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.config import QUIET
from helpers.runs import cli_env, csv_train_rows

GLOBAL_BATCH = 8
STOP, STEPS = 6, 12
COMMON = [
    "logger=csv",
    "monitor.enabled=false",
    "test=false",
    "data.num_val=16",
    "data.num_test=16",
    "trainer.log_every_n_steps=1",
    f"trainer.val_check_interval={STOP}",
    "module.scheduler.warmup_steps=4",  # the learning rate moves at every step: a schedule restored wrong shows
]


def run(run_dir: Path, layout: tuple[int, int], steps: int, *extra: str) -> subprocess.CompletedProcess:
    dp, tp = layout
    overrides = [*QUIET, *COMMON, f"parallel.tensor_parallel_size={tp}", f"trainer.devices={dp * tp}"]
    overrides += [f"trainer.max_steps={steps}"]
    overrides += [f"data.batch_size={GLOBAL_BATCH // dp}", *extra, f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(
        [sys.executable, "-m", "mha_lightning.train", *overrides],
        cwd=run_dir.parent,
        env=cli_env(run_dir.parent),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> dict[tuple[int, int], Path]:
    """A run at (1, 2) and one at (1, 1), each stopped at step STOP with its checkpoint."""
    root = tmp_path_factory.mktemp("stopped")
    runs = {}
    for layout in ((1, 2), (1, 1)):
        runs[layout] = root / f"dp{layout[0]}tp{layout[1]}"
        run(runs[layout], layout, STOP)
    return runs


@pytest.mark.slow
@pytest.mark.parametrize(
    "written, resumed",
    [((1, 2), (1, 1)), ((1, 1), (1, 2)), ((1, 2), (2, 1)), ((1, 2), (2, 2))],
    ids=lambda layout: f"dp{layout[0]}tp{layout[1]}",
)
def test_a_checkpoint_resumes_at_another_layout_like_an_uninterrupted_run(stopped, tmp_path, written, resumed):
    folder = tmp_path / "resumed"
    shutil.copytree(stopped[written], folder)
    proc = run(folder, resumed, STEPS, "resume=auto")
    log = proc.stdout + proc.stderr
    (w_dp, w_tp), (r_dp, r_tp) = written, resumed
    said = f"written at (dp={w_dp}, tp={w_tp}), at (dp={r_dp}, tp={r_tp}): weights and optimizer state are resharded"
    assert said in log
    assert "Restored all states from the checkpoint" in log
    uninterrupted = tmp_path / "uninterrupted"
    run(uninterrupted, resumed, STEPS)
    got, want = csv_train_rows(folder, version=1), csv_train_rows(uninterrupted)
    assert sorted(got) == list(range(STOP, STEPS)), "the resumed run continues at the saved step"
    for step in range(STOP, STEPS):
        (loss, lr), (want_loss, want_lr) = got[step], want[step]
        assert lr == pytest.approx(want_lr, rel=1e-6), f"step {step}: learning rate {lr} vs {want_lr}"
        assert loss == pytest.approx(want_loss, rel=1e-4), f"step {step}: loss {loss} vs uninterrupted {want_loss}"
    assert want[STEPS - 1][0] < want[0][0]  # it trained

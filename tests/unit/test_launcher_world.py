"""preflight against the processes an external launcher started: torchrun's LOCAL_WORLD_SIZE and WORLD_SIZE.

The variables are set here exactly as torchrun sets them in each worker; the two-node run itself is
tests/cli/test_two_node.py."""

from __future__ import annotations

import pytest

from mha_lightning.config import preflight
from mha_lightning.errors import ConfigError, report

TWO_NODES = ["trainer.num_nodes=2", "trainer.devices=2", "parallel.tensor_parallel_size=2"]


def torchrun_env(monkeypatch, nnodes: int, nproc_per_node: int, rank: int = 0) -> None:
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(nproc_per_node))
    monkeypatch.setenv("WORLD_SIZE", str(nnodes * nproc_per_node))
    monkeypatch.setenv("RANK", str(rank))


def test_a_matching_two_node_layout_passes(make_cfg, monkeypatch):
    torchrun_env(monkeypatch, nnodes=2, nproc_per_node=2)
    plan = preflight(make_cfg(*TWO_NODES))
    assert (plan.data_parallel_size, plan.tensor_parallel_size) == (2, 2)


@pytest.mark.parametrize(
    "overrides, needles",
    [
        # The silent case: each of the 4 processes would train a whole single-device job into one folder.
        (["trainer.devices=1"], ["trainer.devices (1)", "--nproc-per-node 2", "trainer.devices=2"]),
        # Forgot trainer.num_nodes: dp x tp = 2 passes the layout check, the launcher started 4.
        (
            ["trainer.devices=2", "parallel.tensor_parallel_size=2"],
            ["trainer.num_nodes (1)", "= 2", "world size (4 processes)", "(2 with 2 processes each)"],
        ),
    ],
    ids=["devices_not_nproc_per_node", "num_nodes_missing"],
)
def test_a_layout_that_does_not_match_torchrun_is_one_line(make_cfg, monkeypatch, capsys, overrides, needles):
    torchrun_env(monkeypatch, nnodes=2, nproc_per_node=2)
    with pytest.raises(ConfigError) as info:
        preflight(make_cfg(*overrides))
    message = str(info.value)
    assert all(needle in message for needle in needles), message
    # Every rank finds the same mistake: rank 0 prints it once, the others stay quiet, all exit 2.
    assert report(info.value, 0) == 2 and report(info.value, 3) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: trainer.devices"), line


def test_without_a_launcher_nothing_is_checked(make_cfg, monkeypatch):
    for var in ("LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert preflight(make_cfg(*TWO_NODES)).world_size == 4


def _threads_in_a_fresh_process(processes: int, **env: str) -> tuple[str, str, int]:
    """``distributed.launch.share_cpu_cores(processes)`` in a new interpreter (it sets process-wide state)
    -> (what it returned, OMP_NUM_THREADS after it, torch's threads after it)."""
    import os
    import subprocess
    import sys

    code = (
        "import os, torch; from mha_lightning.distributed.launch import share_cpu_cores; "
        f"r = share_cpu_cores({processes}); "
        "print(r, os.environ.get('OMP_NUM_THREADS'), torch.get_num_threads())"
    )
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK")}
    done = subprocess.run(
        [sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True, timeout=120, check=True
    )
    returned, omp, threads = done.stdout.split()
    return returned, omp, int(threads)


def test_ranks_of_one_node_share_its_cores_unless_told_otherwise():
    import os

    cores = len(os.sched_getaffinity(0))
    share = max(1, cores // 2)
    # Two ranks on this node: half the cores each, for this process and the ones it starts.
    assert _threads_in_a_fresh_process(2) == (str(share), str(share), share)
    # One process keeps torch's default; OMP_NUM_THREADS set by the user (or torchrun) wins.
    returned, omp, _ = _threads_in_a_fresh_process(1)
    assert (returned, omp) == ("None", "None")
    assert _threads_in_a_fresh_process(2, OMP_NUM_THREADS="3")[:2] == ("None", "3")
    # Under SLURM, each task gets the CPUs it asked for.
    assert _threads_in_a_fresh_process(4, SLURM_CPUS_PER_TASK="1") == ("1", "1", 1)

"""How ranks of one node share its CPU cores: ``distributed.launch.share_cpu_cores`` sets process-wide
state, so each case runs in an interpreter of its own."""

from __future__ import annotations


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

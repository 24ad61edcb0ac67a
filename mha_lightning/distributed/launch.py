"""Starting processes on this machine: one launcher for ``mha-analyze``, the benchmarks and the tests.

:func:`run_local` spawns ``dp * tp`` processes (the ``spawn`` start method), gives each a process
group (NCCL with one GPU per process where there are enough GPUs, gloo otherwise) and a 2-D
:class:`~torch.distributed.device_mesh.DeviceMesh` named like Lightning's (``layout.MESH_DIM_NAMES``),
calls ``fn(mesh, *args)`` and hands every rank's return value back to the caller, by rank. Training
itself is started by Lightning's launcher, torchrun or SLURM; :func:`share_cpu_cores` is the thread
policy all of them follow.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from mha_lightning.distributed.layout import MESH_DIM_NAMES


def free_port() -> int:
    """A localhost TCP port that was free a moment ago (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def share_cpu_cores(processes_per_node: int) -> int | None:
    """Give each of this node's ``processes_per_node`` processes an equal share of its CPU cores for
    torch's threads -> the threads per process, or None where nothing was changed.

    torch's default is every core in every process; its OpenMP threads then wait for each other at
    every parallel op, and N ranks on N cores run much slower (docs/design.md, "CPU threads per
    process"). Sets this process's threads and ``OMP_NUM_THREADS`` for the processes it starts (Lightning's
    launcher, ``mp.spawn``), as torchrun does. An ``OMP_NUM_THREADS`` already set (by the user, torchrun
    or a parent process) wins; under SLURM each task gets its ``SLURM_CPUS_PER_TASK``."""
    if processes_per_node <= 1 or "OMP_NUM_THREADS" in os.environ:
        return None
    if "SLURM_CPUS_PER_TASK" in os.environ:
        threads = int(os.environ["SLURM_CPUS_PER_TASK"])
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, cores // processes_per_node)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    return threads


def default_backend(world_size: int) -> str:
    """NCCL when this machine has a GPU for every process, gloo otherwise (CPU)."""
    return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= world_size else "gloo"


@contextlib.contextmanager
def _environ(**values: str):
    # Spawned children copy os.environ when they start; restore the parent's afterwards.
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _worker(
    rank: int,
    fn: Callable[..., Any],
    mesh_shape: tuple[int, int],
    port: int,
    out_dir: str,
    args: Sequence[Any],
    backend: str,
    threads: int | None,
) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    world_size = mesh_shape[0] * mesh_shape[1]
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size)
    )
    if threads is not None:
        torch.set_num_threads(threads)
    device_type = "cuda" if backend == "nccl" else "cpu"
    if device_type == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world_size)
    try:
        mesh = init_device_mesh(device_type, mesh_shape, mesh_dim_names=MESH_DIM_NAMES)
        result = fn(mesh, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_local(
    fn: Callable[..., Any],
    mesh_shape: tuple[int, int],
    *args: Any,
    backend: str | None = None,
    threads: int | None = None,
    timeout: float | None = None,
    out_dir: str | Path | None = None,
) -> list[Any]:
    """Run ``fn(mesh, *args)`` on a (dp, tp) mesh of dp * tp spawned local processes -> results by rank.

    ``fn`` must be importable by the children (a module-level function). ``backend``: default
    :func:`default_backend`. ``threads``: torch threads per process (default: this machine's cores
    shared out, :func:`share_cpu_cores`). A worker that raises makes the call raise with its
    traceback (the others are stopped); a world still running after ``timeout`` seconds is killed
    (``TimeoutError``). Results travel through ``torch.save`` files in ``out_dir`` (default: a
    temporary folder), written by this call's own children and read back whole."""
    import torch.multiprocessing as mp

    world_size = mesh_shape[0] * mesh_shape[1]
    backend = backend or default_backend(world_size)
    if threads is None and backend == "gloo" and "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, cores // world_size)
    with contextlib.ExitStack() as stack:
        folder = Path(out_dir) if out_dir is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        folder.mkdir(parents=True, exist_ok=True)
        omp = {"OMP_NUM_THREADS": str(threads)} if threads is not None else {}
        with _environ(**omp):
            context = mp.start_processes(
                _worker,
                args=(fn, tuple(mesh_shape), free_port(), str(folder), tuple(args), backend, threads),
                nprocs=world_size,
                join=False,
                start_method="spawn",
            )
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            # join() raises (with the worker's traceback) as soon as one worker fails, and then
            # terminates the others itself.
            while True:
                wait = 5.0 if deadline is None else max(0.1, min(5.0, deadline - time.monotonic()))
                if context.join(timeout=wait):
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"{world_size}-process world {mesh_shape} did not finish within {timeout:.0f}s")
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                    process.join(5)
        # Written by the children of this call into its own folder: trusted, loaded whole.
        return [torch.load(folder / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]

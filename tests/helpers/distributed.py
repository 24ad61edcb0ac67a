"""A small gloo world for tests: spawn N processes, give each a 2-D device mesh, collect results.

``run_distributed(fn, (dp, tp), tmp_dir, *args)`` starts dp * tp processes with the ``spawn``
start method, and in each one initialises a gloo process group on a free localhost port and a
CPU ``DeviceMesh`` with dims ("data_parallel", "tensor_parallel"), then calls
``fn(mesh, *args)``. Whatever ``fn`` returns (tensors, dicts, strings) is saved with
``torch.save`` to ``tmp_dir/rank<r>.pt`` and handed back to the caller as a list by rank, so
the assertions run in the pytest process and report there.

``fn`` must be importable by the children: a module-level function of the package, of
``helpers``, or of a test module (e.g. ``test_parallel.tp_worker``: pytest put the test's folder,
and the ``pythonpath`` ini option tests/, on sys.path, and spawn hands sys.path to the children,
which import it by that name). A worker that raises makes the whole call raise with that
worker's traceback; a world that does not finish in ``timeout`` seconds is killed and raises
``TimeoutError``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

MESH_DIM_NAMES = ("data_parallel", "tensor_parallel")


def free_port() -> int:
    """A localhost TCP port that was free a moment ago (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
) -> None:
    world_size = mesh_shape[0] * mesh_shape[1]
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    # Two cores, up to four ranks: one intra-op thread each, or they fight over the cores.
    torch.set_num_threads(1)
    dist.init_process_group(backend, rank=rank, world_size=world_size)
    try:
        device = "cuda" if backend == "nccl" else "cpu"
        mesh = init_device_mesh(device, mesh_shape, mesh_dim_names=MESH_DIM_NAMES)
        result = fn(mesh, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_distributed(
    fn: Callable[..., Any],
    mesh_shape: tuple[int, int],
    tmp_dir: Path | str,
    *args: Any,
    timeout: float = 180.0,
    backend: str = "gloo",
) -> list[Any]:
    """Run ``fn(mesh, *args)`` on a (dp, tp) mesh of dp * tp spawned processes -> results by rank."""
    out_dir = Path(tmp_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    world_size = mesh_shape[0] * mesh_shape[1]
    port = free_port()
    with _environ(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"):
        context = mp.start_processes(
            _worker,
            args=(fn, tuple(mesh_shape), port, str(out_dir), tuple(args), backend),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
    deadline = time.monotonic() + timeout
    try:
        # join() raises (with the worker's traceback) as soon as one worker fails, and then
        # terminates the others itself.
        while not context.join(timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world_size}-process world {mesh_shape} did not finish within {timeout:.0f}s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join(5)
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]


def mesh_ranks(mesh: DeviceMesh) -> tuple[int, int]:
    """(dp_rank, tp_rank) of this process on a mesh built by ``run_distributed``."""
    return mesh["data_parallel"].get_local_rank(), mesh["tensor_parallel"].get_local_rank()

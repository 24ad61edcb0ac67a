"""A small gloo world for tests: the package's own local launcher (``distributed.launch.run_local``)
with the tests' settings: gloo, one torch thread per rank, a timeout.

``run_distributed(fn, (dp, tp), tmp_dir, *args)`` starts dp * tp processes, gives each a 2-D CPU
``DeviceMesh`` ("data_parallel", "tensor_parallel") and calls ``fn(mesh, *args)``; whatever ``fn``
returns comes back as a list by rank, so the assertions run in the pytest process and report there.

``fn`` must be importable by the children: a module-level function of the package, of
``helpers``, or of a test module (e.g. ``test_parallel.tp_worker``: pytest put the test's folder,
and the ``pythonpath`` ini option tests/, on sys.path, and spawn hands sys.path to the children,
which import it by that name). A worker that raises makes the whole call raise with that
worker's traceback; a world that does not finish in ``timeout`` seconds is killed and raises
``TimeoutError``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.distributed.device_mesh import DeviceMesh

from mha_lightning.distributed import ranks_of
from mha_lightning.distributed.launch import free_port, run_local

__all__ = ["free_port", "mesh_ranks", "run_distributed"]


def run_distributed(
    fn: Callable[..., Any], mesh_shape: tuple[int, int], tmp_dir: Path | str, *args: Any, timeout: float = 180.0
) -> list[Any]:
    """Run ``fn(mesh, *args)`` on a (dp, tp) mesh of dp * tp gloo processes -> results by rank."""
    # Two cores, up to four ranks: one intra-op thread each, or they fight over the cores.
    return run_local(fn, mesh_shape, *args, backend="gloo", threads=1, timeout=timeout, out_dir=tmp_dir)


def mesh_ranks(mesh: DeviceMesh) -> tuple[int, int]:
    """(dp_rank, tp_rank) of this process on a mesh built by ``run_distributed``."""
    ranks = ranks_of(mesh)
    return ranks.dp_rank, ranks.tp_rank

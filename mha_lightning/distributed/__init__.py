"""Everything distributed, in one place (docs/design.md, "What changes when tp=2"):

- ``layout``: the ``parallel`` config (sizes, techniques, their checks) and the mesh's dimension names;
- ``plan``: the tensor-parallel plan, one dict per block;
- ``parallelize``: one function per technique, applied in a fixed order by :func:`parallelize`;
- ``collectives``: the small collectives and gradient norms across meshes;
- ``launch``: local process worlds (analysis, benchmarks, tests) and the CPU-thread policy.

Model code never imports this package; this package shards the model's modules in place.
"""

from mha_lightning.distributed.layout import DP, MESH_DIM_NAMES, TP, ParallelConfig, Ranks, head_layout, ranks_of

__all__ = ["DP", "MESH_DIM_NAMES", "TP", "ParallelConfig", "Ranks", "head_layout", "ranks_of"]
